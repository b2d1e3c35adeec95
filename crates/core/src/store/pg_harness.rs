//! A private PostgreSQL cluster for the tests: started once per test
//! binary, listening only on a Unix socket in its own temporary directory,
//! with a fresh database per test.
//!
//! `initdb` and `pg_ctl` refuse to run as root, and the tests run as root
//! in CI: there the cluster belongs to `nobody`. The cluster lives in a
//! `static` (one per binary, shared by the tests running in parallel), and
//! statics are never dropped, so its end is not left to `Drop`: a guardian
//! shell, started with the cluster, blocks reading a pipe whose only
//! writer is this process, and stops the cluster (`pg_ctl stop -m fast`)
//! and removes its directory when that pipe closes — whenever and however
//! the test binary ends, after failed tests, a panic or a kill included.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// The shared cluster of this test binary.
pub struct Cluster {
    /// The temporary directory: the log and the socket (and the data
    /// directory of the shared cluster).
    dir: PathBuf,
    /// The data directory.
    data: PathBuf,
    /// The write end of the guardian's pipe, and the guardian.
    lifeline: Mutex<Option<(ChildStdin, Child)>>,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static DATABASES: AtomicUsize = AtomicUsize::new(0);

/// The cluster, started on first use.
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| match Cluster::start() {
        Ok(cluster) => cluster,
        Err(why) => panic!(
            "cannot start a private PostgreSQL cluster for the tests \
             (scripts/setup.sh test installs PostgreSQL): {why}"
        ),
    })
}

/// A new, empty database in the shared cluster; its connection string.
pub fn new_database() -> String {
    cluster().new_database()
}

impl Cluster {
    /// A new, empty database in this cluster; its connection string.
    pub fn new_database(&self) -> String {
        let name = format!(
            "test_{}_{}",
            std::process::id(),
            DATABASES.fetch_add(1, Ordering::Relaxed)
        );
        let mut admin = postgres::Client::connect(&self.url("postgres"), postgres::NoTls)
            .unwrap_or_else(|err| panic!("connecting to the test cluster: {err}"));
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|err| panic!("creating database {name}: {err}"));
        self.url(&name)
    }

    /// A cluster of the caller's own (not the shared one) whose data
    /// directory is `data`: a path that does not exist yet, in a directory
    /// the cluster's owner may write (see [`Cluster::give_to_owner`]), for
    /// instance on a small file system the test mounted. `initdb_args` are
    /// added to initdb's, `settings` to `postgresql.conf`. Its socket and
    /// log are in a temporary directory of their own, so that a full data
    /// disk leaves them be. Dropping it stops the server and removes that
    /// directory; the data directory is left to the caller.
    pub fn start_with_data_dir(
        data: &Path,
        initdb_args: &[&str],
        settings: &str,
    ) -> Result<Self, String> {
        Self::start_at(Some(data), initdb_args, settings)
    }

    /// Gives `path` to the user the clusters run as (`nobody` when the
    /// tests run as root), for a data directory's parent.
    pub fn give_to_owner(path: &Path) -> Result<(), String> {
        Owner::for_cluster()?.chown(path)
    }

    /// A libpq connection string for `dbname` over the cluster's socket.
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "host={} port=5432 user=postgres dbname={dbname}",
            self.dir.display()
        )
    }

    fn start() -> Result<Self, String> {
        Self::start_at(None, &[], "")
    }

    /// Initialises and starts a cluster whose data directory is `data`, by
    /// default in its temporary directory.
    fn start_at(data: Option<&Path>, initdb_args: &[&str], settings: &str) -> Result<Self, String> {
        let bindir = bindir()?;
        let owner = Owner::for_cluster()?;
        // Short and fixed: a socket path must fit in 107 bytes.
        let dir = tempfile::Builder::new()
            .prefix("satellite-pg-")
            .tempdir_in("/tmp")
            .map_err(|e| format!("making a temporary directory: {e}"))?
            .keep();
        owner.chown(&dir)?;
        let data = data.map_or_else(|| dir.join("data"), Path::to_path_buf);
        owner.run(
            Command::new(bindir.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "-A", "trust", "-E", "UTF8"])
                .args(["--locale=C", "--no-sync", "--no-instructions"])
                .args(initdb_args),
            &dir,
        )?;
        // max_connections: the integration tests run fifty CGI processes
        // at once (each its own connection), two such tests in parallel,
        // besides serve's workers and the Apache children's mod_dbd pools.
        let settings = format!(
            "\n# The tests' private cluster: no TCP at all.\n\
             listen_addresses = ''\n\
             unix_socket_directories = '{}'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             max_connections = 300\nshared_buffers = 16MB\n{settings}\n",
            dir.display()
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .and_then(|mut conf| conf.write_all(settings.as_bytes()))
            .map_err(|e| format!("configuring the cluster: {e}"))?;
        let pg_ctl = bindir.join("pg_ctl");
        // The guardian first, so that a failed start is cleaned up too.
        let mut guardian = Command::new("/bin/sh");
        guardian
            .args([
                "-c",
                "trap '' INT TERM HUP; cat >/dev/null; \
                 \"$0\" -D \"$1\" -m fast -w stop >/dev/null 2>&1; rm -rf \"$2\"",
            ])
            .arg(&pg_ctl)
            .arg(&data)
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .current_dir(&dir);
        owner.apply(&mut guardian, &dir);
        let mut child = guardian
            .spawn()
            .map_err(|e| format!("starting the guardian: {e}"))?;
        let Some(stdin) = child.stdin.take() else {
            return Err("the guardian has no stdin".into());
        };
        let cluster = Cluster {
            dir,
            data,
            lifeline: Mutex::new(Some((stdin, child))),
        };
        cluster.pg_ctl(&["-w", "-t", "60", "start"])?;
        Ok(cluster)
    }
}

