//! One HTTP/1.1 request per connection, read strictly: anything a proxy in
//! front could frame differently from us is refused, so no request can
//! smuggle a second one past Apache.
//!
//! - Exactly one way to know the body's length: no `Content-Length`
//!   together with `Transfer-Encoding`, no repeated `Content-Length`
//!   (equal or not), no transfer coding but a lone `chunked` → 400.
//! - The head (request line and headers) is at most `MAX_HEAD` bytes and
//!   `MAX_HEADERS` fields → 431.
//! - The whole request must arrive within the read timeout → 408.
//!
//! Every answer closes the connection, so nothing after the request is
//! ever read as another one.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http::StatusCode;
use satellite_core::endpoints::Body;

use crate::listen::Stream;

pub(crate) const MAX_HEAD: usize = 16 * 1024;
pub(crate) const MAX_HEADERS: usize = 100;
/// How often a blocked read looks up to see whether serve is stopping.
const READ_SLICE: Duration = Duration::from_millis(200);
/// Bounds on reading what a refused client still sends, so that our answer
/// is not lost to a reset (the lingering close Apache does too).
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;
/// How long a client may take to accept our answer (set on every
/// connection before anything is written).
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request is not handled: an answer, or nothing (the client left,
/// or serve is stopping before the client said anything).
pub(crate) enum Refusal {
    Answer(StatusCode, String),
    Silent,
}

fn refuse<T>(status: StatusCode, message: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal::Answer(status, message.into()))
}

fn malformed<T>() -> Result<T, Refusal> {
    refuse(StatusCode::BAD_REQUEST, "Malformed request")
}

/// A request as read off the wire, before it becomes an `http::Request`.
pub(crate) struct Incoming {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Body,
}

/// Bytes from the connection, read against one deadline for the whole
/// request.
struct Reader<'a> {
    stream: &'a mut Stream,
    buf: Vec<u8>,
    pos: usize,
    deadline: Instant,
    stopping: &'a AtomicBool,
}

impl Reader<'_> {
    /// Appends what the client sends next; `false` at end of stream.
    fn more(&mut self) -> Result<bool, Refusal> {
        let mut chunk = [0u8; 8192];
        loop {
            let now = Instant::now();
            if now >= self.deadline {
                return refuse(StatusCode::REQUEST_TIMEOUT, "Request not received in time");
            }
            if self.buf.is_empty() && self.stopping.load(Ordering::SeqCst) {
                return Err(Refusal::Silent);
            }
            let slice = (self.deadline - now).min(READ_SLICE);
            if self.stream.set_read_timeout(slice).is_err() {
                return Err(Refusal::Silent);
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => return Err(Refusal::Silent),
            }
        }
    }

    /// The next CRLF-terminated line (without CRLF), at most `max` bytes.
    fn line(&mut self, max: usize) -> Result<Vec<u8>, Refusal> {
        loop {
            if let Some(at) = self.buf[self.pos..].windows(2).position(|w| w == b"\r\n") {
                let line = self.buf[self.pos..self.pos + at].to_vec();
                self.pos += at + 2;
                if line.contains(&b'\n') || line.contains(&b'\r') {
                    return malformed();
                }
                return Ok(line);
            }
            if self.buf.len() - self.pos > max {
                return malformed();
            }
            if !self.more()? {
                return malformed();
            }
        }
    }

    /// Exactly `n` more bytes.
    fn take(&mut self, n: usize) -> Result<Vec<u8>, Refusal> {
        while self.buf.len() - self.pos < n {
            if !self.more()? {
                return malformed();
            }
        }
        let out = self.buf[self.pos..self.pos + n].to_vec();
        self.pos += n;
        Ok(out)
    }
}

