//! Opt-in HTTP/1.1 pipelining of deliveries (an upstream's `pipeline` in the table).
//!
//! Without it every delivery holds one upstream connection for its whole exchange: a request
//! write, a response read, and under load as many connections as deliveries in flight. With
//! it, an upstream's deliveries queue in one [`Lane`] served by `connections` workers; a free
//! worker takes up to `depth` queued requests (and at most [`BATCH_BYTES`] of them, which
//! keeps a batch's write short; responses are read only after it, so an upstream whose answers
//! are large enough to fill both directions' socket buffers stalls the batch until its
//! timeout), writes them in one vectored write, and reads the responses in order, answering
//! each delivery as its response completes. Under load that is one write and about one read
//! for many deliveries.
//!
//! A response is attributed only by its position (RFC 9112 §9.3.2), which is why this is
//! opt-in, for upstreams known to answer pipelined requests in order. When the upstream ends a
//! connection after answering some of a batch (`Connection: close`, or an upstream that takes
//! no pipelined requests and closes after the first, which may also fail the rest of the
//! write), the unanswered rest goes back to the head of the lane and out again on a new
//! connection (each round answers at least one). A response that breaks (cut midway,
//! malformed) fails its delivery as `broken` (retried where the route retries: safe, since
//! providers deduplicate by request id), and the ones behind it go again. A reused connection
//! that fails before any byte of the batch's first response is retried once on a fresh
//! connection, as for unpipelined deliveries; a fresh one that does fails the whole batch.
//! Connecting and the exchange share the batch's deadline. Only deliveries whose response is
//! drained go through a lane (`accept` routes, `proxy` copies); a `proxy` primary streams its
//! response and `collect` captures one, each on its own connection. A lane idle (no job, no
//! connection) for [`IDLE_TIMEOUT`] is retired with its workers.

use bytes::Bytes;
use multihub_filters::table::Pipeline;
use multihub_protocol::http1::client::{write_all_vectored, Exchange, ExchangeError};
use prometheus::IntCounter;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify};

use crate::deliver::{connect, quiet, AddrHasher, Failure, Link, IDLE_TIMEOUT};

/// Most request bytes (heads and bodies) one batch writes; a single larger request goes alone.
pub const BATCH_BYTES: usize = 256 * 1024;

/// One queued delivery.
struct Job {
    head: Bytes,
    body: Bytes,
    head_only: bool,
    timeout: Duration,
    done: oneshot::Sender<Result<u16, Failure>>,
}

impl Job {
    fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }
}

/// The queue of one upstream's pipelined deliveries, and the signal its workers wait on.
struct Lane {
    queue: Mutex<Queue>,
    ready: Notify,
    /// Set (under the [`Pipes`] map lock) when the lane idled out and left the map: its
    /// workers end, and the next delivery to the upstream makes a new lane.
    retired: AtomicBool,
}

struct Queue {
    jobs: VecDeque<Job>,
    /// When a job was last queued.
    last: Instant,
}

/// Every lane of the process, by upstream address and settings. A lane whose workers found
/// nothing to do for `idle` (and hold no connection) is retired: it leaves the map and its
/// workers end, so lanes of addresses or settings a reload dropped do not linger.
pub struct Pipes {
    lanes: Arc<Mutex<Lanes>>,
    counters: Counters,
    idle: Duration,
}

type Lanes = HashMap<(SocketAddr, Pipeline), Arc<Lane>, BuildHasherDefault<AddrHasher>>;

/// `hub_pipeline_writes_total` and `hub_pipelined_deliveries_total`.
#[derive(Clone)]
struct Counters {
    writes: IntCounter,
    sent: IntCounter,
}

/// What a worker needs besides its lane.
#[derive(Clone)]
struct Ctx {
    key: (SocketAddr, Pipeline),
    lanes: Arc<Mutex<Lanes>>,
    counters: Counters,
    idle: Duration,
}

impl Pipes {
    /// No lanes yet; `writes` counts batches written, `sent` the requests in them.
    pub fn new(writes: IntCounter, sent: IntCounter) -> Pipes {
        Pipes::with_idle(writes, sent, IDLE_TIMEOUT)
    }

    /// Like [`Pipes::new`], with connections closed and lanes retired after `idle`.
    pub fn with_idle(writes: IntCounter, sent: IntCounter, idle: Duration) -> Pipes {
        Pipes {
            lanes: Arc::new(Mutex::new(HashMap::default())),
            counters: Counters { writes, sent },
            idle,
        }
    }

