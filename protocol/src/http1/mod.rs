//! Lean HTTP/1.1 for the hot paths: the server side ([`Conn`], the hub's and the association's
//! listeners) and the client side ([`client::Exchange`], the hub's upstream deliveries).
//!
//! Pingora's `HttpServerApp` and proxy session build a whole session object per request (header
//! maps, digests, timers, per-exchange buffers). On the association's `POST /signals` that
//! machinery cost more CPU than the signature check; on one thread answering from the request
//! head it cost 19–31 µs per request against ~11 µs here. [`Conn`] serves the same protocol with one read buffer and one
//! write buffer reused for the life of the connection: heads are parsed with `httparse` in
//! place, bodies are split off the read buffer without copying, and every answer leaves in one
//! write. It runs inside a Pingora `ServerApp`, so listeners, graceful shutdown and upgrades
//! stay Pingora's.
//!
//! What it speaks (RFC 9112): keep-alive (HTTP/1.1 by default, HTTP/1.0 on request) and
//! pipelining; `Content-Length` and `chunked` request bodies (both at once, an unknown coding,
//! or conflicting lengths are refused as request-smuggling risks); `Expect: 100-continue`;
//! fixed-length and chunked (streamed) answers. Idle keep-alive connections close on shutdown.

use bytes::{Buf, Bytes, BytesMut};
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

mod body;
pub mod client;

use body::{fill, next_piece, Body};

/// Most header lines a request head may carry.
pub const MAX_HEADERS: usize = 64;
/// Longest chunk-size line (with extensions) or trailer section accepted in a chunked body.
pub(crate) const MAX_CHUNK_LINE: usize = 4096;
/// Bodies up to this size are copied out of the read buffer rather than split off it.
const COPY_BODY_MAX: usize = 4096;
/// Read-buffer growth step.
pub(crate) const READ_CHUNK: usize = 8192;

/// Per-connection limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request head (request line + headers).
    pub max_head_bytes: usize,
    /// How long an idle keep-alive connection waits for its next request.
    pub idle_timeout: Duration,
    /// How long any one read may wait once a request has started, and any one write.
    pub io_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head_bytes: 64 * 1024 - 1,
            idle_timeout: Duration::from_secs(60),
            io_timeout: Duration::from_secs(30),
        }
    }
}

/// A request head that cannot be served. The connection closes after the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub detail: String,
}

impl Refusal {
    fn new(status: u16, detail: impl Into<String>) -> Refusal {
        Refusal {
            status,
            detail: detail.into(),
        }
    }
}

/// Why a request body could not be read. The connection closes after the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// The body (declared or counted) exceeds the cap.
    TooLarge(usize),
    /// Bad chunked framing, an early end of the stream, or a timeout.
    Bad(String),
}

/// How the request body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
}

/// A parsed request head. Names and values point into the head's bytes.
#[derive(Debug)]
pub struct Request {
    head: Bytes,
    method: (u16, u16),
    target: (u16, u16),
    headers: Vec<[u16; 4]>,
    http10: bool,
    framing: Framing,
    expect_continue: bool,
}

impl Request {
    /// Parses a complete request head (bytes after it are ignored), refusing ambiguous framing
    /// and unsupported expectations as [`Conn::next_request`] does; a head over 65,535 bytes is
    /// a 431, too many header lines a 400. For tools and tests; connections parse in place.
    pub fn parse(head: Bytes) -> Result<Request, Refusal> {
        let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut hdrs);
        match req.parse(&head) {
            Ok(httparse::Status::Complete(n)) if n <= u16::MAX as usize => {
                let (mut r, _) = lower(&req, head.as_ptr() as usize)?;
                r.head = head.slice(..n);
                Ok(r)
            }
            Ok(httparse::Status::Complete(_)) => Err(Refusal::new(431, "request head too long")),
            Ok(httparse::Status::Partial) => Err(Refusal::new(400, "incomplete request head")),
            Err(e) => Err(Refusal::new(400, format!("malformed request head: {e}"))),
        }
    }

    fn slice(&self, (a, b): (u16, u16)) -> &[u8] {
        self.head.get(a as usize..b as usize).unwrap_or_default()
    }

    fn str(&self, r: (u16, u16)) -> &str {
        // httparse admits only token characters in the method and visible ASCII in the target.
        std::str::from_utf8(self.slice(r)).unwrap_or_default()
    }

    pub fn method(&self) -> &str {
        self.str(self.method)
    }

    /// The request target as sent (path and query).
    pub fn target(&self) -> &str {
        self.str(self.target)
    }

    /// The request target's bytes, sharing the head's memory.
    pub fn target_bytes(&self) -> Bytes {
        let end = usize::from(self.target.1).min(self.head.len());
        self.head.slice(usize::from(self.target.0).min(end)..end)
    }

    pub fn path(&self) -> &str {
        let t = self.target();
        t.split_once('?').map_or(t, |(p, _)| p)
    }

    pub fn query(&self) -> Option<&str> {
        self.target().split_once('?').map(|(_, q)| q)
    }

    pub fn is_http10(&self) -> bool {
        self.http10
    }

    /// The first header named `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| {
                self.slice((h[0], h[1]))
                    .eq_ignore_ascii_case(name.as_bytes())
            })
            .map(|h| self.slice((h[2], h[3])))
    }

    /// How many header lines the head has.
    pub fn header_count(&self) -> usize {
        self.headers.len()
    }

    /// Every header, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers
            .iter()
            .map(|h| (self.slice((h[0], h[1])), self.slice((h[2], h[3]))))
    }

    /// The declared body length; `None` when chunked.
    pub fn content_length(&self) -> Option<u64> {
        match self.framing {
            Framing::Length(n) => Some(n),
            Framing::Chunked => None,
        }
    }

    fn has_body(&self) -> bool {
        self.framing != Framing::Length(0)
    }
}

