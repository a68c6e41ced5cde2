//! How a process makes sure it can listen (before start-up) and probes its own listener
//! (readiness checks of the hub and the association).

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

/// A listen address the process cannot listen on.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}{hint}")]
pub struct ListenError {
    pub addr: String,
    #[source]
    pub source: std::io::Error,
    hint: &'static str,
}

/// Checks before a server starts that it can listen on every one of `addrs`: binds them all at
/// once (two equal addresses collide, as they would in the server) and lets them go. Pingora
/// retries a busy address for 30 s and then only its service thread panics: the process lives
/// on without that listener, and a readiness probe of the address reaches whoever holds it. A
/// process that cannot listen must say so and exit instead.
pub fn check_listen(addrs: &[&str]) -> Result<(), ListenError> {
    let mut held = Vec::with_capacity(addrs.len());
    for &addr in addrs {
        match std::net::TcpListener::bind(addr) {
            Ok(l) => held.push(l),
            Err(source) => {
                let hint = if source.kind() == std::io::ErrorKind::AddrInUse {
                    " (another process, or another listener of this one, has it)"
                } else {
                    ""
                };
                return Err(ListenError {
                    addr: addr.to_string(),
                    source,
                    hint,
                });
            }
        }
    }
    Ok(())
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

    #[test]
    fn a_taken_or_repeated_address_cannot_be_listened_on() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let taken = l.local_addr().unwrap_or_else(|e| panic!("{e}")).to_string();
        let e = check_listen(&["127.0.0.1:0", &taken]).err();
        let e = e.map(|e| e.to_string()).unwrap_or_default();
        assert!(e.starts_with(&format!("cannot listen on {taken}: ")), "{e}");
        assert!(e.contains("another process"), "{e}");
        drop(l);
        assert!(check_listen(&[&taken, "127.0.0.1:0"]).is_ok());
        assert!(
            check_listen(&[&taken, &taken]).is_err(),
            "the same address twice"
        );
        assert!(check_listen(&["127.0.0.1:99999"]).is_err(), "no such port");
    }
}
