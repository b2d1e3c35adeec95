//! The glue between the transports and the core: running one endpoint as a
//! CGI program, the cron program, and the admin command's subcommands. The
//! binaries in `src/bin/` are one line each.

pub mod admin;
pub mod apache_status;
pub mod check;
pub mod install;
pub mod jobstates;
pub use satellite_core::subprocess;

use std::io::{self, Write};
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::process::ExitCode;

use http::StatusCode;
use satellite_cgi::CgiError;
use satellite_core::endpoints::{bug_response, config_error_response, oops, Body};
use satellite_core::syslog::Syslog;
use satellite_core::{handle, ClientAddr, Config, Context, Endpoint};

/// Context for an error about one file that names the file once: the
/// configuration's and the store's errors name their path already, a bare
/// SQLite or I/O error does not.
pub trait AboutPath<T> {
    /// Adds `<what> <path>` unless the error's message names `path`.
    fn about_path(self, what: &str, path: &Path) -> anyhow::Result<T>;
}

impl<T, E> AboutPath<T> for Result<T, E>
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn about_path(self, what: &str, path: &Path) -> anyhow::Result<T> {
        self.map_err(|err| {
            let path = path.display().to_string();
            let names_path = err.to_string().contains(&path);
            let err = anyhow::Error::new(err);
            if names_path {
                err
            } else {
                err.context(format!("{what} {path}"))
            }
        })
    }
}

/// Answers the one request of this process for `endpoint`, as Apache's
/// mod_cgi expects: meta-variables in, a `Status:` header and body out, and
/// diagnostics on stderr (Apache's error log).
pub fn run_cgi(endpoint: Endpoint) -> ExitCode {
    let name = endpoint.name();
    // A panic would be a bug; it must still not leave Apache with a
    // half-written answer (and any open transaction rolls back on unwind).
    panic::set_hook(Box::new(move |info| {
        eprintln!("satellite {name}: bug: {info}")
    }));
    let answered = panic::catch_unwind(AssertUnwindSafe(|| answer(endpoint)))
        .unwrap_or_else(|_| Some(bug_response()));
    let Some(response) = answered else {
        return ExitCode::from(2);
    };
    match satellite_cgi::write_response(io::stdout().lock(), &response) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let _ = writeln!(io::stderr(), "satellite {name}: writing the answer: {err}");
            ExitCode::FAILURE
        }
    }
}

fn answer(endpoint: Endpoint) -> Option<http::Response<Body>> {
    let name = endpoint.name();
    if !satellite_cgi::started_by_web_server() {
        eprintln!(
            "{name}: this is a CGI program: install it as {name}.cgi and let the web server run it \
             (GATEWAY_INTERFACE is not set)"
        );
        return None;
    }
    let config = match Config::load() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("satellite {name}: {err}");
            return Some(config_error_response());
        }
    };
    let cgi = satellite_cgi::read_request(
        std::env::vars_os(),
        io::stdin().lock(),
        config.max_body_bytes,
    );
    let cgi = match cgi {
        Ok(cgi) => cgi,
        Err(err) => {
            eprintln!("satellite {name}: {err}");
            return Some(refusal(&config, &err));
        }
    };
    let mut request = cgi.request;
    if let Some(addr) = cgi.remote_addr {
        request.extensions_mut().insert(ClientAddr(addr));
    }
    let syslog = Syslog::new(&config.syslog_socket, "satellite").quiet_when_missing();
    let mut ctx = Context::new(config, syslog);
    Some(handle(&mut ctx, endpoint, &request))
}

/// The answer to a request the CGI environment could not describe.
fn refusal(config: &Config, err: &CgiError) -> http::Response<Body> {
    let (status, message) = match err {
        CgiError::BodyTooLarge { limit } => (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Request body too large (at most {limit} bytes)"),
        ),
        CgiError::UriTooLong => (StatusCode::URI_TOO_LONG, "Request URI too long".to_owned()),
        _ => (StatusCode::BAD_REQUEST, "Malformed request".to_owned()),
    };
    oops(config, status, &message)
}

const CRON_USAGE: &str = "usage: cron [--watch] [--verbose]";

