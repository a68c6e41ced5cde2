//! The client side of one HTTP/1.1 exchange on a (pooled) connection: the request goes out in
//! one write, the response head is parsed in place with `httparse`, the body is read piece by
//! piece without copying, and the connection is handed back only after a clean, complete
//! exchange that keeps it alive.

use bytes::{Bytes, BytesMut};
use std::io::IoSlice;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::body::{fill, next_piece, Body};
use super::{offsets, tokens, MAX_HEADERS, READ_CHUNK};

/// Largest response head accepted (offsets into it are 16-bit).
pub const MAX_RESPONSE_HEAD: usize = u16::MAX as usize;

/// Why an exchange failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExchangeError {
    /// Before any response byte arrived: the request may be retried on a fresh connection.
    BeforeResponse(String),
    /// After the response started.
    Broken(String),
}

/// A parsed response head. Names and values point into the head's bytes.
#[derive(Debug)]
pub struct ResponseHead {
    head: Bytes,
    status: u16,
    headers: Vec<[u16; 4]>,
    framing: Framing,
}

/// How a response body is delimited on the wire, as its head declares (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (HEAD, 204, 304), or `Content-Length`.
    Length,
    /// `Transfer-Encoding: chunked`, alone.
    Chunked,
    /// Other transfer codings (`gzip, chunked`, ...): the body is read raw until the upstream
    /// closes, and passes through only with its `Transfer-Encoding` as given.
    Coded,
    /// Neither: the body ends when the upstream closes.
    UntilClose,
}

impl ResponseHead {
    fn slice(&self, (a, b): (u16, u16)) -> &[u8] {
        self.head.get(a as usize..b as usize).unwrap_or_default()
    }

    pub fn status(&self) -> u16 {
        self.status
    }

    /// The first header named `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers()
            .find(|(k, _)| k.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// Every header, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers
            .iter()
            .map(|h| (self.slice((h[0], h[1])), self.slice((h[2], h[3]))))
    }

    pub fn header_count(&self) -> usize {
        self.headers.len()
    }

    /// How the body is delimited.
    pub fn framing(&self) -> Framing {
        self.framing
    }
}