pub(crate) fn offsets(base: usize, s: &[u8]) -> (u16, u16) {
    let a = (s.as_ptr() as usize).saturating_sub(base);
    (a as u16, (a + s.len()) as u16)
}

/// Tokens of a comma-separated header value, trimmed.
pub fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|b| *b == b',').map(|t| t.trim_ascii())
}

/// Builds a [`Request`] from a complete head; refuses framing that is ambiguous.
/// The head's bytes are attached by the caller (`head` is empty here).
fn lower(req: &httparse::Request<'_, '_>, base: usize) -> Result<(Request, bool), Refusal> {
    let method = req.method.unwrap_or_default();
    let target = req.path.unwrap_or_default();
    let http10 = req.version == Some(0);
    let mut framing: Option<Framing> = None;
    let mut chunked = false;
    let mut close = http10;
    let mut expect_continue = false;
    let mut headers = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let (n0, n1) = offsets(base, h.name.as_bytes());
        let (v0, v1) = offsets(base, h.value);
        headers.push([n0, n1, v0, v1]);
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(h.value.trim_ascii())
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| Refusal::new(400, "content-length is not a number"))?;
            match framing {
                Some(Framing::Length(m)) if m != n => {
                    return Err(Refusal::new(400, "conflicting content-length headers"))
                }
                _ => framing = Some(Framing::Length(n)),
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if http10 {
                return Err(Refusal::new(
                    400,
                    "transfer-encoding in an HTTP/1.0 request",
                ));
            }
            for t in tokens(h.value) {
                if chunked || !t.eq_ignore_ascii_case(b"chunked") {
                    return Err(Refusal::new(
                        400,
                        "transfer-encoding other than a single chunked is not supported",
                    ));
                }
                chunked = true;
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for t in tokens(h.value) {
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if http10 && t.eq_ignore_ascii_case(b"keep-alive") {
                    close = false;
                }
            }
        } else if name.eq_ignore_ascii_case(b"expect") {
            if h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue") {
                expect_continue = !http10;
            } else {
                return Err(Refusal::new(417, "unsupported expectation"));
            }
        }
    }
    let framing = match (framing, chunked) {
        (Some(_), true) => {
            return Err(Refusal::new(
                400,
                "both content-length and transfer-encoding",
            ))
        }
        (_, true) => Framing::Chunked,
        (Some(f), false) => f,
        (None, false) => Framing::Length(0),
    };
    let (m0, m1) = offsets(base, method.as_bytes());
    let (t0, t1) = offsets(base, target.as_bytes());
    Ok((
        Request {
            head: Bytes::new(),
            method: (m0, m1),
            target: (t0, t1),
            headers,
            http10,
            framing,
            expect_continue,
        },
        close,
    ))
}

/// How a streamed answer's body is delimited ([`Conn::start_answer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// `content-length` is added; exactly that many bytes must follow.
    Length(u64),
    /// Chunked (HTTP/1.1 clients) or delimited by the close (HTTP/1.0 clients).
    Chunked,
    /// No body follows and no framing header is added: answers to HEAD, 204 and 304, whose
    /// given headers may describe a body that is not sent.
    NoBody,
    /// The body follows as it is, framed by the `Transfer-Encoding` among the given headers,
    /// and the connection closes after it (a body with codings other than chunked, passed
    /// through).
    Raw,
}

/// How an answer's body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AnswerFraming {
    Length(u64),
    Chunked,
    /// HTTP/1.0 streams end with the connection.
    UntilClose,
    /// No framing header (see [`Answer::NoBody`]).
    Given,
}

/// What [`Conn::next_request`] found.
#[derive(Debug)]
pub enum Next {
    Request(Request),
    /// The head cannot be served: answer it (the connection then closes).
    Refused(Refusal),
    /// The client left, went idle past the timeout, or the server is shutting down.
    Closed,
}

/// One server-side connection.
pub struct Conn<S> {
    io: S,
    buf: BytesMut,
    out: Vec<u8>,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
    /// Keep the connection after the current answer.
    keep_alive: bool,
    /// The current request is HTTP/1.0 (answers say so).
    http10: bool,
    /// The current request has a body not yet read.
    body_unread: bool,
    /// A 100 Continue is owed before reading the body.
    continue_owed: bool,
    /// Framing of the answer being streamed.
    streaming: AnswerFraming,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(io: S, limits: Limits, shutdown: watch::Receiver<bool>) -> Conn<S> {
        Conn {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
            out: Vec::with_capacity(1024),
            limits,
            shutdown,
            keep_alive: false,
            http10: false,
            body_unread: false,
            continue_owed: false,
            streaming: AnswerFraming::Given,
        }
    }

