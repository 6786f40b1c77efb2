//! HTTP/1.1 message heads and body framing (RFC 9112), parsed from bytes
//! that come from anyone: every error is a value, never a panic (fuzzed).

/// The largest request or response head accepted.
pub const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;

/// Why a message cannot be handled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("malformed message head: {0}")]
    Malformed(String),
    #[error("message head larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// A request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The request target as sent (origin-form: path and query).
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// Header names as sent, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Forward the head encoded again rather than as it came: a header
    /// rule changed the headers, or a line ended in a bare LF (which the
    /// parser takes and the next server might read differently).
    pub reencode: bool,
}

/// A response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub version: u8,
    pub code: u16,
    pub reason: String,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// How a body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the sender closes (responses only).
    Close,
}

fn header<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> impl Iterator<Item = &'a [u8]> {
    headers.iter().filter(move |(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_slice())
}

fn has_token(headers: &[(String, Vec<u8>)], name: &str, token: &str) -> bool {
    header(headers, name).any(|v| String::from_utf8_lossy(v).split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

fn framing(headers: &[(String, Vec<u8>)]) -> Result<Option<Framing>, HttpError> {
    if has_token(headers, "transfer-encoding", "chunked") {
        return Ok(Some(Framing::Chunked));
    }
    if header(headers, "transfer-encoding").next().is_some() {
        return Err(HttpError::Unsupported("a transfer-encoding other than chunked".into()));
    }
    let mut len = None;
    for v in header(headers, "content-length") {
        let n: u64 = std::str::from_utf8(v).ok().and_then(|s| s.trim().parse().ok()).ok_or_else(|| HttpError::Malformed("bad content-length".into()))?;
        if len.is_some_and(|l| l != n) {
            return Err(HttpError::Malformed("conflicting content-length headers".into()));
        }
        len = Some(n);
    }
    Ok(len.map(Framing::Length))
}

/// Every line of `head` ends in CRLF.
fn crlf_only(head: &[u8]) -> bool {
    head.iter().enumerate().all(|(i, &b)| b != b'\n' || (i > 0 && head[i - 1] == b'\r'))
}

impl Request {
    /// Parses a request head at the start of `buf`: `Ok(None)` when more
    /// bytes are needed, else the head and its length in bytes.
    pub fn parse(buf: &[u8]) -> Result<Option<(Request, usize)>, HttpError> {
        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut r = httparse::Request::new(&mut hs);
        match r.parse(buf) {
            Ok(httparse::Status::Partial) => {
                if buf.len() > MAX_HEAD {
                    return Err(HttpError::TooLarge);
                }
                Ok(None)
            }
            Ok(httparse::Status::Complete(n)) => {
                if n > MAX_HEAD {
                    return Err(HttpError::TooLarge);
                }
                let req = Request {
                    method: r.method.unwrap_or("").to_string(),
                    target: r.path.unwrap_or("").to_string(),
                    version: r.version.unwrap_or(1),
                    headers: r.headers.iter().map(|h| (h.name.to_string(), h.value.to_vec())).collect(),
                    reencode: !crlf_only(&buf[..n]),
                };
                Ok(Some((req, n)))
            }
            Err(e) => Err(HttpError::Malformed(e.to_string())),
        }
    }

    /// The body's framing (RFC 9112 §6.3; a request without length has none).
    pub fn framing(&self) -> Result<Framing, HttpError> {
        Ok(framing(&self.headers)?.unwrap_or(Framing::None))
    }

    pub fn header(&self, name: &str) -> Option<&[u8]> {
        header(&self.headers, name).next()
    }

    /// The Host header (authority).
    pub fn host(&self) -> &str {
        self.header("host").and_then(|v| std::str::from_utf8(v).ok()).unwrap_or("")
    }

    /// Whether the client wants the connection closed after this exchange.
    pub fn wants_close(&self) -> bool {
        if self.version == 0 { !has_token(&self.headers, "connection", "keep-alive") } else { has_token(&self.headers, "connection", "close") }
    }

    /// The head as bytes, as it will be sent on.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = format!("{} {} HTTP/1.{}\r\n", self.method, self.target, self.version).into_bytes();
        for (n, v) in &self.headers {
            out.extend_from_slice(n.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

impl Response {
    /// Parses a response head at the start of `buf`, like [`Request::parse`].
    pub fn parse(buf: &[u8]) -> Result<Option<(Response, usize)>, HttpError> {
        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut r = httparse::Response::new(&mut hs);
        match r.parse(buf) {
            Ok(httparse::Status::Partial) => {
                if buf.len() > MAX_HEAD {
                    return Err(HttpError::TooLarge);
                }
                Ok(None)
            }
            Ok(httparse::Status::Complete(n)) => Ok(Some((
                Response {
                    version: r.version.unwrap_or(1),
                    code: r.code.unwrap_or(0),
                    reason: r.reason.unwrap_or("").to_string(),
                    headers: r.headers.iter().map(|h| (h.name.to_string(), h.value.to_vec())).collect(),
                },
                n,
            ))),
            Err(e) => Err(HttpError::Malformed(e.to_string())),
        }
    }

    /// The body's framing for a response to `method` (RFC 9112 §6.3).
    pub fn framing(&self, method: &str) -> Result<Framing, HttpError> {
        if method.eq_ignore_ascii_case("HEAD") || (100..200).contains(&self.code) || self.code == 204 || self.code == 304 {
            return Ok(Framing::None);
        }
        Ok(framing(&self.headers)?.unwrap_or(Framing::Close))
    }

    pub fn wants_close(&self) -> bool {
        if self.version == 0 { !has_token(&self.headers, "connection", "keep-alive") } else { has_token(&self.headers, "connection", "close") }
    }
}

/// Finds where a chunked body ends, fed piece by piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunked {
    state: ChunkState,
    line: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd(u8),
    Trailer,
    Done,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked { state: ChunkState::Size, line: Vec::new() }
    }
}

impl Chunked {
    /// Consumes bytes of the body; returns how many belong to it (all of
    /// `buf`, or fewer when the body ends inside it).
    pub fn feed(&mut self, buf: &[u8]) -> Result<usize, HttpError> {
        let mut i = 0;
        while i < buf.len() {
            match self.state {
                ChunkState::Done => return Ok(i),
                ChunkState::Data(n) => {
                    let take = (n.min((buf.len() - i) as u64)) as usize;
                    i += take;
                    self.state = if n - take as u64 == 0 { ChunkState::DataEnd(0) } else { ChunkState::Data(n - take as u64) };
                }
                ChunkState::DataEnd(k) => {
                    let want = if k == 0 { b'\r' } else { b'\n' };
                    if buf[i] != want {
                        return Err(HttpError::Malformed("chunk not followed by CRLF".into()));
                    }
                    i += 1;
                    self.state = if k == 0 { ChunkState::DataEnd(1) } else { ChunkState::Size };
                }
                ChunkState::Size | ChunkState::Trailer => {
                    let b = buf[i];
                    i += 1;
                    if self.line.len() > 4096 {
                        return Err(HttpError::Malformed("chunk line too long".into()));
                    }
                    if b != b'\n' {
                        self.line.push(b);
                        continue;
                    }
                    let line = std::mem::take(&mut self.line);
                    let line = line.strip_suffix(b"\r").unwrap_or(&line);
                    if self.state == ChunkState::Trailer {
                        if line.is_empty() {
                            self.state = ChunkState::Done;
                        }
                        continue;
                    }
                    let hex = line.split(|c| *c == b';').next().unwrap_or(&[]);
                    let hex = std::str::from_utf8(hex).map_err(|_| HttpError::Malformed("chunk size".into()))?.trim();
                    let n = u64::from_str_radix(hex, 16).map_err(|_| HttpError::Malformed(format!("chunk size {hex:?}")))?;
                    self.state = if n == 0 { ChunkState::Trailer } else { ChunkState::Data(n) };
                }
            }
        }
        Ok(i)
    }

    pub fn done(&self) -> bool {
        self.state == ChunkState::Done
    }
}

/// The 403 the proxy answers denied requests with (upstream's body).
pub fn access_denied(close: bool) -> Vec<u8> {
    format!(
        "HTTP/1.1 403 Forbidden\r\ncontent-length: 15\r\ncontent-type: text/plain\r\n{}\r\nAccess denied\r\n",
        if close { "connection: close\r\n" } else { "" }
    )
    .into_bytes()
}

/// A plain error response (bad requests the proxy cannot forward).
pub fn error_response(code: u16, reason: &str) -> Vec<u8> {
    format!("HTTP/1.1 {code} {reason}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_and_framing() {
        let raw = b"POST /api/v1/users?x=1 HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nX-API-Key: k\r\n\r\nhello";
        let (r, n) = Request::parse(raw).unwrap().unwrap();
        assert_eq!((r.method.as_str(), r.target.as_str(), r.host(), n), ("POST", "/api/v1/users?x=1", "svc", raw.len() - 5));
        assert_eq!(r.framing().unwrap(), Framing::Length(5));
        assert!(!r.wants_close());
        assert_eq!(Request::parse(&raw[..20]).unwrap(), None);
        let (back, _) = Request::parse(&r.encode()).unwrap().unwrap();
        assert_eq!(back, r);
        let chunked = b"PUT / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        assert_eq!(Request::parse(chunked).unwrap().unwrap().0.framing().unwrap(), Framing::Chunked);
        let conflict = b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert!(Request::parse(conflict).unwrap().unwrap().0.framing().is_err());
        assert!(Request::parse(b"GARBAGE\r\n\r\n").is_err());
        let v10 = b"GET / HTTP/1.0\r\n\r\n";
        assert!(Request::parse(v10).unwrap().unwrap().0.wants_close());
    }

    #[test]
    fn response_framing_depends_on_method_and_status() {
        let (r, _) = Response::parse(b"HTTP/1.1 200 OK\r\n\r\n").unwrap().unwrap();
        assert_eq!(r.framing("GET").unwrap(), Framing::Close);
        assert_eq!(r.framing("HEAD").unwrap(), Framing::None);
        let (r, _) = Response::parse(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap().unwrap();
        assert_eq!(r.framing("GET").unwrap(), Framing::None);
        let (r, _) = Response::parse(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc").unwrap().unwrap();
        assert_eq!(r.framing("GET").unwrap(), Framing::Length(3));
    }

    #[test]
    fn chunked_bodies_end_where_they_end_in_any_pieces() {
        let body = b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        for split in 0..body.len() {
            let mut c = Chunked::default();
            let a = c.feed(&body[..split]).unwrap();
            let end = if c.done() {
                a
            } else {
                assert_eq!(a, split);
                a + c.feed(&body[split..]).unwrap()
            };
            assert!(c.done());
            assert_eq!(end, body.len() - 4, "split at {split}");
        }
        assert!(Chunked::default().feed(b"zz\r\n").is_err());
        assert!(Chunked::default().feed(b"1\r\nab").is_err());
    }
}
