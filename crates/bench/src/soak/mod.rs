//! `satellite-bench soak` (issue 18): mixed load through a private Apache
//! with the shipped `httpd-conf/`, `satellite serve` behind it (or the
//! endpoints as CGI programs, `--cgi`) and `cron --watch`, both restarted
//! when they die as systemd restarts them, on SQLite or PostgreSQL
//! (`--store`). Every answer is checked (status and body); every 10 s it
//! samples memory, open files and threads of serve, the watcher and
//! Apache, the database and WAL sizes, and the latency per kind of
//! request; with `--faults` it kills and locks things under load and
//! checks each fault's outcome. It ends with a table and a verdict, and
//! exits non-zero when the verdict is a failure.
//!
//! The verdict's last line is `soak verdict: pass|fail; key=value; ...`
//! (answers, wrong, lost, faults, fd growth): the suite's `tests/soak.rs`
//! runs this binary and reads it.

mod faults;
mod load;
mod sample;
mod site;
mod supervise;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use satellite_demo::backend::Backend;

use faults::{Fault, Outcome, Targets};
use load::{Load, Tally};
use sample::Sample;
use site::{SoakSite, StoreKind};
use supervise::Supervised;

const BACKEND_IPS: [&str; 4] = ["127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6"];
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Open files of serve or the watcher may vary by this much over a run
/// (a connection opened, a log rotated) without counting as growth.
const FD_SLACK: i64 = 8;
/// Where serve's and the watcher's stderr go, in the site's directory.
const SERVE_LOG: &str = "serve.stderr";
const WATCHER_LOG: &str = "watcher.stderr";

pub struct Options {
    pub seconds: u64,
    pub cgi: bool,
    pub faults: bool,
    pub websockets: usize,
    pub report: Option<PathBuf>,
    pub store: StoreKind,
    pub verbose: bool,
}

pub const USAGE: &str =
    "usage: satellite-bench soak [--seconds N (3600)] [--store sqlite|postgres] \
[--cgi] [--faults] [--websockets N (200)] [--report FILE] [--verbose]";

impl Options {
    pub fn parse(args: impl Iterator<Item = String>) -> Result<Options> {
        let mut options = Options {
            seconds: 3600,
            cgi: false,
            faults: false,
            websockets: 200,
            report: None,
            store: StoreKind::Sqlite,
            verbose: false,
        };
        let mut args = args;
        while let Some(arg) = args.next() {
            let mut value =
                |name: &str| args.next().with_context(|| format!("{name} needs a value"));
            match arg.as_str() {
                "--seconds" => {
                    options.seconds = value("--seconds")?.parse().context("--seconds")?
                }
                "--websockets" => {
                    options.websockets = value("--websockets")?.parse().context("--websockets")?;
                }
                "--report" => options.report = Some(value("--report")?.into()),
                "--store" => options.store = StoreKind::parse(&value("--store")?)?,
                "--cgi" => options.cgi = true,
                "--faults" => options.faults = true,
                "--verbose" => options.verbose = true,
                "--help" | "-h" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?}\n{USAGE}"),
            }
        }
        if options.seconds == 0 {
            bail!("--seconds must be at least 1");
        }
        Ok(options)
    }
}

/// The load generator holds hundreds of connections: its own limit, not
/// the service's, must not be what fails.
fn raise_open_files_limit() -> Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard.min(65_536), hard)?;
    Ok(())
}

/// A program of this build with the site's config; its stderr is added
/// to `stderr_log` (what it said goes with the wrong answers), its stdout
/// discarded.
fn program(programs: &Path, name: &str, config: &Path, stderr_log: &Path) -> Command {
    let mut cmd = Command::new(programs.join(name));
    cmd.env("SATELLITE_CONFIG", config).stdout(Stdio::null());
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(stderr_log)
    {
        Ok(file) => cmd.stderr(file),
        Err(_) => cmd.stderr(Stdio::null()),
    };
    cmd
}