    /// The stream, for handing back to Pingora or closing.
    pub fn into_inner(self) -> S {
        self.io
    }

    /// Whether the connection stays open after the current answer.
    pub fn keep_alive(&self) -> bool {
        self.keep_alive
    }

    /// Closes the connection after the current answer.
    pub fn close_after_answer(&mut self) {
        self.keep_alive = false;
    }

    /// Longest head accepted: the configured limit, at most what 16-bit offsets address.
    fn max_head(&self) -> usize {
        self.limits.max_head_bytes.min(u16::MAX as usize)
    }

    /// Reads more bytes; `Ok(0)` at the end of the stream.
    async fn fill(&mut self, wait: Duration) -> std::io::Result<usize> {
        fill(&mut self.io, &mut self.buf, Some(wait)).await
    }

    /// Waits for the next request head. A connection with nothing buffered waits at most the
    /// idle timeout, and closes at once when the server shuts down.
    pub async fn next_request(&mut self) -> Next {
        if self.body_unread {
            return Next::Closed;
        }
        loop {
            if !self.buf.is_empty() {
                let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut req = httparse::Request::new(&mut hdrs);
                match req.parse(&self.buf) {
                    Ok(httparse::Status::Complete(n)) if n > self.max_head() => {
                        // A head that completed within one large read can still be too long
                        // (and offsets into it are 16-bit).
                        self.keep_alive = false;
                        return Next::Refused(Refusal::new(
                            431,
                            format!("request head exceeds {} bytes", self.max_head()),
                        ));
                    }
                    Ok(httparse::Status::Complete(n)) => {
                        let lowered = lower(&req, self.buf.as_ptr() as usize);
                        // The head's bytes move out of the buffer without a copy; the request
                        // holds offsets into them.
                        let head = self.buf.split_to(n).freeze();
                        return match lowered {
                            Ok((mut r, close)) => {
                                r.head = head;
                                self.keep_alive = !close && !*self.shutdown.borrow();
                                self.http10 = r.http10;
                                self.body_unread = r.has_body();
                                self.continue_owed = r.expect_continue;
                                Next::Request(r)
                            }
                            Err(refusal) => {
                                self.keep_alive = false;
                                Next::Refused(refusal)
                            }
                        };
                    }
                    Ok(httparse::Status::Partial) => {
                        if self.buf.len() > self.max_head() {
                            self.keep_alive = false;
                            return Next::Refused(Refusal::new(
                                431,
                                format!("request head exceeds {} bytes", self.max_head()),
                            ));
                        }
                    }
                    Err(httparse::Error::TooManyHeaders) => {
                        self.keep_alive = false;
                        return Next::Refused(Refusal::new(
                            431,
                            format!("more than {MAX_HEADERS} header lines"),
                        ));
                    }
                    Err(e) => {
                        self.keep_alive = false;
                        return Next::Refused(Refusal::new(
                            400,
                            format!("malformed request head: {e}"),
                        ));
                    }
                }
            }
            let read = if self.buf.is_empty() {
                if *self.shutdown.borrow() {
                    return Next::Closed;
                }
                let idle = self.limits.idle_timeout;
                tokio::select! {
                    // In order: no random branch choice on every poll.
                    biased;
                    r = fill(&mut self.io, &mut self.buf, Some(idle)) => r,
                    _ = self.shutdown.changed() => return Next::Closed,
                }
            } else {
                self.fill(self.limits.io_timeout).await
            };
            match read {
                Ok(0) | Err(_) => return Next::Closed,
                Ok(_) => {}
            }
        }
    }

    /// Reads the whole body of `req`, at most `cap` bytes. A declared length over the cap is
    /// refused before anything is read. On an error the connection closes after the answer.
    pub async fn read_body(&mut self, req: &Request, cap: usize) -> Result<Bytes, BodyError> {
        if !self.body_unread {
            return Ok(Bytes::new());
        }
        let r = self.read_body_inner(req.framing, cap).await;
        match &r {
            Ok(_) => self.body_unread = false,
            Err(_) => self.keep_alive = false,
        }
        r
    }

    async fn read_body_inner(&mut self, framing: Framing, cap: usize) -> Result<Bytes, BodyError> {
        if let Framing::Length(n) = framing {
            if n > cap as u64 {
                return Err(BodyError::TooLarge(cap));
            }
        }
        if self.continue_owed {
            self.continue_owed = false;
            if self.buf.is_empty() {
                self.write_out(b"HTTP/1.1 100 Continue\r\n\r\n")
                    .await
                    .map_err(|e| BodyError::Bad(format!("writing 100 Continue: {e}")))?;
            }
        }
        match framing {
            Framing::Length(n) => {
                let n = n as usize;
                while self.buf.len() < n {
                    self.more().await?;
                }
                if n <= COPY_BODY_MAX {
                    // A small body is copied out: a split would pin the whole read buffer for
                    // as long as the body lives (the association keeps it until it is durable)
                    // and force a fresh buffer for the next read.
                    let b = Bytes::copy_from_slice(&self.buf[..n]);
                    self.buf.advance(n);
                    Ok(b)
                } else {
                    Ok(self.buf.split_to(n).freeze())
                }
            }
            Framing::Chunked => self.read_chunked(cap).await,
        }
    }

