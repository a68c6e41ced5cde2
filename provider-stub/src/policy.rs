//! Versioned policies, the delegation registry, and the deterministic decision (DESIGN §5.3–5.5).
//!
//! A policy is a JSON file `{"id", "version", ...}`; the sha256 of its exact bytes goes into every
//! receipt. [`decide`] is a pure function of (request, intent, delegation snapshot, policy,
//! operator decision): the same inputs give a byte-identical receipt body.

use multihub_protocol::hashing::{operation_hex, sha256_hex};
use multihub_protocol::receipt::{
    DelegationSnapshot, Effect, EscalationDecision, PolicyRef, ReceiptBody, Scores, Verdict,
    RECEIPT_VERSION,
};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::intent::ParsedIntent;

/// Basis points: 10000 = 100 %.
pub const BP: u64 = 10_000;

/// What a policy does with an op that passes: the sign of the ledger effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpKind {
    Credit,
    Debit,
}

/// What a rule does when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Block,
    Escalate,
}

/// A critical-dimension threshold: below `min_bp` → `action`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    pub min_bp: u64,
    pub action: Action,
}

/// Scoring section of a policy file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scoring {
    /// Weight per dimension (`amount`, `delegation`, `target`).
    pub weights: BTreeMap<String, u64>,
    #[serde(default)]
    pub target_trust_bp: BTreeMap<String, u64>,
    pub default_target_trust_bp: u64,
    #[serde(default)]
    pub critical: BTreeMap<String, Threshold>,
    #[serde(default)]
    pub min_total_bp: u64,
    #[serde(default = "default_below_total")]
    pub below_total: Action,
}

fn default_below_total() -> Action {
    Action::Block
}

/// A policy file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    pub id: String,
    pub version: String,
    /// Requests without `x-delegation-id` are evaluated (true) or blocked `delegation.missing`.
    #[serde(default)]
    pub allow_anonymous: bool,
    /// Allowed ops and the sign of their ledger effect.
    pub ops: BTreeMap<String, OpKind>,
    pub max_amount: u64,
    /// Amounts above this are escalated (`policy.escalate_amount`); absent = never.
    #[serde(default)]
    pub escalate_above: Option<u64>,
    #[serde(default)]
    pub blocked_targets: BTreeSet<String>,
    pub scoring: Scoring,
}

/// Scoring dimensions the provider computes.
pub const DIMENSIONS: [&str; 3] = ["amount", "delegation", "target"];

/// A loaded policy: the parsed file plus its identity.
#[derive(Debug, Clone)]
pub struct Policy {
    pub file: PolicyFile,
    pub bytes: Vec<u8>,
    pub reference: PolicyRef,
}

impl Policy {
    /// Parses and checks policy bytes; problems are prefixed with `at` (a JSON path).
    pub fn from_bytes(bytes: Vec<u8>, at: &str) -> Result<Policy, Vec<String>> {
        let file: PolicyFile =
            serde_json::from_slice(&bytes).map_err(|e| vec![format!("{at}: {e}")])?;
        let mut p = Vec::new();
        if file.id.is_empty() || file.id.len() > 64 {
            p.push(format!("{at}.id: must be 1-64 characters"));
        }
        if file.version.is_empty() || file.version.len() > 64 {
            p.push(format!("{at}.version: must be 1-64 characters"));
        }
        if file.ops.is_empty() {
            p.push(format!("{at}.ops: must name at least one op"));
        }
        if file.max_amount == 0 {
            p.push(format!("{at}.max_amount: must be at least 1"));
        }
        let s = &file.scoring;
        for k in s.weights.keys().chain(s.critical.keys()) {
            if !DIMENSIONS.contains(&k.as_str()) {
                p.push(format!(
                    "{at}.scoring: unknown dimension \"{k}\" (known: amount, delegation, target)"
                ));
            }
        }
        for (k, v) in &s.target_trust_bp {
            if *v > BP {
                p.push(format!("{at}.scoring.target_trust_bp.{k}: above 10000"));
            }
        }
        if s.default_target_trust_bp > BP {
            p.push(format!("{at}.scoring.default_target_trust_bp: above 10000"));
        }
        for (k, t) in &s.critical {
            if t.min_bp > BP {
                p.push(format!("{at}.scoring.critical.{k}.min_bp: above 10000"));
            }
        }
        if s.min_total_bp > BP {
            p.push(format!("{at}.scoring.min_total_bp: above 10000"));
        }
        if !p.is_empty() {
            return Err(p);
        }
        let reference = PolicyRef {
            id: file.id.clone(),
            version: file.version.clone(),
            sha256: sha256_hex(&bytes),
        };
        Ok(Policy {
            file,
            bytes,
            reference,
        })
    }