/// One exchange in progress, positioned at the response body.
pub struct Exchange<S> {
    io: S,
    buf: BytesMut,
    body: Body,
    keep_alive: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Exchange<S> {
    /// Sends the request (`head` on the wire format, then `body`, in one vectored write) and
    /// reads the response head, skipping interim (1xx) responses. `buf` is the connection's
    /// read buffer, empty, handed back by [`Exchange::into_reusable`] so a pooled connection
    /// reads into the same memory every time. `head_request`: the request was a HEAD, so the
    /// response has no body whatever its headers say.
    pub async fn send(
        mut io: S,
        mut buf: BytesMut,
        head: &[u8],
        body: &[u8],
        head_request: bool,
    ) -> Result<(Exchange<S>, ResponseHead), ExchangeError> {
        let before = |e: std::io::Error| ExchangeError::BeforeResponse(e.to_string());
        write_all_vectored(&mut io, &mut [IoSlice::new(head), IoSlice::new(body)])
            .await
            .map_err(before)?;
        io.flush().await.map_err(before)?;
        buf.clear();
        Self::receive(io, buf, head_request).await
    }

    /// Reads the response head of a request already sent, skipping interim (1xx) responses.
    /// `buf` may already hold bytes of it: on a pipelined connection, what the previous
    /// exchange read past its own response ([`Exchange::into_pipelined`]). An error counts as
    /// [`ExchangeError::BeforeResponse`] only when no byte of it had arrived.
    pub async fn receive(
        mut io: S,
        mut buf: BytesMut,
        head_request: bool,
    ) -> Result<(Exchange<S>, ResponseHead), ExchangeError> {
        let before = |e: std::io::Error| ExchangeError::BeforeResponse(e.to_string());
        buf.reserve(READ_CHUNK);
        let mut got_any = !buf.is_empty();
        loop {
            if !buf.is_empty() {
                let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut resp = httparse::Response::new(&mut hdrs);
                match resp.parse(&buf) {
                    Ok(httparse::Status::Complete(n)) if n > MAX_RESPONSE_HEAD => {
                        return Err(ExchangeError::Broken(format!(
                            "response head over {MAX_RESPONSE_HEAD} bytes"
                        )))
                    }
                    Ok(httparse::Status::Complete(n)) => {
                        let status = resp.code.unwrap_or(0);
                        if !(100..600).contains(&status) {
                            // httparse takes any three digits; RFC 9110 §15 allows 100-599.
                            return Err(ExchangeError::Broken(format!(
                                "malformed response head: status {status} outside 100-599"
                            )));
                        }
                        if (100..200).contains(&status) && status != 101 {
                            // Interim answer (100 Continue, 103 Early Hints): the final one follows.
                            let _ = buf.split_to(n);
                            continue;
                        }
                        if status == 101 {
                            return Err(ExchangeError::Broken(
                                "unexpected 101 Switching Protocols".into(),
                            ));
                        }
                        let (body, keep_alive, headers, framing) =
                            frame(&resp, status, head_request, buf.as_ptr() as usize)?;
                        let head = buf.split_to(n).freeze();
                        let ex = Exchange {
                            io,
                            buf,
                            body,
                            keep_alive,
                        };
                        return Ok((
                            ex,
                            ResponseHead {
                                head,
                                status,
                                headers,
                                framing,
                            },
                        ));
                    }
                    Ok(httparse::Status::Partial) if buf.len() <= MAX_RESPONSE_HEAD => {}
                    Ok(httparse::Status::Partial) => {
                        return Err(ExchangeError::Broken(format!(
                            "response head over {MAX_RESPONSE_HEAD} bytes"
                        )))
                    }
                    Err(e) => {
                        return Err(ExchangeError::Broken(format!(
                            "malformed response head: {e}"
                        )))
                    }
                }
            }
            match fill(&mut io, &mut buf, None).await {
                Ok(0) if !got_any => {
                    return Err(ExchangeError::BeforeResponse(
                        "connection closed before any response byte".into(),
                    ))
                }
                Ok(0) => {
                    return Err(ExchangeError::Broken(
                        "connection closed inside the response head".into(),
                    ))
                }
                Ok(_) => got_any = true,
                Err(e) if !got_any => return Err(before(e)),
                Err(e) => return Err(ExchangeError::Broken(e.to_string())),
            }
        }
    }

    /// The next piece of the response body (`None` once complete; empty pieces may occur).
    pub async fn piece(&mut self) -> Result<Option<Bytes>, ExchangeError> {
        next_piece(&mut self.io, &mut self.buf, &mut self.body, None)
            .await
            .map_err(ExchangeError::Broken)
    }

    /// Whether the whole response body has been read.
    pub fn is_done(&self) -> bool {
        matches!(self.body, Body::Done | Body::Length(0))
    }

    /// The connection and its read buffer, when the exchange ended cleanly and the connection
    /// may carry another.
    pub fn into_reusable(self) -> Option<(S, BytesMut)> {
        (self.is_done() && self.keep_alive && self.buf.is_empty()).then_some((self.io, self.buf))
    }

    /// Like [`Exchange::into_reusable`], for a connection carrying pipelined requests: the
    /// read buffer may hold the start of the next response, and goes on with the connection.
    pub fn into_pipelined(self) -> Option<(S, BytesMut)> {
        (self.is_done() && self.keep_alive).then_some((self.io, self.buf))
    }
}

/// Writes every byte of `bufs`, as few writes as the stream takes.
pub async fn write_all_vectored<S: AsyncWrite + Unpin>(
    io: &mut S,
    mut bufs: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = io.write_vectored(bufs).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

type Framed = (Body, bool, Vec<[u16; 4]>, Framing);

/// Body framing (RFC 9112 §6.3), keep-alive, and header offsets of a complete response head.
fn frame(
    resp: &httparse::Response<'_, '_>,
    status: u16,
    head_request: bool,
    base: usize,
) -> Result<Framed, ExchangeError> {
    let http10 = resp.version == Some(0);
    let mut keep_alive = !http10;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut other_coding = false;
    let mut headers = Vec::with_capacity(resp.headers.len());
    for h in resp.headers.iter() {
        let (n0, n1) = offsets(base, h.name.as_bytes());
        let (v0, v1) = offsets(base, h.value);
        headers.push([n0, n1, v0, v1]);
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(h.value.trim_ascii())
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| ExchangeError::Broken("invalid content-length".into()))?;
            if length.is_some_and(|m| m != n) {
                return Err(ExchangeError::Broken(
                    "conflicting content-length headers".into(),
                ));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            for t in tokens(h.value) {
                chunked = t.eq_ignore_ascii_case(b"chunked");
                other_coding |= !chunked;
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for t in tokens(h.value) {
                if t.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if http10 && t.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                }
            }
        }
    }
    let (body, framing) = if head_request || status == 204 || status == 304 {
        (Body::Length(0), Framing::Length)
    } else if chunked && !other_coding {
        (
            Body::Chunked {
                left: 0,
                crlf: false,
            },
            Framing::Chunked,
        )
    } else if chunked || other_coding {
        // Codings other than chunked: read raw, the body ends with the connection.
        keep_alive = false;
        (Body::UntilClose, Framing::Coded)
    } else if let Some(n) = length {
        (Body::Length(n), Framing::Length)
    } else {
        keep_alive = false;
        (Body::UntilClose, Framing::UntilClose)
    };
    Ok((body, keep_alive, headers, framing))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, DuplexStream};

