//! A small CGI (RFC 3875) adapter over the `http` crate's types: the request
//! from meta-variables and stdin, the response to stdout with a `Status:`
//! line.
//!
//! Why not the `cgi` crate: it is AGPL-3.0, which would bind the whole
//! product, and it panics on input a client or a web server can produce
//! (non-UTF-8 meta-variables, an unknown `SERVER_PROTOCOL`, header values it
//! cannot parse). Here every meta-variable is read as bytes, anything
//! unparseable is dropped or escaped, and the body is capped before it is
//! read.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::os::unix::ffi::OsStrExt;

use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, Uri, Version};

/// A request read from a CGI environment.
#[derive(Debug)]
pub struct CgiRequest {
    pub request: Request<Vec<u8>>,
    /// `REMOTE_ADDR`, when present and an IP address.
    pub remote_addr: Option<IpAddr>,
}

#[derive(Debug)]
pub enum CgiError {
    /// `REQUEST_METHOD` is not set although a web server started the
    /// program: the server broke RFC 3875.
    NoMethod,
    /// `REQUEST_METHOD` is not an HTTP token.
    BadMethod,
    BadContentLength,
    /// The request target is longer than a URI may be.
    UriTooLong,
    BodyTooLarge {
        limit: usize,
    },
    /// The client sent less than it announced, or stdin failed.
    BodyRead(io::Error),
}

impl std::fmt::Display for CgiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CgiError::NoMethod => f.write_str("REQUEST_METHOD is not set"),
            CgiError::BadMethod => f.write_str("REQUEST_METHOD is not an HTTP method"),
            CgiError::BadContentLength => f.write_str("CONTENT_LENGTH is not a number"),
            CgiError::UriTooLong => f.write_str("the request target is too long"),
            CgiError::BodyTooLarge { limit } => write!(f, "request body larger than {limit} bytes"),
            CgiError::BodyRead(err) => write!(f, "reading the request body: {err}"),
        }
    }
}

impl std::error::Error for CgiError {}

/// Whether a web server started this process. RFC 3875 (4.1.4) has the
/// server set `GATEWAY_INTERFACE` for every request, and no login shell
/// sets it: a program that finds it missing was run by hand and should say
/// what it is rather than answer a request nobody sent (or complain about a
/// configuration it does not need yet).
pub fn started_by_web_server() -> bool {
    std::env::var_os("GATEWAY_INTERFACE").is_some()
}

/// Builds the request from meta-variables (`std::env::vars_os()` in a real
/// CGI process) and the body from `stdin`, reading at most `max_body` bytes.
pub fn read_request<I, R>(vars: I, stdin: R, max_body: usize) -> Result<CgiRequest, CgiError>
where
    I: IntoIterator<Item = (OsString, OsString)>,
    R: Read,
{
    let meta = MetaVariables::gather(vars);
    let method = meta.method.ok_or(CgiError::NoMethod)?;
    let method = Method::from_bytes(&method).map_err(|_| CgiError::BadMethod)?;
    let length = content_length(meta.content_length.as_deref())?;
    let body = read_body(stdin, length, max_body)?;
    let mut headers = meta.headers;
    headers.insert(CONTENT_LENGTH, HeaderValue::from(length));

    let mut path = meta.script_name;
    path.extend_from_slice(&meta.path_info);
    let uri = request_uri(&path, &meta.query).ok_or(CgiError::UriTooLong)?;

    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = meta.version;
    *request.headers_mut() = headers;
    Ok(CgiRequest {
        request,
        remote_addr: meta.remote_addr,
    })
}

/// The meta-variables a request is made of, as raw bytes where they still
/// need checking.
#[derive(Default)]
struct MetaVariables {
    method: Option<Vec<u8>>,
    query: Vec<u8>,
    script_name: Vec<u8>,
    path_info: Vec<u8>,
    content_length: Option<Vec<u8>>,
    version: Version,
    remote_addr: Option<IpAddr>,
    headers: http::HeaderMap,
}

impl MetaVariables {
    fn gather(vars: impl IntoIterator<Item = (OsString, OsString)>) -> Self {
        let mut meta = MetaVariables::default();
        for (name, value) in vars {
            meta.take(name.as_bytes(), value.as_bytes());
        }
        meta
    }

