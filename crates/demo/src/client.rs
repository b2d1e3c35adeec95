//! An HTTPS client for talking to the private Apache: rustls (ring) that
//! trusts only the test CA, SNI set to the Host, several HTTP/1.1 requests
//! over one kept-alive connection, websocket upgrades with masked text
//! frames, and a chosen local address (a backend must redeem from its own
//! address, since redeem records the caller's REMOTE_ADDR).

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// How long any single read or write may block before the test fails
/// instead of hanging.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Client {
    config: Arc<ClientConfig>,
    server: SocketAddr,
    local: Option<IpAddr>,
}

impl Client {
    /// A client for the TLS server at `server` that trusts the CA
    /// certificate(s) in `ca_pem`.
    pub fn new(server: SocketAddr, ca_pem: &[u8]) -> Client {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            roots.add(cert.expect("a PEM certificate")).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Client {
            config: Arc::new(config),
            server,
            local: None,
        }
    }

    /// The same client, connecting from `local` (port chosen by the system).
    pub fn bind(&self, local: &str) -> Client {
        Client {
            local: Some(local.parse().expect("an IP address")),
            ..self.clone()
        }
    }

    /// A new TLS connection whose SNI is `host` (no port).
    pub fn connect(&self, host: &str) -> io::Result<Conn> {
        let tcp = match self.local {
            None => TcpStream::connect_timeout(&self.server, IO_TIMEOUT)?,
            Some(local) => {
                let socket = socket2::Socket::new(
                    socket2::Domain::for_address(self.server),
                    socket2::Type::STREAM,
                    Some(socket2::Protocol::TCP),
                )?;
                socket.bind(&SocketAddr::new(local, 0).into())?;
                socket.connect_timeout(&self.server.into(), IO_TIMEOUT)?;
                socket.into()
            }
        };
        tcp.set_read_timeout(Some(IO_TIMEOUT))?;
        tcp.set_write_timeout(Some(IO_TIMEOUT))?;
        tcp.set_nodelay(true)?;
        let sni = host.split(':').next().unwrap_or(host).to_owned();
        let name = ServerName::try_from(sni)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let tls = ClientConnection::new(self.config.clone(), name).map_err(io::Error::other)?;
        Ok(Conn {
            stream: StreamOwned::new(tls, tcp),
            buf: Vec::new(),
            default_host: host.to_owned(),
        })
    }

    /// One request on a fresh connection.
    pub fn request(&self, req: &Request) -> io::Result<Response> {
        let mut conn = self.connect(&req.host)?;
        conn.send(req)
    }

    /// `GET target` on a kept-alive connection, as a browser makes it: a
    /// new connection when there is none or the server said `Connection:
    /// close` (MaxKeepAliveRequests), and one retry on a fresh connection
    /// when a kept-alive one turns out closed (Apache's KeepAliveTimeout
    /// racing the request: no answer was given, so nothing was done twice).
    pub fn ask(&self, conn: &mut Option<Conn>, host: &str, target: &str) -> io::Result<Response> {
        for attempt in 0..2 {
            let reused = conn.is_some();
            if conn.is_none() {
                *conn = Some(self.connect(host)?);
            }
            let c = conn.as_mut().expect("connected above");
            match c.get(host, target) {
                Ok(r) => {
                    if r.closes_connection() {
                        *conn = None;
                    }
                    return Ok(r);
                }
                Err(e) => {
                    *conn = None;
                    if !(reused && attempt == 0) {
                        return Err(e);
                    }
                }
            }
        }
        unreachable!("the second attempt returns")
    }

    /// `GET path` with `Host: host` on a fresh connection.
    pub fn get(&self, host: &str, path: &str) -> io::Result<Response> {
        self.request(&Request::get(host, path))
    }
}

/// One request to send. `host` is the Host header value (and, for a new
/// connection, the SNI name without any port).
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub host: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn get(host: &str, target: &str) -> Request {
        Request {
            method: "GET".into(),
            host: host.into(),
            target: target.into(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn post(host: &str, target: &str, body: Vec<u8>) -> Request {
        Request {
            method: "POST".into(),
            body,
            ..Request::get(host, target)
        }
        .header("Content-Type", "application/octet-stream")
    }

    pub fn header(mut self, name: &str, value: &str) -> Request {
        self.headers.push((name.into(), value.into()));
        self
    }
}

#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The server closes the connection after this answer: `close` among
    /// the `Connection` header's options (Apache's may read `Upgrade,
    /// close` when it also offers h2).
    pub fn closes_connection(&self) -> bool {
        self.header("Connection").is_some_and(|v| {
            v.split(',')
                .any(|option| option.trim().eq_ignore_ascii_case("close"))
        })
    }
}

impl std::fmt::Display for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?} {:?}", self.status, self.headers, self.text())
    }
}

/// One kept-alive TLS connection.
pub struct Conn {
    stream: StreamOwned<ClientConnection, TcpStream>,
    /// Bytes read but not consumed yet.
    buf: Vec<u8>,
    default_host: String,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Conn {
    /// How long a read may wait (a websocket waiting to be cut).
    pub fn set_read_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        self.stream.sock.set_read_timeout(Some(timeout))
    }

    /// Sends `req` and reads its whole response; the connection stays open
    /// for the next request (unless the server closes it).
    pub fn send(&mut self, req: &Request) -> io::Result<Response> {
        self.write_request(req)?;
        self.read_response(req.method == "HEAD")
    }

    pub fn get(&mut self, host: &str, path: &str) -> io::Result<Response> {
        self.send(&Request::get(host, path))
    }

