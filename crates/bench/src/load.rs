//! Load generation through the private Apache: several threads, each with
//! one kept-alive TLS connection (rustls, trusting only the bench's CA),
//! sending GETs for a fixed time and reading every response whole. When
//! Apache closes a connection (MaxKeepAliveRequests, an error page) the
//! thread connects again, as a browser would; that cost is in the figure.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// Any single read or write longer than this is an error, not a hang.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Tls {
    config: Arc<ClientConfig>,
    server: SocketAddr,
}

impl Tls {
    pub fn new(server: SocketAddr, ca_pem: &[u8]) -> anyhow::Result<Tls> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            roots.add(cert?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Tls {
            config: Arc::new(config),
            server,
        })
    }

    /// A new connection whose SNI is `host` (without port).
    pub fn connect(&self, host: &str) -> io::Result<Conn> {
        let tcp = TcpStream::connect_timeout(&self.server, IO_TIMEOUT)?;
        tcp.set_read_timeout(Some(IO_TIMEOUT))?;
        tcp.set_write_timeout(Some(IO_TIMEOUT))?;
        tcp.set_nodelay(true)?;
        let sni = host.split(':').next().unwrap_or(host).to_owned();
        let name = ServerName::try_from(sni).map_err(io::Error::other)?;
        let tls = ClientConnection::new(self.config.clone(), name).map_err(io::Error::other)?;
        Ok(Conn {
            stream: StreamOwned::new(tls, tcp),
            buf: Vec::new(),
        })
    }

    /// One GET on a fresh connection.
    pub fn get_once(&self, host: &str, target: &str) -> io::Result<Answer> {
        self.connect(host)?.get(host, target)
    }
}

pub struct Conn {
    stream: StreamOwned<ClientConnection, TcpStream>,
    buf: Vec<u8>,
}

/// What the bench needs of a response.
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
    /// The server said it closes the connection after this response.
    pub closes: bool,
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

impl Conn {
    pub fn get(&mut self, host: &str, target: &str) -> io::Result<Answer> {
        // One write, so the request leaves in one TLS record and segment.
        let request =
            format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: satellite-bench\r\n\r\n");
        self.stream.write_all(request.as_bytes())?;
        self.stream.flush()?;
        self.read_answer()
    }

    fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 16384];
        let n = self.stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed mid-response",
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    fn read_answer(&mut self) -> io::Result<Answer> {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if self.buf.len() > 64 * 1024 {
                return Err(bad("response head over 64 KiB"));
            }
            self.fill()?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        self.buf.drain(..head_end);
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("no status line"))?;
        let mut length = None;
        let mut chunked = false;
        let mut closes = false;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            } else if name.eq_ignore_ascii_case("connection") {
                closes = value.eq_ignore_ascii_case("close");
            }
        }
        let body = if chunked {
            self.read_chunked()?
        } else if let Some(n) = length {
            while self.buf.len() < n {
                self.fill()?;
            }
            self.buf.drain(..n).collect()
        } else {
            return Err(bad("a response without a length"));
        };
        Ok(Answer {
            status,
            body,
            closes,
        })
    }

    fn read_chunked(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                self.fill()?;
            };
            let size_text = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad("bad chunk size"))?;
            self.buf.drain(..line_end + 2);
            while self.buf.len() < size + 2 {
                self.fill()?;
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
            if size == 0 {
                return Ok(body);
            }
        }
    }
}

/// What a load run measured.
pub struct Throughput {
    pub requests: u64,
    pub errors: u64,
    pub connections: u64,
    pub wall: Duration,
    /// The first unexpected answer, for the report.
    pub first_error: Option<String>,
}

impl Throughput {
    pub fn per_second(&self) -> f64 {
        self.requests as f64 / self.wall.as_secs_f64()
    }
}

/// What a thread's i-th request is: its Host, and the start of the body
/// it must get (with status `expect`).
pub type Pick<'a> = &'a (dyn Fn(usize, u64) -> (String, Vec<u8>) + Sync);

/// `threads` clients, each sending GET `target` with the Host `pick` gives
/// for its i-th request, for `duration`. A response counts when its status
/// is `expect` and its body starts with what `pick` said (so a request
/// proxied to the wrong backend is an error); anything else is an error.
pub fn run(
    tls: &Tls,
    threads: usize,
    duration: Duration,
    pick: Pick<'_>,
    target: &str,
    expect: u16,
) -> Throughput {
    let start = Instant::now();
    let deadline = start + duration;
    let results: Vec<(u64, u64, u64, Option<String>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    let (mut ok, mut errors, mut connections) = (0u64, 0u64, 0u64);
                    let mut first_error = None;
                    let mut conn: Option<Conn> = None;
                    let mut i = 0u64;
                    while Instant::now() < deadline {
                        let (name, body_prefix) = pick(t, i);
                        i += 1;
                        if conn.is_none() {
                            match tls.connect(&name) {
                                Ok(c) => {
                                    connections += 1;
                                    conn = Some(c);
                                }
                                Err(e) => {
                                    errors += 1;
                                    first_error.get_or_insert(format!("connect: {e}"));
                                    std::thread::sleep(Duration::from_millis(10));
                                    continue;
                                }
                            }
                        }
                        let Some(c) = conn.as_mut() else { continue };
                        match c.get(&name, target) {
                            Ok(answer) => {
                                if answer.status == expect && answer.body.starts_with(&body_prefix)
                                {
                                    ok += 1;
                                } else {
                                    errors += 1;
                                    first_error.get_or_insert(format!(
                                        "{} {:?}",
                                        answer.status,
                                        String::from_utf8_lossy(
                                            &answer.body[..answer.body.len().min(120)]
                                        )
                                    ));
                                }
                                if answer.closes {
                                    conn = None;
                                }
                            }
                            Err(_) => {
                                // Apache closed a kept-alive connection
                                // (its keep-alive limit): connect again.
                                conn = None;
                            }
                        }
                    }
                    (ok, errors, connections, first_error)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or((0, 1, 0, Some("client thread panicked".into())))
            })
            .collect()
    });
    let wall = start.elapsed();
    let mut total = Throughput {
        requests: 0,
        errors: 0,
        connections: 0,
        wall,
        first_error: None,
    };
    for (ok, errors, connections, first_error) in results {
        total.requests += ok;
        total.errors += errors;
        total.connections += connections;
        if total.first_error.is_none() {
            total.first_error = first_error;
        }
    }
    total
}
