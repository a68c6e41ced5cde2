//! Loop-free relay decisions (DESIGN §3): the outbound path and hops, which peers get the request,
//! and which are suppressed (a loop, or no hops left: counted, not an error).

use http::HeaderValue;

use crate::inbound::{path_ids, Inbound};
use crate::reject::Reject;
use crate::table::{Route, RoutingTable};

/// Why a relay peer was not sent the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suppressed {
    /// The peer is already on the path.
    Loop,
    /// No hops left.
    Hops,
}

impl Suppressed {
    pub fn as_str(self) -> &'static str {
        match self {
            Suppressed::Loop => "loop",
            Suppressed::Hops => "hops",
        }
    }
}

/// The relay part of a request plan.
#[derive(Debug, Clone)]
pub struct RelayPlan {
    /// `x-hub-path` to send: the inbound path with this hub appended.
    pub path_out: HeaderValue,
    /// `x-hub-hops` to send: min(inbound, max_hops) - 1.
    pub hops_out: u32,
    /// Peers (upstream indices) to relay to.
    pub relays: Vec<usize>,
    /// Peers not relayed to, and why.
    pub suppressed: Vec<(usize, Suppressed)>,
}

/// Computes the relay plan. A request whose inbound path already names this hub has looped
/// back here: 508, so nothing is delivered twice.
pub fn plan_relays(
    table: &RoutingTable,
    route: &Route,
    inbound: &Inbound,
) -> Result<RelayPlan, Reject> {
    let hub_id = table.hub.id.as_str();
    let path_in = inbound
        .path_in
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if path_ids(path_in).any(|id| id == hub_id) {
        return Err(Reject::new(
            508,
            "loop_detected",
            format!("this hub ({hub_id}) is already on x-hub-path"),
        ));
    }
    let hops_out = inbound
        .hops_in
        .unwrap_or(table.hub.max_hops)
        .min(table.hub.max_hops)
        .saturating_sub(1);
    let path_out = if path_in.is_empty() {
        table.hub.id_header.clone()
    } else {
        let mut s = String::with_capacity(path_in.len() + 1 + hub_id.len());
        s.push_str(path_in);
        s.push(',');
        s.push_str(hub_id);
        // Both parts were validated as ids.
        HeaderValue::from_str(&s).unwrap_or_else(|_| table.hub.id_header.clone())
    };
    let mut relays = Vec::with_capacity(route.relay.len());
    let mut suppressed = Vec::new();
    for &p in &route.relay {
        let Some(peer) = table.upstream(p) else {
            continue;
        };
        if path_ids(path_in).any(|id| id == peer.id) {
            suppressed.push((p, Suppressed::Loop));
        } else if hops_out == 0 {
            suppressed.push((p, Suppressed::Hops));
        } else {
            relays.push(p);
        }
    }
    Ok(RelayPlan {
        path_out,
        hops_out,
        relays,
        suppressed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbound::inbound;
    use crate::table::{load_bytes, tests::sample};
    use http::HeaderMap;

    fn run(pairs: &[(&'static str, &'static str)]) -> Result<RelayPlan, Reject> {
        let t = load_bytes(sample().as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        let i = inbound(&h)?;
        plan_relays(&t, &t.routes[0], &i)
    }

    #[test]
    fn fresh_request_relays_with_max_hops_minus_one() {
        let p = run(&[]).unwrap_or_else(|r| panic!("{r:?}"));
        assert_eq!(p.path_out, "hub-a");
        assert_eq!(p.hops_out, 7);
        assert_eq!(p.relays.len(), 1);
    }

    #[test]
    fn requester_may_only_restrict() {
        let p = run(&[("x-hub-hops", "1000")]).unwrap_or_else(|r| panic!("{r:?}"));
        assert_eq!(p.hops_out, 7, "hops cannot be raised above max_hops");
        let p = run(&[("x-hub-hops", "1")]).unwrap_or_else(|r| panic!("{r:?}"));
        assert_eq!((p.hops_out, p.relays.len()), (0, 0));
        assert_eq!(p.suppressed[0].1, Suppressed::Hops);
        let p = run(&[("x-hub-hops", "0")]).unwrap_or_else(|r| panic!("{r:?}"));
        assert_eq!(p.hops_out, 0);
    }

    #[test]
    fn peers_on_the_path_are_not_relayed_to() {
        let p = run(&[("x-hub-path", "hub-x,hub-b")]).unwrap_or_else(|r| panic!("{r:?}"));
        assert_eq!(p.path_out, "hub-x,hub-b,hub-a");
        assert!(p.relays.is_empty());
        assert_eq!(p.suppressed[0].1, Suppressed::Loop);
    }

    #[test]
    fn own_id_on_the_path_is_a_loop() {
        let r = run(&[("x-hub-path", "hub-a")])
            .err()
            .unwrap_or_else(|| Reject::new(0, "", ""));
        assert_eq!((r.status, r.kind), (508, "loop_detected"));
    }
}
