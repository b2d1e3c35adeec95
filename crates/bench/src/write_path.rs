//! The CGI write path: redeem as Apache runs it (a fresh `redeemtoken`
//! process per request, a CGI environment, the real database holding that
//! many live routes), a burst of concurrent redeems, and getlink's wall
//! time against the CPU its processes used.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use satellite_core::publish::Publisher;
use satellite_core::{Config, SqliteStore, Store as _};

use crate::stores::{self, StoreKind};
use crate::{ms, new_site, Report, Sample};

/// Fills the store with `live` redeemed tokens `<prefix>-<i>-x`, the i-th
/// routed to `target(i)`, through the same calls redeem makes (see
/// [`stores::fill`]).
pub fn populate(
    config: &Config,
    live: usize,
    prefix: &str,
    target: &dyn Fn(usize) -> (IpAddr, u16),
) -> Result<Duration> {
    let started = Instant::now();
    let publisher = Publisher::new(config);
    stores::fill(config, |store| {
        let now = chrono::Utc::now();
        for i in 0..live {
            let alias = format!("{prefix}-{i}-x");
            store.insert_pending(&alias, now)?;
            let (host, port) = target(i);
            publisher.redeem(store, &alias, host, port, now)?;
        }
        Ok(())
    })?;
    Ok(started.elapsed())
}

/// Pending tokens `<prefix>-<i>-x` for the requests to redeem.
pub fn pending(config: &Config, count: usize, prefix: &str) -> Result<Vec<String>> {
    let mut store = stores::open(config)?;
    let now = chrono::Utc::now();
    (0..count)
        .map(|i| {
            let alias = format!("{prefix}-{i}-x");
            store.insert_pending(&alias, now)?;
            Ok(alias)
        })
        .collect()
}

/// One CGI request as Apache's mod_cgid makes it: the program's answer.
fn cgi(programs: &Path, config: &Path, program: &str, query: &str) -> Result<Vec<u8>> {
    let out = Command::new(programs.join(program))
        .env_clear()
        .env("SATELLITE_CONFIG", config)
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("REQUEST_METHOD", "GET")
        .env("QUERY_STRING", query)
        .env("REMOTE_ADDR", "10.0.0.1")
        .env("HTTP_HOST", "manage.example.org")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    Ok(out.stdout)
}

/// One redeem of `token` for port 50001, as its own CGI process.
fn redeem(programs: &Path, config: &Path, token: &str) -> Result<Vec<u8>> {
    cgi(
        programs,
        config,
        "redeemtoken",
        &format!("token={token}&port=50001"),
    )
}

fn succeeded(answer: &[u8]) -> bool {
    answer.starts_with(b"Status: 200") && answer.ends_with(b"Success!\n")
}

/// What the waited-for children used so far: CPU (user + system), and
/// how often they gave up the CPU to wait (voluntary: fsync, locks, sleeps)
/// or were preempted (involuntary: other work wanted the cores).
#[derive(Clone, Copy, Default)]
pub struct Usage {
    pub cpu: Duration,
    pub waits: i64,
    pub preempted: i64,
}

impl Usage {
    pub fn now() -> Usage {
        use nix::sys::resource::{getrusage, UsageWho};
        getrusage(UsageWho::RUSAGE_CHILDREN)
            .map(|u| {
                let t = |tv: nix::sys::time::TimeVal| {
                    Duration::new(tv.tv_sec() as u64, tv.tv_usec() as u32 * 1000)
                };
                Usage {
                    cpu: t(u.user_time()) + t(u.system_time()),
                    waits: u.voluntary_context_switches(),
                    preempted: u.involuntary_context_switches(),
                }
            })
            .unwrap_or_default()
    }

    /// Per request since `before`, for the report.
    fn per_request_since(&self, before: Usage, n: usize) -> String {
        let n = n.max(1);
        format!(
            "CPU {} ms, {:.1} waits + {:.1} preemptions",
            ms((self.cpu.saturating_sub(before.cpu)) / n as u32),
            (self.waits - before.waits) as f64 / n as f64,
            (self.preempted - before.preempted) as f64 / n as f64
        )
    }
}

