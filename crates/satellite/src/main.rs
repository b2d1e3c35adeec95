//! `satellite`: the admin command (and the native server, and the demo).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
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
    /// Serve the endpoints natively over HTTP (behind Apache, or alone on loopback)
    Serve {
        /// Address to listen on [default: serve_listen from the config]
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
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
    Show { token: String },
    /// Delete a token now, whatever its state, and drop its route
    Revoke { token: String },
    /// Expire tokens past their TTL now
    Gc,
    /// Print what cron would write (the route map or the vhosts)
    Render,
    /// Counts by state, the oldest token, sessions per compute node
    Stats,
    /// Create the database, or take a Perl SRPS database in place (backup first)
    Migrate {
        /// The database [default: dbfile from the config]
        #[arg(long, value_name = "FILE")]
        db: Option<PathBuf>,
        /// Report what the database holds and what would change; change nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Check a deployment: config, files and modes, database, Apache, reload, certificate
    Check {
        /// The certificate Apache serves (SSLCertificateFile)
        #[arg(long, value_name = "FILE")]
        cert: Option<PathBuf>,
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("satellite: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(path: Option<&PathBuf>) -> Result<Config> {
    let path = match path {
        Some(path) => path.clone(),
        None => Config::locate()?,
    };
    Config::load_file(&path)
        .with_context(|| format!("loading the configuration {}", path.display()))
}

fn print(text: String) -> Result<ExitCode> {
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

fn run(cli: Cli) -> Result<ExitCode> {
    let config = || load_config(cli.config.as_ref());
    match &cli.command {
        Command::Serve { listen } => {
            let config = config()?;
            let listen = listen
                .clone()
                .unwrap_or_else(|| config.serve_listen.clone());
            let server = satellite_serve::Server::bind(config, &listen)?;
            server.stop_on_signals()?;
            eprintln!("satellite serve: listening on http://{listen}/");
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
        Command::Show { token } => print(admin::show(&config()?, token)?),
        Command::Revoke { token } => print(admin::revoke(&config()?, token)?),
        Command::Gc => print(admin::gc(&config()?)?),
        Command::Render => print(admin::render(&config()?)?),
        Command::Stats => print(admin::stats(&config()?)?),
        Command::Migrate { db, dry_run } => {
            let db = match db {
                Some(db) => db.clone(),
                None => config()?.dbfile,
            };
            print(admin::migrate(&db, *dry_run)?)
        }
        Command::Check { cert } => {
            let findings =
                satellite::check::check(config().map_err(|e| format!("{e:#}")), cert.as_deref());
            for finding in &findings {
                println!("{finding}");
            }
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
            satellite::demo::demo(&satellite::demo::DemoOptions {
                port: *port,
                walkthrough: *walkthrough,
            })?;
            Ok(ExitCode::SUCCESS)
        }
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