    /// How many lanes exist now.
    pub fn lanes(&self) -> usize {
        self.lanes.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Queues `job` on the lane of `(addr, p)`, made (with its workers) if there is none. The
    /// job is queued under the map lock, so it never lands in a lane being retired.
    fn submit(&self, addr: SocketAddr, p: Pipeline, job: Job) {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        let lane = lanes.entry((addr, p)).or_insert_with(|| {
            let lane = Arc::new(Lane {
                queue: Mutex::new(Queue {
                    jobs: VecDeque::new(),
                    last: Instant::now(),
                }),
                ready: Notify::new(),
                retired: AtomicBool::new(false),
            });
            let ctx = Ctx {
                key: (addr, p),
                lanes: self.lanes.clone(),
                counters: self.counters.clone(),
                idle: self.idle,
            };
            for _ in 0..p.connections {
                tokio::spawn(work(lane.clone(), ctx.clone()));
            }
            lane
        });
        {
            let mut q = lane.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.jobs.push_back(job);
            q.last = Instant::now();
        }
        lane.ready.notify_one();
    }

    /// Delivers one request through `addr`'s lane; `Ok(status)` is a 2xx. Fails with
    /// [`Failure::Timeout`] when no complete response came within `timeout` (queueing
    /// included).
    pub async fn deliver(
        &self,
        addr: SocketAddr,
        p: Pipeline,
        head: Bytes,
        body: Bytes,
        head_only: bool,
        timeout: Duration,
    ) -> Result<u16, Failure> {
        let (done, answer) = oneshot::channel();
        let job = Job {
            head,
            body,
            head_only,
            timeout,
            done,
        };
        self.submit(addr, p, job);
        let status = match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(r)) => r?,
            Ok(Err(_)) => return Err(Failure::Broken("the pipeline worker stopped".into())),
            Err(_) => return Err(Failure::Timeout),
        };
        if (200..300).contains(&status) {
            Ok(status)
        } else {
            Err(Failure::Status(status))
        }
    }
}

/// Takes the next batch off the lane: up to `depth` jobs and [`BATCH_BYTES`] (a single larger
/// job goes alone), skipping jobs whose caller gave up (they are never sent).
fn take(lane: &Lane, depth: usize, batch: &mut VecDeque<Job>) {
    let mut q = lane.queue.lock().unwrap_or_else(|e| e.into_inner());
    let mut bytes = 0;
    while batch.len() < depth {
        match q.jobs.front() {
            Some(j) if j.done.is_closed() => {
                q.jobs.pop_front();
            }
            Some(j) if batch.is_empty() || bytes + j.len() <= BATCH_BYTES => {
                bytes += j.len();
                batch.extend(q.jobs.pop_front());
            }
            _ => break,
        }
    }
}

/// Retires `lane` if nothing was queued on it for `ctx.idle`: takes it out of the map and
/// marks it, under the map lock (which every submission holds). True when it is retired.
fn retire(lane: &Arc<Lane>, ctx: &Ctx) -> bool {
    let mut lanes = ctx.lanes.lock().unwrap_or_else(|e| e.into_inner());
    if lane.retired.load(Ordering::SeqCst) {
        return true;
    }
    let q = lane.queue.lock().unwrap_or_else(|e| e.into_inner());
    if !q.jobs.is_empty() || q.last.elapsed() < ctx.idle {
        return false;
    }
    drop(q);
    if lanes.get(&ctx.key).is_some_and(|l| Arc::ptr_eq(l, lane)) {
        lanes.remove(&ctx.key);
    }
    lane.retired.store(true, Ordering::SeqCst);
    true
}

/// One connection's worker: takes batches off the lane until the lane is retired.
async fn work(lane: Arc<Lane>, ctx: Ctx) {
    let depth = ctx.key.1.depth;
    let mut link: Option<Link> = None;
    let mut batch = VecDeque::with_capacity(depth);
    loop {
        take(&lane, depth, &mut batch);
        if batch.is_empty() {
            if tokio::time::timeout(ctx.idle, lane.ready.notified())
                .await
                .is_err()
            {
                // Idle: close the connection; with none, end if the whole lane is idle.
                if link.take().is_none() && retire(&lane, &ctx) {
                    return;
                }
            }
            continue;
        }
        link = run(&lane, link, ctx.key.0, &mut batch, &ctx.counters).await;
    }
}

