//! `satellite`: the admin command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use satellite_core::{Config, Store};

#[derive(Parser)]
#[command(
    name = "satellite",
    version,
    about = "Admin command of the satellite reverse-proxy broker"
)]
struct Cli {
    /// The configuration file (default: $SATELLITE_CONFIG, else ../etc/satellite.toml beside this program).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the database, or bring a legacy (Perl SRPS) one up to date in place.
    Migrate {
        /// The database file (default: `dbfile` from the configuration).
        #[arg(long)]
        db: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
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
    Config::load_file(&path).with_context(|| format!("loading {}", path.display()))
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Migrate { db } => {
            let db = match db {
                Some(db) => db,
                None => load_config(cli.config.as_ref())?.dbfile,
            };
            let (store, migration) = Store::open_or_create(&db, Duration::from_secs(10))
                .with_context(|| format!("migrating {}", db.display()))?;
            let what = if migration.created {
                "created".to_owned()
            } else if migration.changed_anything() {
                let mut changes = vec![format!(
                    "schema {} -> {}",
                    migration.from_version,
                    store.schema_version()?
                )];
                changes.extend(
                    migration
                        .added_columns
                        .iter()
                        .map(|c| format!("added column {c}")),
                );
                format!("migrated ({})", changes.join(", "))
            } else {
                "already current".to_owned()
            };
            println!("{}: {what}", db.display());
            Ok(())
        }
    }
}