/// Long-lived sessions, whose routes carry the proxied load and the
/// websockets (one per backend and a few more), and tokens that stay
/// pending for the waiting page's polls.
#[allow(clippy::type_complexity)]
fn sessions(
    site: &SoakSite,
    backends: &[Backend],
    tally: &Tally,
) -> Result<(Vec<(String, usize)>, Vec<String>)> {
    // Apache answers before its first database connection is made: the
    // first token may take a few tries.
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = site.getlink() {
        if Instant::now() > deadline {
            return Err(e.context("the service never answered getlink"));
        }
        thread::sleep(Duration::from_millis(200));
    }
    let mut long_lived = Vec::new();
    for i in 0..8 {
        let alias = site.getlink()?;
        let backend = &backends[i % backends.len()];
        site.redeem(&alias, &backend.ip(), backend.port())?;
        tally.remember(&alias, "proxied");
        long_lived.push((alias, i % backends.len()));
    }
    let mut pending = Vec::new();
    for _ in 0..4 {
        let alias = site.getlink()?;
        tally.remember(&alias, "pending");
        pending.push(alias);
    }
    Ok((long_lived, pending))
}

/// Runs the soak; true when the verdict is a pass.
pub fn run(programs: &Path, options: &Options) -> Result<bool> {
    raise_open_files_limit()?;
    let serving = !options.cgi;
    eprintln!(
        "soak: {} s on {}, {}, {} websockets, faults {}",
        options.seconds,
        options.store.label(),
        if serving { "serve" } else { "CGI only" },
        options.websockets,
        if options.faults { "on" } else { "off" }
    );
    let site = Arc::new(SoakSite::start(programs, options.store, serving)?);
    let config = site.config_file();
    let serve = serving.then(|| {
        let (programs, config, socket) = (programs.to_owned(), config.clone(), site.serve_socket());
        let log = site.log_file(SERVE_LOG);
        Supervised::start(move || {
            let mut cmd = program(&programs, "satellite", &config, &log);
            cmd.args(["serve", "--socket"]).arg(&socket);
            cmd
        })
    });
    let watcher = {
        let (programs, config) = (programs.to_owned(), config.clone());
        let log = site.log_file(WATCHER_LOG);
        Supervised::start(move || {
            let mut cmd = program(&programs, "cron", &config, &log);
            cmd.arg("--watch");
            cmd
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while serving && !site.serve_socket().exists() {
        if Instant::now() > deadline {
            bail!("serve never listened on {}", site.serve_socket().display());
        }
        thread::sleep(Duration::from_millis(50));
    }
    let backends: Vec<Backend> = BACKEND_IPS
        .iter()
        .enumerate()
        .map(|(i, ip)| Backend::start(&format!("backend{i}"), ip))
        .collect();
    let tally = Arc::new(Tally::new());
    let (long_lived, pending) = sessions(&site, &backends, &tally)
        .with_context(|| format!("Apache's error log:\n{}", site.notable_errors(40)))?;
    let load = Arc::new(Load {
        site: site.clone(),
        backends,
        tally: tally.clone(),
        stop: Arc::new(AtomicBool::new(false)),
        long_lived,
        pending,
    });

    let started = Instant::now();
    let duration = Duration::from_secs(options.seconds);
    let end = started + duration;
    let mut workers = Vec::new();
    for w in 0..2 {
        let load = load.clone();
        workers.push(thread::spawn(move || load.cycles(w)));
    }
    for w in 0..2 {
        let load = load.clone();
        workers.push(thread::spawn(move || load.browsing(w)));
    }
    {
        let (load, count) = (load.clone(), options.websockets);
        workers.push(thread::spawn(move || load.websockets(count)));
    }
    let plan = if options.faults {
        Fault::plan(serving, options.store)
    } else {
        Vec::new()
    };
    let fault_thread = {
        let load = load.clone();
        let targets = Targets {
            serve: serve.as_ref().map(Supervised::pid_cell),
            watcher: watcher.pid_cell(),
        };
        let plan = plan.clone();
        thread::spawn(move || faults::run(&load, &targets, &plan, started, duration))
    };

    let mut samples: Vec<Sample> = Vec::new();
    while Instant::now() < end {
        thread::sleep(SAMPLE_EVERY.min(end.saturating_duration_since(Instant::now())));
        let (db_kb, wal_kb) = sample::database_sizes(&site);
        let mut s = Sample {
            at_secs: started.elapsed().as_secs(),
            serve: serve
                .as_ref()
                .and_then(|s| sample::usage(s.pid()))
                .unwrap_or_default(),
            serve_pid: serve.as_ref().map_or(0, Supervised::pid),
            watcher: sample::usage(watcher.pid()).unwrap_or_default(),
            watcher_pid: watcher.pid(),
            apache: sample::usage_of(&site.apache_pids()),
            db_kb,
            wal_kb,
            answers: tally.answers.load(Ordering::Relaxed),
            ..Sample::default()
        };
        s.set_latencies(tally.drain_latencies());
        if options.verbose {
            eprintln!(
                "t={} answers={} load fds={:?} serve={:?} watcher={:?} apache={:?}",
                s.at_secs,
                s.answers,
                sample::usage(std::process::id()).map(|u| u.fds),
                s.serve,
                s.watcher,
                s.apache
            );
        }
        samples.push(s);
    }
    load.stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))?;
    }
    let outcomes = fault_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the fault thread panicked"))?;
    let elapsed = started.elapsed();

    let restarts = (
        serve.as_ref().map_or(0, Supervised::restarts),
        watcher.restarts(),
    );
    let verdict = Verdict::reach(&site, &tally, &samples, &plan, &outcomes)?;
    let mut report = format!(
        "satellite-bench soak: {} s on {}, {}, {} websockets, faults {}\n\n",
        options.seconds,
        options.store.label(),
        if serving { "serve" } else { "CGI only" },
        options.websockets,
        if options.faults { "on" } else { "off" }
    );
    report.push_str(&sample::table(&samples));
    let answers = tally.answers.load(Ordering::Relaxed);
    let _ = writeln!(
        report,
        "\n{answers} answers in {:.0} s ({:.0}/s), {} wrong, {} refusals tolerated in fault windows; \
         serve restarted {} times, the watcher {} times",
        elapsed.as_secs_f64(),
        answers as f64 / elapsed.as_secs_f64(),
        verdict.wrong,
        tally.tolerated.load(Ordering::Relaxed),
        restarts.0,
        restarts.1,
    );
    report.push_str(&verdict.render(answers, &outcomes));
    print!("{report}");
    if !verdict.wrong_answers.is_empty() {
        eprintln!(
            "wrong answers:\n{}\nApache's error log:\n{}\nserve said (last lines):\n{}\n\
             the watcher said (last lines):\n{}\n{}",
            verdict.wrong_answers.join("\n"),
            site.notable_errors(40),
            site.last_lines(SERVE_LOG, 20),
            site.last_lines(WATCHER_LOG, 20),
            sample::apache_workers(&site.apache_pids()),
        );
    }
    if let Some(path) = &options.report {
        std::fs::write(path, &report)
            .with_context(|| format!("writing the report to {}", path.display()))?;
    }
    drop(watcher);
    drop(serve);
    Ok(verdict.passed())
}

