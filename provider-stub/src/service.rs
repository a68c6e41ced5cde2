//! The provider pipeline without Pingora: a request is (headers, body bytes) and the answer is a
//! [`Reply`]. Gateway → idempotency → START (durable) → decision → commit → signed receipt.
//!
//! Headers read on ingest:
//! - `x-request-id` (required, DESIGN §3 grammar), `x-hub-request-repr`, `x-hub-binding`
//!   (required, recomputed from the received bytes and `x-hub-context`; mismatch = `tampered`);
//! - `x-delegation-id` (optional): the delegation the caller acts under; absent = `anonymous`;
//! - `Idempotency-Key` (optional): else `x-request-id` is the key;
//! - `x-hub-outcome-url`, `x-hub-path` (optional): where the receipt is relayed.

use ed25519_dalek::SigningKey;
use http::HeaderMap;
use multihub_protocol::hashing::{binding_hex, repr_of, sha256_hex, Repr};
use multihub_protocol::headers as h;
use multihub_protocol::receipt::{receipt_sha256, sign, EscalationDecision, ReceiptBody, Verdict};
use multihub_protocol::signal::{key_id, Signal, Stage};
use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;
use tokio::sync::Semaphore;

use crate::config::{Config, HttpUrl};
use crate::error::ApiError;
use crate::intent::ParsedIntent;
use crate::metrics::Metrics;
use crate::policy::{decide, Decision, DelegationsFile, Policy, RequestFacts, ANONYMOUS};
use crate::store::{Applied, CompleteOp, Held, NewOut, Op, StartOp, StartState, Writer};

/// Header naming the delegation a request acts under.
pub const DELEGATION_ID: &str = "x-delegation-id";
/// Idempotency key header (IETF draft).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Set on answers replayed from the idempotency record.
pub const IDEMPOTENT_REPLAY: &str = "x-idempotent-replay";

/// An answer: status, extra headers, JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(status: u16, body: Vec<u8>) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body,
        }
    }
}

impl From<ApiError> for Reply {
    fn from(e: ApiError) -> Reply {
        let mut r = Reply::json(e.status, e.body());
        if e.status == 409 || e.status == 503 {
            r.headers.push(("retry-after", "1".into()));
        }
        r
    }
}

/// The provider: identity, key, policy, registry and the handle to the store writer.
pub struct Provider {
    pub id: String,
    key: SigningKey,
    pub key_id: String,
    pub policy: Arc<Policy>,
    pub delegations: Arc<DelegationsFile>,
    revoked: RwLock<HashSet<String>>,
    in_flight: Mutex<HashSet<(String, String)>>,
    limit: Arc<Semaphore>,
    pub writer: Writer,
    signals_url: String,
    pub metrics: Arc<Metrics>,
    pub max_body: usize,
}

/// Removes an idempotency key from the in-flight set when the request ends.
struct InFlight<'a> {
    set: &'a Mutex<HashSet<(String, String)>>,
    key: (String, String),
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.set.lock() {
            s.remove(&self.key);
        }
    }
}

fn header<'a>(hm: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    hm.get(name).map(|v| v.as_bytes())
}

fn header_str<'a>(hm: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match header(hm, name) {
        None => Ok(None),
        Some(b) => std::str::from_utf8(b)
            .map(Some)
            .map_err(|_| ApiError::new(400, "bad_header", format!("{name}: not UTF-8"))),
    }
}

fn token_ok(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_graphic())
}

/// What the gateway established about a request.
struct Gate<'a> {
    request_id: &'a str,
    repr: Repr,
    intent: ParsedIntent,
    delegation: Option<&'a str>,
    /// The delegation id, or `anonymous`.
    caller: &'a str,
    /// `Idempotency-Key`, else `x-request-id`.
    key: &'a str,
    outcome_url: Option<&'a str>,
    hub_path: &'a str,
    /// The hub's `x-hub-route`, passed to the association with START (it selects the
    /// confirmation policy there; the signal itself does not carry it).
    route: Option<&'a str>,
}