    fn take(&mut self, name: &[u8], value: &[u8]) {
        match name {
            b"REQUEST_METHOD" => self.method = Some(value.to_vec()),
            b"QUERY_STRING" => self.query = value.to_vec(),
            b"SCRIPT_NAME" => self.script_name = value.to_vec(),
            b"PATH_INFO" => self.path_info = value.to_vec(),
            b"CONTENT_LENGTH" => self.content_length = Some(value.to_vec()),
            b"CONTENT_TYPE" => {
                if let Ok(v) = HeaderValue::from_bytes(value) {
                    self.headers.insert(CONTENT_TYPE, v);
                }
            }
            b"SERVER_PROTOCOL" => self.version = protocol_version(value),
            b"REMOTE_ADDR" => {
                self.remote_addr = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.trim().parse::<IpAddr>().ok())
            }
            _ => {
                // Headers that are not valid HTTP are dropped, not fatal.
                if let Some((name, value)) = client_header(name, value) {
                    self.headers.append(name, value);
                }
            }
        }
    }
}

/// Unknown protocols (`INCLUDED`, junk) are answered as HTTP/1.1.
fn protocol_version(value: &[u8]) -> Version {
    match value {
        b"HTTP/0.9" => Version::HTTP_09,
        b"HTTP/1.0" => Version::HTTP_10,
        b"HTTP/2" | b"HTTP/2.0" => Version::HTTP_2,
        b"HTTP/3" | b"HTTP/3.0" => Version::HTTP_3,
        _ => Version::HTTP_11,
    }
}

/// `HTTP_X_FORWARDED_FOR` → `x-forwarded-for`; `None` for any other
/// meta-variable and for a name or value that is not valid HTTP.
fn client_header(name: &[u8], value: &[u8]) -> Option<(HeaderName, HeaderValue)> {
    let header: Vec<u8> = name
        .strip_prefix(b"HTTP_")?
        .iter()
        .map(|&b| match b {
            b'_' => b'-',
            _ => b.to_ascii_lowercase(),
        })
        .collect();
    Some((
        HeaderName::from_bytes(&header).ok()?,
        HeaderValue::from_bytes(value).ok()?,
    ))
}

fn content_length(raw: Option<&[u8]>) -> Result<u64, CgiError> {
    match raw {
        None | Some(b"") => Ok(0),
        Some(raw) => std::str::from_utf8(raw)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or(CgiError::BadContentLength),
    }
}

/// Exactly `length` bytes of `stdin`, refused before reading when the
/// length is over `max_body`.
fn read_body(stdin: impl Read, length: u64, max_body: usize) -> Result<Vec<u8>, CgiError> {
    if length > max_body as u64 {
        return Err(CgiError::BodyTooLarge { limit: max_body });
    }
    let mut body = Vec::with_capacity(length as usize);
    stdin
        .take(length)
        .read_to_end(&mut body)
        .map_err(CgiError::BodyRead)?;
    if body.len() as u64 != length {
        return Err(CgiError::BodyRead(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("announced {length} bytes, got {}", body.len()),
        )));
    }
    Ok(body)
}

/// The request target from a raw path and query, every byte a URI may not
/// hold escaped (decoding gives the raw bytes back). Shared with the native
/// server, so both transports hand the handlers the same URI.
/// `None` when the target is too long for a URI (the http crate's limit,
/// 64 KiB after escaping).
pub fn request_uri(path: &[u8], query: &[u8]) -> Option<Uri> {
    let mut target = escape_uri_part(path, false);
    if !target.starts_with('/') {
        target.insert(0, '/');
    }
    if !query.is_empty() {
        target.push('?');
        target.push_str(&escape_uri_part(query, true));
    }
    // Escaping leaves only characters a URI may hold; what remains to fail
    // is the length.
    Uri::try_from(target).ok()
}

