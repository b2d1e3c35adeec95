//! `satellite init`: an install tree in the original's layout.
//!
//! ```text
//! <prefix>/cgi/<endpoint>.cgi   the endpoint programs (Apache runs them)
//! <prefix>/bin/satellite, cron  the admin command and the cron program
//! <prefix>/etc/satellite.toml   the configuration (never overwritten)
//! <prefix>/var/                 database and word list; 2770, web server group
//! <prefix>/dynconf/             proxyconf.conf (vhost routing)
//! <prefix>/html/                retry page and site assets
//! ```

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use nix::unistd::{chown, Gid, Group, Uid, User};
use satellite_core::{Endpoint, SqliteStore};

use crate::admin::set_mode;
use crate::AboutPath;

pub const WORDLIST: &str = include_str!("../../../wordlist/eff_large_wordlist.txt");
pub const RETRY_PAGE: &str = include_str!("../../../html/satellite/retry.html");
pub const UNAVAILABLE_PAGE: &str = include_str!("../../../html/satellite/unavailable.html");
pub const WAITING_PAGE: &str = include_str!("../../../html/satellite/waiting.html");
pub const DEFAULT_MESSAGE: &str = include_str!("../../../html/satellite/default.txt");
pub const CONFIG_TEMPLATE: &str = include_str!("../assets/satellite.toml");

/// Written by cron: created up front so that Apache's include and cron's
/// lock exist before the first run.
const LOCK_AND_ROUTE_FILES: [&str; 2] = ["dynconf/proxyconf.conf", "dynconf/.satellite.lock"];

/// The key of log ids (`logkey`'s default): read by the endpoints (web
/// server group) and cron (owner), by nobody else.
const LOG_KEY: &str = "etc/logkey";

pub struct InitOptions {
    pub prefix: PathBuf,
    pub apache_user: Option<String>,
    pub cron_user: Option<String>,
    pub extbasename: String,
    /// Where the programs to install are (default: beside this program).
    pub programs_dir: Option<PathBuf>,
}

/// The web server's user on this system: Debian's www-data, RHEL's apache.
fn default_apache_user() -> Option<String> {
    ["www-data", "apache", "httpd"]
        .into_iter()
        .find(|name| User::from_name(name).ok().flatten().is_some())
        .map(str::to_owned)
}

/// Makes (or completes) the install tree under `options.prefix` and says
/// what it did, a line a step. Safe to run again: the configuration, the
/// word list and the database are kept, the programs replaced.
///
/// # Errors
/// When a program is missing beside this one, a file cannot be written, or
/// (as root) the web server's user or the cron user does not exist.
pub fn init(options: &InitOptions) -> Result<String> {
    let prefix = &options.prefix;
    let mut log = String::new();
    for dir in ["cgi", "bin", "etc", "var", "dynconf", "html/satellite"] {
        fs::create_dir_all(prefix.join(dir))
            .with_context(|| format!("creating {}", prefix.join(dir).display()))?;
    }
    install_programs(&programs_dir(options)?, prefix)?;
    log.push_str(&format!(
        "installed the programs into {0}/cgi and {0}/bin\n",
        prefix.display()
    ));
    log.push_str(&write_config(prefix, &options.extbasename)?);
    write_data_files(prefix)?;
    if write_log_key(&prefix.join(LOG_KEY))? {
        log.push_str(&format!("wrote {}\n", prefix.join(LOG_KEY).display()));
    }
    log.push_str(&create_database(prefix)?);
    set_modes(prefix)?;
    if Uid::effective().is_root() {
        log.push_str(&give_to_web_server(prefix, options)?);
    } else {
        log.push_str(
            "not root: ownership left as is (run as root to give var/ to the web server group)\n",
        );
    }
    Ok(log)
}

fn programs_dir(options: &InitOptions) -> Result<PathBuf> {
    match &options.programs_dir {
        Some(dir) => Ok(dir.clone()),
        None => Ok(std::env::current_exe()?
            .canonicalize()?
            .parent()
            .context("locating the programs")?
            .to_owned()),
    }
}

fn install_programs(programs: &Path, prefix: &Path) -> Result<()> {
    for endpoint in Endpoint::ALL {
        install_program(
            programs,
            endpoint.name(),
            &prefix.join(format!("cgi/{}.cgi", endpoint.name())),
        )?;
    }
    for name in ["satellite", "cron"] {
        install_program(programs, name, &prefix.join("bin").join(name))?;
    }
    Ok(())
}

/// A configuration for `extbasename` unless there is one: an admin's
/// settings are never overwritten.
fn write_config(prefix: &Path, extbasename: &str) -> Result<String> {
    let config = prefix.join("etc/satellite.toml");
    if config.exists() {
        return Ok(format!("kept {}\n", config.display()));
    }
    fs::write(
        &config,
        CONFIG_TEMPLATE.replace("@EXTBASENAME@", extbasename),
    )
    .with_context(|| format!("writing {}", config.display()))?;
    Ok(format!("wrote {}\n", config.display()))
}