    /// Reads more of a started request; the end of the stream or a timeout is an error.
    async fn more(&mut self) -> Result<(), BodyError> {
        match self.fill(self.limits.io_timeout).await {
            Ok(0) => Err(BodyError::Bad("the stream ended inside the body".into())),
            Ok(_) => Ok(()),
            Err(e) => Err(BodyError::Bad(format!("reading the body: {e}"))),
        }
    }

    async fn read_chunked(&mut self, cap: usize) -> Result<Bytes, BodyError> {
        let mut state = Body::Chunked {
            left: 0,
            crlf: false,
        };
        let mut out = BytesMut::new();
        let wait = Some(self.limits.io_timeout);
        while let Some(piece) = next_piece(&mut self.io, &mut self.buf, &mut state, wait)
            .await
            .map_err(BodyError::Bad)?
        {
            out.extend_from_slice(&piece);
            let left = match state {
                Body::Chunked { left, .. } => left,
                _ => 0,
            };
            if out.len() as u64 + left > cap as u64 {
                return Err(BodyError::TooLarge(cap));
            }
        }
        Ok(out.freeze())
    }

    /// Starts an answer head in the write buffer: status line, `date` (unless `headers` carry
    /// one), framing and `connection` as needed, then `headers`.
    fn head(&mut self, status: u16, headers: &[(&str, &[u8])], framing: AnswerFraming) {
        if self.body_unread {
            // The body was not read: the connection cannot carry another request.
            self.keep_alive = false;
        }
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(if self.http10 {
            b"HTTP/1.0 "
        } else {
            b"HTTP/1.1 "
        });
        push_decimal(out, status as u64);
        out.push(b' ');
        out.extend_from_slice(reason(status).as_bytes());
        out.extend_from_slice(b"\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("date")) {
            // Date is a singleton: a proxied answer keeps its origin's.
            out.extend_from_slice(b"date: ");
            push_date(out);
            out.extend_from_slice(b"\r\n");
        }
        match framing {
            AnswerFraming::Length(n) => {
                out.extend_from_slice(b"content-length: ");
                push_decimal(out, n);
                out.extend_from_slice(b"\r\n");
            }
            AnswerFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            AnswerFraming::UntilClose | AnswerFraming::Given => {}
        }
        if !self.keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        } else if self.http10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
        for (k, v) in headers {
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }

    /// Writes a whole answer in one write. False when the client went away.
    /// A 1xx, 204 or 304 answer carries no body and no `content-length` (RFC 9110 §8.6,
    /// §15.4.5): `body` must then be empty, and is not sent.
    pub async fn respond(&mut self, status: u16, headers: &[(&str, &[u8])], body: &[u8]) -> bool {
        let bodiless = (100..200).contains(&status) || status == 204 || status == 304;
        let framing = if bodiless {
            AnswerFraming::Given
        } else {
            AnswerFraming::Length(body.len() as u64)
        };
        self.head(status, headers, framing);
        let mut out = std::mem::take(&mut self.out);
        if !bodiless {
            out.extend_from_slice(body);
        }
        let ok = self.write_out(&out).await.is_ok();
        self.out = out;
        ok
    }

    /// Starts a streamed (chunked) answer that ends the connection (event streams); HTTP/1.0
    /// clients get the stream unframed. False when the client went away.
    pub async fn start_stream(&mut self, status: u16, headers: &[(&str, &[u8])]) -> bool {
        self.keep_alive = false;
        self.start_answer(status, headers, Answer::Chunked).await
    }

    /// Starts an answer whose body follows in [`Conn::stream`] calls and ends with
    /// [`Conn::end_stream`]. `headers` must not carry `content-length` or `transfer-encoding`
    /// unless `answer` is [`Answer::NoBody`]. False when the client went away.
    pub async fn start_answer(
        &mut self,
        status: u16,
        headers: &[(&str, &[u8])],
        answer: Answer,
    ) -> bool {
        let framing = match answer {
            Answer::Length(n) => AnswerFraming::Length(n),
            Answer::NoBody => AnswerFraming::Given,
            Answer::Raw => {
                self.keep_alive = false;
                AnswerFraming::UntilClose
            }
            Answer::Chunked if self.http10 => {
                self.keep_alive = false;
                AnswerFraming::UntilClose
            }
            Answer::Chunked => AnswerFraming::Chunked,
        };
        self.streaming = framing;
        self.head(status, headers, framing);
        let out = std::mem::take(&mut self.out);
        let ok = self.write_out(&out).await.is_ok();
        self.out = out;
        ok
    }

    /// Sends one piece of a streamed answer. False when the client went away.
    pub async fn stream(&mut self, data: &[u8]) -> bool {
        if data.is_empty() {
            return true;
        }
        if self.streaming != AnswerFraming::Chunked {
            return self.write_out(data).await.is_ok();
        }
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        push_hex(&mut out, data.len());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
        let ok = self.write_out(&out).await.is_ok();
        self.out = out;
        ok
    }

