//! `satellite-bench`: measures what the design choices are for and prints a
//! table. Build the programs first (they are spawned as Apache would):
//!
//! ```text
//! cargo build --release && cargo run --release -p satellite-bench
//! ```
//!
//! Rows: a request answered by a fresh CGI process against one answered by
//! `satellite serve` (latency, throughput, memory), and how long map
//! routing takes to publish a route as the table of live routes grows
//! (the time a redeem adds before it answers).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use satellite_core::publish::Publisher;
use satellite_core::{Config, Store};

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
    Store::open_or_create(&dir.path().join("var/state.sqlite"), Duration::from_secs(5))?;
    Ok(Site { dir, config })
}

struct Sample {
    latencies: Vec<Duration>,
    wall: Duration,
}

impl Sample {
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
    write!(
        stream,
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    if !answer.starts_with(b"HTTP/1.1 200") {
        bail!("{target}: {}", String::from_utf8_lossy(&answer));
    }
    Ok(())
}

fn native(port: u16, target: &str, host: &str, clients: usize) -> Result<Sample> {
    let per_client = REQUESTS / clients;
    let start = Instant::now();
    let latencies = std::thread::scope(|scope| -> Result<Vec<Duration>> {
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                scope.spawn(move || -> Result<Vec<Duration>> {
                    let mut out = Vec::with_capacity(per_client);
                    for _ in 0..per_client {
                        let t = Instant::now();
                        http_get(port, target, host)?;
                        out.push(t.elapsed());
                    }
                    Ok(out)
                })
            })
            .collect();
        let mut all = Vec::new();
        for worker in workers {
            all.extend(worker.join().expect("client thread")?);
        }
        Ok(all)
    })?;
    Ok(Sample {
        latencies,
        wall: start.elapsed(),
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

fn main() -> Result<()> {
    let programs = programs_dir()?;
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
        cgi(&programs, &site, "getlink", "", "manage.example.org")?,
    );
    row(
        "CGI tokenjobstate (the waiting page's poll)",
        cgi(&programs, &site, "tokenjobstate", &poll, "example.org")?,
    );
    row(
        "CGI index (waiting page)",
        cgi(&programs, &site, "index", "", &alias_host)?,
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

    println!(
        "\n{:<44} {:>9} {:>9}",
        "map routing: redeem + publish one more route", "p50 ms", "p95 ms"
    );
    for live in [10usize, 10_000, 100_000] {
        let site = new_site("routing = \"map\"")?;
        let config = Config::load_file(&site.config)?;
        let publisher = Publisher::new(&config);
        let mut store = Store::open(&config.dbfile, Duration::from_secs(5))?;
        let now = chrono::Utc::now();
        for i in 0..live {
            let alias = format!("route-{i}-x");
            store.insert_pending(&alias, now)?;
            let host = std::net::Ipv4Addr::new(10, 1, (i / 250 % 250) as u8, (i % 250 + 1) as u8);
            publisher.redeem(&mut store, &alias, host.into(), 50000, now)?;
        }
        let mut latencies = Vec::new();
        let start = Instant::now();
        for i in 0..50 {
            let alias = format!("extra-{i}-x");
            store.insert_pending(&alias, now)?;
            let t = Instant::now();
            publisher.redeem(&mut store, &alias, "10.2.0.1".parse()?, 50001, now)?;
            latencies.push(t.elapsed());
        }
        let mut sample = Sample {
            latencies,
            wall: start.elapsed(),
        };
        let (p50, p95) = (sample.percentile(0.5), sample.percentile(0.95));
        println!(
            "{:<44} {:>9} {:>9}",
            format!("with {live} live routes (in process)"),
            ms(p50),
            ms(p95)
        );
        drop(site.dir);
    }
    Ok(())
}
