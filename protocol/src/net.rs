//! How a process makes sure it can listen (before start-up) and proves its own listener up
//! (readiness checks of the hub and the association).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
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

/// What one readiness probe of a listener found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// This process's listener accepted it: ready.
    Ours,
    /// Nothing accepted it (not bound yet).
    Refused,
    /// Something accepted it and this process never saw it arrive: another process holds the
    /// address.
    Foreign,
}

/// Whether a listener of this process is up, proved by a probe connection the process sees
/// arrive (a connection to the address is not proof: a listener of another process there
/// accepts it too). The server calls [`ListenerProbe::arrived`] for each connection it accepts
/// until [`ListenerProbe::is_ready`]; readiness checks call [`ListenerProbe::probe`].
#[derive(Debug, Default)]
pub struct ListenerProbe {
    ready: AtomicBool,
    /// Source addresses of the probes in progress (several `/readyz` may probe at once).
    sources: Mutex<Vec<SocketAddr>>,
}

/// Takes a probe's source address out of the pending ones however the probe ends.
struct Pending<'a>(&'a Mutex<Vec<SocketAddr>>, SocketAddr);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        s.retain(|a| *a != self.1);
    }
}

impl ListenerProbe {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Ready without a probe (an address that cannot be probed).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    /// For a connection the listener accepted from `peer`: true (and ready) when it is the
    /// probe, which the server then closes.
    pub fn arrived(&self, peer: Option<SocketAddr>) -> bool {
        let Some(peer) = peer else {
            return false;
        };
        let sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if !sources.contains(&peer) {
            return false;
        }
        self.ready.store(true, Ordering::SeqCst);
        true
    }

    /// Connects to the listener at `addr` (see [`probe_addr`]) and waits up to
    /// [`PROBE_TIMEOUT`] for [`ListenerProbe::arrived`] to see it.
    pub async fn probe(&self, addr: SocketAddr) -> Probe {
        if self.is_ready() {
            return Probe::Ours;
        }
        // The source address is fixed (and noted) before connecting: the listener may accept
        // the connection before `connect` returns here.
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        };
        let Ok(socket) = socket else {
            return Probe::Refused;
        };
        // Same address (and IPv6 scope), any port.
        let mut src = addr;
        src.set_port(0);
        let Ok(local) = socket.bind(src).and_then(|()| socket.local_addr()) else {
            return Probe::Refused;
        };
        self.sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(local);
        let _pending = Pending(&self.sources, local);
        let Ok(Ok(_conn)) = tokio::time::timeout(PROBE_TIMEOUT, socket.connect(addr)).await else {
            return Probe::Refused;
        };
        let end = tokio::time::Instant::now() + PROBE_TIMEOUT;
        while tokio::time::Instant::now() < end {
            if self.is_ready() {
                return Probe::Ours;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        Probe::Foreign
    }
}

/// A Pingora server app behind its listener's readiness proof: until `listener` is ready, each
/// connection the listener accepts is checked for the probe (and closed if it is one; one peer
/// lookup per connection, only before ready), then `app` serves it.
#[cfg(feature = "pingora")]
pub struct Probed<A> {
    pub app: std::sync::Arc<A>,
    pub listener: std::sync::Arc<ListenerProbe>,
}

#[cfg(feature = "pingora")]
#[async_trait::async_trait]
impl<A> pingora_core::apps::ServerApp for Probed<A>
where
    A: pingora_core::apps::ServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &std::sync::Arc<Self>,
        io: pingora_core::protocols::Stream,
        shutdown: &pingora_core::server::ShutdownWatch,
    ) -> Option<pingora_core::protocols::Stream> {
        if !self.listener.is_ready() {
            let peer = io
                .get_socket_digest()
                .and_then(|d| d.peer_addr().and_then(|a| a.as_inet().copied()));
            if self.listener.arrived(peer) {
                return None;
            }
        }
        self.app.process_new(io, shutdown).await
    }

    async fn cleanup(&self) {
        self.app.cleanup().await
    }
}