    fn write_request(&mut self, req: &Request) -> io::Result<()> {
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: {}\r\n",
            req.method, req.target, req.host
        );
        let mut has_length = false;
        for (k, v) in &req.headers {
            has_length |= k.eq_ignore_ascii_case("content-length");
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if !has_length && (!req.body.is_empty() || req.method == "POST" || req.method == "PUT") {
            head.push_str(&format!("Content-Length: {}\r\n", req.body.len()));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&req.body);
        self.stream.write_all(&bytes)?;
        self.stream.flush()
    }

    /// Writes `bytes` as they are (a request no `Request` can express, such
    /// as one without Host) and reads until the server closes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<Vec<u8>> {
        self.stream.write_all(bytes)?;
        self.stream.flush()?;
        while self.fill()? > 0 {}
        Ok(std::mem::take(&mut self.buf))
    }

    /// Reads more bytes into the buffer; `Ok(0)` at the end of the stream
    /// (a close without close_notify counts as an end too).
    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
            Err(e) => Err(e),
        }
    }

    fn read_exact_buf(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection closed with {} of {n} bytes", self.buf.len()),
                ));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    fn read_line(&mut self) -> io::Result<String> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..pos + 2).collect();
                return Ok(String::from_utf8_lossy(&line[..pos]).into_owned());
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed in the middle of a line",
                ));
            }
        }
    }

    fn read_head(&mut self) -> io::Result<(u16, Vec<(String, String)>)> {
        let status_line = self.read_line()?;
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .filter(|_| status_line.starts_with("HTTP/1."))
            .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let line = self.read_line()?;
            if line.is_empty() {
                break;
            }
            let (k, v) = line
                .split_once(':')
                .ok_or_else(|| bad(format!("bad header line {line:?}")))?;
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        Ok((status, headers))
    }

    fn read_response(&mut self, head_only: bool) -> io::Result<Response> {
        let (status, headers) = loop {
            let (status, headers) = self.read_head()?;
            // 100 Continue and other interim answers precede the real one.
            if (100..200).contains(&status) && status != 101 {
                continue;
            }
            break (status, headers);
        };
        let find = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let body = if head_only || status == 101 || status == 204 || status == 304 {
            Vec::new()
        } else if find("Transfer-Encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            let mut body = Vec::new();
            loop {
                let line = self.read_line()?;
                let size_text = line.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size_text, 16)
                    .map_err(|_| bad(format!("bad chunk size line {line:?}")))?;
                if size == 0 {
                    // Trailers, then the empty line.
                    while !self.read_line()?.is_empty() {}
                    break;
                }
                body.extend(self.read_exact_buf(size)?);
                let crlf = self.read_exact_buf(2)?;
                if crlf != b"\r\n" {
                    return Err(bad("chunk not followed by CRLF"));
                }
            }
            body
        } else if let Some(len) = find("Content-Length") {
            let len: usize = len
                .parse()
                .map_err(|_| bad(format!("bad Content-Length {len:?}")))?;
            self.read_exact_buf(len)?
        } else {
            // Delimited by the end of the connection.
            while self.fill()? > 0 {}
            std::mem::take(&mut self.buf)
        };
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    /// Upgrades this connection to a websocket on `path`, asking for
    /// `protocol`; returns the 101 answer (or whatever else came back,
    /// with the connection no longer usable for websocket frames).
    pub fn websocket(&mut self, host: &str, path: &str, protocol: &str) -> io::Result<Response> {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let req = Request::get(host, path)
            .header("Upgrade", "websocket")
            .header("Connection", "Upgrade")
            .header("Sec-WebSocket-Key", key)
            .header("Sec-WebSocket-Version", "13")
            .header("Sec-WebSocket-Protocol", protocol)
            .header("Origin", &format!("https://{host}"));
        self.write_request(&req)?;
        let response = self.read_response(false)?;
        if response.status == 101 {
            let expected = crate::backend::websocket_accept(key);
            if response.header("Sec-WebSocket-Accept") != Some(expected.as_str()) {
                return Err(bad(format!("bad Sec-WebSocket-Accept in {response}")));
            }
        }
        Ok(response)
    }

    /// Sends one masked text frame.
    pub fn send_text(&mut self, text: &str) -> io::Result<()> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let frame = crate::backend::encode_frame(0x1, text.as_bytes(), Some(mask));
        self.stream.write_all(&frame)?;
        self.stream.flush()
    }

    /// Reads frames until a text frame arrives (answering pings); returns
    /// its text. A close frame is an error.
    pub fn recv_text(&mut self) -> io::Result<String> {
        loop {
            let (opcode, payload) = self.read_frame()?;
            match opcode {
                0x1 => return Ok(String::from_utf8_lossy(&payload).into_owned()),
                0x8 => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "websocket closed",
                    ))
                }
                0x9 => {
                    let pong = crate::backend::encode_frame(0xA, &payload, Some([1, 2, 3, 4]));
                    self.stream.write_all(&pong)?;
                }
                _ => {}
            }
        }
    }

    fn read_frame(&mut self) -> io::Result<(u8, Vec<u8>)> {
        let head = self.read_exact_buf(2)?;
        let opcode = head[0] & 0x0f;
        let masked = head[1] & 0x80 != 0;
        let len = match head[1] & 0x7f {
            126 => u16::from_be_bytes(self.read_exact_buf(2)?.try_into().unwrap()) as usize,
            127 => u64::from_be_bytes(self.read_exact_buf(8)?.try_into().unwrap()) as usize,
            n => n as usize,
        };
        let mask = if masked {
            Some(self.read_exact_buf(4)?)
        } else {
            None
        };
        let mut payload = self.read_exact_buf(len)?;
        if let Some(mask) = mask {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
        }
        Ok((opcode, payload))
    }

    /// The Host this connection was opened for (its SNI name).
    pub fn host(&self) -> &str {
        &self.default_host
    }
}