/// Sends `batch` on `link` (or a fresh connection) and answers every job in it, or puts the
/// ones the upstream left unanswered back at the head of `lane`. Returns the connection when it
/// can carry the next batch. Connecting, writing and reading share one deadline: the longest
/// timeout of the batch's jobs.
async fn run(
    lane: &Lane,
    link: Option<Link>,
    addr: SocketAddr,
    batch: &mut VecDeque<Job>,
    counters: &Counters,
) -> Option<Link> {
    let timeout = batch
        .iter()
        .map(|j| j.timeout)
        .max()
        .unwrap_or(IDLE_TIMEOUT);
    let deadline = tokio::time::Instant::now() + timeout;
    let dial = || async move {
        match tokio::time::timeout_at(deadline, connect(addr)).await {
            Ok(r) => r,
            Err(_) => Err(Failure::Timeout),
        }
    };
    let reused = link.filter(|l| l.buf.is_empty() && quiet(&l.io));
    let mut fresh = reused.is_none();
    let mut link = match reused {
        Some(l) => l,
        None => match dial().await {
            Ok(l) => l,
            Err(f) => return fail_all(batch, f),
        },
    };
    loop {
        let end = match tokio::time::timeout_at(deadline, exchange(link, batch, counters)).await {
            Ok(end) => end,
            Err(_) => return fail_all(batch, Failure::Timeout),
        };
        match end {
            End::Open(l) => return Some(l),
            End::Closed => return None,
            End::Broke(ExchangeError::BeforeResponse(_), Answered::None) if !fresh => {
                // The upstream had closed the idle connection: once more on a fresh one.
                fresh = true;
                link = match dial().await {
                    Ok(l) => l,
                    Err(f) => return fail_all(batch, f),
                };
            }
            End::Broke(ExchangeError::BeforeResponse(e), Answered::None) => {
                // A fresh connection that answered nothing: no progress to be had here.
                return fail_all(batch, Failure::Broken(e));
            }
            End::Broke(ExchangeError::BeforeResponse(_), Answered::Some) => {
                // The upstream answered some and closed (an upstream that does not take
                // pipelined requests closes after the first): the rest go again, on a new
                // connection (RFC 9112 §9.3.2). Each round answers at least one.
                requeue(lane, batch);
                return None;
            }
            End::Broke(ExchangeError::Broken(e), _) => {
                // The response in progress broke (cut, malformed): that delivery fails (and
                // retries where its route retries); the ones behind it were not answered at
                // all and go again. Each round settles at least one.
                if let Some(j) = batch.pop_front() {
                    let _ = j.done.send(Err(Failure::Broken(e)));
                }
                requeue(lane, batch);
                return None;
            }
        }
    }
}

/// Puts the unanswered jobs of `batch` back at the head of the lane, in their order.
fn requeue(lane: &Lane, batch: &mut VecDeque<Job>) {
    if batch.is_empty() {
        return;
    }
    let mut q = lane.queue.lock().unwrap_or_else(|e| e.into_inner());
    while let Some(j) = batch.pop_back() {
        q.jobs.push_front(j);
    }
    drop(q);
    lane.ready.notify_one();
}

fn fail_all(batch: &mut VecDeque<Job>, f: Failure) -> Option<Link> {
    for j in batch.drain(..) {
        let _ = j.done.send(Err(f.clone()));
    }
    None
}

/// Whether any job of a batch had been answered when it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answered {
    None,
    Some,
}

/// How a batch's exchange ended.
enum End {
    /// Every job answered; the connection carries the next batch.
    Open(Link),
    /// Every job answered; the upstream ended the connection.
    Closed,
    /// The exchange failed with jobs left in the batch (the first of them in progress).
    Broke(ExchangeError, Answered),
}