    /// Ends a streamed answer.
    pub async fn end_stream(&mut self) -> bool {
        match self.streaming {
            AnswerFraming::Chunked => self.write_out(b"0\r\n\r\n").await.is_ok(),
            AnswerFraming::UntilClose => self.io.shutdown().await.is_ok(),
            AnswerFraming::Length(_) | AnswerFraming::Given => true,
        }
    }

    async fn write_out(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let io = &mut self.io;
        // Most answers fit the socket buffer: written and flushed at the first try, with no
        // timer. Only a write that has to wait is bounded by the I/O timeout.
        let mut done = 0;
        let finished = std::future::poll_fn(|cx| loop {
            let step = if done < bytes.len() {
                Pin::new(&mut *io).poll_write(cx, &bytes[done..])
            } else {
                Pin::new(&mut *io).poll_flush(cx).map_ok(|()| 0)
            };
            match step {
                Poll::Pending => return Poll::Ready(Ok(false)),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(_)) if done == bytes.len() => return Poll::Ready(Ok(true)),
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => done += n,
            }
        })
        .await?;
        if finished {
            return Ok(());
        }
        let rest = &bytes[done..];
        let write = async {
            io.write_all(rest).await?;
            io.flush().await
        };
        match tokio::time::timeout(self.limits.io_timeout, write).await {
            Ok(r) => r,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }
}

/// Appends `n` in decimal.
pub fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