impl Provider {
    pub fn new(
        cfg: &Config,
        key: SigningKey,
        revoked: Vec<String>,
        writer: Writer,
        metrics: Arc<Metrics>,
    ) -> Provider {
        let mut signals_url = format!(
            "http://{}{}",
            cfg.association.authority, cfg.association.path
        );
        signals_url.push_str("/signals");
        Provider {
            id: cfg.provider.clone(),
            key_id: key_id(&key.verifying_key()),
            key,
            policy: cfg.policy.clone(),
            delegations: cfg.delegations.clone(),
            revoked: RwLock::new(revoked.into_iter().collect()),
            in_flight: Mutex::new(HashSet::new()),
            limit: Arc::new(Semaphore::new(cfg.limits.max_in_flight)),
            writer,
            signals_url,
            metrics,
            max_body: cfg.limits.max_body_bytes,
        }
    }

    /// Idempotency keys being processed right now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.lock().map(|s| s.len()).unwrap_or(0)
    }

    fn count(&self, outcome: &str) {
        self.metrics.requests.with_label_values(&[outcome]).inc();
    }

    fn is_revoked(&self, id: Option<&str>) -> bool {
        id.is_some_and(|id| self.revoked.read().map(|s| s.contains(id)).unwrap_or(true))
    }

    fn claim(&self, caller: &str, key: &str) -> Result<InFlight<'_>, ApiError> {
        let k = (caller.to_string(), key.to_string());
        let fresh = self
            .in_flight
            .lock()
            .map(|mut s| s.insert(k.clone()))
            .unwrap_or(false);
        if fresh {
            Ok(InFlight {
                set: &self.in_flight,
                key: k,
            })
        } else {
            Err(ApiError::new(
                409,
                "in_flight",
                "a request with this idempotency key is being processed; retry later",
            ))
        }
    }

    fn gateway<'a>(&self, hm: &'a HeaderMap, body: &[u8]) -> Result<Gate<'a>, ApiError> {
        let request_id = header_str(hm, h::REQUEST_ID)?
            .ok_or_else(|| ApiError::new(400, "bad_request_id", "x-request-id: missing"))?;
        if multihub_protocol::validate_request_id(request_id.as_bytes()).is_err() {
            return Err(ApiError::new(
                400,
                "bad_request_id",
                "x-request-id: must be 1-128 of [A-Za-z0-9._:-]",
            ));
        }
        let repr = repr_of(body);
        match header(hm, h::HUB_REQUEST_REPR) {
            None => {
                return Err(ApiError::new(
                    400,
                    "tampered",
                    "x-hub-request-repr: missing",
                ))
            }
            Some(v) if v != repr.as_str().as_bytes() => {
                return Err(ApiError::new(
                    400,
                    "tampered",
                    "x-hub-request-repr: does not match the received body",
                ))
            }
            Some(_) => {}
        }
        let context = header(hm, h::HUB_CONTEXT).unwrap_or(b"");
        match header(hm, h::HUB_BINDING) {
            None => return Err(ApiError::new(400, "tampered", "x-hub-binding: missing")),
            Some(v) if v != binding_hex(repr.as_str(), context).as_bytes() => {
                return Err(ApiError::new(
                    400,
                    "tampered",
                    "x-hub-binding: does not match x-hub-request-repr and x-hub-context",
                ))
            }
            Some(_) => {}
        }
        let intent = ParsedIntent::parse(body)
            .map_err(|e| ApiError::new(400, "bad_intent", e.to_string()))?;
        let delegation = header_str(hm, DELEGATION_ID)?;
        if let Some(d) = delegation {
            if !token_ok(d, 128) || d == ANONYMOUS {
                return Err(ApiError::new(
                    400,
                    "bad_header",
                    "x-delegation-id: must be 1-128 visible ASCII characters, not \"anonymous\"",
                ));
            }
        }
        let key = match header_str(hm, IDEMPOTENCY_KEY)? {
            Some(k) if token_ok(k, 255) => k,
            Some(_) => {
                return Err(ApiError::new(
                    400,
                    "bad_header",
                    "idempotency-key: must be 1-255 visible ASCII characters",
                ))
            }
            None => request_id,
        };
        let outcome_url = header_str(hm, h::HUB_OUTCOME_URL)?;
        if let Some(u) = outcome_url {
            HttpUrl::parse(u)
                .map_err(|e| ApiError::new(400, "bad_header", format!("x-hub-outcome-url: {e}")))?;
        }
        let hub_path = header_str(hm, h::HUB_PATH)?.unwrap_or("");
        let route = header_str(hm, h::HUB_ROUTE)?;
        if let Some(r) = route {
            if multihub_protocol::ids::validate_hub_id(r).is_err() {
                return Err(ApiError::new(
                    400,
                    "bad_header",
                    "x-hub-route: must be 1-64 of [A-Za-z0-9._:-]",
                ));
            }
        }
        Ok(Gate {
            route,
            request_id,
            repr,
            intent,
            caller: delegation.unwrap_or(ANONYMOUS),
            delegation,
            key,
            outcome_url,
            hub_path,
        })
    }

    fn answer(&self, mut r: Reply, request_id: &str) -> Reply {
        r.headers.push(("x-request-id", request_id.to_string()));
        r.headers.push(("x-provider-id", self.id.clone()));
        r
    }

    /// Handles one ingest `POST` (body already read and within the cap).
    pub async fn ingest(&self, hm: &HeaderMap, body: &[u8]) -> Reply {
        let started = Instant::now();
        let r = match self.limit.clone().try_acquire_owned() {
            Ok(_permit) => self.ingest_inner(hm, body).await,
            Err(_) => {
                self.count("overloaded");
                ApiError::new(
                    503,
                    "overloaded",
                    "max_in_flight requests are being processed",
                )
                .into()
            }
        };
        self.metrics
            .request_seconds
            .observe(started.elapsed().as_secs_f64());
        r
    }

    async fn ingest_inner(&self, hm: &HeaderMap, body: &[u8]) -> Reply {
        let g = match self.gateway(hm, body) {
            Ok(g) => g,
            Err(e) => {
                self.count(if e.kind == "tampered" {
                    "tampered"
                } else {
                    "bad_request"
                });
                return e.into();
            }
        };
        let rid = g.request_id;
        let r = match self.pipeline(&g, body).await {
            Ok(r) => r,
            Err(e) => {
                self.count(match e.status {
                    409 => "in_flight",
                    422 => "mismatch",
                    _ => "error",
                });
                e.into()
            }
        };
        self.answer(r, rid)
    }

    async fn pipeline(&self, g: &Gate<'_>, body: &[u8]) -> Result<Reply, ApiError> {
        let _guard = self.claim(g.caller, g.key)?;
        // START: provider-generated boundary, durable before any effect.
        let mut pre = String::with_capacity(200);
        pre.push_str(&self.id);
        pre.push('\n');
        pre.push_str(g.request_id);
        pre.push('\n');
        pre.push_str(&g.intent.fingerprint);
        let start = Signal::signed_with_key_id(
            g.request_id,
            g.repr.as_str(),
            &self.id,
            Stage::Start,
            &sha256_hex(pre.as_bytes()),
            &self.key,
            &self.key_id,
        );
        let op = Op::Start(StartOp {
            caller: g.caller.to_string(),
            key: g.key.to_string(),
            fingerprint: g.intent.fingerprint.clone(),
            request_id: g.request_id.to_string(),
            start: NewOut {
                dedup: crate::store::dedup("S", g.caller, g.key),
                url: self.signals_url.clone(),
                headers: g
                    .route
                    .map(|r| vec![(h::HUB_ROUTE.to_string(), r.to_string())])
                    .unwrap_or_default(),
                body: start.to_bytes(),
                kind: "signal",
            },
        });
        match self.store(op).await? {
            Applied::Start(StartState::Go, _) => {}
            Applied::Start(StartState::Mismatch, _) => {
                return Err(ApiError::new(
                    422,
                    "idempotency_mismatch",
                    "idempotency key was used with a different intent (fingerprint differs)",
                ))
            }
            Applied::Start(StartState::Done { status, response }, _) => {
                self.count("replay");
                let mut r = Reply::json(status, response);
                r.headers.push((IDEMPOTENT_REPLAY, "true".into()));
                return Ok(r);
            }
            Applied::Start(StartState::Held { response }, _) => {
                self.count("escalate");
                return Ok(Reply::json(202, response));
            }
            _ => return Err(ApiError::new(500, "store", "unexpected store answer")),
        }
        let snapshot = self
            .delegations
            .snapshot(g.delegation, self.is_revoked(g.delegation));
        let facts = RequestFacts {
            provider: &self.id,
            request_id: g.request_id,
            request_repr: g.repr.as_str(),
        };
        match decide(facts, &g.intent, &snapshot, &self.policy, None) {
            Decision::Escalate { rules } => {
                let response = serde_json::to_vec(&serde_json::json!({
                    "status": "escalated", "request_id": g.request_id, "rules": rules,
                }))
                .unwrap_or_default();
                let held = Held {
                    request_id: g.request_id.to_string(),
                    caller: g.caller.to_string(),
                    key: g.key.to_string(),
                    delegation: g.delegation.map(str::to_string),
                    request: body.to_vec(),
                    repr: g.repr.as_str().to_string(),
                    outcome_url: g.outcome_url.map(str::to_string),
                    hub_path: g.hub_path.to_string(),
                };
                self.store(Op::Hold {
                    held: Box::new(held),
                    response: response.clone(),
                })
                .await?;
                self.count("escalate");
                Ok(Reply::json(202, response))
            }
            Decision::Receipt(receipt) => {
                let r = self
                    .commit_receipt(
                        &receipt,
                        g.caller,
                        g.key,
                        body,
                        false,
                        g.outcome_url,
                        g.hub_path,
                    )
                    .await?;
                self.count(receipt.verdict.as_str());
                Ok(r)
            }
        }
    }

    async fn store(&self, op: Op) -> Result<Applied, ApiError> {
        self.writer
            .run(op)
            .await
            .map_err(|e| ApiError::new(500, "store", e))
    }

    #[allow(clippy::too_many_arguments)]
    async fn commit_receipt(
        &self,
        receipt: &ReceiptBody,
        caller: &str,
        key: &str,
        request: &[u8],
        from_held: bool,
        outcome_url: Option<&str>,
        hub_path: &str,
    ) -> Result<Reply, ApiError> {
        let bytes = receipt.to_bytes();
        let sha = receipt_sha256(&bytes);
        let sig = sign(&bytes, &self.key);
        // COMPLETE marks a crossed boundary: an effect committed. A blocked (or denied)
        // request ends with its signed receipt, relayed as the outcome, and no COMPLETE.
        // (Signed only then: an ed25519 signature is ~30 µs of CPU here.)
        let complete = (receipt.verdict == Verdict::Pass).then(|| NewOut {
            dedup: crate::store::dedup("C", caller, key),
            url: self.signals_url.clone(),
            headers: Vec::new(),
            body: Signal::signed_with_key_id(
                &receipt.request_id,
                &receipt.request_repr,
                &self.id,
                Stage::Complete,
                &sha,
                &self.key,
                &self.key_id,
            )
            .to_bytes(),
            kind: "signal",
        });
        let outcome = outcome_url.map(|u| {
            (
                u.to_string(),
                vec![
                    (h::REQUEST_ID.to_string(), receipt.request_id.clone()),
                    (h::PROVIDER_ID.to_string(), self.id.clone()),
                    (h::HUB_PATH.to_string(), hub_path.to_string()),
                ],
            )
        });
        let op = Op::Complete(Box::new(CompleteOp {
            caller: caller.to_string(),
            key: key.to_string(),
            request_id: receipt.request_id.clone(),
            from_held,
            receipt: bytes,
            receipt_sha256: sha,
            sig,
            key_id: self.key_id.clone(),
            effect: receipt.effect.clone(),
            request: request.to_vec(),
            complete,
            outcome,
        }));
        match self.store(op).await? {
            Applied::Completed { response, .. } => Ok(Reply::json(200, response)),
            Applied::NotCompletable => Err(ApiError::new(
                409,
                "in_flight",
                "the request was completed or decided concurrently",
            )),
            _ => Err(ApiError::new(500, "store", "unexpected store answer")),
        }
    }

    /// `POST /admin/delegations/{id}/revoke`.
    pub async fn revoke(&self, id: &str) -> Reply {
        if !self.delegations.delegations.contains_key(id) {
            return ApiError::new(404, "unknown_delegation", format!("delegation \"{id}\"")).into();
        }
        match self.store(Op::Revoke { id: id.to_string() }).await {
            Ok(Applied::Revoked(new)) => {
                if let Ok(mut s) = self.revoked.write() {
                    s.insert(id.to_string());
                }
                self.metrics.admin.with_label_values(&["revoke"]).inc();
                Reply::json(
                    200,
                    serde_json::to_vec(&serde_json::json!({"revoked": id, "newly": new}))
                        .unwrap_or_default(),
                )
            }
            Ok(_) => ApiError::new(500, "store", "unexpected store answer").into(),
            Err(e) => e.into(),
        }
    }

    /// `POST /admin/escalations/{request_id}` with `{"decision": "approve"|"deny", "operator"}`.
    pub async fn decide_escalation(&self, request_id: &str, body: &[u8]) -> Reply {
        match self.decide_inner(request_id, body).await {
            Ok(r) => self.answer(r, request_id),
            Err(e) => e.into(),
        }
    }

    async fn decide_inner(&self, request_id: &str, body: &[u8]) -> Result<Reply, ApiError> {
        let d: EscalationDecision = serde_json::from_slice(body)
            .map_err(|e| ApiError::new(400, "bad_decision", format!("body: {e}")))?;
        if d.decision != "approve" && d.decision != "deny" {
            return Err(ApiError::new(
                400,
                "bad_decision",
                "decision: must be \"approve\" or \"deny\"",
            ));
        }
        if !token_ok(&d.operator, 128) {
            return Err(ApiError::new(
                400,
                "bad_decision",
                "operator: must be 1-128 visible ASCII characters",
            ));
        }
        let held = match self
            .store(Op::GetHeld {
                request_id: request_id.to_string(),
            })
            .await?
        {
            Applied::HeldRow(Some(h)) => h,
            _ => {
                return Err(ApiError::new(
                    404,
                    "not_held",
                    format!("request_id \"{request_id}\": no escalation is waiting"),
                ))
            }
        };
        let _guard = self.claim(&held.caller, &held.key)?;
        let intent = ParsedIntent::parse(&held.request)
            .map_err(|e| ApiError::new(500, "store", format!("held intent: {e}")))?;
        let deleg = held.delegation.as_deref();
        let snapshot = self.delegations.snapshot(deleg, self.is_revoked(deleg));
        let facts = RequestFacts {
            provider: &self.id,
            request_id: &held.request_id,
            request_repr: &held.repr,
        };
        let Decision::Receipt(receipt) = decide(facts, &intent, &snapshot, &self.policy, Some(&d))
        else {
            return Err(ApiError::new(500, "policy", "decision did not resolve"));
        };
        let r = self
            .commit_receipt(
                &receipt,
                &held.caller,
                &held.key,
                &held.request,
                true,
                held.outcome_url.as_deref(),
                &held.hub_path,
            )
            .await?;
        self.metrics
            .admin
            .with_label_values(&[if d.decision == "approve" {
                "approve"
            } else {
                "deny"
            }])
            .inc();
        Ok(r)
    }

    /// `GET /admin/ledger`: balances and receipt count.
    pub async fn ledger(&self) -> Reply {
        match self.store(Op::Ledger).await {
            Ok(Applied::Ledger { balances, receipts }) => {
                let b: serde_json::Map<String, serde_json::Value> = balances
                    .into_iter()
                    .map(|(k, v)| (k, serde_json::Value::from(v)))
                    .collect();
                Reply::json(
                    200,
                    serde_json::to_vec(&serde_json::json!({"balances": b, "receipts": receipts}))
                        .unwrap_or_default(),
                )
            }
            Ok(_) => ApiError::new(500, "store", "unexpected store answer").into(),
            Err(e) => e.into(),
        }
    }
}
