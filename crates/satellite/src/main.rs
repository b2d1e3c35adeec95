//! `satellite`: the admin command (and the native server, and the demo).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{CommandFactory, Parser, Subcommand};
use satellite::{admin, install};
use satellite_core::Config;

#[derive(Parser)]
#[command(
    name = "satellite",
    version,
    about = "The satellite reverse-proxy broker: serve, maintain and inspect it"
)]
struct Cli {
    /// The configuration file [default: $SATELLITE_CONFIG, else ../etc/satellite.toml beside this program]
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the endpoints natively over HTTP behind Apache (a Unix socket by default)
    Serve {
        /// TCP address to listen on instead of the Unix socket [default: serve_listen]
        #[arg(long, value_name = "ADDR", conflicts_with = "socket")]
        listen: Option<String>,
        /// Unix socket to listen on [default: serve_socket]
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    /// Expire tokens and publish routes once, or keep doing it (--watch)
    Cron {
        /// Stay running; publish within about a second of any change
        #[arg(long)]
        watch: bool,
        /// Print what changed (always printed under --watch)
        #[arg(long, short)]
        verbose: bool,
    },
    /// Create an install tree (cgi/, bin/, etc/, var/, dynconf/, html/)
    Init {
        #[arg(long, value_name = "DIR")]
        prefix: PathBuf,
        /// The web server's user [default: www-data or apache]
        #[arg(long, value_name = "USER")]
        apache_user: Option<String>,
        /// The user cron runs as (owner of var/ and dynconf/) [default: root]
        #[arg(long, value_name = "USER")]
        cron_user: Option<String>,
        /// The domain for a new configuration
        #[arg(long, default_value = "localhost")]
        extbasename: String,
    },
    /// List tokens: state, age, target, job
    List {
        /// An array of objects: alias, state, dsthost, dstport, jobid, modified
        #[arg(long)]
        json: bool,
    },
    /// Show one token
    Show {
        token: String,
        /// An object: alias, url, state, dsthost, dstport, jobid, modified, age_seconds
        #[arg(long)]
        json: bool,
    },
    /// Delete a token now, whatever its state, and drop its route
    Revoke { token: String },
    /// Expire tokens past their TTL now
    Gc,
    /// Print what cron would write (the route map or the vhosts)
    Render,
    /// Counts by state, the oldest token, sessions per compute node
    Stats {
        /// An object: tokens_by_state, oldest_modified, jobstates, sessions_per_host
        #[arg(long)]
        json: bool,
    },
    /// Print the store's gauges in Prometheus text format
    ///
    /// For node_exporter's textfile collector, e.g. every minute from cron:
    /// `satellite metrics > DIR/satellite.prom.$$ && mv DIR/satellite.prom.$$ DIR/satellite.prom`.
    /// CGI programs run one process per request and keep no counters, so
    /// only the gauges exist here; `satellite serve` adds request counts and
    /// redeem latency at GET /metrics (for addresses in metrics_allow).
    Metrics,
    /// Create the database, or take a Perl SRPS database in place (backup first)
    Migrate {
        /// The database [default: dbfile from the config]
        #[arg(long, value_name = "FILE")]
        db: Option<PathBuf>,
        /// Report what the database holds and what would change; change nothing
        #[arg(long)]
        dry_run: bool,
        /// Copy the SQLite database (--db, or dbfile) into this empty PostgreSQL database (a postgres:// URL or libpq key=value parameters), in one transaction, and verify the counts; the SQLite file is left as it was
        #[arg(long, value_name = "URL", conflicts_with = "dry_run")]
        to: Option<String>,
    },
    /// Check a deployment: config, files and modes, database, Apache, reload, certificate
    Check {
        /// The certificate Apache serves (SSLCertificateFile)
        #[arg(long, value_name = "FILE")]
        cert: Option<PathBuf>,
        /// An object: ok (false if anything failed) and findings [{level, what, fix}]
        #[arg(long)]
        json: bool,
        /// Also prove the site end to end through Apache: getlink, the waiting page, a redeem to a temporary backend, the proxied URL, destroy (needs curl)
        #[arg(long)]
        live: bool,
        /// With --live: Apache's TLS listener [default: 127.0.0.1 and SATELLITE_PORT]
        #[arg(long, value_name = "ADDRESS:PORT", requires = "live")]
        connect: Option<std::net::SocketAddr>,
        /// With --live: the node address to redeem from and run the temporary backend on; an address of this host in tgtipmask [default: the one that reaches --connect]
        #[arg(long, value_name = "ADDRESS", requires = "live")]
        from: Option<std::net::IpAddr>,
        /// With --live: the CA certificate to trust [default: the system's]
        #[arg(long, value_name = "FILE", requires = "live")]
        cacert: Option<PathBuf>,
    },
    /// Bring the whole stack up on loopback: Apache, serve, cron --watch, a sample notebook
    Demo {
        /// Walk through getlink, the waiting page, redeem and the proxied URL, then exit
        #[arg(long)]
        walkthrough: bool,
        /// Apache's TLS port on 127.0.0.1
        #[arg(long, default_value_t = 8443)]
        port: u16,
    },
    /// Job states from the scheduler
    Jobstates {
        #[command(subcommand)]
        command: JobstatesCommand,
    },
    /// Write man pages (man/) and shell completions (completions/) into a directory; packaging runs this
    #[command(hide = true)]
    Generate {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum JobstatesCommand {
    /// Query Slurm once (squeue, every job in every state) and push the
    /// complete snapshot to update-jobs; or push a `<jobid> <state>` table
    Push {
        /// Read `<jobid> <state>` lines from this file (- for stdin) instead of
        /// querying Slurm; sent as an old-style, incomplete table
        #[arg(long, visible_alias = "file", value_name = "FILE")]
        from: Option<PathBuf>,
        /// Write into this database directly instead of POSTing
        #[arg(long, value_name = "FILE")]
        db: Option<PathBuf>,
        /// The update-jobs URL [default: https://<extbasename>/update-jobs.cgi]
        #[arg(long)]
        url: Option<String>,
        /// Seconds allowed for the squeue query, and for the POST
        #[arg(long, value_name = "SECS", default_value_t = 30.0)]
        timeout: f64,
        /// Push every SECS seconds (±10 % jitter) until stopped; a failed
        /// cycle is logged and sends nothing
        #[arg(long, value_name = "SECS", conflicts_with = "from")]
        every: Option<f64>,
        /// The squeue program (not looked up in PATH)
        #[arg(long, value_name = "PATH", default_value = satellite_sched::slurm::DEFAULT_SQUEUE)]
        squeue: PathBuf,
    },
    /// On the broker host: query Slurm itself and end the sessions of jobs that are over
    Poll {
        /// One query, then exit (non-zero if the query failed)
        #[arg(long)]
        once: bool,
        /// Seconds between queries (each with ±10% jitter)
        #[arg(long, value_name = "SECS", default_value_t = 30)]
        every: u64,
        /// Seconds a query may take before it is abandoned (and counts as no news)
        #[arg(long, value_name = "SECS", default_value_t = 20)]
        timeout: u64,
        /// The squeue program [default: /usr/bin/squeue]
        #[arg(long, value_name = "PATH")]
        squeue: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        // `satellite list | head`: the reader has all it wanted, which is
        // success for a pipeline, not an error to report.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("satellite: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn load_config(path: Option<&PathBuf>) -> Result<Config> {
    let path = match path {
        Some(path) => path.clone(),
        None => Config::locate()?,
    };
    // The configuration's errors name the file already.
    Ok(Config::load_file(&path)?)
}

/// Writes a command's output. Never `print!`: it panics when the reader has
/// gone away (Rust ignores SIGPIPE, so the write fails with EPIPE instead).
fn print(text: String) -> Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("writing to standard output")?;
    Ok(ExitCode::SUCCESS)
}

fn run(cli: Cli) -> Result<ExitCode> {
    let config = || load_config(cli.config.as_ref());
    match &cli.command {
        Command::Serve { listen, socket } => {
            let config = config()?;
            let bind = match (listen, socket) {
                (Some(addr), _) => satellite_serve::Bind::Tcp(addr.clone()),
                (None, Some(path)) => satellite_serve::Bind::Unix(path.clone()),
                (None, None) => satellite_serve::Server::default_bind(&config),
            };
            let server = satellite_serve::Server::bind(config, &bind)?;
            server.stop_on_signals()?;
            eprintln!("satellite serve: listening on {}", server.describe());
            server.run()?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cron { watch, verbose } => Ok(satellite::cron_main(&config()?, *watch, *verbose)),
        Command::Init {
            prefix,
            apache_user,
            cron_user,
            extbasename,
        } => print(install::init(&install::InitOptions {
            prefix: prefix.clone(),
            apache_user: apache_user.clone(),
            cron_user: cron_user.clone(),
            extbasename: extbasename.clone(),
            programs_dir: None,
        })?),
        Command::List { json } => print(admin::list(&config()?, *json)?),
        Command::Show { token, json } => print(admin::show(&config()?, token, *json)?),
        Command::Revoke { token } => print(admin::revoke(&config()?, token)?),
        Command::Gc => print(admin::gc(&config()?)?),
        Command::Render => print(admin::render(&config()?)?),
        Command::Stats { json } => print(admin::stats(&config()?, *json)?),
        Command::Metrics => print(admin::metrics(&config()?)?),
        Command::Migrate { db, dry_run, to } => {
            if let Some(url) = to {
                let db = match db {
                    Some(db) => db.clone(),
                    None => config()?.dbfile,
                };
                return print(admin::migrate_to_postgres(&db, url)?);
            }
            let db = match db {
                Some(db) => db.clone(),
                None => {
                    let config = config()?;
                    if config.database_url.is_some() {
                        return print(admin::migrate_postgres(&config, *dry_run)?);
                    }
                    config.dbfile
                }
            };
            print(admin::migrate(&db, *dry_run)?)
        }
        Command::Check {
            cert,
            json,
            live,
            connect,
            from,
            cacert,
        } => {
            let live = live.then(|| satellite::live::LiveOptions {
                connect: *connect,
                from: *from,
                cacert: cacert.clone(),
            });
            let findings = satellite::check::check(
                config().map_err(|e| format!("{e:#}")),
                cert.as_deref(),
                live.as_ref(),
            );
            let report: String = if *json {
                satellite::check::to_json(&findings)
            } else {
                findings.iter().map(|f| format!("{f}\n")).collect()
            };
            print(report)?;
            let failed = findings
                .iter()
                .any(|f| f.level == satellite::check::Level::Fail);
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Demo { walkthrough, port } => {
            let options = satellite_demo::demo::DemoOptions {
                port: *port,
                walkthrough: *walkthrough,
            };
            satellite_demo::demo::demo(&options, |prefix, domain| {
                install::init(&install::InitOptions {
                    prefix: prefix.to_owned(),
                    apache_user: None,
                    cron_user: None,
                    extbasename: domain.to_owned(),
                    programs_dir: None,
                })
                .map(drop)
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate { out } => print(generate(out)?),
        Command::Jobstates {
            command:
                JobstatesCommand::Poll {
                    once,
                    every,
                    timeout,
                    squeue,
                },
        } => print(satellite::jobstates::poll(
            &config()?,
            &satellite::jobstates::PollOptions {
                once: *once,
                every: std::time::Duration::from_secs((*every).max(1)),
                timeout: std::time::Duration::from_secs((*timeout).max(1)),
                squeue: squeue.clone(),
            },
        )?),
        Command::Jobstates {
            command:
                JobstatesCommand::Push {
                    from,
                    db,
                    url,
                    timeout,
                    every,
                    squeue,
                },
        } => {
            let url = match (db, url) {
                (Some(_), _) => None,
                (None, Some(url)) => Some(url.clone()),
                (None, None) => Some(format!("https://{}/update-jobs.cgi", config()?.extbasename)),
            };
            let secs = |what: &str, value: f64| {
                Duration::try_from_secs_f64(value)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .with_context(|| format!("--{what} wants a positive number of seconds"))
            };
            let slurm = satellite_sched::SlurmScheduler::new().with_squeue(squeue);
            let options = admin::PushOptions {
                source: match from {
                    Some(path) => admin::JobSource::Table(path),
                    None => admin::JobSource::Scheduler(&slurm),
                },
                db: db.as_deref(),
                url,
                timeout: secs("timeout", *timeout)?,
            };
            match every {
                Some(every) => admin::push_jobstates_every(&options, secs("every", *every)?),
                None => print(admin::push_jobstates(&options)?),
            }
        }
    }
}

/// Man pages and completions come from the same clap definitions as
/// `--help`, so they can never disagree with the program they ship with.
fn generate(out: &std::path::Path) -> Result<String> {
    use clap_complete::Shell;
    let man = out.join("man");
    let completions = out.join("completions");
    for dir in [&man, &completions] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    clap_mangen::generate_to(Cli::command(), &man)
        .with_context(|| format!("writing man pages into {}", man.display()))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), "satellite", &completions)
            .with_context(|| {
                format!("writing {shell} completions into {}", completions.display())
            })?;
    }
    Ok(format!(
        "wrote man pages into {} and completions into {}\n",
        man.display(),
        completions.display()
    ))
}
