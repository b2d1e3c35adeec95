//! What `satellite check` reads from Apache's mod_status: every open
//! websocket (a notebook's kernel channels) holds one of Apache's worker
//! threads, so a busy site runs out of workers before anything else, and
//! new users then wait with no error anywhere. The machine-readable page
//! (`/server-status?auto`) says how many are busy and idle.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// The counts of one `?auto` page.
#[derive(Debug, PartialEq, Eq)]
pub struct Workers {
    pub busy: u64,
    pub idle: u64,
    /// Scoreboard slots no process has yet (`.`): room to grow.
    pub open_slots: u64,
}

impl Workers {
    /// Fewer than a tenth of the running workers idle, and no room left to
    /// start more: the next burst of sessions queues.
    pub fn short(&self) -> bool {
        let running = self.busy + self.idle;
        running > 0 && self.idle * 10 < running && self.open_slots * 10 < running
    }
}

/// Reads `BusyWorkers`, `IdleWorkers` and `Scoreboard` from an `?auto`
/// page; `None` when it is not one.
pub fn parse_auto(text: &str) -> Option<Workers> {
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    Some(Workers {
        busy: field("BusyWorkers")?.parse().ok()?,
        idle: field("IdleWorkers")?.parse().ok()?,
        open_slots: field("Scoreboard")
            .map(|board| board.bytes().filter(|b| *b == b'.').count() as u64)
            .unwrap_or(0),
    })
}

/// Fetches `http://host[:port]/path` (plain HTTP: mod_status is meant for
/// loopback) with a short timeout, and returns the body.
pub fn fetch(url: &str, timeout: Duration) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs (mod_status on loopback)"))?;
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    let with_port = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| format!("{authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority}: no address"))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{url}: {e}"))?;
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    // One write: `write!` on an unbuffered stream sends each piece as its own
    // segment, and a server that answers after its first read then closes
    // with request bytes unread, which resets the connection under our read.
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nUser-Agent: satellite-check\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("{url}: {e}"))?;
    let mut answer = Vec::new();
    stream
        .take(1 << 20)
        .read_to_end(&mut answer)
        .map_err(|e| format!("{url}: {e}"))?;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{url}: not an HTTP answer"))?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!("{url} answered {status}"));
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_auto_page_of_an_event_mpm() {
        let page = "ServerVersion: Apache/2.4.62\nBusyWorkers: 47\nIdleWorkers: 3\n\
                    Scoreboard: WWWWW_W_R___..\n";
        let workers = parse_auto(page).unwrap();
        assert_eq!(
            workers,
            Workers {
                busy: 47,
                idle: 3,
                open_slots: 2
            }
        );
        assert!(workers.short());
        let roomy =
            parse_auto("BusyWorkers: 47\nIdleWorkers: 3\nScoreboard: ..........\n").unwrap();
        assert!(!roomy.short());
        assert!(parse_auto("<html>It works!</html>").is_none());
    }

    #[test]
    fn a_real_http_server_is_read_and_a_closed_port_is_an_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut chunk = [0u8; 512];
            while !request.ends_with(b"\r\n\r\n") {
                let read = conn.read(&mut chunk).unwrap();
                assert!(read > 0, "the request ended before its blank line");
                request.extend_from_slice(&chunk[..read]);
            }
            conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nBusyWorkers: 1\nIdleWorkers: 24\n")
                .unwrap();
        });
        let body = fetch(
            &format!("http://127.0.0.1:{port}/server-status?auto"),
            Duration::from_secs(5),
        )
        .unwrap();
        server.join().unwrap();
        assert_eq!(parse_auto(&body).unwrap().idle, 24);
        assert!(fetch(&format!("http://127.0.0.1:{port}/"), Duration::from_secs(1)).is_err());
    }
}