/// Percent-encodes every byte a URI may not hold (and a `%` that starts no
/// valid escape), so that decoding gives back exactly the original bytes.
fn escape_uri_part(raw: &[u8], is_query: bool) -> String {
    let mut out = String::with_capacity(raw.len());
    for (i, &b) in raw.iter().enumerate() {
        let valid_escape = b == b'%'
            && raw.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
            && raw.get(i + 2).is_some_and(u8::is_ascii_hexdigit);
        let plain = b.is_ascii_alphanumeric()
            || b"-._~!$&'()*+,;=:@/".contains(&b)
            || (is_query && b == b'?');
        if plain || valid_escape {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Writes a CGI response: `Status:`, the headers, a blank line, the body.
pub fn write_response<W: Write>(mut out: W, response: &Response<Vec<u8>>) -> io::Result<()> {
    let status = response.status();
    let mut head = format!(
        "Status: {} {}\n",
        status.as_str(),
        status.canonical_reason().unwrap_or("")
    );
    for (name, value) in response.headers() {
        // Apache recomputes the length (and drops the body of a HEAD).
        if name == CONTENT_LENGTH {
            continue;
        }
        head.push_str(&title_case(name.as_str()));
        head.push_str(": ");
        head.push_str(&String::from_utf8_lossy(value.as_bytes()));
        head.push('\n');
    }
    head.push('\n');
    out.write_all(head.as_bytes())?;
    out.write_all(response.body())?;
    out.flush()
}

/// `content-type` → `Content-Type`, as people and old clients expect.
pub fn title_case(name: &str) -> String {
    let mut upper = true;
    name.chars()
        .map(|c| {
            let c = if upper { c.to_ascii_uppercase() } else { c };
            upper = c == '-';
            c
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &[u8])]) -> Vec<(OsString, OsString)> {
        use std::os::unix::ffi::OsStringExt;
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from_vec(v.to_vec())))
            .collect()
    }

    #[test]
    fn a_get_with_headers_and_a_junk_query() {
        let vars = env(&[
            ("REQUEST_METHOD", b"GET"),
            ("QUERY_STRING", b"token=x\\&jobid=1%zz \xff"),
            ("SCRIPT_NAME", b"/linktoken.cgi"),
            ("REMOTE_ADDR", b"10.0.0.7"),
            ("HTTP_HOST", b"manage.example.org"),
            ("HTTP_X_BAD", b"\x01\x02"),
            ("SERVER_PROTOCOL", b"INCLUDED"),
            ("NON_UTF8", b"\xff\xfe"),
        ]);
        let cgi = read_request(vars, io::empty(), 10).unwrap();
        assert_eq!(cgi.remote_addr, Some("10.0.0.7".parse().unwrap()));
        assert_eq!(cgi.request.uri().path(), "/linktoken.cgi");
        assert_eq!(
            cgi.request.uri().query(),
            Some("token=x%5C&jobid=1%25zz%20%FF")
        );
        assert_eq!(cgi.request.headers()["host"], "manage.example.org");
        assert!(cgi.request.headers().get("x-bad").is_none());
    }

    #[test]
    fn the_body_is_capped_and_must_be_complete() {
        let post = |len: &[u8], body: &'static [u8]| {
            read_request(
                env(&[("REQUEST_METHOD", b"POST"), ("CONTENT_LENGTH", len)]),
                body,
                8,
            )
        };
        assert_eq!(post(b"5", b"hello").unwrap().request.body(), b"hello");
        assert!(matches!(
            post(b"9", b"123456789"),
            Err(CgiError::BodyTooLarge { limit: 8 })
        ));
        assert!(matches!(post(b"6", b"hello"), Err(CgiError::BodyRead(_))));
        assert!(matches!(post(b"-1", b""), Err(CgiError::BadContentLength)));
    }

    #[test]
    fn a_request_without_a_method_is_refused() {
        assert!(matches!(
            read_request(env(&[]), io::empty(), 8),
            Err(CgiError::NoMethod)
        ));
    }

    #[test]
    fn responses_carry_a_status_line() {
        let response = Response::builder()
            .status(404)
            .header("content-type", "text/plain")
            .header("access-control-allow-origin", "https://a.b")
            .body(b"Oops! x\n".to_vec())
            .unwrap();
        let mut out = Vec::new();
        write_response(&mut out, &response).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Status: 404 Not Found\nContent-Type: text/plain\nAccess-Control-Allow-Origin: https://a.b\n\nOops! x\n"
        );
    }
}
