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
    /// `REQUEST_METHOD` is not set: the program was not started by a web
    /// server.
    NotCgi,
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
            CgiError::NotCgi => f.write_str(
                "REQUEST_METHOD is not set: this is a CGI program, to be run by a web server",
            ),
            CgiError::BadMethod => f.write_str("REQUEST_METHOD is not an HTTP method"),
            CgiError::BadContentLength => f.write_str("CONTENT_LENGTH is not a number"),
            CgiError::UriTooLong => f.write_str("the request target is too long"),
            CgiError::BodyTooLarge { limit } => write!(f, "request body larger than {limit} bytes"),
            CgiError::BodyRead(err) => write!(f, "reading the request body: {err}"),
        }
    }
}

impl std::error::Error for CgiError {}

/// Builds the request from meta-variables (`std::env::vars_os()` in a real
/// CGI process) and the body from `stdin`, reading at most `max_body` bytes.
pub fn read_request<I, R>(vars: I, stdin: R, max_body: usize) -> Result<CgiRequest, CgiError>
where
    I: IntoIterator<Item = (OsString, OsString)>,
    R: Read,
{
    let mut method = None;
    let mut query = Vec::new();
    let mut script_name = Vec::new();
    let mut path_info = Vec::new();
    let mut content_length = None;
    let mut version = Version::HTTP_11;
    let mut remote_addr = None;
    let mut headers = http::HeaderMap::new();

    for (name, value) in vars {
        let (name, value) = (name.as_bytes(), value.as_bytes());
        match name {
            b"REQUEST_METHOD" => method = Some(value.to_vec()),
            b"QUERY_STRING" => query = value.to_vec(),
            b"SCRIPT_NAME" => script_name = value.to_vec(),
            b"PATH_INFO" => path_info = value.to_vec(),
            b"CONTENT_LENGTH" => content_length = Some(value.to_vec()),
            b"CONTENT_TYPE" => {
                if let Ok(v) = HeaderValue::from_bytes(value) {
                    headers.insert(CONTENT_TYPE, v);
                }
            }
            b"SERVER_PROTOCOL" => {
                version = match value {
                    b"HTTP/0.9" => Version::HTTP_09,
                    b"HTTP/1.0" => Version::HTTP_10,
                    b"HTTP/2" | b"HTTP/2.0" => Version::HTTP_2,
                    b"HTTP/3" | b"HTTP/3.0" => Version::HTTP_3,
                    // Unknown protocols (INCLUDED, junk) are answered as 1.1.
                    _ => Version::HTTP_11,
                }
            }
            b"REMOTE_ADDR" => {
                remote_addr = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.trim().parse::<IpAddr>().ok())
            }
            _ => {
                if let Some(header) = name.strip_prefix(b"HTTP_") {
                    let header: Vec<u8> = header
                        .iter()
                        .map(|&b| {
                            if b == b'_' {
                                b'-'
                            } else {
                                b.to_ascii_lowercase()
                            }
                        })
                        .collect();
                    // Headers that are not valid HTTP are dropped, not fatal.
                    if let (Ok(n), Ok(v)) = (
                        HeaderName::from_bytes(&header),
                        HeaderValue::from_bytes(value),
                    ) {
                        headers.append(n, v);
                    }
                }
            }
        }
    }

    let method = method.ok_or(CgiError::NotCgi)?;
    let method = Method::from_bytes(&method).map_err(|_| CgiError::BadMethod)?;

    let length = match content_length.as_deref() {
        None | Some(b"") => 0,
        Some(raw) => std::str::from_utf8(raw)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or(CgiError::BadContentLength)?,
    };
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
    if let Ok(v) = HeaderValue::from_str(&length.to_string()) {
        headers.insert(CONTENT_LENGTH, v);
    }

    let mut path = script_name;
    path.extend_from_slice(&path_info);
    let uri = request_uri(&path, &query).ok_or(CgiError::UriTooLong)?;

    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(CgiRequest {
        request,
        remote_addr,
    })
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
    fn not_started_by_a_web_server() {
        assert!(matches!(
            read_request(env(&[]), io::empty(), 8),
            Err(CgiError::NotCgi)
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
