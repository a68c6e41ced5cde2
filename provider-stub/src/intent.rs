//! The intent a requester sends (the request body): typed, integers only, canonicalized.
//!
//! Shape: `{"op": "<name>", "target": "<account>", "amount": <integer>, "params": {...}}`;
//! `params` is optional (absent = `{}`) and may nest objects, arrays, strings, booleans, null and
//! integers, but no floats. Every refusal names the field.

use multihub_protocol::hashing::sha256_hex;
use multihub_protocol::receipt::{canonical, MAX_SAFE_INTEGER};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// The typed intent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Intent {
    pub op: String,
    pub target: String,
    pub amount: u64,
    #[serde(default)]
    pub params: BTreeMap<String, Value>,
}

/// A parsed intent with its canonical bytes and fingerprint.
#[derive(Debug, Clone)]
pub struct ParsedIntent {
    pub intent: Intent,
    /// The intent as a JSON value (canonical when serialized with RFC 8785).
    pub value: Value,
    /// RFC 8785 bytes of the intent.
    pub canonical: Vec<u8>,
    /// Hex sha256 of `canonical`: the idempotency fingerprint.
    pub fingerprint: String,
}

/// Why an intent was refused: the field (JSON path) and the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntentError {
    pub field: String,
    pub problem: String,
}

impl std::fmt::Display for IntentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

fn err(field: impl Into<String>, problem: impl Into<String>) -> IntentError {
    IntentError {
        field: field.into(),
        problem: problem.into(),
    }
}

const MAX_DEPTH: usize = 8;

