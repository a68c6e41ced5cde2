//! Target selection (DESIGN §2 `select`).

use std::sync::atomic::Ordering;

use crate::headers::Headers;
use crate::table::{Route, Selection};

/// FNV-1a 64: a stable, fast hash of a header value (the same on every hub and every restart).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Appends the selected targets (upstream indices) to `out`.
///
/// `healthy(i)` tells whether upstream `i` is believed reachable; only `count` consults it:
/// the first N healthy targets in listed order, topped up with unhealthy ones in order when
/// fewer than N are healthy (they are still tried and reported, never silently skipped).
pub fn select_targets<H: Headers + ?Sized>(
    route: &Route,
    headers: &H,
    healthy: impl Fn(usize) -> bool,
    out: &mut Vec<usize>,
) {
    let t = &route.targets;
    if t.is_empty() {
        return;
    }
    match &route.select {
        Selection::All => out.extend_from_slice(t),
        Selection::Count(n) => {
            let start = out.len();
            out.extend(t.iter().copied().filter(|i| healthy(*i)).take(*n));
            for &i in t {
                if out.len() - start >= *n {
                    break;
                }
                if !out[start..].contains(&i) {
                    out.push(i);
                }
            }
        }
        Selection::Hash(name) => {
            let v = headers.first(name.as_str()).unwrap_or(b"");
            let k = (fnv1a(v) % t.len() as u64) as usize;
            out.push(t[k]);
        }
        Selection::RoundRobin(next) => {
            let k = next.fetch_add(1, Ordering::Relaxed) % t.len();
            out.push(t[k]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{load_bytes, tests::sample};
    use http::{HeaderMap, HeaderValue};

    fn table_with(select: &str) -> crate::table::RoutingTable {
        let doc = sample().replace(
            r#""relay": ["hub-b"]"#,
            &format!(r#""relay": ["hub-b"], "select": {select}"#),
        );
        load_bytes(doc.as_bytes()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn all_and_count_with_health() {
        let t = table_with(r#""all""#);
        let mut out = vec![];
        select_targets(&t.routes[0], &HeaderMap::new(), |_| true, &mut out);
        assert_eq!(out, t.routes[0].targets);

        let t = table_with(r#"{"count": 2}"#);
        let r = &t.routes[0];
        let mut out = vec![];
        select_targets(r, &HeaderMap::new(), |_| true, &mut out);
        assert_eq!(out, r.targets[..2]);
        out.clear();
        let first = r.targets[0];
        select_targets(r, &HeaderMap::new(), |i| i != first, &mut out);
        assert_eq!(out, r.targets[1..3], "unhealthy first target skipped");
        out.clear();
        select_targets(r, &HeaderMap::new(), |_| false, &mut out);
        assert_eq!(out, r.targets[..2], "none healthy: still N, in order");
    }

    #[test]
    fn hash_is_stable_and_spreads() {
        let t = table_with(r#"{"hash": "x-tenant"}"#);
        let r = &t.routes[0];
        let pick = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("x-tenant", HeaderValue::from_static(v));
            let mut out = vec![];
            select_targets(r, &h, |_| true, &mut out);
            assert_eq!(out.len(), 1);
            out[0]
        };
        assert_eq!(pick("t1"), pick("t1"));
        let all: std::collections::BTreeSet<_> = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]
            .iter()
            .map(|v| pick(v))
            .collect();
        assert!(all.len() > 1, "ten tenants all on one target");
    }

    #[test]
    fn round_robin_rotates() {
        let t = table_with(r#""round_robin""#);
        let r = &t.routes[0];
        let mut out = vec![];
        for _ in 0..6 {
            select_targets(r, &HeaderMap::new(), |_| true, &mut out);
        }
        assert_eq!(&out[..3], &r.targets[..]);
        assert_eq!(&out[3..], &r.targets[..]);
    }
}
