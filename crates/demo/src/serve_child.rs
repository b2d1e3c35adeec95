//! Starting `satellite serve` as a child process on port 0: the child binds
//! whatever port the system gives and says which, so no port is chosen
//! first and lost to another process before the child binds it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::Child;

use anyhow::{bail, Context as _, Result};

/// Reads the stderr of `child` (spawned with `Stdio::piped()` stderr and
/// `--listen <ip>:0`) until it says where it listens, then drains the rest
/// in the background so the child never blocks on a full pipe.
///
/// # Errors
/// When the child exits (or closes stderr) first: the error holds what it
/// said.
pub fn listening_addr(child: &mut Child) -> Result<SocketAddr> {
    let mut stderr = BufReader::new(child.stderr.take().context("serve's stderr is not piped")?);
    let mut said = String::new();
    loop {
        let mut line = String::new();
        if stderr.read_line(&mut line)? == 0 {
            bail!("serve did not start: {said}");
        }
        let addr = line
            .strip_prefix(satellite_serve::LISTENING)
            .and_then(|rest| rest.strip_suffix("/\n"))
            .and_then(|addr| addr.parse().ok());
        if let Some(addr) = addr {
            std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
            return Ok(addr);
        }
        said.push_str(&line);
    }
}