/// Writes every request of `batch`, then reads the responses in order, answering (and
/// removing) each job as its response completes. A failed write still reads what arrived:
/// an upstream that answers the first request and closes makes the rest of a long write fail,
/// and that first answer is not lost.
async fn exchange(link: Link, batch: &mut VecDeque<Job>, counters: &Counters) -> End {
    let Link { mut io, mut buf } = link;
    let written = {
        let mut slices = Vec::with_capacity(batch.len() * 2);
        for j in batch.iter() {
            slices.push(IoSlice::new(&j.head));
            if !j.body.is_empty() {
                slices.push(IoSlice::new(&j.body));
            }
        }
        write_all_vectored(&mut io, &mut slices).await
    };
    counters.writes.inc();
    counters.sent.inc_by(batch.len() as u64);
    let mut answered = Answered::None;
    while let Some(head_only) = batch.front().map(|j| j.head_only) {
        let (mut ex, resp) = match Exchange::receive(io, buf, head_only).await {
            Ok(r) => r,
            Err(ExchangeError::BeforeResponse(e)) => {
                let e = match &written {
                    Err(w) => format!("writing the batch: {w}; then {e}"),
                    Ok(()) => e,
                };
                return End::Broke(ExchangeError::BeforeResponse(e), answered);
            }
            Err(e) => return End::Broke(e, answered),
        };
        loop {
            match ex.piece().await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => return End::Broke(e, answered),
            }
        }
        if let Some(j) = batch.pop_front() {
            let _ = j.done.send(Ok(resp.status()));
        }
        answered = Answered::Some;
        match ex.into_pipelined() {
            Some((i, b)) => (io, buf) = (i, b),
            None if batch.is_empty() => return End::Closed,
            None => {
                // Closed after this response (`Connection: close`): none of the rest will be.
                return End::Broke(
                    ExchangeError::BeforeResponse("the upstream closed the connection".into()),
                    answered,
                );
            }
        }
    }
    if written.is_err() {
        // Everything was answered although the write failed: the connection is done.
        return End::Closed;
    }
    End::Open(Link { io, buf })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// An upstream answering pipelined requests in order, all answers to what one read brought
    /// in one write; `GET /s/<code>` is answered with status `<code>` and a body naming the
    /// path (none for 204 and 304). Each connection closes after `close_after` answers, saying
    /// so (`Connection: close`) unless `quietly`; `/silent` is never answered, `/cut` gets half
    /// an answer and the connection closes.
    async fn upstream(close_after: usize, quietly: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let conns = Arc::new(AtomicUsize::new(0));
        let seen = conns.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                seen.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut buf, mut answered) = (Vec::new(), 0);
                    let mut chunk = [0u8; 4096];
                    loop {
                        let n = match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        buf.extend_from_slice(&chunk[..n]);
                        let mut out = Vec::new();
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head: Vec<u8> = buf.drain(..end + 4).collect();
                            let line = String::from_utf8_lossy(&head).to_string();
                            let path = line.split(' ').nth(1).unwrap_or("").to_string();
                            if path == "/silent" {
                                continue;
                            }
                            if path == "/cut" {
                                out.extend_from_slice(
                                    b"HTTP/1.1 200 X\r\ncontent-length: 9\r\n\r\nabc",
                                );
                                let _ = s.write_all(&out).await;
                                return;
                            }
                            let code = path.strip_prefix("/s/").unwrap_or("500");
                            answered += 1;
                            let close = answered == close_after;
                            let conn = if close && !quietly {
                                "connection: close\r\n"
                            } else {
                                ""
                            };
                            out.extend_from_slice(
                                if code == "204" || code == "304" {
                                    format!("HTTP/1.1 {code} X\r\n{conn}\r\n")
                                } else {
                                    let n = path.len();
                                    format!("HTTP/1.1 {code} X\r\ncontent-length: {n}\r\n{conn}\r\n{path}")
                                }
                                .as_bytes(),
                            );
                            if close {
                                let _ = s.write_all(&out).await;
                                return;
                            }
                        }
                        if !out.is_empty() && s.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, conns)
    }

    fn head(path: &str) -> Bytes {
        Bytes::from(format!("GET {path} HTTP/1.1\r\nhost: u\r\n\r\n"))
    }

    fn pipes() -> Pipes {
        let c = |n: &str| IntCounter::new(n, "test").unwrap_or_else(|e| panic!("{e}"));
        Pipes::new(c("writes"), c("sent"))
    }

    const P: Pipeline = Pipeline {
        depth: 16,
        connections: 1,
    };

    async fn deliver_all(
        pipes: &Pipes,
        addr: SocketAddr,
        paths: &[String],
    ) -> Vec<Result<u16, Failure>> {
        let wait = Duration::from_secs(10);
        futures::future::join_all(
            paths
                .iter()
                .map(|p| pipes.deliver(addr, P, head(p), Bytes::new(), false, wait)),
        )
        .await
    }

    #[tokio::test]
    async fn every_delivery_gets_the_answer_to_its_own_request() {
        let (addr, conns) = upstream(usize::MAX, false).await;
        let pipes = pipes();
        for round in 0..3 {
            let codes: Vec<u16> = (0..40)
                .map(|i| 200 + ((i * 7 + round) % 100) as u16)
                .collect();
            let paths: Vec<String> = codes.iter().map(|c| format!("/s/{c}")).collect();
            let got = deliver_all(&pipes, addr, &paths).await;
            let want: Vec<Result<u16, Failure>> = codes.iter().map(|&c| Ok(c)).collect();
            assert_eq!(got, want, "round {round}");
        }
        let not_2xx = deliver_all(&pipes, addr, &["/s/503".to_string()]).await;
        assert_eq!(not_2xx, vec![Err(Failure::Status(503))]);
        assert_eq!(
            conns.load(Ordering::SeqCst),
            1,
            "one connection carried every batch"
        );
    }

    #[tokio::test]
    async fn requests_left_unanswered_by_a_closing_upstream_go_again_on_a_new_connection() {
        // Each connection answers three, then closes, saying so or not (an upstream that takes
        // no pipelined requests does the same after the first).
        for quietly in [false, true] {
            let (addr, conns) = upstream(3, quietly).await;
            let pipes = pipes();
            let paths: Vec<String> = (0..10).map(|i| format!("/s/{}", 200 + i)).collect();
            let got = deliver_all(&pipes, addr, &paths).await;
            let want: Vec<Result<u16, Failure>> = (0..10).map(|i| Ok(200 + i)).collect();
            assert_eq!(got, want, "quietly: {quietly}");
            assert_eq!(conns.load(Ordering::SeqCst), 4, "quietly: {quietly}");
        }
    }

    #[tokio::test]
    async fn a_response_cut_midway_fails_its_delivery_only() {
        let (addr, _) = upstream(usize::MAX, false).await;
        let pipes = pipes();
        let paths = ["/s/201", "/cut", "/s/202", "/s/203"].map(String::from);
        let got = deliver_all(&pipes, addr, &paths).await;
        assert_eq!(got[0], Ok(201));
        assert!(matches!(&got[1], Err(Failure::Broken(_))), "{:?}", got[1]);
        assert_eq!(got[2..], [Ok(202), Ok(203)]);
        // First in its batch, too.
        let paths = ["/cut", "/s/204", "/s/205"].map(String::from);
        let got = deliver_all(&pipes, addr, &paths).await;
        assert!(matches!(&got[0], Err(Failure::Broken(_))), "{:?}", got[0]);
        assert_eq!(got[1..], [Ok(204), Ok(205)]);
    }

    #[tokio::test]
    async fn an_idle_lane_is_retired_and_made_again_when_needed() {
        let (addr, conns) = upstream(usize::MAX, false).await;
        let c = |n: &str| IntCounter::new(n, "test").unwrap_or_else(|e| panic!("{e}"));
        let pipes = Pipes::with_idle(c("w"), c("s"), Duration::from_millis(50));
        for round in 0..2 {
            let got = deliver_all(&pipes, addr, &["/s/201".to_string()]).await;
            assert_eq!(got, vec![Ok(201)], "round {round}");
            assert_eq!(pipes.lanes(), 1);
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while pipes.lanes() > 0 {
                assert!(std::time::Instant::now() < deadline, "the idle lane stayed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        assert_eq!(
            conns.load(Ordering::SeqCst),
            2,
            "a new connection for the new lane"
        );
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_after_an_answer_is_replaced_without_failing_anything()
    {
        // Every connection closes after one answer, saying so or not: each next batch goes
        // out on a fresh connection (a silently closed one is seen as closed before the
        // batch, or the batch fails before any response byte and is sent again).
        for quietly in [false, true] {
            let (addr, conns) = upstream(1, quietly).await;
            let pipes = pipes();
            for i in 0..5 {
                let got = deliver_all(&pipes, addr, &[format!("/s/{}", 200 + i)]).await;
                assert_eq!(got, vec![Ok(200 + i)], "quietly: {quietly}");
            }
            assert_eq!(conns.load(Ordering::SeqCst), 5, "quietly: {quietly}");
        }
    }

    #[tokio::test]
    async fn an_unanswered_request_times_out_and_later_ones_use_a_new_connection() {
        let (addr, conns) = upstream(usize::MAX, false).await;
        let pipes = pipes();
        let r = pipes
            .deliver(
                addr,
                P,
                head("/silent"),
                Bytes::new(),
                false,
                Duration::from_millis(200),
            )
            .await;
        assert_eq!(r, Err(Failure::Timeout));
        let got = deliver_all(&pipes, addr, &["/s/201".to_string()]).await;
        assert_eq!(got, vec![Ok(201)]);
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }
}