/// Reads one request from `stream`, or says why not.
pub(crate) fn read_request(
    stream: &mut Stream,
    timeout: Duration,
    max_body: usize,
    stopping: &AtomicBool,
) -> Result<Incoming, Refusal> {
    let mut reader = Reader {
        stream,
        buf: Vec::with_capacity(1024),
        pos: 0,
        deadline: Instant::now() + timeout,
        stopping,
    };
    let (mut incoming, head_len, version) = loop {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut fields);
        match parsed.parse(&reader.buf) {
            Ok(httparse::Status::Complete(len)) => {
                if len > MAX_HEAD {
                    return refuse(
                        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        "Request header too large",
                    );
                }
                let incoming = Incoming {
                    method: parsed.method.unwrap_or_default().to_owned(),
                    target: parsed.path.unwrap_or_default().to_owned(),
                    headers: parsed
                        .headers
                        .iter()
                        .map(|h| (h.name.to_owned(), h.value.to_vec()))
                        .collect(),
                    body: Vec::new(),
                };
                break (incoming, len, parsed.version.unwrap_or(1));
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => {
                return refuse(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "Too many request header fields",
                )
            }
            Err(_) => return malformed(),
        }
        if reader.buf.len() >= MAX_HEAD {
            return refuse(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "Request header too large",
            );
        }
        if !reader.more()? {
            // Gone before finishing the head: nobody to answer.
            return Err(Refusal::Silent);
        }
    };
    reader.pos = head_len;

    let headers = &incoming.headers;
    let named = |name: &'static str| {
        headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    };
    let lengths: Vec<&[u8]> = named("content-length").collect();
    let codings: Vec<&[u8]> = named("transfer-encoding").collect();
    if named("host").count() > 1 {
        return malformed();
    }
    let expects_continue = named("expect")
        .any(|v| v.trim_ascii().eq_ignore_ascii_case(b"100-continue"))
        && version == 1;
    let chunked = match (lengths.as_slice(), codings.as_slice()) {
        (_, [_, _, ..]) | ([_, _, ..], _) | ([_], [_]) => return malformed(),
        (_, [coding]) => {
            if version == 0 || !coding.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return malformed();
            }
            true
        }
        ([length], []) => {
            if length.is_empty() || !length.iter().all(u8::is_ascii_digit) {
                return malformed();
            }
            let too_large = std::str::from_utf8(length)
                .ok()
                .and_then(|l| l.parse::<usize>().ok())
                .is_none_or(|l| l > max_body);
            if too_large {
                return refuse(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("Request body too large (at most {max_body} bytes)"),
                );
            }
            let length: usize = std::str::from_utf8(length)
                .ok()
                .and_then(|l| l.parse().ok())
                .unwrap_or(0);
            if length > 0 && expects_continue && reader.buf.len() == head_len {
                continue_please(reader.stream);
            }
            incoming.body = reader.take(length)?;
            return Ok(incoming);
        }
        ([], []) => return Ok(incoming),
    };
    debug_assert!(chunked);
    if expects_continue && reader.buf.len() == head_len {
        continue_please(reader.stream);
    }
    incoming.body = read_chunked(&mut reader, max_body)?;
    Ok(incoming)
}

fn continue_please(stream: &mut Stream) {
    let _ = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
}

/// A `chunked` body: sizes in hex, extensions ignored, trailers read and
/// dropped; lines end in CRLF and nothing else.
fn read_chunked(reader: &mut Reader<'_>, max_body: usize) -> Result<Body, Refusal> {
    let mut body = Vec::new();
    loop {
        let line = reader.line(1024)?;
        let size = line.split(|&b| b == b';').next().unwrap_or_default();
        let size = size.trim_ascii_end();
        if size.is_empty() || size.len() > 15 || !size.iter().all(u8::is_ascii_hexdigit) {
            return malformed();
        }
        let size = std::str::from_utf8(size)
            .ok()
            .and_then(|s| usize::from_str_radix(s, 16).ok())
            .map_or_else(malformed, Ok)?;
        if size == 0 {
            break;
        }
        if body.len() + size > max_body {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("Request body too large (at most {max_body} bytes)"),
            );
        }
        body.extend(reader.take(size)?);
        if reader.take(2)? != b"\r\n" {
            return malformed();
        }
    }
    let mut trailer_bytes = 0;
    for _ in 0..=MAX_HEADERS {
        let line = reader.line(MAX_HEAD)?;
        if line.is_empty() {
            return Ok(body);
        }
        trailer_bytes += line.len();
        if trailer_bytes > MAX_HEAD {
            break;
        }
    }
    refuse(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "Request trailer too large",
    )
}

/// Writes `response` (within the connection's write timeout) and closes
/// our side. `head_only`: a HEAD request,
/// whose answer has the body's length but not the body.
pub(crate) fn write_response(
    stream: &mut Stream,
    response: &http::Response<Body>,
    head_only: bool,
) -> io::Result<()> {
    let status = response.status();
    let mut out = Vec::with_capacity(256 + response.body().len());
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {} {}\r\n",
            status.as_str(),
            status.canonical_reason().unwrap_or("")
        )
        .as_bytes(),
    );
    for (name, value) in response.headers() {
        if matches!(
            name,
            &http::header::CONTENT_LENGTH | &http::header::CONNECTION
        ) {
            continue;
        }
        out.extend_from_slice(satellite_cgi::title_case(name.as_str()).as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    if !bodiless {
        out.extend_from_slice(format!("Content-Length: {}\r\n", response.body().len()).as_bytes());
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    if !bodiless && !head_only {
        out.extend_from_slice(response.body());
    }
    stream.write_all(&out)?;
    stream.flush()?;
    stream.shutdown_write();
    Ok(())
}

/// After refusing a request the client may still be sending it: read and
/// drop what comes (within bounds) so that closing does not reset the
/// connection before the client has read our answer.
pub(crate) fn linger(stream: &mut Stream) {
    let deadline = Instant::now() + LINGER_TIME;
    let mut drained = 0;
    let mut sink = [0u8; 8192];
    while drained < LINGER_BYTES {
        let now = Instant::now();
        if now >= deadline || stream.set_read_timeout(deadline - now).is_err() {
            return;
        }
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
    }
}