/// Sequential redeems, one process each: (latencies, usage per redeem).
fn redeem_series(programs: &Path, config: &Path, tokens: &[String]) -> Result<(Sample, String)> {
    let before = Usage::now();
    let start = Instant::now();
    let mut latencies = Vec::with_capacity(tokens.len());
    for token in tokens {
        let t = Instant::now();
        let answer = redeem(programs, config, token)?;
        latencies.push(t.elapsed());
        if !succeeded(&answer) {
            bail!("redeem failed: {}", String::from_utf8_lossy(&answer));
        }
    }
    let cpu = Usage::now().per_request_since(before, tokens.len());
    Ok((
        Sample {
            latencies,
            wall: start.elapsed(),
        },
        cpu,
    ))
}

/// `tokens.len()` redeem processes started evenly within `window`, each
/// waited for on its own thread: (time from the first start to the last
/// answer, errors, per-request latencies).
fn burst(
    programs: &Path,
    config: &Path,
    tokens: &[String],
    window: Duration,
) -> (Duration, usize, Sample) {
    burst_of(tokens, window, |token| {
        redeem(programs, config, token).is_ok_and(|a| succeeded(&a))
    })
}

/// `tokens.len()` calls of `redeem` (true: `Success!`) started evenly
/// within `window`, each on its own thread: (time from the first start to
/// the last answer, errors, per-request latencies).
pub fn burst_of(
    tokens: &[String],
    window: Duration,
    redeem: impl Fn(&str) -> bool + Sync,
) -> (Duration, usize, Sample) {
    let redeem = &redeem;
    let start = Instant::now();
    let step = window / tokens.len() as u32;
    let results: Vec<Option<Duration>> = std::thread::scope(|scope| {
        let workers: Vec<_> = tokens
            .iter()
            .enumerate()
            .map(|(i, token)| {
                scope.spawn(move || {
                    let at = start + step * i as u32;
                    if let Some(wait) = at.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let t = Instant::now();
                    redeem(token).then(|| t.elapsed())
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().ok().flatten())
            .collect()
    });
    let finished = start.elapsed();
    let errors = results.iter().filter(|r| r.is_none()).count();
    let latencies: Vec<Duration> = results.into_iter().flatten().collect();
    (
        finished,
        errors,
        Sample {
            latencies,
            wall: finished,
        },
    )
}

/// getlink from `clients` concurrent loops: (latencies, usage per request).
fn getlink_load(
    programs: &Path,
    config: &Path,
    clients: usize,
    per_client: usize,
) -> Result<(Sample, String)> {
    let before = Usage::now();
    let sample = Sample::from_clients(clients, per_client, || {
        let answer = cgi(programs, config, "getlink", "")?;
        if !answer.starts_with(b"Status: 200") {
            bail!("getlink: {}", String::from_utf8_lossy(&answer));
        }
        Ok(())
    })?;
    let cpu = Usage::now().per_request_since(before, sample.latencies.len());
    Ok((sample, cpu))
}

pub struct Parts {
    pub redeem: bool,
    pub burst: bool,
    pub getlink: bool,
}

/// Redeem at 10 / 10k / 100k live routes, the burst and getlink at 10k,
/// on `store`.
pub fn run(
    programs: &Path,
    parts: &Parts,
    sizes: &[usize],
    store: StoreKind,
    report: &mut Report,
) -> Result<()> {
    let on = store.label();
    let sqlite = store == StoreKind::Sqlite;
    // The PostgreSQL server's CPU is not our children's: read apart.
    let server_cpu = || (!sqlite).then(stores::pg_server_cpu).flatten();
    let server_cpu_since = |before, n| {
        if sqlite {
            String::new()
        } else {
            stores::pg_server_cpu_since(before, n)
        }
    };
    let mut ten_route_p50 = None;
    for &live in sizes {
        let needs_site = parts.redeem || (live == 10_000 && (parts.burst || parts.getlink));
        if !needs_site {
            continue;
        }
        let url = store.new_database()?;
        let site = new_site(&format!(
            "routing = \"map\"\n{}",
            stores::config_lines(url.as_deref())
        ))?;
        let config = Config::load_file(&site.config)?;
        let filled = populate(&config, live, "route", &|i| {
            let host = Ipv4Addr::new(10, 1, (i / 250 % 250) as u8, (i % 250 + 1) as u8);
            (host.into(), 50000)
        })?;
        eprintln!(
            "  {live} live routes written in {:.1} s",
            filled.as_secs_f64()
        );
        // Two conditions: no other connection to the database (an idle
        // site: each CGI process is the last to close, so SQLite
        // checkpoints and deletes the WAL every time), and one reader held
        // open, as Apache's mod_dbd holds its connections (DBDKeep) on a
        // site in use.
        // PostgreSQL has no such difference: its server holds the data.
        let conditions: &[bool] = if sqlite { &[false, true] } else { &[false] };
        for &held in conditions {
            let reader = if held {
                Some(SqliteStore::open(&config.dbfile, Duration::from_secs(5))?)
            } else {
                None
            };
            let condition = if held { ", db held open" } else { "" };
            if parts.redeem {
                let tokens = pending(&config, 100, if held { "held" } else { "bench" })?;
                let server = server_cpu();
                let (mut sample, cpu) = redeem_series(programs, &site.config, &tokens)?;
                let server = server_cpu_since(server, tokens.len());
                let (p50, p95) = (sample.percentile(0.5), sample.percentile(0.95));
                if live == 10 && !held {
                    ten_route_p50 = Some(p50);
                }
                let baseline = match (live, held) {
                    (10, false) if sqlite => "19 ms",
                    (100_000, false) if sqlite => "395 ms (txt), 810 (dbm)",
                    _ => "-",
                };
                let goal = match (live, ten_route_p50) {
                    (10, _) if !held => "(reference)".to_owned(),
                    (_, Some(ten)) => {
                        format!("p50 <= 10 ms and <= {} ms (1.5x)", ms(ten.mul_f64(1.5)))
                    }
                    _ => "p50 <= 10 ms".to_owned(),
                };
                report.line(
                    &format!("redeem CGI p50/p95, {live} live routes, {on}{condition}"),
                    &goal,
                    baseline,
                    format!("{} / {} ms ({cpu}{server})", ms(p50), ms(p95)),
                );
            }
            if live == 10_000 && parts.burst {
                let tokens = pending(&config, 200, if held { "burstheld" } else { "burst" })?;
                let before = Usage::now();
                let server = server_cpu();
                let (finished, errors, mut sample) =
                    burst(programs, &site.config, &tokens, Duration::from_secs(1));
                let usage = Usage::now().per_request_since(before, tokens.len());
                let server = server_cpu_since(server, tokens.len());
                let p95 = if sample.latencies.is_empty() {
                    "-".to_owned()
                } else {
                    ms(sample.percentile(0.95))
                };
                report.line(
                    &format!("200 redeems started within 1 s, 10k routes (CGI), {on}{condition}"),
                    "<= 1.5 s, 0 errors",
                    if held || !sqlite { "-" } else { "6.6 s" },
                    format!(
                        "{:.2} s, {errors} errors (each: p95 {p95} ms; {usage}{server})",
                        finished.as_secs_f64()
                    ),
                );
            }
            drop(reader);
        }
        if live == 10_000 && parts.getlink {
            for clients in [1usize, 4] {
                let per_client = if clients == 1 { 100 } else { 200 / clients };
                let (mut sample, cpu) = getlink_load(programs, &site.config, clients, per_client)?;
                report.line(
                    &format!("getlink CGI wall p50 vs CPU, {clients} concurrent, {on}"),
                    "wall near CPU",
                    if clients == 1 || !sqlite {
                        "-"
                    } else {
                        "24 ms wall, 3.5 ms CPU"
                    },
                    format!(
                        "{} ms wall (p95 {}), {cpu}",
                        ms(sample.percentile(0.5)),
                        ms(sample.percentile(0.95)),
                    ),
                );
            }
        }
        drop(site.dir);
    }
    Ok(())
}