    /// Reads a policy file.
    pub fn load(path: &Path) -> Result<Policy, Vec<String>> {
        let at = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| vec![format!("{at}: {e}")])?;
        Policy::from_bytes(bytes, &at)
    }

    /// Loads every `*.json` in `dir` and returns the one with `id` and `version`.
    pub fn find(dir: &Path, id: &str, version: &str) -> Result<Policy, Vec<String>> {
        let rd = std::fs::read_dir(dir).map_err(|e| vec![format!("policy.dir: {e}")])?;
        let mut problems = Vec::new();
        let mut found = None;
        let mut paths: Vec<_> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        for path in paths {
            match Policy::load(&path) {
                Ok(p) if p.file.id == id && p.file.version == version => {
                    if found.is_some() {
                        problems.push(format!(
                            "policy: {id} version {version} is defined twice (again in {})",
                            path.display()
                        ));
                    }
                    found = Some(p);
                }
                Ok(_) => {}
                Err(e) => problems.extend(e),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        found.ok_or_else(|| {
            vec![format!(
                "policy: no policy with id \"{id}\" and version \"{version}\" in {}",
                dir.display()
            )]
        })
    }
}

/// One delegation's bounds in the registry file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelegationFile {
    pub ops: Vec<String>,
    /// Account names, or `"*"` for any.
    pub targets: Vec<String>,
    pub max_amount: u64,
}

/// The delegation registry file: `{"version": 1, "delegations": {"<id>": {...}}}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelegationsFile {
    pub version: u32,
    pub delegations: BTreeMap<String, DelegationFile>,
}

impl DelegationsFile {
    pub fn load(path: &Path) -> Result<DelegationsFile, Vec<String>> {
        let at = format!("delegations ({})", path.display());
        let bytes = std::fs::read(path).map_err(|e| vec![format!("{at}: {e}")])?;
        let f: DelegationsFile =
            serde_json::from_slice(&bytes).map_err(|e| vec![format!("{at}: {e}")])?;
        let mut p = Vec::new();
        if f.version != 1 {
            p.push(format!("{at}.version: must be 1"));
        }
        for (id, d) in &f.delegations {
            if id == ANONYMOUS || id.is_empty() || id.len() > 128 {
                p.push(format!(
                    "{at}.delegations.{id}: id must be 1-128 characters and not \"anonymous\""
                ));
            }
            if d.ops.is_empty() {
                p.push(format!("{at}.delegations.{id}.ops: must not be empty"));
            }
            if d.targets.is_empty() {
                p.push(format!("{at}.delegations.{id}.targets: must not be empty"));
            }
        }
        if p.is_empty() {
            Ok(f)
        } else {
            Err(p)
        }
    }

    /// The snapshot recorded in a receipt for delegation `id` (`None` = anonymous).
    pub fn snapshot(&self, id: Option<&str>, revoked: bool) -> DelegationSnapshot {
        match id {
            None => DelegationSnapshot {
                id: ANONYMOUS.into(),
                known: false,
                revoked: false,
                ops: vec![],
                targets: vec![],
                max_amount: 0,
            },
            Some(id) => match self.delegations.get(id) {
                Some(d) => DelegationSnapshot {
                    id: id.into(),
                    known: true,
                    revoked,
                    ops: d.ops.clone(),
                    targets: d.targets.clone(),
                    max_amount: d.max_amount,
                },
                None => DelegationSnapshot {
                    id: id.into(),
                    known: false,
                    revoked,
                    ops: vec![],
                    targets: vec![],
                    max_amount: 0,
                },
            },
        }
    }
}

/// Caller id of requests without `x-delegation-id`.
pub const ANONYMOUS: &str = "anonymous";

/// What the request looked like on the wire (the parts a receipt records).
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub provider: &'a str,
    pub request_id: &'a str,
    pub request_repr: &'a str,
}

/// The outcome of a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A receipt (verdict pass or block).
    Receipt(Box<ReceiptBody>),
    /// The policy wants an operator decision; nothing is signed yet.
    Escalate { rules: Vec<String> },
}

struct Eval {
    rules: BTreeSet<String>,
    block: bool,
    escalate: bool,
    scores: Scores,
}

fn fire(e: &mut Eval, rule: &str, action: Action) {
    e.rules.insert(rule.to_string());
    match action {
        Action::Block => e.block = true,
        Action::Escalate => e.escalate = true,
    }
}

