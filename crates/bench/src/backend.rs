//! The stand-in for a notebook: a small HTTP/1.1 server of ours on a
//! loopback address that answers every request at once with a short body
//! and keeps connections open. It counts connections and requests, which
//! tells whether Apache reused its connections to the backend.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

pub struct Backend {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicU64>,
    pub requests: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Backend {
    pub fn start(ip: &str) -> anyhow::Result<Backend> {
        let listener = TcpListener::bind((ip, 0))?;
        let addr = listener.local_addr()?;
        let connections = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, r, s) = (connections.clone(), requests.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                c.fetch_add(1, Ordering::Relaxed);
                let r = r.clone();
                let body = body_of(addr);
                std::thread::spawn(move || serve(stream, &r, &body));
            }
        });
        Ok(Backend {
            addr,
            connections,
            requests,
            stop,
        })
    }

    /// What this backend answers: its own address, so that a request
    /// proxied to the wrong backend is seen.
    pub fn body(&self) -> Vec<u8> {
        body_of(self.addr)
    }

    /// (connections, requests) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.connections.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn body_of(addr: SocketAddr) -> Vec<u8> {
    format!("backend {addr}\n").into_bytes()
}

fn serve(stream: TcpStream, requests: &AtomicU64, body: &[u8]) {
    let _ = stream.set_nodelay(true);
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        // A request head: lines up to an empty one. Apache sends GETs
        // without a body here.
        let mut saw_any = false;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
            saw_any = true;
        }
        if !saw_any {
            continue;
        }
        requests.fetch_add(1, Ordering::Relaxed);
        let mut answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        answer.extend_from_slice(body);
        if writer.write_all(&answer).is_err() {
            return;
        }
    }
}
