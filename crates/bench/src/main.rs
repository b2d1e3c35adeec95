//! `satellite-bench`: measures what the design choices are for and prints
//! one table beside the goals of issue 8 and the figures before the
//! redesign. Build the programs first (they are spawned as Apache would):
//!
//! ```text
//! cargo build --release && cargo run --release -p satellite-bench
//! cargo run --release -p satellite-bench -- --only redeem,burst
//! ```
//!
//! Parts (`--only`, comma-separated; all by default):
//! - `redeem`: a real `redeemtoken` CGI process per request against a
//!   database holding 10 / 10k / 100k live routes, and through Apache;
//! - `burst`: 200 redeem processes started within 1 s at 10k routes;
//! - `getlink`: getlink's wall time against its processes' CPU, alone and
//!   4 at a time;
//! - `proxy`: proxied req/s through the private Apache for one host and for
//!   random live hosts among `--routes` (100k) against a static ProxyPass
//!   to the same backend;
//! - `flood`: unknown, pending and non-token hosts (static pages);
//! - `reuse`: the proxy rows again under worker definitions that might let
//!   `[P]` rewrites reuse backend connections;
//! - `serve`: a CGI process against `satellite serve` (latency, memory).
//!
//! `--store sqlite|postgres|both` (both by default): the redeem, burst,
//! getlink, proxy, flood rows on SQLite files and/or on a private
//! PostgreSQL cluster (issue 16), plus, on PostgreSQL, a second frontend on
//! the same database (see `frontends.rs`) and the lookups compared.
//! `satellite-bench soak` is the reliability run of issue 18 instead (mixed
//! load with checked answers and faults, on SQLite or PostgreSQL):
//! `satellite-bench soak --help`, and `soak/mod.rs`.
//!
//! Load comes from threads of our own (`--threads`, 8), each with one
//! kept-alive rustls connection, for `--seconds` (4) per row; loopback only.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use satellite_core::SqliteStore;

mod backend;
mod frontends;
mod load;
mod proxy;
mod soak;
mod stores;
mod web;
mod write_path;

const REQUESTS: usize = 300;

fn programs_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("locating the programs")?.to_owned();
    if !dir.join("getlink").exists() {
        bail!(
            "{} has no getlink: run `cargo build --release` first",
            dir.display()
        );
    }
    Ok(dir)
}

struct Site {
    dir: tempfile::TempDir,
    config: PathBuf,
}

fn new_site(extra: &str) -> Result<Site> {
    let dir = tempfile::tempdir()?;
    for sub in ["etc", "var", "dynconf", "html"] {
        std::fs::create_dir(dir.path().join(sub))?;
    }
    let words = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../wordlist/eff_large_wordlist.txt");
    std::fs::copy(words, dir.path().join("var/eff_large_wordlist.txt"))?;
    let config = dir.path().join("etc/satellite.toml");
    std::fs::write(
        &config,
        format!("extbasename = \"example.org\"\ntgtipmask = [\"10.0.0.0/8\", \"127.0.0.0/8\"]\nsyslog_socket = \"\"\n{extra}"),
    )?;
    SqliteStore::open_or_create(&dir.path().join("var/state.sqlite"), Duration::from_secs(5))?;
    Ok(Site { dir, config })
}

struct Sample {
    latencies: Vec<Duration>,
    wall: Duration,
}

impl Sample {
    /// `clients` threads each timing `per_client` calls of `request`; the
    /// first failure ends the run.
    fn from_clients(
        clients: usize,
        per_client: usize,
        request: impl Fn() -> Result<()> + Sync,
    ) -> Result<Sample> {
        let start = Instant::now();
        let request = &request;
        let latencies = std::thread::scope(|scope| -> Result<Vec<Duration>> {
            let workers: Vec<_> = (0..clients)
                .map(|_| {
                    scope.spawn(move || -> Result<Vec<Duration>> {
                        let mut out = Vec::with_capacity(per_client);
                        for _ in 0..per_client {
                            let t = Instant::now();
                            request()?;
                            out.push(t.elapsed());
                        }
                        Ok(out)
                    })
                })
                .collect();
            let mut all = Vec::new();
            for worker in workers {
                all.extend(
                    worker
                        .join()
                        .map_err(|_| anyhow::anyhow!("client thread panicked"))??,
                );
            }
            Ok(all)
        })?;
        Ok(Sample {
            latencies,
            wall: start.elapsed(),
        })
    }