/// Headroom of `amount` under `max` in basis points (0 when over or when max is 0).
fn headroom_bp(amount: u64, max: u64) -> Option<u64> {
    if max == 0 || amount >= max {
        return Some(0);
    }
    (max - amount).checked_mul(BP)?.checked_div(max)
}

fn evaluate(
    intent: &ParsedIntent,
    d: &DelegationSnapshot,
    anonymous: bool,
    p: &PolicyFile,
) -> Option<Eval> {
    let i = &intent.intent;
    let mut e = Eval {
        rules: BTreeSet::new(),
        block: false,
        escalate: false,
        scores: Scores::default(),
    };
    if anonymous {
        if !p.allow_anonymous {
            fire(&mut e, "delegation.missing", Action::Block);
        }
    } else if !d.known {
        fire(&mut e, "delegation.unknown", Action::Block);
    } else {
        if d.revoked {
            fire(&mut e, "delegation.revoked", Action::Block);
        }
        if !d.ops.contains(&i.op) {
            fire(&mut e, "delegation.op", Action::Block);
        }
        if !d.targets.iter().any(|t| t == "*" || *t == i.target) {
            fire(&mut e, "delegation.target", Action::Block);
        }
        if i.amount > d.max_amount {
            fire(&mut e, "delegation.max_amount", Action::Block);
        }
    }
    if !p.ops.contains_key(&i.op) {
        fire(&mut e, "policy.op", Action::Block);
    }
    if i.amount > p.max_amount {
        fire(&mut e, "policy.max_amount", Action::Block);
    }
    if p.blocked_targets.contains(&i.target) {
        fire(&mut e, "policy.target_blocked", Action::Block);
    }
    if p.escalate_above.is_some_and(|x| i.amount > x) {
        fire(&mut e, "policy.escalate_amount", Action::Escalate);
    }
    // Scoring: integer basis points, weighted mean, critical thresholds.
    let s = &p.scoring;
    let dims = [
        ("amount", headroom_bp(i.amount, p.max_amount)?),
        ("delegation", headroom_bp(i.amount, d.max_amount)?),
        (
            "target",
            *s.target_trust_bp
                .get(&i.target)
                .unwrap_or(&s.default_target_trust_bp),
        ),
    ];
    let mut sum = 0u64;
    let mut wsum = 0u64;
    for (name, bp) in dims {
        let w = *s.weights.get(name).unwrap_or(&0);
        sum = sum.checked_add(bp.checked_mul(w)?)?;
        wsum = wsum.checked_add(w)?;
        e.scores.dimensions.insert(name.to_string(), bp);
        if let Some(t) = s.critical.get(name) {
            if bp < t.min_bp {
                fire(&mut e, &format!("score.{name}"), t.action);
            }
        }
    }
    // A policy without weights cannot score: an evaluation error (fail closed).
    e.scores.total_bp = sum.checked_div(wsum)?;
    if e.scores.total_bp < s.min_total_bp {
        fire(&mut e, "score.total", s.below_total);
    }
    Some(e)
}

