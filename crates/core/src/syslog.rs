//! Audit lines to the local syslog socket (`/dev/log`), as the original
//! logged every issue, redeem, destroy and link. Tokens themselves are never
//! logged: they are bearer secrets; lines name them by a hash prefix.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

/// facility `user` (1), severity `info` (6), as Sys::Syslog's defaults.
const PRIORITY_USER_INFO: u8 = 8 + 6;

#[derive(Clone, Debug)]
pub struct Syslog {
    socket: Option<PathBuf>,
    ident: String,
}

impl Syslog {
    /// An empty socket path turns logging off.
    pub fn new(socket: &Path, ident: &str) -> Self {
        Syslog {
            socket: (!socket.as_os_str().is_empty()).then(|| socket.to_owned()),
            ident: ident.to_owned(),
        }
    }

    /// Sends one line. Logging must never fail a request, so a missing or
    /// full or stalled socket only costs the line (and a note on stderr).
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
            eprintln!("satellite: syslog {}: {err}: {message}", path.display());
        }
    }
}