/// What `cron --help` prints: the program is a plain argument loop (it runs
/// every minute, so it stays small), and this text is its clap-less help.
pub const CRON_HELP: &str = "\
Expire tokens and publish routes (in vhost routing: test and reload Apache)

usage: cron [--watch] [--verbose]

Options:
  --watch        Stay running; publish within about a second of any change
  -v, --verbose  Print what changed (always printed under --watch)
  -h, --help     Print this help
  -V, --version  Print the version

The configuration is $SATELLITE_CONFIG, else ../etc/satellite.toml beside
this program. Exit status: 0 when the run worked or another run holds the
lock, 1 when it failed, 2 for a bad argument.
";

/// The `cron` program: `cron [--watch] [--verbose]`. Exit status 0 when
/// the run worked or another run holds the lock, 1 when it failed.
pub fn run_cron(args: Vec<std::ffi::OsString>) -> ExitCode {
    let (mut watch, mut verbose) = (false, false);
    for arg in &args {
        match arg.to_str() {
            Some("--watch") => watch = true,
            Some("--verbose" | "-v") => verbose = true,
            Some("--help" | "-h") => {
                // A closed pipe is no reason to fail `cron --help | head`.
                let _ = io::stdout().lock().write_all(CRON_HELP.as_bytes());
                return ExitCode::SUCCESS;
            }
            Some("--version" | "-V") => {
                let _ = writeln!(io::stdout().lock(), "cron {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            _ => {
                eprintln!("{CRON_USAGE}\nTry 'cron --help' for more information.");
                return ExitCode::from(2);
            }
        }
    }
    let config = match Config::load() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("satellite cron: {err}");
            return ExitCode::FAILURE;
        }
    };
    cron_main(&config, watch, verbose)
}

/// Runs cron once or for ever (`--watch`). Failures go to stderr always;
/// what changed only with `verbose` (a crontab mails any output, every
/// minute) or under `--watch` (the service's journal).
pub fn cron_main(config: &Config, watch: bool, verbose: bool) -> ExitCode {
    satellite_core::logid::use_key(&config.logkey);
    let print = |report: anyhow::Result<satellite_cron::Report>| match report {
        Ok(report) => {
            if verbose || watch {
                // Not println!: a closed stdout must not panic the watcher.
                let mut out = io::stdout().lock();
                for line in report.lines() {
                    let _ = writeln!(out, "satellite cron: {line}");
                }
            }
            true
        }
        Err(err) => {
            // Not eprintln!: a closed stderr must not panic the watcher.
            let _ = writeln!(io::stderr().lock(), "satellite cron: {err:#}");
            false
        }
    };
    if watch {
        let metrics = satellite_core::metrics::CronMetrics::default();
        let result = satellite_cron::watch(config, |report| {
            match &report {
                Ok(report) if !report.skipped => {
                    if report.tunnels_cut.is_empty() && report.cut_failures.is_empty() {
                        metrics.publication.observe(report.took);
                    }
                    metrics.expired.add(report.expired as u64);
                    metrics.tunnels_cut.add(report.sockets_cut as u64);
                    metrics.cut_failures.add(report.cut_failures.len() as u64);
                }
                Ok(_) => {}
                Err(_) => metrics.failures.inc(),
            }
            print(report);
            if let Some(dir) = &config.metrics_textfile_dir {
                let mut text = String::new();
                metrics.render(&mut text);
                let written =
                    satellite_core::metrics::write_textfile(dir, "satellite-cron.prom", &text);
                if let Err(err) = written {
                    eprintln!("satellite cron: metrics: {err}");
                }
            }
        });
        if let Err(err) = result {
            eprintln!("satellite cron --watch: {err:#}");
        }
        return ExitCode::FAILURE;
    }
    if print(satellite_cron::run_once(config, chrono::Utc::now())) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Writes `text` to standard output for a long-running loop: a closed
/// stdout (the journal restarted, a pipe whose reader went) must not end
/// the loop, so errors are dropped, never a panic as `print!` would.
pub fn say(text: &str) {
    let mut out = io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// [`say`] for standard error.
pub fn complain(text: &str) {
    let _ = writeln!(io::stderr().lock(), "{text}");
}