    fn percentile(&mut self, p: f64) -> Duration {
        self.latencies.sort();
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i]
    }

    fn per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64()
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

fn cgi(programs: &Path, site: &Site, program: &str, query: &str, host: &str) -> Result<Sample> {
    let mut latencies = Vec::with_capacity(REQUESTS);
    let start = Instant::now();
    for _ in 0..REQUESTS {
        let t = Instant::now();
        let out = Command::new(programs.join(program))
            .env_clear()
            .env("SATELLITE_CONFIG", &site.config)
            .env("GATEWAY_INTERFACE", "CGI/1.1")
            .env("REQUEST_METHOD", "GET")
            .env("QUERY_STRING", query)
            .env("REMOTE_ADDR", "10.0.0.1")
            .env("HTTP_HOST", host)
            .stdin(Stdio::null())
            .output()?;
        latencies.push(t.elapsed());
        if !out.stdout.starts_with(b"Status: 200") {
            bail!("{program}: {}", String::from_utf8_lossy(&out.stdout));
        }
    }
    Ok(Sample {
        latencies,
        wall: start.elapsed(),
    })
}

fn http_get(port: u16, target: &str, host: &str) -> Result<()> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    let request = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    if !answer.starts_with(b"HTTP/1.1 200") {
        bail!("{target}: {}", String::from_utf8_lossy(&answer));
    }
    Ok(())
}

fn native(port: u16, target: &str, host: &str, clients: usize) -> Result<Sample> {
    Sample::from_clients(clients, REQUESTS / clients, || {
        http_get(port, target, host).map(drop)
    })
}

fn max_rss_children_kib() -> i64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .map(|u| u.max_rss())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> i64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        })
        .unwrap_or(0)
}

