//! Provider receipts and audit entries (DESIGN §5.7): the receipt body, its RFC 8785 canonical
//! encoding, ed25519 signing and verification, and the hash-chained audit entry.
//!
//! A receipt body holds only inputs and the decision derived from them — no clock, sequence or
//! chain data — so re-running the same intent under the same delegation and policy version
//! produces byte-identical bytes. Numbers are integers only (I-JSON safe: |n| < 2^53), so the
//! canonical form is exact.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use thiserror::Error;

use crate::hashing::{hex_into, sha256_hex};

/// Receipt format version.
pub const RECEIPT_VERSION: u32 = 1;

/// The largest integer magnitude allowed anywhere in signed data (2^53 - 1, I-JSON).
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// `prev` of the first audit entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Why a receipt or audit entry was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReceiptError {
    #[error("malformed receipt: {0}")]
    Malformed(String),
    #[error("receipt bytes are not RFC 8785 canonical JSON")]
    NonCanonical,
    #[error("unsupported receipt version {0}")]
    Version(u32),
    #[error("key_id does not match the verifying key")]
    KeyId,
    #[error("signature is not valid base64url of 64 bytes")]
    SignatureEncoding,
    #[error("signature does not verify")]
    BadSignature,
}

/// The decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Block,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Block => "block",
        }
    }
}

/// The delegation as the provider saw it when deciding (a snapshot: bounds and revocation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelegationSnapshot {
    /// Delegation id, or `anonymous` when the request carried none.
    pub id: String,
    /// False when the id is not in the registry (then the bounds are empty).
    pub known: bool,
    pub max_amount: u64,
    pub ops: Vec<String>,
    pub revoked: bool,
    pub targets: Vec<String>,
}

/// The policy the decision was taken under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRef {
    pub id: String,
    /// Hex sha256 of the policy file bytes.
    pub sha256: String,
    pub version: String,
}

/// Integer scores in basis points (0..=10000).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scores {
    pub dimensions: BTreeMap<String, u64>,
    pub total_bp: u64,
}

/// An operator's decision on an escalated request; an input of the receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EscalationDecision {
    /// `approve` or `deny`.
    pub decision: String,
    pub operator: String,
}

/// The effect committed on the reference ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Effect {
    /// Ledger account (the intent's target).
    pub account: String,
    /// Signed change of the account's balance.
    pub delta: i64,
}

/// The signed receipt body. Serialized only through [`ReceiptBody::to_bytes`] (canonical).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptBody {
    pub delegation: DelegationSnapshot,
    pub effect: Option<Effect>,
    pub escalation: Option<EscalationDecision>,
    /// The intent in canonical form.
    pub intent: serde_json::Value,
    /// Hex sha256 of the canonical intent bytes (the idempotency fingerprint).
    pub intent_sha256: String,
    /// DESIGN §6 operation: hex sha256("multihub-op-v1\n" + request_id + "\n" + request_repr).
    pub operation: String,
    pub policy: PolicyRef,
    pub provider: String,
    pub request_id: String,
    pub request_repr: String,
    /// Ids of the rules that fired, sorted and de-duplicated.
    pub rules: Vec<String>,
    pub scores: Scores,
    pub v: u32,
    pub verdict: Verdict,
}

/// An integer magnitude RFC 8785 writes exactly (within ±(2^53 - 1)).
fn safe_integer(n: u64) -> bool {
    n <= MAX_SAFE_INTEGER
}

/// See [`ReceiptBody::to_bytes`]: ASCII keys in sorted iteration order, safe integers only.
fn value_is_plain_canonical(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::Null | Value::Bool(_) | Value::String(_) => true,
        Value::Number(n) => {
            n.as_u64().is_some_and(safe_integer)
                || n.as_i64().is_some_and(|i| safe_integer(i.unsigned_abs()))
        }
        Value::Array(a) => a.iter().all(value_is_plain_canonical),
        Value::Object(m) => {
            let mut prev: Option<&str> = None;
            m.iter().all(|(k, v)| {
                let sorted = prev.is_none_or(|p| p < k.as_str());
                prev = Some(k);
                sorted && k.is_ascii() && value_is_plain_canonical(v)
            })
        }
    }
}

