//! Incremental decoding of a message body read from a buffered stream (both sides).

use bytes::{Buf, Bytes, BytesMut};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::{MAX_CHUNK_LINE, READ_CHUNK};

/// Where a body decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Body {
    /// This many bytes remain.
    Length(u64),
    /// Chunked: `left` bytes remain in the current chunk; `crlf` = the CRLF after the current
    /// chunk's data is still to be consumed.
    Chunked { left: u64, crlf: bool },
    /// Everything until the peer closes (a response without framing).
    UntilClose,
    /// The body is complete.
    Done,
}

/// Reads more bytes into `buf`, waiting at most `wait` (`None`: no limit); `Ok(0)` at the end
/// of the stream.
pub(crate) async fn fill<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    wait: Option<Duration>,
) -> std::io::Result<usize> {
    buf.reserve(READ_CHUNK);
    match wait {
        None => io.read_buf(buf).await,
        Some(w) => match tokio::time::timeout(w, io.read_buf(buf)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        },
    }
}

async fn more<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    wait: Option<Duration>,
) -> Result<(), String> {
    match fill(io, buf, wait).await {
        Ok(0) => Err("the stream ended inside the body".into()),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("reading the body: {e}")),
    }
}

/// The next piece of the body (`None` once it is complete). Pieces are split off `buf`
/// without copying; an empty piece marks the start of a chunk.
pub(crate) async fn next_piece<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    body: &mut Body,
    wait: Option<Duration>,
) -> Result<Option<Bytes>, String> {
    match *body {
        Body::Done => Ok(None),
        Body::Length(0) => {
            *body = Body::Done;
            Ok(None)
        }
        Body::Length(n) => {
            if buf.is_empty() {
                more(io, buf, wait).await?;
            }
            let take = (buf.len() as u64).min(n) as usize;
            *body = Body::Length(n - take as u64);
            Ok(Some(buf.split_to(take).freeze()))
        }
        Body::UntilClose => {
            if buf.is_empty() {
                match fill(io, buf, wait).await {
                    Ok(0) => {
                        *body = Body::Done;
                        return Ok(None);
                    }
                    Ok(_) => {}
                    Err(e) => return Err(format!("reading the body: {e}")),
                }
            }
            Ok(Some(buf.split().freeze()))
        }
        Body::Chunked { left: 0, crlf } => {
            if crlf {
                while buf.len() < 2 {
                    more(io, buf, wait).await?;
                }
                if &buf[..2] != b"\r\n" {
                    return Err("chunk data not followed by CRLF".into());
                }
                buf.advance(2);
            }
            let (line, size) = loop {
                match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete(c)) => break c,
                    Ok(httparse::Status::Partial) if buf.len() <= MAX_CHUNK_LINE => {
                        more(io, buf, wait).await?
                    }
                    _ => return Err("malformed chunk size line".into()),
                }
            };
            buf.advance(line);
            if size == 0 {
                skip_trailers(io, buf, wait).await?;
                *body = Body::Done;
                return Ok(None);
            }
            *body = Body::Chunked {
                left: size,
                crlf: true,
            };
            // An empty piece: a chunk of `size` bytes starts (lets a capped reader refuse
            // it before reading it).
            Ok(Some(Bytes::new()))
        }
        Body::Chunked { left, crlf } => {
            if buf.is_empty() {
                more(io, buf, wait).await?;
            }
            let take = (buf.len() as u64).min(left) as usize;
            *body = Body::Chunked {
                left: left - take as u64,
                crlf,
            };
            Ok(Some(buf.split_to(take).freeze()))
        }
    }
}

/// Skips the trailer section after the last chunk, up to and including its empty line.
async fn skip_trailers<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    wait: Option<Duration>,
) -> Result<(), String> {
    let mut seen = 0usize;
    loop {
        match buf.iter().position(|b| *b == b'\n') {
            Some(i) => {
                let line = buf.split_to(i + 1);
                seen += line.len();
                if line.as_ref() == b"\r\n" || line.as_ref() == b"\n" {
                    return Ok(());
                }
            }
            None => more(io, buf, wait).await?,
        }
        if seen > MAX_CHUNK_LINE {
            return Err("trailer section too long".into());
        }
    }
}