fn push_hex(out: &mut Vec<u8>, mut n: usize) {
    let mut tmp = [0u8; 16];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

/// Reason phrases of the statuses the services answer.
fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

thread_local! {
    /// The `date` value of the current second (IMF-fixdate), formatted once per second.
    static DATE: std::cell::Cell<(u64, [u8; 29])> = const { std::cell::Cell::new((u64::MAX, [0; 29])) };
}

fn push_date(out: &mut Vec<u8>) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (sec, text) = DATE.get();
    let text = if sec == now {
        text
    } else {
        let t = imf_fixdate(now);
        DATE.set((now, t));
        t
    };
    out.extend_from_slice(&text);
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` for a Unix time (RFC 9110 §5.6.7).
fn imf_fixdate(unix: u64) -> [u8; 29] {
    const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let days = unix / 86_400;
    let secs = unix % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = [b' '; 29];
    let two = |n: u64| [b'0' + (n / 10 % 10) as u8, b'0' + (n % 10) as u8];
    out[0..3].copy_from_slice(DAYS[(days % 7) as usize]);
    out[3] = b',';
    out[5..7].copy_from_slice(&two(day as u64));
    out[8..11].copy_from_slice(MONTHS[(month - 1) as usize]);
    let y = year.clamp(0, 9999) as u64;
    out[12..14].copy_from_slice(&two(y / 100));
    out[14..16].copy_from_slice(&two(y));
    out[17..19].copy_from_slice(&two(secs / 3600));
    out[19] = b':';
    out[20..22].copy_from_slice(&two(secs / 60 % 60));
    out[22] = b':';
    out[23..25].copy_from_slice(&two(secs % 60));
    out[26..29].copy_from_slice(b"GMT");
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, DuplexStream};

    type Client = DuplexStream;

    fn conn() -> (Conn<DuplexStream>, Client, watch::Sender<bool>) {
        let (a, b) = duplex(1 << 20);
        let (tx, rx) = watch::channel(false);
        (Conn::new(a, Limits::default(), rx), b, tx)
    }

    fn request(n: Next) -> Request {
        match n {
            Next::Request(r) => r,
            other => panic!("expected a request, got {other:?}"),
        }
    }

    fn refusal(n: Next) -> Refusal {
        match n {
            Next::Refused(r) => r,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// Everything the server wrote until it closed its side.
    async fn written(c: Conn<DuplexStream>, mut client: Client) -> String {
        drop(c);
        let mut s = String::new();
        let _ = client.read_to_string(&mut s).await;
        s
    }

    #[tokio::test]
    async fn pipelined_keep_alive_requests_are_answered_in_order() {
        let (mut c, mut client, _tx) = conn();
        client
            .write_all(
                b"POST /signals?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nX-Hub-Route: r1\r\n\r\nhello\
                  GET /b HTTP/1.1\r\nhost: a\r\n\r\n",
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let r = request(c.next_request().await);
        assert_eq!(
            (r.method(), r.path(), r.query()),
            ("POST", "/signals", Some("x=1"))
        );
        assert_eq!(r.header("x-hub-route"), Some(&b"r1"[..]));
        assert_eq!(r.header("HOST"), Some(&b"a"[..]));
        assert_eq!(r.headers().count(), 3);
        assert_eq!(c.read_body(&r, 100).await, Ok(Bytes::from_static(b"hello")));
        assert!(
            c.respond(201, &[("content-type", b"application/json")], b"{}")
                .await
        );
        assert!(c.keep_alive());
        let r = request(c.next_request().await);
        assert_eq!((r.method(), r.path(), r.query()), ("GET", "/b", None));
        assert_eq!(c.read_body(&r, 100).await, Ok(Bytes::new()));
        assert!(c.respond(200, &[], b"ok").await);
        let out = written(c, client).await;
        let first = out
            .find("HTTP/1.1 201 Created\r\ndate: ")
            .unwrap_or(usize::MAX);
        let second = out.find("HTTP/1.1 200 OK\r\n").unwrap_or(usize::MAX);
        assert!(first < second && second < usize::MAX, "{out}");
        assert!(out.contains("content-length: 2\r\ncontent-type: application/json\r\n\r\n{}"));
        assert!(out.ends_with("content-length: 2\r\n\r\nok"), "{out}");
        assert!(!out.contains("connection: close"), "{out}");
    }

    #[tokio::test]
    async fn chunked_bodies_are_decoded_and_capped() {
        let (mut c, mut client, _tx) = conn();
        client
            .write_all(
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
                  5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n",
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let r = request(c.next_request().await);
        assert_eq!(r.content_length(), None);
        assert_eq!(
            c.read_body(&r, 11).await,
            Ok(Bytes::from_static(b"hello world"))
        );
        assert!(c.keep_alive());

        let (mut c, mut client, _tx) = conn();
        client
            .write_all(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let r = request(c.next_request().await);
        assert_eq!(c.read_body(&r, 11).await, Err(BodyError::TooLarge(11)));
        assert!(!c.keep_alive());

        let (mut c, mut client, _tx) = conn();
        client
            .write_all(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let r = request(c.next_request().await);
        assert!(matches!(c.read_body(&r, 100).await, Err(BodyError::Bad(_))));
    }

    #[tokio::test]
    async fn ambiguous_or_oversized_heads_are_refused() {
        let cases: [(&[u8], u16); 7] = [
            (
                b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                400,
            ),
            (b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n", 400),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                400,
            ),
            (
                b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
            ),
            (b"GET / HTTP/1.1\r\nExpect: something\r\n\r\n", 417),
            (b"GET /\x01 HTTP/1.1\r\n\r\n", 400),
        ];
        for (head, status) in cases {
            let (mut c, mut client, _tx) = conn();
            client
                .write_all(head)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let r = refusal(c.next_request().await);
            assert_eq!(r.status, status, "{}", String::from_utf8_lossy(head));
            assert!(!c.keep_alive());
        }
        // Equal repeated lengths are fine.
        let (mut c, mut client, _tx) = conn();
        client
            .write_all(b"POST / HTTP/1.1\r\nContent-Length: 2\r\ncontent-length: 2\r\n\r\nok")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let r = request(c.next_request().await);
        assert_eq!(c.read_body(&r, 2).await, Ok(Bytes::from_static(b"ok")));

        let (mut c, mut client, _tx) = conn();
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        client
            .write_all(&many)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(refusal(c.next_request().await).status, 431);

        // Complete in one read, but longer than 16-bit offsets reach.
        let (mut c, mut client, _tx) = conn();
        let mut long = b"GET / HTTP/1.1\r\nx-long: ".to_vec();
        long.resize(70_000, b'a');
        long.extend_from_slice(b"\r\nx-after: 1\r\n\r\n");
        client
            .write_all(&long)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(refusal(c.next_request().await).status, 431);

        let (mut c, mut client, _tx) = conn();
        let mut long = b"GET / HTTP/1.1\r\nx-long: ".to_vec();
        long.resize(Limits::default().max_head_bytes + 10, b'a');
        client
            .write_all(&long)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(refusal(c.next_request().await).status, 431);
    }

    #[tokio::test]
    async fn declared_lengths_over_the_cap_are_refused_unread_and_close() {
        let (mut c, mut client, _tx) = conn();
        client
            .write_all(b"POST / HTTP/1.1\r\nContent-Length: 1000\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let r = request(c.next_request().await);
        assert_eq!(c.read_body(&r, 999).await, Err(BodyError::TooLarge(999)));
        assert!(c.respond(413, &[], b"{}").await);
        assert!(matches!(c.next_request().await, Next::Closed));
        let out = written(c, client).await;
        assert!(out.contains("connection: close\r\n"), "{out}");

        // An answer to a request whose body was never read closes the connection too.
        let (mut c, mut client, _tx) = conn();
        client
            .write_all(b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let _ = request(c.next_request().await);
        assert!(c.respond(404, &[], b"").await);
        assert!(matches!(c.next_request().await, Next::Closed));
    }

    #[tokio::test]
    async fn truncated_bodies_are_errors() {
        let (mut c, mut client, _tx) = conn();
        client
            .write_all(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        client.shutdown().await.unwrap_or_else(|e| panic!("{e}"));
        let r = request(c.next_request().await);
        assert!(matches!(c.read_body(&r, 100).await, Err(BodyError::Bad(_))));
    }

    #[tokio::test]
    async fn expect_continue_gets_a_100_before_the_body() {
        let (mut c, mut client, _tx) = conn();
        client
            .write_all(b"POST / HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let r = request(c.next_request().await);
        let server = tokio::spawn(async move {
            let body = c.read_body(&r, 10).await;
            (c, body)
        });
        let mut got = [0u8; 25];
        client
            .read_exact(&mut got)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&got, b"HTTP/1.1 100 Continue\r\n\r\n");
        client
            .write_all(b"ok")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let (_c, body) = server.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(body, Ok(Bytes::from_static(b"ok")));
    }

    #[tokio::test]
    async fn http10_answers_say_so_and_close_unless_kept_alive() {
        let (mut c, mut client, _tx) = conn();
        client
            .write_all(b"GET / HTTP/1.0\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let _ = request(c.next_request().await);
        assert!(!c.keep_alive());
        assert!(c.respond(200, &[], b"x").await);
        let out = written(c, client).await;
        assert!(out.starts_with("HTTP/1.0 200 OK\r\n") && out.contains("connection: close"));

        let (mut c, mut client, _tx) = conn();
        client
            .write_all(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let _ = request(c.next_request().await);
        assert!(c.keep_alive());
        assert!(c.respond(200, &[], b"x").await);
        let out = written(c, client).await;
        assert!(out.contains("connection: keep-alive\r\n"), "{out}");

        let (mut c, mut client, _tx) = conn();
        client
            .write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let _ = request(c.next_request().await);
        assert!(!c.keep_alive());
    }

    #[tokio::test]
    async fn streams_are_chunked_and_end_with_a_last_chunk() {
        let (mut c, mut client, _tx) = conn();
        client
            .write_all(b"GET /events HTTP/1.1\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let _ = request(c.next_request().await);
        assert!(
            c.start_stream(200, &[("content-type", b"text/event-stream")])
                .await
        );
        assert!(c.stream(b"data: 1\n\n").await);
        assert!(c.stream(b"").await);
        assert!(c.end_stream().await);
        let out = written(c, client).await;
        assert!(
            out.contains("transfer-encoding: chunked\r\nconnection: close\r\n"),
            "{out}"
        );
        assert!(
            out.ends_with("\r\n\r\n9\r\ndata: 1\n\n\r\n0\r\n\r\n"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn streamed_answers_frame_by_length_or_pass_given_headers() {
        let (mut c, mut client, _tx) = conn();
        client
            .write_all(b"GET /a HTTP/1.1\r\n\r\nHEAD /a HTTP/1.1\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let _ = request(c.next_request().await);
        assert!(
            c.start_answer(200, &[("x-a", &b"1"[..])], Answer::Length(5))
                .await
        );
        assert!(c.stream(b"hel").await && c.stream(b"lo").await && c.end_stream().await);
        assert!(c.keep_alive());
        let _ = request(c.next_request().await);
        let given = [("content-length", &b"5"[..])];
        assert!(c.start_answer(200, &given, Answer::NoBody).await && c.end_stream().await);
        let out = written(c, client).await;
        assert!(
            out.contains("content-length: 5\r\nx-a: 1\r\n\r\nhello"),
            "{out}"
        );
        assert!(out.ends_with("\r\ncontent-length: 5\r\n\r\n"), "{out}");
        assert_eq!(out.matches("content-length").count(), 2, "{out}");
    }

    #[tokio::test]
    async fn no_content_answers_carry_no_length_and_others_do() {
        let (mut c, mut client, _tx) = conn();
        client
            .write_all(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let _ = request(c.next_request().await);
        assert!(c.respond(204, &[], b"").await);
        assert!(c.keep_alive());
        let _ = request(c.next_request().await);
        assert!(c.respond(200, &[], b"").await);
        let out = written(c, client).await;
        let (first, second) = out
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("{out}"));
        assert!(first.starts_with("HTTP/1.1 204 "), "{out}");
        assert!(!first.contains("content-length"), "RFC 9110 8.6: {out}");
        assert!(second.contains("content-length: 0"), "{out}");
    }

    #[tokio::test]
    async fn an_answer_has_one_date_its_own_or_the_given_one() {
        let (mut c, mut client, _tx) = conn();
        client
            .write_all(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let _ = request(c.next_request().await);
        assert!(c.respond(204, &[], b"").await);
        let _ = request(c.next_request().await);
        let origin = [("Date", &b"Sun, 06 Nov 1994 08:49:37 GMT"[..])];
        assert!(c.respond(204, &origin, b"").await);
        let out = written(c, client).await;
        let (first, second) = out
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("{out}"));
        assert_eq!(
            first.to_ascii_lowercase().matches("date: ").count(),
            1,
            "{out}"
        );
        assert!(first.contains(" GMT"), "{out}");
        assert_eq!(
            second.to_ascii_lowercase().matches("date: ").count(),
            1,
            "{out}"
        );
        assert!(
            second.contains("Date: Sun, 06 Nov 1994 08:49:37 GMT"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn idle_connections_close_on_shutdown_and_at_the_end_of_the_stream() {
        let (mut c, _client, tx) = conn();
        let server = tokio::spawn(async move { matches!(c.next_request().await, Next::Closed) });
        tx.send_replace(true);
        assert!(server.await.unwrap_or(false));

        let (mut c, client, _tx) = conn();
        drop(client);
        assert!(matches!(c.next_request().await, Next::Closed));
    }

    #[test]
    fn dates_are_imf_fixdate() {
        let s = |t| String::from_utf8_lossy(&imf_fixdate(t)).into_owned();
        assert_eq!(s(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(s(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(s(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(s(1_795_391_999), "Sun, 22 Nov 2026 23:59:59 GMT");
        assert_eq!(s(1_795_478_399), "Mon, 23 Nov 2026 23:59:59 GMT");
    }

    /// Mutation fuzzing of the server side: whatever a client sends, the connection answers or
    /// closes, never panics, and a body it hands out has the declared length.
    pub(crate) mod fuzz {
        use super::*;
        use proptest::prelude::*;

        /// Well-formed starting points: lengths, chunked with extensions and trailers,
        /// pipelining, `Expect`, HTTP/1.0, an absolute-form target.
        const SEEDS: &[&[u8]] = &[
            b"POST /a?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello",
            b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\nTrailer: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
            b"PUT /e HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
            b"POST http://h:1/abs HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx",
            b"POST /t HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
        ];

        /// One edit of a byte string: (kind, position, byte).
        fn mutate(seed: &[u8], edits: &[(u8, usize, u8)]) -> Vec<u8> {
            let mut v = seed.to_vec();
            for &(kind, pos, byte) in edits {
                // Inserts may land at the end; the other edits at an existing byte.
                let end = pos % (v.len() + 1);
                let at = if v.is_empty() { 0 } else { pos % v.len() };
                match kind % 5 {
                    0 if !v.is_empty() => v[at] = byte,
                    1 => v.insert(end, byte),
                    2 if !v.is_empty() => {
                        v.remove(at);
                    }
                    3 => v.truncate(at),
                    // A digit, the byte that most often changes a length or a chunk size.
                    _ => v.insert(end, b'0' + byte % 10),
                }
            }
            v
        }

        /// Edits of `seeds` (mostly: near-valid input reaches past the parser) or random bytes.
        pub(crate) fn inputs(seeds: &'static [&'static [u8]]) -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                4 => (
                    prop::sample::select(seeds),
                    prop::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 0..6)
                )
                    .prop_map(|(seed, edits)| mutate(seed, &edits)),
                1 => prop::collection::vec(any::<u8>(), 0..256),
            ]
        }

        /// Serves everything `input` holds (the client then closes its side); returns how
        /// many requests were read.
        async fn serve(input: Vec<u8>) -> usize {
            let (mut c, mut client, _tx) = conn();
            client
                .write_all(&input)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            client.shutdown().await.unwrap_or_else(|e| panic!("{e}"));
            let drain = tokio::spawn(async move {
                let mut sink = Vec::new();
                let _ = client.read_to_end(&mut sink).await;
            });
            let mut served = 0;
            loop {
                match c.next_request().await {
                    Next::Request(r) => {
                        served += 1;
                        assert!(served <= input.len(), "more requests than bytes");
                        assert!(!r.method().is_empty() && !r.target().is_empty());
                        match c.read_body(&r, 1 << 16).await {
                            Ok(body) => {
                                // (Content-Length with Transfer-Encoding is refused at parse.)
                                if let Some(n) = r.content_length() {
                                    assert_eq!(body.len() as u64, n);
                                }
                                if !c.respond(200, &[], b"ok").await || !c.keep_alive() {
                                    break;
                                }
                            }
                            Err(_) => {
                                c.respond(400, &[], b"bad").await;
                                break;
                            }
                        }
                    }
                    Next::Refused(r) => {
                        assert!((400..500).contains(&r.status), "refusal {}", r.status);
                        c.respond(r.status, &[], r.detail.as_bytes()).await;
                        break;
                    }
                    Next::Closed => break,
                }
            }
            drop(c);
            let _ = drain.await;
            served
        }

        fn block_on<F: std::future::Future>(f: F) -> F::Output {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("{e}"))
                .block_on(f)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn any_client_bytes_are_answered_or_closed(input in inputs(SEEDS)) {
                block_on(serve(input));
            }

            #[test]
            fn any_head_parses_or_is_refused(input in inputs(SEEDS)) {
                if let Ok(r) = Request::parse(Bytes::from(input)) {
                    prop_assert!(!r.method().is_empty());
                    let _ = (r.path(), r.query(), r.content_length(), r.headers().count());
                }
            }

            /// Chunked bodies cut at arbitrary sizes, with extensions, come back whole.
            #[test]
            fn chunked_bodies_round_trip(
                body in prop::collection::vec(any::<u8>(), 0..600),
                cuts in prop::collection::vec(1usize..64, 1..20),
                ext in any::<bool>(),
            ) {
                let mut wire = b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                let (mut rest, mut i) = (&body[..], 0);
                while !rest.is_empty() {
                    let n = cuts[i % cuts.len()].min(rest.len());
                    wire.extend_from_slice(format!("{n:x}").as_bytes());
                    if ext {
                        wire.extend_from_slice(b";a=b");
                    }
                    wire.extend_from_slice(b"\r\n");
                    wire.extend_from_slice(&rest[..n]);
                    wire.extend_from_slice(b"\r\n");
                    rest = &rest[n..];
                    i += 1;
                }
                wire.extend_from_slice(b"0\r\n\r\n");
                let got = block_on(async move {
                    let (mut c, mut client, _tx) = conn();
                    client.write_all(&wire).await.unwrap_or_else(|e| panic!("{e}"));
                    let r = request(c.next_request().await);
                    c.read_body(&r, 1 << 16).await
                });
                prop_assert_eq!(got.map(|b| b.to_vec()).ok(), Some(body));
            }
        }
    }
}
