//! `satellite init`: an install tree in the original's layout.
//!
//! ```text
//! <prefix>/cgi/<endpoint>.cgi   the endpoint programs (Apache runs them)
//! <prefix>/bin/satellite, cron  the admin command and the cron program
//! <prefix>/etc/satellite.toml   the configuration (never overwritten)
//! <prefix>/var/                 database and word list; 2770, web server group
//! <prefix>/dynconf/             routes.map / proxyconf.conf
//! <prefix>/html/                retry page and site assets
//! ```

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use nix::unistd::{chown, Gid, Group, Uid, User};
use satellite_core::{Endpoint, Store};

use crate::admin::set_mode;

pub const WORDLIST: &str = include_str!("../../../wordlist/eff_large_wordlist.txt");
pub const RETRY_PAGE: &str = include_str!("../../../html/satellite/retry.html");
pub const WAITING_PAGE: &str = include_str!("../../../html/satellite/waiting.html");
pub const CONFIG_TEMPLATE: &str = include_str!("../assets/satellite.toml");

/// Written by cron and, in map routing, by the endpoints (as the web
/// server): created up front, group-writable, so neither locks the other out.
const LOCK_AND_ROUTE_FILES: [&str; 4] = [
    "dynconf/routes.map",
    "dynconf/proxyconf.conf",
    "dynconf/.routes.map.lock",
    "dynconf/.satellite.lock",
];

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

pub fn init(options: &InitOptions) -> Result<String> {
    let prefix = &options.prefix;
    let mut log = String::new();
    let programs = match &options.programs_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .canonicalize()?
            .parent()
            .context("locating the programs")?
            .to_owned(),
    };
    for dir in ["cgi", "bin", "etc", "var", "dynconf", "html/satellite"] {
        fs::create_dir_all(prefix.join(dir))
            .with_context(|| format!("creating {}", prefix.join(dir).display()))?;
    }
    for endpoint in Endpoint::ALL {
        install_program(
            &programs,
            endpoint.name(),
            &prefix.join(format!("cgi/{}.cgi", endpoint.name())),
        )?;
    }
    for name in ["satellite", "cron"] {
        install_program(&programs, name, &prefix.join("bin").join(name))?;
    }
    log.push_str(&format!(
        "installed the programs into {0}/cgi and {0}/bin\n",
        prefix.display()
    ));

    let config = prefix.join("etc/satellite.toml");
    if config.exists() {
        log.push_str(&format!("kept {}\n", config.display()));
    } else {
        fs::write(
            &config,
            CONFIG_TEMPLATE.replace("@EXTBASENAME@", &options.extbasename),
        )?;
        log.push_str(&format!("wrote {}\n", config.display()));
    }
    write_if_missing(&prefix.join("var/eff_large_wordlist.txt"), WORDLIST)?;
    fs::write(prefix.join("html/satellite/retry.html"), RETRY_PAGE)?;
    fs::write(prefix.join("html/satellite/waiting.html"), WAITING_PAGE)?;
    // What the waiting page shows as the site's name and help link; the
    // site edits it (a static file, so pages cost Apache no process).
    write_if_missing(
        &prefix.join("html/satellite/site.json"),
        &site_json(&options.extbasename),
    )?;
    for file in LOCK_AND_ROUTE_FILES {
        write_if_missing(&prefix.join(file), "")?;
    }
    let db = prefix.join("var/state.sqlite");
    let (_store, migration) = Store::open_or_create(&db, Duration::from_secs(10))
        .with_context(|| format!("creating {}", db.display()))?;
    if migration.created {
        log.push_str(&format!("created {}\n", db.display()));
    }

    // The web server runs the endpoints: it writes the database (and WAL
    // files beside it) and, in map routing, the route map.
    set_mode(&prefix.join("var"), 0o2770)?;
    set_mode(&prefix.join("dynconf"), 0o2770)?;
    set_mode(&db, 0o660)?;
    for file in LOCK_AND_ROUTE_FILES {
        set_mode(&prefix.join(file), 0o664)?;
    }
    set_mode(&config, 0o640)?;
    if Uid::effective().is_root() {
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
            "var",
            "var/state.sqlite",
            "var/eff_large_wordlist.txt",
            "dynconf",
            "dynconf/routes.map",
            "dynconf/proxyconf.conf",
        ] {
            chown(&prefix.join(path), Some(owner), Some(group))
                .with_context(|| format!("chown {}", prefix.join(path).display()))?;
        }
        for wal in ["var/state.sqlite-wal", "var/state.sqlite-shm"] {
            let _ = chown(
                &prefix.join(wal),
                Some(owner),
                Some(Gid::from_raw(group.as_raw())),
            );
        }
        log.push_str(&format!(
            "var/ and dynconf/ belong to group {apache} (mode 2770)\n"
        ));
    } else {
        log.push_str("not root: ownership left as is (run as root to give var/ and dynconf/ to the web server group)\n");
    }
    Ok(log)
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

/// The initial `html/satellite/site.json`: the domain as the site's name,
/// no help link until the site names one.
pub fn site_json(extbasename: &str) -> String {
    let site = serde_json::json!({ "name": extbasename, "help": "", "help_text": "Help" });
    format!("{site:#}\n")
}

fn write_if_missing(path: &Path, text: &str) -> Result<()> {
    if !path.exists() {
        fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
