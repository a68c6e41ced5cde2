//! Where a process probes its own listener (readiness checks of the hub and the association).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The address to connect to in order to reach a listener bound to `listen`: a wildcard bind
/// (`0.0.0.0` / `[::]`) is reached on the loopback address of the same family.
pub fn probe_addr(mut listen: SocketAddr) -> SocketAddr {
    if listen.ip().is_unspecified() {
        listen.set_ip(match listen {
            SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    listen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_become_loopback_of_their_family() {
        let p = |s: &str| probe_addr(s.parse().unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(p("0.0.0.0:80").to_string(), "127.0.0.1:80");
        assert_eq!(p("[::]:80").to_string(), "[::1]:80");
        assert_eq!(p("10.1.2.3:80").to_string(), "10.1.2.3:80");
    }
}