/// What the run proves or not.
struct Verdict {
    wrong: u64,
    wrong_answers: Vec<String>,
    tokens_checked: usize,
    lost: Vec<String>,
    /// SQLite's `PRAGMA integrity_check`; PostgreSQL's own (none to run).
    integrity: String,
    /// (who, growth of its open files over its last run, if long enough)
    fd_growth: Vec<(&'static str, Option<i64>)>,
    faults_planned: usize,
    faults_passed: usize,
}

impl Verdict {
    fn reach(
        site: &SoakSite,
        tally: &Tally,
        samples: &[Sample],
        plan: &[Fault],
        outcomes: &[Outcome],
    ) -> Result<Verdict> {
        let (wrong_answers, wrong) = tally.wrong();
        // Nothing lost or half-written: every token is as its last
        // successful write left it (or one step further).
        let rows: std::collections::HashMap<String, String> = site
            .open_store()?
            .list_tokens()
            .context("reading every token after the run")?
            .into_iter()
            .map(|row| (row.alias, row.state))
            .collect();
        let tokens = tally.tokens();
        let mut lost = Vec::new();
        for (alias, expected) in &tokens {
            let found = rows.get(alias);
            if !found.is_some_and(|s| load::not_behind(s, expected)) {
                lost.push(format!("{alias}: expected {expected}, found {found:?}"));
            }
        }
        let integrity = match &site.database_url {
            Some(_) => "n/a (PostgreSQL)".to_owned(),
            None => {
                let conn = rusqlite::Connection::open(site.db_file())?;
                conn.busy_timeout(Duration::from_secs(30))?;
                conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?
            }
        };
        let mut fd_growth = vec![(
            "watcher",
            sample::fd_growth(samples, |s| (s.watcher_pid, s.watcher.fds)),
        )];
        if site.serving {
            fd_growth.insert(
                0,
                (
                    "serve",
                    sample::fd_growth(samples, |s| (s.serve_pid, s.serve.fds)),
                ),
            );
        }
        Ok(Verdict {
            wrong,
            wrong_answers,
            tokens_checked: tokens.len(),
            lost,
            integrity,
            fd_growth,
            faults_planned: plan.len(),
            faults_passed: outcomes.iter().filter(|o| o.passed()).count(),
        })
    }