fn write_data_files(prefix: &Path) -> Result<()> {
    write_if_missing(&prefix.join("var/eff_large_wordlist.txt"), WORDLIST)?;
    for (name, text) in [
        ("retry.html", RETRY_PAGE),
        ("unavailable.html", UNAVAILABLE_PAGE),
        ("waiting.html", WAITING_PAGE),
        ("default.txt", DEFAULT_MESSAGE),
    ] {
        let path = prefix.join("html/satellite").join(name);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    // What the waiting page shows as the site's name and help link; the
    // site edits it (a static file, so pages cost Apache no process).
    let site = prefix.join("html/satellite/site.json");
    if fs::read_to_string(&site).is_ok_and(|text| is_placeholder_site_json(&text)) {
        fs::write(&site, site_json()).with_context(|| format!("writing {}", site.display()))?;
    }
    write_if_missing(&site, &site_json())?;
    for file in LOCK_AND_ROUTE_FILES {
        write_if_missing(&prefix.join(file), "")?;
    }
    Ok(())
}

fn create_database(prefix: &Path) -> Result<String> {
    let db = prefix.join("var/state.sqlite");
    let (_store, migration) =
        SqliteStore::open_or_create(&db, Duration::from_secs(10)).about_path("creating", &db)?;
    Ok(if migration.created {
        format!("created {}\n", db.display())
    } else if migration.from_version < satellite_core::store::SCHEMA_VERSION {
        // APR's SQLite driver never prepares Apache's route lookup again
        // after a schema change: until a reload every routed host answers
        // 503 (never the waiting page, see satellite.conf).
        format!(
            "migrated {} from schema version {} to {}: reload Apache gracefully \
             (apachectl graceful) so that its route lookups see the new schema\n",
            db.display(),
            migration.from_version,
            satellite_core::store::SCHEMA_VERSION
        )
    } else {
        String::new()
    })
}

/// The web server runs the endpoints: it writes the database (and WAL
/// files beside it). Apache reads dynconf/ as configuration, so only
/// cron's user may write there: never the web server user, whose code
/// would otherwise run as root at the next reload.
fn set_modes(prefix: &Path) -> Result<()> {
    set_mode(&prefix.join("var"), 0o2770)?;
    set_mode(&prefix.join("dynconf"), 0o755)?;
    set_mode(&prefix.join("var/state.sqlite"), 0o660)?;
    for file in LOCK_AND_ROUTE_FILES {
        set_mode(&prefix.join(file), 0o644)?;
    }
    set_mode(&prefix.join("etc/satellite.toml"), 0o640)
}

/// As root: what the web server writes belongs to its group, and to the
/// cron user (root unless named); what Apache reads as configuration to
/// the cron user alone.
fn give_to_web_server(prefix: &Path, options: &InitOptions) -> Result<String> {
    let apache = options
        .apache_user
        .clone()
        .or_else(default_apache_user)
        .context("no web server user found (www-data, apache); give --apache-user")?;
    let group = Group::from_name(&apache)?
        .map(|g| g.gid)
        .or_else(|| User::from_name(&apache).ok().flatten().map(|u| u.gid))
        .with_context(|| format!("no group for web server user {apache}"))?;
    let owner = match &options.cron_user {
        Some(name) => {
            User::from_name(name)?
                .with_context(|| format!("no user {name}"))?
                .uid
        }
        None => Uid::from_raw(0),
    };
    for path in [
        "etc",
        "etc/satellite.toml",
        LOG_KEY,
        "var",
        "var/state.sqlite",
        "var/eff_large_wordlist.txt",
    ] {
        chown(&prefix.join(path), Some(owner), Some(group))
            .with_context(|| format!("chown {}", prefix.join(path).display()))?;
    }
    let owner_group = User::from_uid(owner)?
        .map(|u| u.gid)
        .unwrap_or(Gid::from_raw(0));
    for path in [
        "dynconf",
        "dynconf/proxyconf.conf",
        "dynconf/.satellite.lock",
    ] {
        chown(&prefix.join(path), Some(owner), Some(owner_group))
            .with_context(|| format!("chown {}", prefix.join(path).display()))?;
    }
    for wal in ["var/state.sqlite-wal", "var/state.sqlite-shm"] {
        // They exist only while a connection is open; missing is fine.
        let _ = chown(
            &prefix.join(wal),
            Some(owner),
            Some(Gid::from_raw(group.as_raw())),
        );
    }
    Ok(format!(
        "var/ belongs to group {apache} (mode 2770); dynconf/ only to cron's user (mode 755)\n"
    ))
}

fn install_program(from_dir: &Path, name: &str, to: &Path) -> Result<()> {
    let from = from_dir.join(name);
    if !from.exists() {
        bail!(
            "{} is missing: build the workspace first (cargo build --release)",
            from.display()
        );
    }
    // Copy, never link: the programs find etc/ relative to their real path.
    let temp = to.with_extension("new");
    fs::copy(&from, &temp)
        .with_context(|| format!("copying {} to {}", from.display(), temp.display()))?;
    set_mode(&temp, 0o755)?;
    fs::rename(&temp, to).with_context(|| format!("installing {}", to.display()))?;
    Ok(())
}

/// A new random key, unless there is one: replacing it would change every
/// id and break the link between old and new log lines.
fn write_log_key(path: &Path) -> Result<bool> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let created = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(path);
    let mut file = match created {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(err) => return Err(err).with_context(|| format!("creating {}", path.display())),
    };
    file.write_all(&satellite_core::logid::new_key())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    // The umask may have taken group read away.
    set_mode(path, 0o640)?;
    Ok(true)
}

/// The initial `html/satellite/site.json`: the domain as the site's name,
/// no help link until the site names one.
/// The site's name and help link for the waiting page. No name by
/// default: the page then shows the domain it was reached under, which
/// stays right when `extbasename` is set after the install.
pub fn site_json() -> String {
    let site = serde_json::json!({ "name": "", "help": "", "help_text": "Help" });
    format!("{site:#}\n")
}

/// A site.json an earlier version wrote at install, before the admin set
/// the domain (its name the template's placeholder domain, no help link):
/// replaced by [`site_json`]; anything a site edited is kept.
fn is_placeholder_site_json(text: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(text).is_ok_and(|site| {
        site.get("name").and_then(|n| n.as_str()) == Some("localhost")
            && site.get("help").and_then(|h| h.as_str()) == Some("")
    })
}

fn write_if_missing(path: &Path, text: &str) -> Result<()> {
    if !path.exists() {
        fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