impl Cluster {
    /// Restarts the server the way an admin's `pg_ctl restart -m fast`
    /// does: every connection is cut, and the cluster answers again once
    /// this returns. A test that does this runs in a binary of its own,
    /// since the cluster is shared by the tests of one binary.
    pub fn restart_fast(&self) -> Result<(), String> {
        self.pg_ctl(&["-w", "-t", "60", "-m", "fast", "restart"])
    }

    /// Starts the server again after it stopped by itself (a PANIC whose
    /// crash recovery failed too), as an admin's `pg_ctl start` does.
    pub fn start_again(&self) -> Result<(), String> {
        self.pg_ctl(&["-w", "-t", "60", "start"])
    }

    /// Whether the server runs (`pg_ctl status`): it may still be in crash
    /// recovery and refuse connections.
    pub fn is_running(&self) -> bool {
        self.pg_ctl(&["status"]).is_ok()
    }

    /// The server's log so far, for a test's messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// Runs `pg_ctl` on this cluster as its owner.
    fn pg_ctl(&self, args: &[&str]) -> Result<(), String> {
        let owner = Owner::for_cluster()?;
        let pg_ctl = bindir()?.join("pg_ctl");
        owner.run(
            Command::new(&pg_ctl)
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(self.dir.join("log"))
                .args(args),
            &self.dir,
        )
    }
}

impl Drop for Cluster {
    // Only a cluster that is not the shared static gets here; closing the
    // pipe is what stops it either way.
    fn drop(&mut self) {
        let taken = self.lifeline.lock().ok().and_then(|mut l| l.take());
        if let Some((stdin, mut guardian)) = taken {
            drop(stdin);
            let _ = guardian.wait();
        }
    }
}

/// Where PostgreSQL's server programs are: `$SATELLITE_PG_BINDIR`, the
/// newest of Debian's `/usr/lib/postgresql/N/bin`, the PGDG packages'
/// `/usr/pgsql-N/bin`, else the `PATH` (RHEL's own packages).
fn bindir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("SATELLITE_PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = Vec::new();
    for (parent, prefix, suffix) in [
        ("/usr/lib/postgresql", "", "bin"),
        ("/usr", "pgsql-", "bin"),
    ] {
        let Ok(entries) = std::fs::read_dir(parent) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(version) = name.strip_prefix(prefix).and_then(|v| v.parse().ok()) else {
                continue;
            };
            let bin = entry.path().join(suffix);
            if bin.join("initdb").exists() {
                found.push((version, bin));
            }
        }
    }
    if let Some((_, bin)) = found.into_iter().max() {
        return Ok(bin);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .find(|dir| dir.join("initdb").exists() && dir.join("pg_ctl").exists())
        .ok_or_else(|| {
            "no initdb found (looked in /usr/lib/postgresql/*/bin, /usr/pgsql-*/bin and the PATH)"
                .into()
        })
}

/// Who runs the cluster: `nobody` when the tests run as root, else the
/// tests' own user.
struct Owner {
    ids: Option<(u32, u32)>,
}

impl Owner {
    fn for_cluster() -> Result<Self, String> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(Owner { ids: None });
        }
        let user = nix::unistd::User::from_name("nobody")
            .map_err(|e| format!("looking up user nobody: {e}"))?
            .ok_or("no user nobody to run PostgreSQL as (initdb refuses root)")?;
        Ok(Owner {
            ids: Some((user.uid.as_raw(), user.gid.as_raw())),
        })
    }

    fn chown(&self, path: &Path) -> Result<(), String> {
        let Some((uid, gid)) = self.ids else {
            return Ok(());
        };
        nix::unistd::chown(
            path,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .map_err(|e| format!("giving {} to nobody: {e}", path.display()))
    }

    fn apply(&self, command: &mut Command, home: &Path) {
        if let Some((uid, gid)) = self.ids {
            command.uid(uid).gid(gid);
        }
        command
            .current_dir(home)
            .env("HOME", home)
            .env("LC_ALL", "C")
            .env_remove("PGDATA")
            .env_remove("PGHOST")
            .env_remove("PGPORT");
    }

    fn run(&self, command: &mut Command, home: &Path) -> Result<(), String> {
        self.apply(command, home);
        let shown = format!("{command:?}");
        let output = command
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{shown}: {e}"))?;
        if output.status.success() {
            return Ok(());
        }
        let log = std::fs::read_to_string(home.join("log")).unwrap_or_default();
        Err(format!(
            "{shown}: {}\n{}{}{log}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}