fn serve_rows(programs: &Path) -> Result<()> {
    let site = new_site("")?;
    let token = {
        let out = Command::new(programs.join("getlink"))
            .env_clear()
            .env("SATELLITE_CONFIG", &site.config)
            .env("GATEWAY_INTERFACE", "CGI/1.1")
            .env("REQUEST_METHOD", "GET")
            .env("REMOTE_ADDR", "10.0.0.1")
            .output()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .to_owned()
    };
    let alias_host = format!("{token}.example.org");
    let poll = format!("token={token}");

    println!("satellite-bench: {REQUESTS} requests per row, one machine, loopback\n");
    println!(
        "{:<44} {:>9} {:>9} {:>10}",
        "request", "p50 ms", "p95 ms", "req/s"
    );
    let row = |name: &str, mut s: Sample| {
        let (p50, p95) = (s.percentile(0.5), s.percentile(0.95));
        println!(
            "{name:<44} {:>9} {:>9} {:>10.0}",
            ms(p50),
            ms(p95),
            s.per_second()
        );
    };
    row(
        "CGI getlink (process + db open + insert)",
        cgi(programs, &site, "getlink", "", "manage.example.org")?,
    );
    row(
        "CGI tokenjobstate (the waiting page's poll)",
        cgi(programs, &site, "tokenjobstate", &poll, "example.org")?,
    );
    row(
        "CGI index (waiting page)",
        cgi(programs, &site, "index", "", &alias_host)?,
    );
    let cgi_rss = max_rss_children_kib();

    // Port 0: serve binds whatever port the system gives and says which,
    // so no port is chosen here and lost to another process before serve
    // binds it.
    let mut serve = Command::new(programs.join("satellite"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("SATELLITE_CONFIG", &site.config)
        .stderr(Stdio::piped())
        .spawn()?;
    let port = satellite_demo::serve_child::listening_addr(&mut serve)?.port();
    let target = format!("/tokenjobstate.cgi?{poll}");
    row(
        "serve tokenjobstate, 1 client",
        native(port, &target, "example.org", 1)?,
    );
    row(
        "serve tokenjobstate, 8 clients",
        native(port, &target, "example.org", 8)?,
    );
    row(
        "serve index (waiting page), 8 clients",
        native(port, "/", &alias_host, 8)?,
    );
    let serve_rss = rss_kib(serve.id());
    let _ = serve.kill();
    let _ = serve.wait();

    println!("\n{:<44} {:>10}", "memory", "peak RSS");
    println!(
        "{:<44} {:>7} KiB",
        "one CGI process (largest seen)", cgi_rss
    );
    println!(
        "{:<44} {:>7} KiB",
        "serve, 8 workers, after the runs above", serve_rss
    );

    Ok(())
}

/// The table: each figure beside its goal and the figure before the
/// redesign (issue 8).
#[derive(Default)]
pub struct Report {
    lines: Vec<[String; 4]>,
}

impl Report {
    fn line(&mut self, figure: &str, goal: &str, baseline: &str, measured: String) {
        eprintln!("  -> {figure}: {measured}");
        self.lines
            .push([figure.into(), goal.into(), baseline.into(), measured]);
    }

    fn print(&self) {
        let header = ["figure", "goal", "before (issue 8)", "measured"];
        println!("| {} |", header.join(" | "));
        println!("|---|---|---|---|");
        for line in &self.lines {
            println!("| {} |", line.join(" | "));
        }
    }
}

const PARTS: [&str; 7] = [
    "redeem", "burst", "getlink", "proxy", "flood", "reuse", "serve",
];

struct Args {
    only: Vec<String>,
    routes: usize,
    threads: usize,
    seconds: f64,
    stores: Vec<stores::StoreKind>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        only: PARTS.iter().map(|p| (*p).to_owned()).collect(),
        routes: 100_000,
        threads: 8,
        seconds: 4.0,
        stores: stores::StoreKind::parse_list("both")?,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--only" => {
                let list = value("--only")?;
                args.only = list.split(',').map(str::to_owned).collect();
                if let Some(bad) = args.only.iter().find(|p| !PARTS.contains(&p.as_str())) {
                    bail!("unknown part {bad:?}; parts: {}", PARTS.join(","));
                }
            }
            "--routes" => args.routes = value("--routes")?.parse().context("--routes")?,
            "--threads" => args.threads = value("--threads")?.parse().context("--threads")?,
            "--seconds" => args.seconds = value("--seconds")?.parse().context("--seconds")?,
            "--store" => args.stores = stores::StoreKind::parse_list(&value("--store")?)?,
            "--help" | "-h" => {
                println!(
                    "usage: satellite-bench [--only {}] [--routes N] [--threads N] [--seconds S] [--store sqlite|postgres|both]\n       satellite-bench soak --help",
                    PARTS.join(",")
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(args)
}

fn main() -> Result<()> {
    if std::env::args().nth(1).as_deref() == Some("soak") {
        let options = soak::Options::parse(std::env::args().skip(2))?;
        let passed = soak::run(&programs_dir()?, &options)?;
        std::process::exit(if passed { 0 } else { 1 });
    }
    let args = parse_args()?;
    let on = |part: &str| args.only.iter().any(|p| p == part);
    let programs = programs_dir()?;
    let started = Instant::now();
    let mut report = Report::default();
    if on("redeem") || on("burst") || on("getlink") {
        eprintln!("CGI write path");
        let parts = write_path::Parts {
            redeem: on("redeem"),
            burst: on("burst"),
            getlink: on("getlink"),
        };
        let mut sizes = vec![10, 10_000, args.routes];
        sizes.sort_unstable();
        sizes.dedup();
        for &store in &args.stores {
            write_path::run(&programs, &parts, &sizes, store, &mut report)?;
        }
    }
    if on("proxy") || on("flood") || on("reuse") || on("redeem") {
        eprintln!("private Apache");
        let options = proxy::Options {
            routes: args.routes,
            threads: args.threads,
            seconds: args.seconds,
            proxy: on("proxy"),
            flood: on("flood"),
            reuse: on("reuse"),
            redeem: on("redeem"),
        };
        let sites = args
            .stores
            .iter()
            .map(|&store| proxy::run(&programs, &options, store, &mut report))
            .collect::<Result<Vec<_>>>()?;
        if let ([sqlite, postgres], true) = (&sites[..], options.proxy || options.flood) {
            proxy::compare(sqlite, postgres, &options, &mut report);
        }
    }
    println!(
        "satellite-bench: {} cores, load average {}, {:.0} s\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        started.elapsed().as_secs_f64()
    );
    report.print();
    if on("serve") {
        println!();
        serve_rows(&programs)?;
    }
    Ok(())
}