/// The deterministic decision. `decision` is the operator's answer to an earlier escalation.
pub fn decide(
    req: RequestFacts<'_>,
    intent: &ParsedIntent,
    delegation: &DelegationSnapshot,
    policy: &Policy,
    decision: Option<&EscalationDecision>,
) -> Decision {
    let anonymous = delegation.id == ANONYMOUS && !delegation.known;
    let (verdict, rules, scores) = match evaluate(intent, delegation, anonymous, &policy.file) {
        None => (
            Verdict::Block,
            BTreeSet::from(["policy.error".to_string()]),
            Scores::default(),
        ),
        Some(mut e) => {
            if e.block {
                (Verdict::Block, e.rules, e.scores)
            } else if e.escalate {
                match decision.map(|d| d.decision.as_str()) {
                    Some("approve") => {
                        e.rules.insert("escalation.approved".into());
                        (Verdict::Pass, e.rules, e.scores)
                    }
                    Some(_) => {
                        e.rules.insert("escalation.denied".into());
                        (Verdict::Block, e.rules, e.scores)
                    }
                    None => {
                        return Decision::Escalate {
                            rules: e.rules.into_iter().collect(),
                        }
                    }
                }
            } else {
                (Verdict::Pass, e.rules, e.scores)
            }
        }
    };
    let i = &intent.intent;
    let effect = match (verdict, policy.file.ops.get(&i.op)) {
        (Verdict::Pass, Some(kind)) => {
            // amount is below 2^53, so it fits an i64.
            let a = i64::try_from(i.amount).unwrap_or(i64::MAX);
            Some(Effect {
                account: i.target.clone(),
                delta: if *kind == OpKind::Debit { -a } else { a },
            })
        }
        _ => None,
    };
    Decision::Receipt(Box::new(ReceiptBody {
        v: RECEIPT_VERSION,
        provider: req.provider.to_string(),
        request_id: req.request_id.to_string(),
        operation: operation_hex(req.request_id, req.request_repr),
        request_repr: req.request_repr.to_string(),
        intent: intent.value.clone(),
        intent_sha256: intent.fingerprint.clone(),
        delegation: delegation.clone(),
        policy: policy.reference.clone(),
        verdict,
        rules: rules.into_iter().collect(),
        scores,
        escalation: decision.cloned(),
        effect,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use multihub_protocol::hashing::repr_of;
    use proptest::prelude::*;

    pub(crate) const POLICY: &str = r#"{
      "id": "payments", "version": "1", "allow_anonymous": false,
      "ops": {"transfer": "credit", "refund": "debit"},
      "max_amount": 1000, "escalate_above": 500, "blocked_targets": ["frozen"],
      "scoring": {"weights": {"amount": 2, "delegation": 1, "target": 1},
                  "target_trust_bp": {"risky": 1000}, "default_target_trust_bp": 8000,
                  "critical": {"target": {"min_bp": 2000, "action": "escalate"}},
                  "min_total_bp": 0}
    }"#;

    fn policy() -> Policy {
        Policy::from_bytes(POLICY.as_bytes().to_vec(), "p").unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn delegations() -> DelegationsFile {
        serde_json::from_str(
            r#"{"version":1,"delegations":{"d1":{"ops":["transfer","refund"],"targets":["*"],"max_amount":800}}}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn intent(op: &str, target: &str, amount: u64) -> ParsedIntent {
        ParsedIntent::parse(
            serde_json::json!({"op": op, "target": target, "amount": amount})
                .to_string()
                .as_bytes(),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn run(
        i: &ParsedIntent,
        d: Option<&str>,
        revoked: bool,
        dec: Option<&EscalationDecision>,
    ) -> Decision {
        let repr = repr_of(&i.canonical);
        decide(
            RequestFacts {
                provider: "provider-a",
                request_id: "r1",
                request_repr: repr.as_str(),
            },
            i,
            &delegations().snapshot(d, revoked),
            &policy(),
            dec,
        )
    }

    fn receipt(d: Decision) -> ReceiptBody {
        match d {
            Decision::Receipt(r) => *r,
            Decision::Escalate { rules } => panic!("escalated: {rules:?}"),
        }
    }

    #[test]
    fn pass_block_escalate() {
        let r = receipt(run(&intent("transfer", "a", 100), Some("d1"), false, None));
        assert_eq!(r.verdict, Verdict::Pass);
        assert_eq!(r.rules, Vec::<String>::new());
        assert_eq!(r.effect.map(|e| e.delta), Some(100));
        assert_eq!(r.scores.dimensions.get("amount"), Some(&9000));
        let r = receipt(run(&intent("refund", "a", 10), Some("d1"), false, None));
        assert_eq!(r.effect.map(|e| e.delta), Some(-10));

        let r = receipt(run(&intent("transfer", "a", 100), Some("d1"), true, None));
        assert_eq!(r.verdict, Verdict::Block);
        assert_eq!(r.rules, vec!["delegation.revoked".to_string()]);
        assert_eq!(r.effect, None);
        let r = receipt(run(&intent("transfer", "a", 100), Some("zz"), false, None));
        assert_eq!(r.rules, vec!["delegation.unknown".to_string()]);
        let r = receipt(run(&intent("transfer", "a", 100), None, false, None));
        assert_eq!(r.rules, vec!["delegation.missing".to_string()]);
        let r = receipt(run(&intent("burn", "frozen", 900), Some("d1"), false, None));
        assert_eq!(
            r.rules,
            vec![
                "delegation.max_amount",
                "delegation.op",
                "policy.escalate_amount",
                "policy.target_blocked",
                "policy.op"
            ]
            .into_iter()
            .map(String::from)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
        );

        let i = intent("transfer", "risky", 600);
        assert_eq!(
            run(&i, Some("d1"), false, None),
            Decision::Escalate {
                rules: vec!["policy.escalate_amount".into(), "score.target".into()]
            }
        );
        let ok = EscalationDecision {
            decision: "approve".into(),
            operator: "op".into(),
        };
        let r = receipt(run(&i, Some("d1"), false, Some(&ok)));
        assert_eq!(r.verdict, Verdict::Pass);
        assert!(r.rules.contains(&"escalation.approved".to_string()));
        assert_eq!(r.escalation, Some(ok));
        let no = EscalationDecision {
            decision: "deny".into(),
            operator: "op".into(),
        };
        let r = receipt(run(&i, Some("d1"), false, Some(&no)));
        assert_eq!(r.verdict, Verdict::Block);
        assert_eq!(r.effect, None);
    }

    #[test]
    fn evaluation_error_blocks() {
        let mut p = policy();
        p.file.scoring.weights.clear();
        let i = intent("transfer", "a", 1);
        let repr = repr_of(b"x");
        let d = decide(
            RequestFacts {
                provider: "p",
                request_id: "r",
                request_repr: repr.as_str(),
            },
            &i,
            &delegations().snapshot(Some("d1"), false),
            &p,
            None,
        );
        let r = receipt(d);
        assert_eq!(r.verdict, Verdict::Block);
        assert_eq!(r.rules, vec!["policy.error".to_string()]);
    }

    #[test]
    fn invalid_policy_lists_every_problem() {
        let bad = r#"{"id":"","version":"1","ops":{},"max_amount":0,
          "scoring":{"weights":{"speed":1},"default_target_trust_bp":20000}}"#;
        let e = Policy::from_bytes(bad.as_bytes().to_vec(), "p")
            .err()
            .unwrap_or_default();
        assert_eq!(e.len(), 5, "{e:?}");
        assert!(e.iter().any(|m| m.contains("unknown dimension \"speed\"")));
    }

    proptest! {
        #[test]
        fn same_inputs_same_bytes_and_any_change_differs(
            op in prop::sample::select(vec!["transfer", "refund", "burn"]),
            target in "[a-z]{1,8}", amount in 0u64..2000, revoked in any::<bool>(),
            deleg in prop::sample::select(vec![Some("d1"), Some("d2"), None]),
            field in 0usize..10,
        ) {
            let i = intent(op, &target, amount);
            let approve = EscalationDecision { decision: "approve".into(), operator: "o".into() };
            let a = receipt(run(&i, deleg, revoked, Some(&approve))).to_bytes();
            let b = receipt(run(&intent(op, &target, amount), deleg, revoked, Some(&approve))).to_bytes();
            prop_assert_eq!(&a, &b);
            // Change exactly one input.
            let mut dec = approve.clone();
            let (i2, d2, rev2, req2, pol2) = match field {
                0 => (intent(if op == "transfer" { "refund" } else { "transfer" }, &target, amount), deleg, revoked, "r1", false),
                1 => (intent(op, &format!("{target}x"), amount), deleg, revoked, "r1", false),
                2 => (intent(op, &target, amount + 1), deleg, revoked, "r1", false),
                3 => (i.clone(), if deleg == Some("d1") { Some("d2") } else { Some("d1") }, revoked, "r1", false),
                4 => (i.clone(), deleg, revoked, "r2", false),
                5 => (i.clone(), deleg, revoked, "r1", true),
                // Revocation (an anonymous request has nothing to revoke: use a delegation).
                6 => (i.clone(), Some(deleg.unwrap_or("d1")), if deleg.is_some() { !revoked } else { revoked }, "r1", false),
                7 => { dec.decision = "deny".into(); (i.clone(), deleg, revoked, "r1", false) }
                8 => { dec.operator = "o2".into(); (i.clone(), deleg, revoked, "r1", false) }
                _ => {
                    let body = serde_json::json!({"op": op, "target": target, "amount": amount, "params": {"n": 1}});
                    let p = ParsedIntent::parse(body.to_string().as_bytes()).unwrap_or_else(|e| panic!("{e}"));
                    (p, deleg, revoked, "r1", false)
                }
            };
            let mut p = policy();
            if pol2 {
                let mut bytes = p.bytes.clone();
                bytes.push(b'\n');
                p = Policy::from_bytes(bytes, "p").unwrap_or_else(|e| panic!("{e:?}"));
            }
            let repr = repr_of(&i.canonical);
            let c = receipt(decide(
                RequestFacts { provider: "provider-a", request_id: req2, request_repr: repr.as_str() },
                &i2, &delegations().snapshot(d2, rev2), &p, Some(&dec),
            )).to_bytes();
            prop_assert_ne!(a, c);
        }
    }
}
