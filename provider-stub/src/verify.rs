//! `verify`: the audit chain, every signature, and every stored intent re-run through the
//! decision under its recorded policy version (receipt bytes compared), plus the ledger against
//! the sum of receipt effects. `replay`: one intent through the decision, receipt bytes out.

use multihub_protocol::hashing::repr_of;
use multihub_protocol::receipt::{
    canonical, receipt_sha256, verify as verify_sig, AuditEntry, EscalationDecision, ReceiptBody,
    GENESIS,
};
use rusqlite::{Connection, OpenFlags};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::error::ProviderError;
use crate::intent::ParsedIntent;
use crate::keys::parse_public;
use crate::policy::{decide, Decision, DelegationsFile, Policy, RequestFacts};

/// The first problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// The audit seq of the first broken entry; `None` for store-wide problems (ledger).
    pub seq: Option<u64>,
    pub reason: String,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.seq {
            Some(s) => write!(f, "broken at seq {s}: {}", self.reason),
            None => write!(f, "broken: {}", self.reason),
        }
    }
}

/// A verified store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub receipts: u64,
    pub tip: String,
    pub accounts: usize,
}

struct Row {
    seq: i64,
    prev: String,
    receipt_sha256: String,
    entry_sha256: String,
    recorded_at: i64,
    body: Option<Vec<u8>>,
    sig: Option<String>,
    key_id: Option<String>,
    request: Option<Vec<u8>>,
}

fn broken(seq: u64, reason: impl Into<String>) -> Broken {
    Broken {
        seq: Some(seq),
        reason: reason.into(),
    }
}

/// Checks one stored receipt against its audit position; returns the parsed body.
fn check_row(
    r: &Row,
    expect: u64,
    prev: &str,
    keys: &HashMap<String, ed25519_dalek::VerifyingKey>,
    policies: &HashMap<String, Policy>,
) -> Result<ReceiptBody, Broken> {
    let seq = u64::try_from(r.seq).unwrap_or(0);
    if seq != expect {
        return Err(broken(
            expect,
            format!("audit sequence out of order: found seq {} here", r.seq),
        ));
    }
    let entry = AuditEntry {
        seq,
        prev: r.prev.clone(),
        receipt_sha256: r.receipt_sha256.clone(),
        entry_sha256: r.entry_sha256.clone(),
        recorded_at: u64::try_from(r.recorded_at).unwrap_or(0),
    };
    if entry.prev != prev {
        return Err(broken(seq, "prev does not equal the previous entry_sha256"));
    }
    if !entry.self_consistent() {
        return Err(broken(seq, "entry_sha256 does not match the entry"));
    }
    let (Some(body), Some(sig), Some(key_id), Some(request)) =
        (&r.body, &r.sig, &r.key_id, &r.request)
    else {
        return Err(broken(seq, "receipt row missing"));
    };
    if receipt_sha256(body) != entry.receipt_sha256 {
        return Err(broken(
            seq,
            "receipt bytes do not match the audit entry's receipt_sha256",
        ));
    }
    let parsed = ReceiptBody::parse(body).map_err(|e| broken(seq, format!("receipt: {e}")))?;
    let key = keys
        .get(key_id)
        .ok_or_else(|| broken(seq, format!("unknown key id {key_id}")))?;
    verify_sig(body, sig, key_id, key).map_err(|e| broken(seq, format!("signature: {e}")))?;
    if repr_of(request).as_str() != parsed.request_repr {
        return Err(broken(
            seq,
            "stored request bytes do not match request_repr",
        ));
    }
    let intent = ParsedIntent::parse(request)
        .map_err(|e| broken(seq, format!("stored request is not a valid intent: {e}")))?;
    if intent.canonical != canonical(&parsed.intent) {
        return Err(broken(
            seq,
            "receipt intent differs from the stored request",
        ));
    }
    let policy = policies
        .get(&parsed.policy.sha256)
        .ok_or_else(|| broken(seq, "policy version not in the store"))?;
    let facts = RequestFacts {
        provider: &parsed.provider,
        request_id: &parsed.request_id,
        request_repr: &parsed.request_repr,
    };
    match decide(
        facts,
        &intent,
        &parsed.delegation,
        policy,
        parsed.escalation.as_ref(),
    ) {
        Decision::Receipt(again) if again.to_bytes() == *body => Ok(parsed),
        Decision::Receipt(_) => Err(broken(
            seq,
            "re-running the intent under the recorded policy gives different receipt bytes",
        )),
        Decision::Escalate { .. } => Err(broken(
            seq,
            "re-running the intent escalates but no operator decision is recorded",
        )),
    }
}