fn name_ok(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

fn check_integers(v: &Value, path: &mut String, depth: usize) -> Result<(), IntentError> {
    if depth > MAX_DEPTH {
        return Err(err(path.clone(), "nested too deeply (max 8)"));
    }
    match v {
        Value::Number(n) => {
            let ok = n.as_u64().is_some_and(|u| u <= MAX_SAFE_INTEGER)
                || n.as_i64()
                    .is_some_and(|i| i.unsigned_abs() <= MAX_SAFE_INTEGER);
            if ok {
                Ok(())
            } else {
                Err(err(
                    path.clone(),
                    "numbers must be integers with magnitude below 2^53 (no floats)",
                ))
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                check_integers(x, path, depth + 1)?;
                path.truncate(len);
            }
            Ok(())
        }
        Value::Object(o) => check_members(o, path, depth),
        _ => Ok(()),
    }
}

/// [`check_integers`] on each member of an object found at `depth`.
fn check_members(
    o: &Map<String, Value>,
    path: &mut String,
    depth: usize,
) -> Result<(), IntentError> {
    for (k, x) in o {
        let len = path.len();
        path.push('.');
        path.push_str(k);
        check_integers(x, path, depth + 1)?;
        path.truncate(len);
    }
    Ok(())
}

impl ParsedIntent {
    /// Parses and validates body bytes.
    pub fn parse(body: &[u8]) -> Result<ParsedIntent, IntentError> {
        let v: Value = serde_json::from_slice(body).map_err(|e| err("body", e.to_string()))?;
        Self::from_value(v)
    }

    /// Validates a JSON value as an intent (also used to re-check a stored canonical intent).
    pub fn from_value(v: Value) -> Result<ParsedIntent, IntentError> {
        let Value::Object(mut o) = v else {
            return Err(err("body", "must be a JSON object"));
        };
        for k in o.keys() {
            if !matches!(k.as_str(), "op" | "target" | "amount" | "params") {
                return Err(err(
                    k.clone(),
                    "unknown field (expected op, target, amount, params)",
                ));
            }
        }
        let op = match o.get("op") {
            Some(Value::String(s)) if name_ok(s, 64) => s.clone(),
            Some(Value::String(_)) => return Err(err("op", "must be 1-64 of [A-Za-z0-9._:-]")),
            Some(_) => return Err(err("op", "must be a string")),
            None => return Err(err("op", "missing")),
        };
        let target = match o.get("target") {
            Some(Value::String(s)) if name_ok(s, 128) => s.clone(),
            Some(Value::String(_)) => {
                return Err(err("target", "must be 1-128 of [A-Za-z0-9._:-]"))
            }
            Some(_) => return Err(err("target", "must be a string")),
            None => return Err(err("target", "missing")),
        };
        let amount = match o.get("amount") {
            Some(Value::Number(n)) => match n.as_u64() {
                Some(a) if a <= MAX_SAFE_INTEGER => a,
                _ => {
                    return Err(err(
                        "amount",
                        "must be a non-negative integer below 2^53 (no floats)",
                    ))
                }
            },
            Some(_) => return Err(err("amount", "must be an integer")),
            None => return Err(err("amount", "missing")),
        };
        let params = match o.remove("params") {
            None => Map::new(),
            Some(Value::Object(p)) => {
                let mut path = String::from("params");
                // `params` itself is at depth 1, its members at depth 2.
                check_members(&p, &mut path, 1)?;
                p
            }
            Some(_) => return Err(err("params", "must be an object")),
        };
        // The typed intent and the JSON value each own their params: one copy for the intent;
        // the map itself moves into `value` (`json!` would serialize it into another copy).
        let intent = Intent {
            op,
            target,
            amount,
            params: params.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        };
        let value = Value::Object(Map::from_iter([
            ("op".to_string(), Value::String(intent.op.clone())),
            ("target".to_string(), Value::String(intent.target.clone())),
            ("amount".to_string(), Value::from(amount)),
            ("params".to_string(), Value::Object(params)),
        ]));
        let canonical = canonical(&value);
        let fingerprint = sha256_hex(&canonical);
        Ok(ParsedIntent {
            intent,
            value,
            canonical,
            fingerprint,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(body: &str) -> String {
        ParsedIntent::parse(body.as_bytes())
            .map(|_| String::new())
            .unwrap_or_else(|e| e.field)
    }

    #[test]
    fn refusals_name_the_field() {
        assert_eq!(field(r#"{"op":"t","target":"a","amount":1.5}"#), "amount");
        assert_eq!(field(r#"{"op":"t","target":"a","amount":-1}"#), "amount");
        assert_eq!(field(r#"{"op":"t","target":"a"}"#), "amount");
        assert_eq!(field(r#"{"op":"t","target":"a","amount":1,"x":1}"#), "x");
        assert_eq!(
            field(r#"{"op":"t","target":"a","amount":1,"params":{"a":[1,2.5]}}"#),
            "params.a[1]"
        );
        assert_eq!(field(r#"{"op":"","target":"a","amount":1}"#), "op");
        assert_eq!(field(r#"{"op":"t","target":7,"amount":1}"#), "target");
        assert_eq!(field("[1]"), "body");
        assert_eq!(field("{"), "body");
        assert_eq!(field(r#"{"op":"t","target":"a","amount":1}"#), "");
    }

    #[test]
    fn canonical_form_ignores_spelling() {
        let a = ParsedIntent::parse(br#"{"target":"a","op":"t","amount":1}"#);
        let b = ParsedIntent::parse(br#"{ "op" : "t", "amount":1, "target":"a", "params":{} }"#);
        let (Ok(a), Ok(b)) = (a, b) else {
            panic!("both parse")
        };
        assert_eq!(a.canonical, b.canonical);
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_eq!(
            String::from_utf8_lossy(&a.canonical),
            r#"{"amount":1,"op":"t","params":{},"target":"a"}"#
        );
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        fn json_int() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                (-(MAX_SAFE_INTEGER as i64)..=(MAX_SAFE_INTEGER as i64)).prop_map(Value::from),
                "[a-z\u{e9}\u{1F600}\\\"]{0,6}".prop_map(Value::from),
                any::<bool>().prop_map(Value::from),
                Just(Value::Null),
            ];
            leaf.prop_recursive(3, 16, 4, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    proptest::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #[test]
            fn canonical_intent_round_trips(
                op in "[a-z]{1,8}", target in "[a-z0-9-]{1,8}", amount in 0..=MAX_SAFE_INTEGER,
                params in proptest::collection::btree_map("[a-z]{1,4}", json_int(), 0..4),
            ) {
                let v = serde_json::json!({"op": op, "target": target, "amount": amount, "params": params});
                // Any spelling (pretty, reordered) gives the same canonical bytes and fingerprint.
                let pretty = serde_json::to_vec_pretty(&v).unwrap_or_default();
                let a = ParsedIntent::parse(&pretty);
                prop_assert!(a.is_ok(), "{:?}", a.err());
                let a = a.unwrap_or_else(|e| panic!("{e}"));
                let b = ParsedIntent::parse(&a.canonical).unwrap_or_else(|e| panic!("{e}"));
                prop_assert_eq!(&a.canonical, &b.canonical);
                prop_assert_eq!(&a.fingerprint, &b.fingerprint);
                prop_assert_eq!(&a.intent, &b.intent);
                prop_assert_eq!(serde_json::from_slice::<Value>(&a.canonical).ok(), Some(v));
            }
        }
    }
}