    async fn exchange(
        response: &[u8],
        head_request: bool,
    ) -> (
        Result<(Exchange<DuplexStream>, ResponseHead), ExchangeError>,
        DuplexStream,
    ) {
        let (a, mut b) = duplex(1 << 16);
        b.write_all(response)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        (
            Exchange::send(
                a,
                BytesMut::new(),
                b"GET / HTTP/1.1\r\n\r\n",
                b"",
                head_request,
            )
            .await,
            b,
        )
    }

    async fn body(ex: &mut Exchange<DuplexStream>) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(p) = ex.piece().await.unwrap_or_else(|e| panic!("{e:?}")) {
            out.extend_from_slice(&p);
        }
        out
    }

    #[tokio::test]
    async fn length_chunked_and_interim_answers() {
        let (r, mut server) = exchange(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 5\r\n\r\nhello",
            false,
        )
        .await;
        let (mut ex, head) = r.unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(head.status(), 200);
        assert_eq!(head.header("x-a"), Some(&b"1"[..]));
        assert_eq!(body(&mut ex).await, b"hello");
        assert!(ex.into_reusable().is_some());
        let mut sent = [0u8; 18];
        server
            .read_exact(&mut sent)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&sent, b"GET / HTTP/1.1\r\n\r\n");

        let (r, _s) = exchange(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nT: v\r\n\r\n",
            false,
        )
        .await;
        let (mut ex, head) = r.unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(head.framing(), Framing::Chunked);
        assert_eq!(body(&mut ex).await, b"abcde");
        assert!(ex.into_reusable().is_some());
    }

    #[tokio::test]
    async fn bodiless_answers_and_connection_reuse_rules() {
        // HEAD: the length describes a body that does not follow.
        let (r, _s) = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true).await;
        let (mut ex, _) = r.unwrap_or_else(|e| panic!("{e:?}"));
        assert!(ex.is_done());
        assert_eq!(body(&mut ex).await, b"");
        assert!(ex.into_reusable().is_some());
        // Connection: close, and a body delimited by the close: never reused.
        let (r, _s) = exchange(
            b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n",
            false,
        )
        .await;
        let (ex, _) = r.unwrap_or_else(|e| panic!("{e:?}"));
        assert!(ex.into_reusable().is_none());
        let (r, s) = exchange(b"HTTP/1.0 200 OK\r\n\r\nuntil close", false).await;
        drop(s);
        let (mut ex, _) = r.unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(body(&mut ex).await, b"until close");
        assert!(ex.into_reusable().is_none());
        // Extra bytes after the response: not reused.
        let (r, _s) = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxy", false).await;
        let (mut ex, _) = r.unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(body(&mut ex).await, b"x");
        assert!(ex.into_reusable().is_none());
    }

    #[tokio::test]
    async fn failures_say_whether_a_response_had_started() {
        let (a, b) = duplex(1024);
        drop(b);
        let r = Exchange::send(a, BytesMut::new(), b"GET / HTTP/1.1\r\n\r\n", b"", false).await;
        assert!(matches!(r, Err(ExchangeError::BeforeResponse(_))));

        let (a, mut b) = duplex(1024);
        b.write_all(b"HTTP/1.1 200 OK\r\nContent-Le")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let (r, _) = tokio::join!(
            Exchange::send(a, BytesMut::new(), b"GET / HTTP/1.1\r\n\r\n", b"", false),
            async { drop(b) }
        );
        assert!(matches!(r, Err(ExchangeError::Broken(_))), "{:?}", r.err());

        let (r, _s) = exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            false,
        )
        .await;
        assert!(matches!(r, Err(ExchangeError::Broken(_))));

        // Three digits, but not a status (RFC 9110 §15: 100-599); found by the fuzz below.
        for line in ["HTTP/1.1 000 X", "HTTP/1.1 099 X", "HTTP/1.1 600 X"] {
            let (r, _s) = exchange(
                format!("{line}\r\nContent-Length: 0\r\n\r\n").as_bytes(),
                false,
            )
            .await;
            assert!(matches!(r, Err(ExchangeError::Broken(_))), "{line}");
        }

        let (r, s) = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", false).await;
        drop(s);
        let (mut ex, _) = r.unwrap_or_else(|e| panic!("{e:?}"));
        let mut err = None;
        loop {
            match ex.piece().await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        assert!(matches!(err, Some(ExchangeError::Broken(_))));
    }

    #[tokio::test]
    async fn head_and_body_arrive_whole_through_partial_writes() {
        // A 64-byte pipe takes every write in small pieces.
        let (a, mut b) = duplex(64);
        let head = b"POST /x HTTP/1.1\r\nhost: u\r\ncontent-length: 300\r\n\r\n";
        let body = vec![b'z'; 300];
        let server = async {
            let mut got = Vec::new();
            let want = head.len() + body.len();
            let mut chunk = [0u8; 50];
            while got.len() < want {
                let n = b.read(&mut chunk).await.unwrap_or_else(|e| panic!("{e}"));
                assert!(n > 0, "stream ended early");
                got.extend_from_slice(&chunk[..n]);
            }
            b.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            (got, b)
        };
        let (r, (got, _b)) = tokio::join!(
            Exchange::send(a, BytesMut::new(), head, &body, false),
            server
        );
        let (ex, resp) = r.unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(resp.status(), 204);
        assert_eq!(&got[..head.len()], head);
        assert_eq!(&got[head.len()..], &body[..]);
        let (_, buf) = ex.into_reusable().unwrap_or_else(|| panic!("not reusable"));
        assert!(buf.is_empty());
    }

    /// Mutation fuzzing of the client side: whatever an upstream answers, the exchange ends
    /// with a status and a body or an error, never a panic, and a length-framed body has its
    /// declared length.
    mod fuzz {
        use super::*;
        use crate::http1::tests::fuzz::inputs;
        use proptest::prelude::*;

        const SEEDS: &[&[u8]] = &[
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n4;x=y\r\nabcd\r\n0\r\nT: 1\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n",
            b"HTTP/1.0 200 OK\r\n\r\nuntil close",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        ];

        async fn fetch(response: Vec<u8>, head_request: bool) {
            let (a, mut b) = duplex(1 << 16);
            b.write_all(&response)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            b.shutdown().await.unwrap_or_else(|e| panic!("{e}"));
            let sent = Exchange::send(
                a,
                BytesMut::new(),
                b"GET / HTTP/1.1\r\n\r\n",
                b"",
                head_request,
            )
            .await;
            let Ok((mut ex, resp)) = sent else {
                return;
            };
            assert!(
                (200..600).contains(&resp.status()),
                "final status {}",
                resp.status()
            );
            let declared = match resp.framing() {
                Framing::Length
                    if !head_request && resp.status() != 204 && resp.status() != 304 =>
                {
                    resp.header("content-length")
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .and_then(|v| v.trim().parse::<usize>().ok())
                }
                _ => None,
            };
            let (mut got, mut pieces) = (0, 0);
            loop {
                match ex.piece().await {
                    Ok(Some(p)) => {
                        got += p.len();
                        pieces += 1;
                        assert!(pieces <= response.len() + 1, "more pieces than bytes");
                    }
                    Ok(None) => {
                        if let Some(n) = declared {
                            assert_eq!(got, n, "length-framed body");
                        }
                        break;
                    }
                    Err(_) => break,
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn any_upstream_bytes_end_the_exchange(input in inputs(SEEDS), head in any::<bool>()) {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap_or_else(|e| panic!("{e}"))
                    .block_on(fetch(input, head));
            }
        }
    }
}
