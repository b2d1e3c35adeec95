//! A stand-in for a user's notebook server: plain HTTP/1.1 on a loopback
//! address of its own (127.0.0.3, 127.0.0.4, ...), std threads only. It
//! records every request it receives, answers with a body that names it and
//! echoes the request target, redirects `/redirect` to its own
//! `http://<ip>:<port>/lab` (what Jupyter does), sets cookies for the whole
//! domain on `/set-cookie` (cookie tossing), and speaks RFC 6455
//! websockets: it echoes the offered `Sec-WebSocket-Protocol` and every text
//! frame.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use base64::Engine as _;
use sha1::Digest as _;

/// One request as the backend received it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// Path and query exactly as on the request line.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
    /// SHA-1 of the body, hex, to check a large body arrived intact.
    pub body_sha1: String,
    /// The peer (Apache's side of the proxied connection).
    pub peer: SocketAddr,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    streams: Arc<Mutex<HashMap<usize, TcpStream>>>,
    accept: Option<thread::JoinHandle<()>>,
}

/// The body the backend answers a plain request with.
pub fn answer_body(name: &str, method: &str, target: &str) -> String {
    format!("backend {name} answers {method} {target}\n")
}

/// A port on an address, bound but not listening: connections to it are
/// refused, as to a notebook that has not started yet, and no other process
/// can take it before the backend starts on it ([`ReservedPort::listen`]).
pub struct ReservedPort {
    socket: socket2::Socket,
    pub port: u16,
}

impl ReservedPort {
    pub fn on(ip: &str) -> ReservedPort {
        use socket2::{Domain, Socket, Type};
        let addr = SocketAddr::new(ip.parse().unwrap(), 0);
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
        socket.bind(&addr.into()).unwrap();
        let port = socket.local_addr().unwrap().as_socket().unwrap().port();
        ReservedPort { socket, port }
    }

    /// The backend, answering on the reserved port from now on.
    pub fn listen(self, name: &str) -> Backend {
        self.socket.listen(128).unwrap();
        Backend::on_listener(name, self.socket.into())
    }
}

impl Backend {
    /// Listens on `ip` at a port the system picks.
    pub fn start(name: &str, ip: &str) -> Backend {
        let listener = TcpListener::bind((ip, 0))
            .unwrap_or_else(|e| panic!("backend {name} cannot listen on {ip}: {e}"));
        Self::on_listener(name, listener)
    }

    /// Answers on a socket that listens already.
    pub fn on_listener(name: &str, listener: TcpListener) -> Backend {
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let streams = Arc::new(Mutex::new(HashMap::new()));
        let accept = {
            let (name, seen, stop, streams) =
                (name.to_owned(), seen.clone(), stop.clone(), streams.clone());
            thread::spawn(move || {
                for (id, stream) in listener.incoming().enumerate() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    // Kept to cut at stop, and only while open: a long run
                    // (the soak) opens a connection per proxied request.
                    if let Ok(clone) = stream.try_clone() {
                        streams.lock().unwrap().insert(id, clone);
                    }
                    let (name, seen, streams) = (name.clone(), seen.clone(), streams.clone());
                    thread::spawn(move || {
                        let _ = serve(stream, addr, &name, &seen);
                        streams.lock().unwrap().remove(&id);
                    });
                }
            })
        };
        Backend {
            name: name.to_owned(),
            addr,
            seen,
            stop,
            streams,
            accept: Some(accept),
        }
    }

    pub fn ip(&self) -> String {
        self.addr.ip().to_string()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The last request received whose target starts with `prefix`.
    pub fn last(&self, prefix: &str) -> Option<Seen> {
        self.seen()
            .into_iter()
            .rev()
            .find(|s| s.target.starts_with(prefix))
    }

    pub fn stop(&mut self) {
        if self.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the accept loop, then cut every open connection.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2));
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        for (_, stream) in self.streams.lock().unwrap().drain() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455 4.2.2).
pub fn websocket_accept(key: &str) -> String {
    let mut sha = sha1::Sha1::new();
    sha.update(key.trim().as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// One final frame; masked with `mask` if given (client to server frames
/// must be, server to client frames must not be).
pub fn encode_frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut frame = vec![0x80 | opcode];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => frame.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(mask_bit | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(mask) => {
            frame.extend_from_slice(&mask);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        }
        None => frame.extend_from_slice(payload),
    }
    frame
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// A buffered reader over the raw stream (requests may be pipelined and
/// frames may follow a handshake in the same segment).
struct Input {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Input {
    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 64 * 1024];
        let n = self.stream.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill()? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    fn line(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..pos + 2).collect();
                return Ok(Some(String::from_utf8_lossy(&line[..pos]).into_owned()));
            }
            if self.fill()? == 0 {
                return Ok(None);
            }
        }
    }
}