/// RFC 8785 bytes of a value. Only strings, integers, booleans, arrays and objects reach this.
pub fn canonical<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json_canonicalizer::to_vec(v).unwrap_or_default()
}

impl ReceiptBody {
    /// The canonical bytes: what is signed, hashed and stored.
    ///
    /// Fast path: serde_json's plain output (fields are declared in sorted order, maps are
    /// sorted) is already RFC 8785 when every object key is ASCII (byte order = UTF-16 order)
    /// and every number is an integer within ±(2^53 - 1); string escaping is the same in both.
    /// Anything else goes through the generic canonicalizer. A property test pins the two.
    pub fn to_bytes(&self) -> Vec<u8> {
        if self.plain_json_is_canonical() {
            if let Ok(b) = serde_json::to_vec(self) {
                return b;
            }
        }
        canonical(self)
    }

    fn plain_json_is_canonical(&self) -> bool {
        safe_integer(self.delegation.max_amount)
            && safe_integer(self.scores.total_bp)
            && self
                .scores
                .dimensions
                .iter()
                .all(|(k, n)| k.is_ascii() && safe_integer(*n))
            && self
                .effect
                .as_ref()
                .is_none_or(|e| safe_integer(e.delta.unsigned_abs()))
            && value_is_plain_canonical(&self.intent)
    }

    /// Parses canonical receipt bytes, refusing unknown fields and non-canonical input.
    pub fn parse(bytes: &[u8]) -> Result<ReceiptBody, ReceiptError> {
        let r: ReceiptBody =
            serde_json::from_slice(bytes).map_err(|e| ReceiptError::Malformed(e.to_string()))?;
        if r.to_bytes() != bytes {
            return Err(ReceiptError::NonCanonical);
        }
        if r.v != RECEIPT_VERSION {
            return Err(ReceiptError::Version(r.v));
        }
        Ok(r)
    }
}

/// Hex sha256 of the receipt body bytes (the COMPLETE boundary, the audit `receipt_sha256`).
pub fn receipt_sha256(body: &[u8]) -> String {
    sha256_hex(body)
}

/// base64url (no padding) ed25519 signature over the body bytes.
pub fn sign(body: &[u8], key: &SigningKey) -> String {
    URL_SAFE_NO_PAD.encode(key.sign(body).to_bytes())
}

/// Verifies `sig` (base64url) over `body` with `key` (`verify_strict`), and that `key_id` names it.
pub fn verify(
    body: &[u8],
    sig: &str,
    key_id: &str,
    key: &VerifyingKey,
) -> Result<(), ReceiptError> {
    if key_id != crate::signal::key_id(key) {
        return Err(ReceiptError::KeyId);
    }
    let raw = crate::signal::decode_signature(sig).ok_or(ReceiptError::SignatureEncoding)?;
    key.verify_strict(body, &Signature::from_bytes(&raw))
        .map_err(|_| ReceiptError::BadSignature)
}

/// One hash-chained audit entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    pub seq: u64,
    pub prev: String,
    pub receipt_sha256: String,
    pub entry_sha256: String,
    /// Milliseconds since the Unix epoch when the entry was committed.
    pub recorded_at: u64,
}

#[derive(Serialize)]
struct EntryPre<'a> {
    seq: u64,
    prev: &'a str,
    receipt_sha256: &'a str,
    recorded_at: u64,
}

/// `entry_sha256` = hex sha256 of the RFC 8785 bytes of `{seq, prev, receipt_sha256, recorded_at}`.
pub fn entry_sha256(seq: u64, prev: &str, receipt_sha256: &str, recorded_at: u64) -> String {
    let bytes = canonical(&EntryPre {
        seq,
        prev,
        receipt_sha256,
        recorded_at,
    });
    let mut s = String::with_capacity(64);
    hex_into(&mut s, &Sha256::digest(&bytes));
    s
}

impl AuditEntry {
    /// The entry following `prev` (or [`GENESIS`]) for a receipt.
    pub fn next(seq: u64, prev: &str, receipt_sha256: &str, recorded_at: u64) -> AuditEntry {
        AuditEntry {
            seq,
            prev: prev.to_string(),
            receipt_sha256: receipt_sha256.to_string(),
            entry_sha256: entry_sha256(seq, prev, receipt_sha256, recorded_at),
            recorded_at,
        }
    }

