//! The `cron` program's front end: its arguments, its help, and what it
//! prints (runs that changed something, failures, the watcher's metrics for
//! node_exporter's textfile collector). `satellite cron` calls the same.

use std::io::{self, Write};
use std::process::ExitCode;

use satellite_core::Config;

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
    let print = |report: anyhow::Result<crate::Report>| match report {
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
        let result = crate::watch(config, |report| {
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
    if print(crate::run_once(config, chrono::Utc::now())) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
