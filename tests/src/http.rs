//! A deliberately small HTTP/1.1 reader/writer for tests: exact control over bytes on the wire.

use std::io;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// A parsed message head plus body.
#[derive(Debug, Clone)]
pub struct Message {
    pub start: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Message {
    /// First value of a header (name compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a header.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Reads one message head (and, when `with_body`, its body: see [`read_body`]).
/// `Ok(None)` on a clean EOF before any byte.
pub async fn read_message(
    r: &mut BufReader<OwnedReadHalf>,
    with_body: bool,
) -> io::Result<Option<Message>> {
    let mut start = String::new();
    if r.read_line(&mut start).await? == 0 {
        return Ok(None);
    }
    let start = start.trim_end().to_string();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "eof in head"));
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut m = Message {
        start,
        headers,
        body: Vec::new(),
    };
    if !with_body {
        return Ok(Some(m));
    }
    m.body = read_body(r, &m).await?;
    Ok(Some(m))
}

/// Reads the body `m`'s head announces: chunked (see [`read_chunk`]) or by Content-Length;
/// empty when the head announces neither.
pub async fn read_body<R: AsyncBufRead + Unpin>(r: &mut R, m: &Message) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    if m.header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        while let Some(chunk) = read_chunk(r).await? {
            body.extend_from_slice(&chunk);
        }
    } else if let Some(n) = m
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        body = vec![0; n];
        r.read_exact(&mut body).await?;
    }
    Ok(body)
}

/// Reads one chunk of a chunked body (chunk extensions such as `1a;name=value` ignored):
/// `None` at the terminating zero chunk, whose trailer section is read up to its blank line.
pub async fn read_chunk<R: AsyncBufRead + Unpin>(r: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut size = String::new();
    if r.read_line(&mut size).await? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "eof before chunk size",
        ));
    }
    let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if n == 0 {
        loop {
            let mut trailer = String::new();
            if r.read_line(&mut trailer).await? == 0 || trailer.trim_end().is_empty() {
                return Ok(None);
            }
        }
    }
    let mut buf = vec![0; n + 2];
    r.read_exact(&mut buf).await?;
    buf.truncate(n);
    Ok(Some(buf))
}

/// A response as the client saw it.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub msg: Message,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.msg.header(name)
    }
    pub fn body(&self) -> &[u8] {
        &self.msg.body
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.msg.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A client connection that can carry several requests (keep-alive).
pub struct Conn {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

impl Conn {
    pub async fn open(addr: &str) -> io::Result<Conn> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        Ok(Conn {
            r: BufReader::new(r),
            w,
        })
    }

    /// Writes raw bytes.
    pub async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.w.write_all(bytes).await
    }

    /// Reads one response (skipping 1xx unless `keep_1xx`).
    pub async fn read_response(&mut self) -> io::Result<Response> {
        loop {
            let m = read_message(&mut self.r, false)
                .await?
                .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"))?;
            let status: u16 = m
                .start
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            if (100..200).contains(&status) {
                continue;
            }
            // Read the body now that we know it is a final response.
            let mut m = m;
            if status != 204 && status != 304 {
                m.body = read_body(&mut self.r, &m).await?;
            }
            return Ok(Response { status, msg: m });
        }
    }

    /// Reads one raw line (for 100-continue tests).
    pub async fn read_line(&mut self) -> io::Result<String> {
        let mut s = String::new();
        self.r.read_line(&mut s).await?;
        Ok(s)
    }

    /// Sends a request with a Content-Length body and reads the response.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body);
        self.write(&bytes).await?;
        self.read_response().await
    }

    /// True when the peer closed the connection (reads EOF).
    pub async fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.r.read(&mut b).await, Ok(0) | Err(_))
    }
}

/// One request on a fresh connection.
pub async fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Response> {
    Conn::open(addr)
        .await?
        .request(method, path, headers, body)
        .await
}

impl Conn {
    /// Reads a response head only (status and headers), leaving the body unread.
    pub async fn read_head(&mut self) -> io::Result<Message> {
        read_message(&mut self.r, false)
            .await?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"))
    }

    /// Reads everything until the peer closes the connection.
    pub async fn read_to_end(&mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.r.read_to_end(&mut out).await?;
        Ok(out)
    }

    /// Reads one chunk of a chunked body (see [`read_chunk`]): `None` at the terminating zero
    /// chunk.
    pub async fn read_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        read_chunk(&mut self.r).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(headers: &[(&str, &str)]) -> Message {
        Message {
            start: "HTTP/1.1 200 OK".into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: Vec::new(),
        }
    }

    #[tokio::test]
    async fn chunked_body_strips_extensions_and_consumes_trailers() {
        let m = head(&[("Transfer-Encoding", "chunked")]);
        let mut r: &[u8] =
            b"1a;name=value\r\nabcdefghijklmnopqrstuvwxyz\r\n3 ; x\r\n012\r\n0;end\r\nX-T: 1\r\n\r\nNEXT";
        let body = read_body(&mut r, &m)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(body, b"abcdefghijklmnopqrstuvwxyz012");
        assert_eq!(r, b"NEXT", "trailer section consumed, nothing more");
    }

    #[tokio::test]
    async fn content_length_body_and_truncated_chunked_body() {
        let mut r: &[u8] = b"hello world";
        let body = read_body(&mut r, &head(&[("content-length", "5")]))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((body.as_slice(), r), (&b"hello"[..], &b" world"[..]));
        let mut r: &[u8] = b"3\r\nabc\r\n";
        let e = read_body(&mut r, &head(&[("transfer-encoding", "chunked")])).await;
        assert_eq!(
            e.map_err(|e| e.kind()).err(),
            Some(io::ErrorKind::UnexpectedEof)
        );
    }
}