    /// True when `entry_sha256` matches the other fields.
    pub fn self_consistent(&self) -> bool {
        self.entry_sha256
            == entry_sha256(self.seq, &self.prev, &self.receipt_sha256, self.recorded_at)
    }
}

/// The provider's answer for a receipt, RFC 8785 canonical:
/// `{"audit":{"entry_sha256","seq"},"key_id","receipt":<body>,"sig"}`. `body` must already be
/// canonical; it is embedded verbatim.
pub fn response_bytes(body: &[u8], sig: &str, key_id: &str, seq: u64, entry: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 256);
    out.extend_from_slice(b"{\"audit\":{\"entry_sha256\":\"");
    out.extend_from_slice(entry.as_bytes());
    out.extend_from_slice(b"\",\"seq\":");
    out.extend_from_slice(seq.to_string().as_bytes());
    out.extend_from_slice(b"},\"key_id\":\"");
    out.extend_from_slice(key_id.as_bytes());
    out.extend_from_slice(b"\",\"receipt\":");
    out.extend_from_slice(body);
    out.extend_from_slice(b",\"sig\":\"");
    out.extend_from_slice(sig.as_bytes());
    out.extend_from_slice(b"\"}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hashing::{operation_hex, repr_of};
    use serde_json::json;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    fn sample() -> ReceiptBody {
        let intent = json!({"op": "transfer", "target": "acct-1", "amount": 5, "params": {}});
        let repr = repr_of(b"{}");
        ReceiptBody {
            v: RECEIPT_VERSION,
            provider: "provider-a".into(),
            request_id: "r1".into(),
            operation: operation_hex("r1", repr.as_str()),
            request_repr: repr.as_str().into(),
            intent_sha256: sha256_hex(&canonical(&intent)),
            intent,
            delegation: DelegationSnapshot {
                id: "d1".into(),
                known: true,
                revoked: false,
                ops: vec!["transfer".into()],
                targets: vec!["*".into()],
                max_amount: 100,
            },
            policy: PolicyRef {
                id: "p".into(),
                version: "1".into(),
                sha256: "00".into(),
            },
            verdict: Verdict::Pass,
            rules: vec![],
            scores: Scores::default(),
            escalation: None,
            effect: Some(Effect {
                account: "acct-1".into(),
                delta: 5,
            }),
        }
    }

    #[test]
    fn round_trip_sign_verify() {
        let r = sample();
        let b = r.to_bytes();
        assert_eq!(ReceiptBody::parse(&b), Ok(r));
        let k = key(1);
        let kid = crate::signal::key_id(&k.verifying_key());
        let sig = sign(&b, &k);
        assert_eq!(verify(&b, &sig, &kid, &k.verifying_key()), Ok(()));
        let mut t = b.clone();
        t[10] ^= 1;
        assert_eq!(
            verify(&t, &sig, &kid, &k.verifying_key()),
            Err(ReceiptError::BadSignature)
        );
        assert_eq!(
            verify(&b, &sig, &kid, &key(2).verifying_key()),
            Err(ReceiptError::KeyId)
        );
    }

    #[test]
    fn non_canonical_is_refused() {
        let b = sample().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
        let pretty = serde_json::to_vec_pretty(&v).unwrap_or_default();
        assert_eq!(ReceiptBody::parse(&pretty), Err(ReceiptError::NonCanonical));
    }

    #[test]
    fn response_is_canonical_and_chain_links() {
        let b = sample().to_bytes();
        let e1 = AuditEntry::next(1, GENESIS, &receipt_sha256(&b), 7);
        let e2 = AuditEntry::next(2, &e1.entry_sha256, &receipt_sha256(&b), 8);
        assert!(e1.self_consistent() && e2.self_consistent());
        let mut bad = e2.clone();
        bad.recorded_at = 9;
        assert!(!bad.self_consistent());
        let resp = response_bytes(&b, "sig", "kid", e1.seq, &e1.entry_sha256);
        let v: serde_json::Value = serde_json::from_slice(&resp).unwrap_or_default();
        assert_eq!(canonical(&v), resp);
        assert_eq!(v["audit"]["seq"], json!(1));
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        fn json_value() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<u64>().prop_map(serde_json::Value::from),
                (-1e6f64..1e6).prop_map(serde_json::Value::from),
                (-(MAX_SAFE_INTEGER as i64)..=MAX_SAFE_INTEGER as i64)
                    .prop_map(serde_json::Value::from),
                any::<String>().prop_map(serde_json::Value::from),
            ];
            let key = prop_oneof![
                "[a-z_]{1,6}",
                any::<String>(),
                "[\u{e000}-\u{e0ff}\u{10000}-\u{10100}]{1,2}"
            ];
            nested(leaf.boxed(), key.boxed())
        }

        /// Arrays and objects (keys from `key`) over `leaf`, up to 3 levels deep.
        fn nested(
            leaf: BoxedStrategy<serde_json::Value>,
            key: BoxedStrategy<String>,
        ) -> impl Strategy<Value = serde_json::Value> {
            leaf.prop_recursive(3, 24, 5, move |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..5)
                        .prop_map(serde_json::Value::from),
                    proptest::collection::btree_map(key.clone(), inner, 0..5)
                        .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// Only what the fast path accepts: ASCII keys, safe integers, any strings.
        fn plain_value() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                (-(MAX_SAFE_INTEGER as i64)..=MAX_SAFE_INTEGER as i64)
                    .prop_map(serde_json::Value::from),
                any::<String>().prop_map(serde_json::Value::from),
            ];
            nested(leaf.boxed(), "[ -~]{0,6}".boxed())
        }

        proptest! {
            #[test]
            fn the_fast_path_is_taken_and_exact(intent in plain_value(), text in any::<String>()) {
                let mut r = sample();
                r.intent = intent;
                r.request_id = text.clone();
                r.rules = vec![text];
                prop_assert!(r.plain_json_is_canonical());
                prop_assert_eq!(serde_json::to_vec(&r).unwrap_or_default(), canonical(&r));
            }

            #[test]
            fn fast_bytes_equal_the_generic_canonicalizer(
                intent in json_value(),
                strings in proptest::collection::vec(any::<String>(), 8),
                dims in proptest::collection::btree_map(prop_oneof!["[a-z]{1,5}", any::<String>()], any::<u64>(), 0..4),
                numbers in (any::<u64>(), any::<u64>(), any::<i64>(), 0u64..MAX_SAFE_INTEGER),
                flags in (any::<bool>(), any::<bool>(), any::<bool>()),
            ) {
                let mut r = sample();
                r.intent = intent;
                r.provider = strings[0].clone();
                r.request_id = strings[1].clone();
                r.delegation.id = strings[2].clone();
                r.delegation.ops = vec![strings[3].clone()];
                r.policy.version = strings[4].clone();
                r.rules = vec![strings[5].clone(), strings[6].clone()];
                r.scores.dimensions = dims;
                r.scores.total_bp = if flags.0 { numbers.0 } else { numbers.3 };
                r.delegation.max_amount = if flags.1 { numbers.1 } else { numbers.3 };
                r.delegation.revoked = flags.2;
                r.escalation = flags.2.then(|| EscalationDecision {
                    decision: "approve".into(),
                    operator: strings[7].clone(),
                });
                r.effect = Some(Effect { account: strings[7].clone(), delta: numbers.2 });
                prop_assert_eq!(r.to_bytes(), canonical(&r));
                r.effect = None;
                prop_assert_eq!(r.to_bytes(), canonical(&r));
            }

            #[test]
            fn receipts_round_trip_canonically(
                op in "[a-z]{1,12}", target in "[a-z0-9-]{1,16}", amount in 0u64..MAX_SAFE_INTEGER,
                p in proptest::collection::btree_map("[a-z\u{e9}\u{1F600}]{1,6}", -1000i64..1000, 0..4),
                rules in proptest::collection::btree_set("[a-z.]{1,10}", 0..4),
                pass in any::<bool>(),
            ) {
                let mut r = sample();
                r.intent = json!({"op": op, "target": target, "amount": amount, "params": p});
                r.rules = rules.into_iter().collect();
                r.verdict = if pass { Verdict::Pass } else { Verdict::Block };
                let b = r.to_bytes();
                let back = ReceiptBody::parse(&b);
                prop_assert_eq!(back.as_ref(), Ok(&r));
                prop_assert_eq!(back.map(|x| x.to_bytes()).unwrap_or_default(), b);
            }
        }
    }
}