/// A background service probing a listener from start-up until it is proved up (`addr`
/// `None`: an address that cannot be probed, taken as up), so that its connections stop being
/// checked for the probe whether or not anyone asks `/readyz`.
#[cfg(feature = "pingora")]
pub struct ProveUp {
    pub listener: std::sync::Arc<ListenerProbe>,
    pub addr: Option<SocketAddr>,
}

#[cfg(feature = "pingora")]
#[async_trait::async_trait]
impl pingora_core::services::background::BackgroundService for ProveUp {
    async fn start(&self, mut shutdown: pingora_core::server::ShutdownWatch) {
        let Some(addr) = self.addr else {
            self.listener.set_ready();
            return;
        };
        while !self.listener.is_ready() {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = self.listener.probe(addr) => {}
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
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

/// The address a listener for `listen` binds: like Pingora, the first one `listen` resolves to
/// (`ip:port`, or `host:port`).
pub fn listen_addr(listen: &str) -> std::io::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    listen.to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "resolves to no address")
    })
}

/// How long [`check_listen`] waits for a taken address to come free (a process restarted
/// just after the old one was told to stop, which closes its listeners at once).
pub const LISTEN_WAIT: Duration = Duration::from_secs(2);

/// Checks before a server starts that it can listen on every one of `addrs`: binds what each
/// resolves to ([`listen_addr`]) all at once (two equal addresses collide, as they would in
/// the server) and lets them go; a taken one is tried again for [`LISTEN_WAIT`]. Pingora
/// retries a taken address for 30 s and then only its service thread panics: the process
/// lives on without that listener, and a readiness probe of the address reaches whoever holds
/// it. A process that cannot listen must say so and exit instead.
pub fn check_listen(addrs: &[&str]) -> Result<(), ListenError> {
    let end = std::time::Instant::now() + LISTEN_WAIT;
    let mut held = Vec::with_capacity(addrs.len());
    for &addr in addrs {
        let fail = |source: std::io::Error| {
            let hint = if source.kind() == std::io::ErrorKind::AddrInUse {
                " (another process, or another listener of this one, has it)"
            } else {
                ""
            };
            ListenError {
                addr: addr.to_string(),
                source,
                hint,
            }
        };
        let a = listen_addr(addr).map_err(fail)?;
        loop {
            match std::net::TcpListener::bind(a) {
                Ok(l) => {
                    held.push(l);
                    break;
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse
                        && std::time::Instant::now() < end
                        && !held.iter().any(|l| l.local_addr().ok() == Some(a)) =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(fail(e)),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn wildcards_become_loopback_of_their_family() {
        let p = |s: &str| probe_addr(s.parse().unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(p("0.0.0.0:80").to_string(), "127.0.0.1:80");
        assert_eq!(p("[::]:80").to_string(), "[::1]:80");
        assert_eq!(p("10.1.2.3:80").to_string(), "10.1.2.3:80");
    }

    #[tokio::test]
    async fn only_a_listener_that_sees_the_probe_arrive_is_ready() {
        // Another process's listener: accepts, never reports.
        let foreign = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = foreign.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = foreign.accept().await {
                held.push(s);
            }
        });
        let p = Arc::new(ListenerProbe::default());
        assert_eq!(p.probe(addr).await, Probe::Foreign);
        assert!(!p.is_ready());
        // This process's listener, reporting what it accepts; another connection first, which
        // is not the probe.
        let ours = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = ours.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let other = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let seen = p.clone();
        tokio::spawn(async move {
            while let Ok((_, peer)) = ours.accept().await {
                seen.arrived(Some(peer));
            }
        });
        assert_eq!(p.probe(addr).await, Probe::Ours);
        assert!(p.is_ready());
        drop(other);
        // Nothing listening.
        let gone = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
            l.local_addr().unwrap_or_else(|e| panic!("{e}"))
        };
        let fresh = ListenerProbe::default();
        assert_eq!(fresh.probe(probe_addr(gone)).await, Probe::Refused);
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
        assert!(check_listen(&["localhost:0"]).is_ok(), "a host name");
    }

    #[test]
    fn an_address_freed_within_the_wait_is_taken() {
        // As when the old process was just told to stop: it lets go of the address shortly.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}")).to_string();
        let old = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(l);
        });
        assert!(check_listen(&[&addr]).is_ok());
        let _ = old.join();
    }
}