    fn fds_flat(&self) -> bool {
        self.fd_growth
            .iter()
            .all(|(_, growth)| growth.is_none_or(|g| g <= FD_SLACK))
    }

    fn passed(&self) -> bool {
        self.wrong == 0
            && self.lost.is_empty()
            && (self.integrity == "ok" || self.integrity.starts_with("n/a"))
            && self.fds_flat()
            && self.faults_passed == self.faults_planned
    }

    fn render(&self, answers: u64, outcomes: &[Outcome]) -> String {
        let mut out = String::new();
        for o in outcomes {
            let _ = writeln!(
                out,
                "fault at {:>6.1} s: {:<28} back in {:>8}  {}  {}",
                o.at_secs,
                o.fault.label(),
                o.back_in
                    .map_or("never".to_owned(), |t| format!("{:.2} s", t.as_secs_f64())),
                if o.passed() { "ok  " } else { "FAIL" },
                o.detail
            );
        }
        let _ = writeln!(
            out,
            "integrity: {}; tokens checked: {}; rows lost or behind: {}",
            self.integrity,
            self.tokens_checked,
            self.lost.len()
        );
        for lost in self.lost.iter().take(20) {
            let _ = writeln!(out, "  lost: {lost}");
        }
        let growth: Vec<String> = self
            .fd_growth
            .iter()
            .map(|(who, g)| match g {
                Some(g) => format!("{who} {g:+}"),
                None => format!("{who} too short to tell"),
            })
            .collect();
        let _ = writeln!(
            out,
            "open files over each program's last run: {}",
            growth.join(", ")
        );
        let _ = writeln!(
            out,
            "soak verdict: {}; answers={answers}; wrong={}; lost={}; integrity={}; faults={}/{}; fd_growth={}",
            if self.passed() { "pass" } else { "fail" },
            self.wrong,
            self.lost.len(),
            if self.integrity == "ok" || self.integrity.starts_with("n/a") { "ok" } else { "bad" },
            self.faults_passed,
            self.faults_planned,
            if self.fds_flat() { "none" } else { "grew" },
        );
        out
    }
}
