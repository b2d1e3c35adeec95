//! Audit lines to the local syslog socket (`/dev/log`), as the original
//! logged every issue, redeem, destroy and link. Tokens themselves are never
//! logged: they are bearer secrets; lines name them by a keyed HMAC (see `logid`).

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// facility `user` (1), severity `info` (6), as Sys::Syslog's defaults.
const PRIORITY_USER_INFO: u8 = 8 + 6;

#[derive(Clone, Debug)]
pub struct Syslog {
    socket: Option<PathBuf>,
    ident: String,
    quiet_when_missing: bool,
}

/// Set once this process has said on stderr that syslog failed: the note
/// lands in Apache's error log, once is enough.
static REPORTED: AtomicBool = AtomicBool::new(false);

impl Syslog {
    /// An empty socket path turns logging off.
    pub fn new(socket: &Path, ident: &str) -> Self {
        Syslog {
            socket: (!socket.as_os_str().is_empty()).then(|| socket.to_owned()),
            ident: ident.to_owned(),
            quiet_when_missing: false,
        }
    }

    /// For programs that live for one request (CGI): a missing syslog
    /// socket is not noted at all, or Apache's error log would get a line
    /// per request; `satellite check` reports it instead.
    pub fn quiet_when_missing(mut self) -> Self {
        self.quiet_when_missing = true;
        self
    }

    /// Sends one line. Logging must never fail a request, so a missing or
    /// full or stalled socket only costs the line (and, once per process, a
    /// note on stderr).
    pub fn info(&self, message: &str) {
        let Some(path) = &self.socket else { return };
        let line = format!(
            "<{PRIORITY_USER_INFO}>{}[{}]: {}",
            self.ident,
            std::process::id(),
            message.replace(['\n', '\r'], " ")
        );
        // Non-blocking: a stalled syslog daemon must not stall the request.
        let sent = UnixDatagram::unbound().and_then(|sock| {
            sock.set_nonblocking(true)?;
            sock.send_to(line.as_bytes(), path)
        });
        if let Err(err) = sent {
            let missing = matches!(
                err.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            );
            if missing && self.quiet_when_missing {
                return;
            }
            if !REPORTED.swap(true, Ordering::SeqCst) {
                eprintln!(
                    "satellite: syslog {}: {err}; audit lines are lost (noted once; see satellite check)",
                    path.display()
                );
            }
        }
    }
}