/// Verifies the whole store at `path`.
pub fn verify_store(path: &Path) -> Result<Result<Verified, Broken>, ProviderError> {
    let c = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    let mut keys = HashMap::new();
    for row in c
        .prepare("SELECT key_id, public_hex FROM keys")?
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
    {
        let (kid, hex) = row?;
        if let Some(k) = parse_public(&hex) {
            keys.insert(kid, k);
        }
    }
    let mut policies = HashMap::new();
    for row in c
        .prepare("SELECT sha256, bytes FROM policies")?
        .query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?
    {
        let (sha, bytes) = row?;
        if let Ok(p) = Policy::from_bytes(bytes, "stored policy") {
            if p.reference.sha256 == sha {
                policies.insert(sha, p);
            }
        }
    }
    let mut st = c.prepare(
        "SELECT a.seq, a.prev, a.receipt_sha256, a.entry_sha256, a.recorded_at,
                r.body, r.sig, r.key_id, r.request
         FROM audit a LEFT JOIN receipts r ON r.seq = a.seq ORDER BY a.rowid",
    )?;
    let rows = st.query_map([], |r| {
        Ok(Row {
            seq: r.get(0)?,
            prev: r.get(1)?,
            receipt_sha256: r.get(2)?,
            entry_sha256: r.get(3)?,
            recorded_at: r.get(4)?,
            body: r.get(5)?,
            sig: r.get(6)?,
            key_id: r.get(7)?,
            request: r.get(8)?,
        })
    })?;
    let mut prev = GENESIS.to_string();
    let mut expect = 1u64;
    let mut sums: BTreeMap<String, i64> = BTreeMap::new();
    for row in rows {
        let row = row?;
        let parsed = match check_row(&row, expect, &prev, &keys, &policies) {
            Ok(p) => p,
            Err(b) => return Ok(Err(b)),
        };
        if let Some(e) = parsed.effect {
            *sums.entry(e.account).or_default() += e.delta;
        }
        prev = row.entry_sha256;
        expect += 1;
    }
    let receipts = expect - 1;
    let stored: i64 = c.query_row("SELECT COUNT(*) FROM receipts", [], |r| r.get(0))?;
    if u64::try_from(stored).unwrap_or(0) != receipts {
        return Ok(Err(broken(
            receipts + 1,
            format!("{stored} receipt rows but {receipts} audit entries"),
        )));
    }
    let mut ledger: BTreeMap<String, i64> = BTreeMap::new();
    for row in c
        .prepare("SELECT account, balance FROM ledger")?
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
    {
        let (a, b) = row?;
        if b != 0 || sums.contains_key(&a) {
            ledger.insert(a, b);
        }
    }
    sums.retain(|a, v| *v != 0 || ledger.contains_key(a));
    if ledger != sums {
        let diff = sums
            .iter()
            .find(|(a, v)| ledger.get(*a) != Some(v))
            .map(|(a, v)| (a.clone(), *v, ledger.get(a).copied()))
            .or_else(|| {
                ledger
                    .iter()
                    .find(|(a, _)| !sums.contains_key(*a))
                    .map(|(a, b)| (a.clone(), 0, Some(*b)))
            });
        let reason = match diff {
            Some((a, want, have)) => format!(
                "ledger: account \"{a}\" has balance {} but receipts sum to {want}",
                have.map(|b| b.to_string()).unwrap_or_else(|| "none".into())
            ),
            None => "ledger differs from the receipts".into(),
        };
        return Ok(Err(Broken { seq: None, reason }));
    }
    Ok(Ok(Verified {
        receipts,
        tip: prev,
        accounts: ledger.len(),
    }))
}

/// Inputs of `replay`.
pub struct ReplayArgs<'a> {
    pub intent: &'a Path,
    pub delegation: Option<&'a str>,
    pub policy: &'a Path,
    pub delegations: Option<&'a Path>,
    pub provider: &'a str,
    pub request_id: &'a str,
    pub revoked: bool,
    pub decision: Option<EscalationDecision>,
}

/// Runs one intent through the decision; returns the receipt body bytes.
pub fn replay(a: &ReplayArgs<'_>) -> Result<Vec<u8>, ProviderError> {
    let body = std::fs::read(a.intent)?;
    let intent = ParsedIntent::parse(&body)
        .map_err(|e| ProviderError::Usage(format!("{}: {e}", a.intent.display())))?;
    let policy = Policy::load(a.policy).map_err(|e| ProviderError::Usage(e.join("; ")))?;
    let registry = match a.delegations {
        Some(p) => DelegationsFile::load(p).map_err(|e| ProviderError::Usage(e.join("; ")))?,
        None => DelegationsFile {
            version: 1,
            delegations: BTreeMap::new(),
        },
    };
    let snapshot = registry.snapshot(a.delegation, a.revoked);
    let repr = repr_of(&body);
    let facts = RequestFacts {
        provider: a.provider,
        request_id: a.request_id,
        request_repr: repr.as_str(),
    };
    match decide(facts, &intent, &snapshot, &policy, a.decision.as_ref()) {
        Decision::Receipt(r) => Ok(r.to_bytes()),
        Decision::Escalate { rules } => Err(ProviderError::Usage(format!(
            "the policy escalates ({}); pass --decision approve|deny --operator ID",
            rules.join(", ")
        ))),
    }
}
