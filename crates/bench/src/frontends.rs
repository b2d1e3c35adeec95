//! Redeem through Apache to the CGI program or to `satellite serve`, and
//! several frontends on one PostgreSQL database: the time from a redeem's
//! answer on frontend A to the first request proxied to the new route on
//! frontend B (another Apache on its own port, reading routes from the
//! same database through its own mod_dbd connections).

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::backend::Backend;
use crate::web::{WebSite, DOMAIN};
use crate::Sample;

/// How long B may show anything but the backend's answer after A's
/// `Success!` before the bench gives up on that route.
const PROPAGATION_LIMIT: Duration = Duration::from_secs(5);

/// One redeem of `token` for `port` through `site`'s Apache, on a fresh
/// connection as galyleo's curl makes it; the route's target is the
/// client's address (127.0.0.1) and `port`.
pub fn redeem_once(site: &WebSite, token: &str, port: u16) -> Result<()> {
    let manage = format!("manage.{DOMAIN}:{}", site.port);
    let answer = site.tls.get_once(
        &manage,
        &format!("/redeemtoken.cgi?token={token}&port={port}"),
    )?;
    if answer.status != 200 || answer.body != b"Success!\n" {
        bail!(
            "redeem through Apache: {} {}\n{}",
            answer.status,
            String::from_utf8_lossy(&answer.body),
            site.error_log()
        );
    }
    Ok(())
}

/// Sequential redeems through `site`, one fresh connection each.
pub fn redeem_series(site: &WebSite, tokens: &[String], port: u16) -> Result<Sample> {
    let start = Instant::now();
    let mut latencies = Vec::with_capacity(tokens.len());
    for token in tokens {
        let t = Instant::now();
        redeem_once(site, token, port)?;
        latencies.push(t.elapsed());
    }
    Ok(Sample {
        latencies,
        wall: start.elapsed(),
    })
}

/// For each token: redeem on `a` for `backend`, then ask `b` for the
/// token's host on one kept-alive connection, again and again, until the
/// backend's own answer comes back. The latency is from A's answer to
/// B's first proxied 200 (a waiting page is a 200 too: the body decides).
pub fn redeem_to_first_proxied(
    a: &WebSite,
    b: &WebSite,
    backend: &Backend,
    tokens: &[String],
) -> Result<Sample> {
    let expected = backend.body();
    let start = Instant::now();
    let mut latencies = Vec::with_capacity(tokens.len());
    for token in tokens {
        let host = format!("{token}.{DOMAIN}:{}", b.port);
        // Connected before the redeem: the handshake is not the
        // propagation being measured.
        let mut conn = b.tls.connect(&host)?;
        redeem_once(a, token, backend.addr.port())?;
        let answered = Instant::now();
        loop {
            let answer = match conn.get(&host, "/") {
                Ok(answer) => answer,
                Err(_) => {
                    conn = b.tls.connect(&host)?;
                    continue;
                }
            };
            if answer.status == 200 && answer.body == expected {
                latencies.push(answered.elapsed());
                break;
            }
            if answered.elapsed() > PROPAGATION_LIMIT {
                bail!(
                    "{token}: frontend B still answers {} {:?} {} s after A's Success!",
                    answer.status,
                    String::from_utf8_lossy(&answer.body),
                    PROPAGATION_LIMIT.as_secs()
                );
            }
            if answer.closes {
                conn = b.tls.connect(&host)?;
            }
        }
    }
    Ok(Sample {
        latencies,
        wall: start.elapsed(),
    })
}

/// `satellite serve` on a loopback port the system picks, with `site`'s
/// config: the child and the URL Apache sends the endpoints to.
/// It runs as Apache's workers do, as production runs it beside the CGI
/// programs: files it creates beside a SQLite database stay theirs.
pub fn start_serve(programs: &Path, site: &WebSite) -> Result<(ServeChild, String)> {
    let mut command = Command::new(programs.join("satellite"));
    if nix::unistd::Uid::effective().is_root() {
        let name = satellite_demo::private_apache::PrivateApache::worker_user();
        let user = nix::unistd::User::from_name(&name)?
            .with_context(|| format!("no user {name} to run serve as"))?;
        command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    let mut child = command
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("SATELLITE_CONFIG", site.config_file())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting satellite serve")?;
    let addr = satellite_demo::serve_child::listening_addr(&mut child)?;
    Ok((ServeChild(child), format!("http://{addr}")))
}

/// A `satellite serve` process, killed when dropped.
pub struct ServeChild(Child);

impl Drop for ServeChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