fn serve(stream: TcpStream, me: SocketAddr, name: &str, seen: &Mutex<Vec<Seen>>) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let peer = stream.peer_addr()?;
    let mut out = stream.try_clone()?;
    let mut input = Input {
        stream,
        buf: Vec::new(),
    };
    loop {
        let Some(request_line) = input.line()? else {
            return Ok(());
        };
        if request_line.is_empty() {
            continue;
        }
        let mut parts = request_line.split(' ');
        let method = parts.next().unwrap_or("").to_owned();
        let target = parts.next().unwrap_or("").to_owned();
        let mut headers = Vec::new();
        loop {
            let line = input.line()?.ok_or_else(|| bad("closed in the header"))?;
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_owned(), v.trim().to_owned()));
            }
        }
        let find = |name: &str| {
            headers
                .iter()
                .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let body = if find("Transfer-Encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            let mut body = Vec::new();
            loop {
                let line = input.line()?.ok_or_else(|| bad("closed in a chunk"))?;
                let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| bad("bad chunk size"))?;
                if size == 0 {
                    while input.line()?.is_some_and(|l| !l.is_empty()) {}
                    break;
                }
                body.extend(input.take(size)?);
                input.take(2)?;
            }
            body
        } else {
            let len = find("Content-Length")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            input.take(len)?
        };
        let sha = sha1::Sha1::digest(&body);
        seen.lock().unwrap().push(Seen {
            method: method.clone(),
            target: target.clone(),
            headers: headers.clone(),
            body_len: body.len(),
            body_sha1: sha.iter().map(|b| format!("{b:02x}")).collect(),
            peer,
        });

        let upgrade = find("Upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
        if upgrade {
            let key = find("Sec-WebSocket-Key").unwrap_or_default();
            let mut head = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {}\r\n",
                websocket_accept(&key)
            );
            if let Some(protocol) = find("Sec-WebSocket-Protocol") {
                let first = protocol.split(',').next().unwrap_or("").trim().to_owned();
                head.push_str(&format!("Sec-WebSocket-Protocol: {first}\r\n"));
            }
            head.push_str("\r\n");
            out.write_all(head.as_bytes())?;
            return echo_frames(&mut input, &mut out);
        }

        let (status, extra, body) = if target == "/redirect" || target.starts_with("/redirect?") {
            (
                "302 Found",
                format!("Location: http://{me}/lab\r\n"),
                format!("backend {name} redirects\n"),
            )
        } else if target.starts_with("/set-cookie") {
            // Cookies for the whole domain (cookie tossing), and headers the
            // proxy must not duplicate.
            (
                "200 OK",
                "Set-Cookie: tossed=1; Domain=example.test; Path=/\r\n\
                 Set-Cookie: dotted=2; Path=/; domain=.EXAMPLE.test; Secure; HttpOnly\r\n\
                 Set-Cookie: plain=3; Path=/\r\n\
                 X-Content-Type-Options: nosniff\r\n\
                 Strict-Transport-Security: max-age=5\r\n"
                    .to_owned(),
                answer_body(name, &method, &target),
            )
        } else {
            ("200 OK", String::new(), answer_body(name, &method, &target))
        };
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             X-Backend: {name}\r\n{extra}\r\n{body}",
            body.len()
        );
        out.write_all(response.as_bytes())?;
        if find("Connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
            return Ok(());
        }
    }
}

fn echo_frames(input: &mut Input, out: &mut TcpStream) -> io::Result<()> {
    loop {
        let head = input.take(2)?;
        let opcode = head[0] & 0x0f;
        let masked = head[1] & 0x80 != 0;
        let len = match head[1] & 0x7f {
            126 => u16::from_be_bytes(input.take(2)?.try_into().unwrap()) as usize,
            127 => u64::from_be_bytes(input.take(8)?.try_into().unwrap()) as usize,
            n => n as usize,
        };
        let mask = if masked { Some(input.take(4)?) } else { None };
        let mut payload = input.take(len)?;
        if let Some(mask) = mask {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
        }
        match opcode {
            0x1 | 0x2 => out.write_all(&encode_frame(opcode, &payload, None))?,
            0x8 => {
                out.write_all(&encode_frame(0x8, &payload, None))?;
                return Ok(());
            }
            0x9 => out.write_all(&encode_frame(0xA, &payload, None))?,
            _ => {}
        }
    }
}
