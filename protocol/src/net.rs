//! How a process probes its own listener (readiness checks of the hub and the association).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// Longest one probe may take: with a full accept queue the kernel drops SYNs and an unbounded
/// connect would retry for minutes.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

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

/// True when the listener at `probe` (see [`probe_addr`]) accepts a connection within
/// [`PROBE_TIMEOUT`].
pub async fn accepts(probe: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(probe)).await,
        Ok(Ok(_))
    )
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

    #[tokio::test]
    async fn accepts_only_while_something_listens() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
        assert!(accepts(probe_addr(addr)).await);
        drop(l);
        assert!(!accepts(addr).await);
    }
}
