//! Confirmation policy (DESIGN §6) and linkage from stored digests.
//!
//! A provider *counts* for an operation once both its START and its COMPLETE are recorded;
//! COMPLETE without START is recorded but does not count until START arrives.

use multihub_protocol::signal::{linkage_from_digests, Stage};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// `{"all_of": [...]}` (sorted, distinct) or `{"quorum": N}` over registered providers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    AllOf(Vec<String>),
    Quorum(usize),
}

/// The (provider, stage) pairs recorded for one operation, with the sha256 of each signal.
#[derive(Debug, Default, Clone)]
pub struct OpSignals {
    pub entries: Vec<(String, Stage, [u8; 32])>,
}

impl OpSignals {
    /// Providers with both stages recorded, sorted.
    pub fn counted(&self) -> Vec<&str> {
        let mut m: BTreeMap<&str, (bool, bool)> = BTreeMap::new();
        for (p, s, _) in &self.entries {
            let e = m.entry(p.as_str()).or_default();
            match s {
                Stage::Start => e.0 = true,
                Stage::Complete => e.1 = true,
            }
        }
        m.into_iter()
            .filter(|(_, (a, b))| *a && *b)
            .map(|(p, _)| p)
            .collect()
    }

    /// DESIGN §6 linkage over the recorded signals.
    pub fn linkage(&self) -> String {
        linkage_from_digests(self.entries.iter().map(|(p, s, d)| (p.as_str(), *s, d)))
    }
}

impl Policy {
    /// `Some(providers)` (sorted) when the policy holds for these signals: for `all_of` the
    /// listed providers, for `quorum` every provider that counts.
    pub fn holds(&self, signals: &OpSignals) -> Option<Vec<String>> {
        let counted = signals.counted();
        match self {
            Policy::AllOf(list) => list
                .iter()
                .all(|p| counted.binary_search(&p.as_str()).is_ok())
                .then(|| list.clone()),
            Policy::Quorum(n) => {
                (counted.len() >= *n).then(|| counted.iter().map(|s| s.to_string()).collect())
            }
        }
    }

    /// What is still missing, for the read API: `provider:STAGE` entries for `all_of`, or the
    /// number of further providers needed for `quorum`.
    pub fn missing(&self, signals: &OpSignals) -> serde_json::Value {
        match self {
            Policy::AllOf(list) => {
                let mut out = Vec::new();
                for p in list {
                    for st in [Stage::Start, Stage::Complete] {
                        if !signals.entries.iter().any(|(q, s, _)| q == p && *s == st) {
                            out.push(serde_json::Value::String(format!("{p}:{}", st.as_str())));
                        }
                    }
                }
                serde_json::Value::Array(out)
            }
            Policy::Quorum(n) => {
                let have = signals.counted().len();
                serde_json::json!({ "quorum": n, "counted": have, "need": n.saturating_sub(have) })
            }
        }
    }

    /// The policy as JSON (as configured).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Policy::AllOf(l) => serde_json::json!({ "all_of": l }),
            Policy::Quorum(n) => serde_json::json!({ "quorum": n }),
        }
    }
}

/// sha256 of bytes as an array.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(entries: &[(&str, Stage)]) -> OpSignals {
        OpSignals {
            entries: entries
                .iter()
                .map(|(p, s)| (p.to_string(), *s, digest(format!("{p}{s:?}").as_bytes())))
                .collect(),
        }
    }

    #[test]
    fn complete_without_start_does_not_count() {
        let p = Policy::AllOf(vec!["a".into()]);
        assert_eq!(p.holds(&ops(&[("a", Stage::Complete)])), None);
        assert_eq!(
            p.holds(&ops(&[("a", Stage::Complete), ("a", Stage::Start)])),
            Some(vec!["a".into()])
        );
        assert_eq!(
            p.missing(&ops(&[("a", Stage::Complete)])),
            serde_json::json!(["a:START"])
        );
    }

    #[test]
    fn all_of_and_quorum() {
        let all = Policy::AllOf(vec!["a".into(), "b".into()]);
        let q = Policy::Quorum(2);
        let s = ops(&[
            ("a", Stage::Start),
            ("a", Stage::Complete),
            ("c", Stage::Start),
            ("c", Stage::Complete),
        ]);
        assert_eq!(all.holds(&s), None);
        assert_eq!(q.holds(&s), Some(vec!["a".into(), "c".into()]));
        assert_eq!(
            all.missing(&s),
            serde_json::json!(["b:START", "b:COMPLETE"])
        );
        assert_eq!(Policy::Quorum(3).missing(&s)["need"], 1);
    }
}
