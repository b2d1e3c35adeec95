//! A real single-node Slurm for tests: a private `munged`, `slurmctld` and
//! `slurmd` with a generated `slurm.conf` in a temporary directory, on
//! loopback. See `docs/slurm-in-tests.md` for why each setting is there.
//!
//! Slurm's ports are fixed in its config, so only one such cluster can run
//! on a machine: a lock file makes test binaries (and worktrees) take
//! turns. Within one test binary the tests share the cluster
//! ([`Slurm::shared`]); a test that disturbs it (a node set DOWN, the
//! controller stopped) takes it alone ([`Slurm::exclusive`]). The last
//! test to let go stops every daemon and reaps it.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The node's name in slurm.conf (slurmd is told it with `-N`, so the
/// machine's host name does not matter).
pub const NODE: &str = "satnode";
pub const PARTITION: &str = "satq";
/// Unusual ports, so that a site's own Slurm on the test machine is not
/// disturbed; the lock below keeps our own clusters apart.
const CTLD_PORT: u16 = 16817;
const SLURMD_PORT: u16 = 16818;
/// Shared by every test binary and checkout on the machine.
const LOCK_FILE: &str = "/tmp/satellite-test-slurm.lock";

pub const SBIN: &str = "/usr/sbin";
pub const BIN: &str = "/usr/bin";

/// The running cluster. Dropping the last handle stops it.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
    munged: Mutex<Option<Child>>,
    slurmctld: Mutex<Option<Child>>,
    slurmd: Mutex<Option<Child>>,
    turns: Turns,
    _lock: File,
}

/// A test's hold on the shared cluster.
pub struct Slurm {
    cluster: Arc<Cluster>,
    exclusive: bool,
}

/// Many shared holders or one exclusive holder; a waiting exclusive
/// holder goes before new shared ones.
#[derive(Default)]
struct Turns {
    /// (shared holders, exclusive holder, exclusive holders waiting)
    state: Mutex<(usize, bool, usize)>,
    changed: Condvar,
}

impl Turns {
    fn take(&self, exclusive: bool) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if exclusive {
            state.2 += 1;
            while state.0 > 0 || state.1 {
                state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            state.2 -= 1;
            state.1 = true;
        } else {
            while state.1 || state.2 > 0 {
                state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            state.0 += 1;
        }
    }

    fn give_back(&self, exclusive: bool) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if exclusive {
            state.1 = false;
        } else {
            state.0 -= 1;
        }
        self.changed.notify_all();
    }
}

static CURRENT: Mutex<Weak<Cluster>> = Mutex::new(Weak::new());

/// The node set DOWN by [`Slurm::node_down`]; resumed when dropped.
pub struct NodeDown<'a>(&'a Slurm);

impl Drop for NodeDown<'_> {
    fn drop(&mut self) {
        // No panic here (the test may be failing already): say it loudly,
        // since every later test's jobs would wait for the node.
        let resumed = self
            .0
            .command("scontrol")
            .args(["update", &format!("nodename={NODE}"), "state=resume"])
            .output();
        match resumed {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "could not resume {NODE}: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("could not resume {NODE}: {e}"),
        }
    }
}

impl Slurm {
    /// The cluster, shared with the other tests of this binary that run
    /// at the same time.
    pub fn shared() -> Slurm {
        Self::take(false)
    }

    /// The cluster for this test alone: no other test's job runs while
    /// it has it.
    pub fn exclusive() -> Slurm {
        Self::take(true)
    }

    fn take(exclusive: bool) -> Slurm {
        let cluster = Self::cluster();
        cluster.turns.take(exclusive);
        Slurm { cluster, exclusive }
    }

    fn cluster() -> Arc<Cluster> {
        let mut current = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cluster) = current.upgrade() {
            return cluster;
        }
        let cluster = Arc::new(Cluster::start());
        *current = Arc::downgrade(&cluster);
        cluster
    }

    pub fn conf(&self) -> &Path {
        &self.cluster.conf
    }

    pub fn dir(&self) -> &Path {
        self.cluster.dir.path()
    }

    /// A Slurm client program (`sbatch`, `squeue`…) aimed at this cluster.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new(Path::new(BIN).join(program));
        command.env("SLURM_CONF", &self.cluster.conf);
        command.current_dir(self.cluster.dir.path());
        command
    }

    /// Runs a client program, panicking with its stderr if it fails.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self.command(program).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Submits a batch job and returns its id. Output goes to /dev/null:
    /// the tests look at states, not at job output.
    pub fn sbatch(&self, args: &[&str]) -> String {
        let mut all = vec!["--parsable", "--output=/dev/null"];
        all.extend_from_slice(args);
        let out = self.run("sbatch", &all);
        // --parsable prints `<id>` or `<id>;<cluster>`.
        out.trim().split(';').next().unwrap().to_owned()
    }

    pub fn scancel(&self, ids: &[&str]) {
        self.run("scancel", ids);
    }

    pub fn scontrol(&self, args: &[&str]) -> String {
        self.run("scontrol", args)
    }

    /// The job's long state as squeue reports it now ("" once purged).
    pub fn job_state(&self, id: &str) -> String {
        let out = self
            .command("squeue")
            .args(["--noheader", "--states=all", "--format=%T", "--jobs", id])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Waits until `job_state(id)` is `state`.
    pub fn wait_for_state(&self, id: &str, state: &str, within: Duration) {
        wait_until(&format!("job {id} {state}"), within, || {
            let now = self.job_state(id);
            (now == state).then_some(()).ok_or(now)
        });
    }

    /// Waits until every job of `ids` is in `state`, asking squeue once per
    /// look for all of them (ended jobs stay visible only for `MinJobAge`).
    pub fn wait_for_states(&self, ids: &[&str], state: &str, within: Duration) {
        let list = ids.join(",");
        wait_until(&format!("{} jobs {state}", ids.len()), within, || {
            let out = self
                .command("squeue")
                .args([
                    "--noheader",
                    "--states=all",
                    "--format=%i %T",
                    "--jobs",
                    &list,
                ])
                .output()
                .map_err(|e| e.to_string())?;
            let text = String::from_utf8_lossy(&out.stdout);
            let done = text
                .lines()
                .filter(|line| line.split_whitespace().nth(1) == Some(state))
                .count();
            (done == ids.len())
                .then_some(())
                .ok_or(format!("{done} of {} {state}", ids.len()))
        });
    }

    /// Sets the node DOWN (as an admin would, with a reason) until the
    /// returned guard is dropped, however the test ends: a node left down
    /// would hold every later test's jobs. Only with [`Slurm::exclusive`].
    pub fn node_down(&self) -> NodeDown<'_> {
        assert!(self.exclusive, "only with Slurm::exclusive()");
        self.scontrol(&[
            "update",
            &format!("nodename={NODE}"),
            "state=down",
            "reason=test",
        ]);
        NodeDown(self)
    }

    /// The node's state as sinfo prints it (`idle`, `mix`, `down`…).
    pub fn node_state(&self) -> String {
        node_state(&self.cluster.conf)
    }

    /// Stops slurmctld (SIGTERM, reaped): every client call fails until
    /// [`Slurm::start_controller`]. Only with [`Slurm::exclusive`].
    pub fn stop_controller(&self) {
        assert!(self.exclusive, "only with Slurm::exclusive()");
        if let Some(child) = self.cluster.slurmctld.lock().unwrap().take() {
            stop(child, "slurmctld");
        }
    }

    pub fn start_controller(&self) {
        let child = self.cluster.spawn_slurmctld();
        *self.cluster.slurmctld.lock().unwrap() = Some(child);
        self.cluster.wait_until_idle();
    }

    /// Freezes (or thaws) slurmctld: it keeps its socket but never answers,
    /// the way a controller overwhelmed by RPCs looks to a client.
    pub fn freeze_controller(&self, frozen: bool) {
        assert!(self.exclusive, "only with Slurm::exclusive()");
        let guard = self.cluster.slurmctld.lock().unwrap();
        let pid = Pid::from_raw(guard.as_ref().expect("slurmctld runs").id() as i32);
        let signal = if frozen {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        kill(pid, signal).unwrap();
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        // A test's jobs must not outlive its turn: cancel what is left of
        // an exclusive test (shared tests cancel their own).
        // A test that failed half-way must not leave the cluster broken
        // for the next: thaw or restart the controller.
        if self.exclusive {
            let pid = self
                .cluster
                .slurmctld
                .lock()
                .ok()
                .and_then(|c| c.as_ref().map(Child::id));
            match pid {
                Some(pid) => {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGCONT);
                }
                None => {
                    // Kept in the cluster, which stops and reaps it.
                    let mut slot = self
                        .cluster
                        .slurmctld
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    *slot = Some(self.cluster.spawn_slurmctld());
                    drop(slot);
                    self.cluster.wait_until_idle();
                }
            }
        }
        if self.exclusive && self.cluster.ctld_running() {
            self.cluster.cancel_all();
            // A test that set the node DOWN and failed before resuming it
            // must not leave it down for the next.
            if node_state(&self.cluster.conf).starts_with("down") {
                let _ = Command::new(Path::new(BIN).join("scontrol"))
                    .args(["update", &format!("nodename={NODE}"), "state=resume"])
                    .env("SLURM_CONF", &self.cluster.conf)
                    .status();
                self.cluster.wait_until_idle();
            }
        }
        self.cluster.turns.give_back(self.exclusive);
    }
}

impl Cluster {
    fn start() -> Cluster {
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .unwrap();
        // Waits for another binary's cluster to stop.
        lock.lock().unwrap();
        for daemon in ["munged", "slurmctld", "slurmd"] {
            assert!(
                Path::new(SBIN).join(daemon).exists(),
                "{SBIN}/{daemon} is missing: run scripts/setup.sh test (Debian: slurmctld slurmd slurm-client munge)"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("satellite-slurm")
            .tempdir()
            .unwrap();
        // Job steps run as the job's user and read the config.
        set_mode(dir.path(), 0o755);
        for sub in ["munge", "state", "spool", "log"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        set_mode(&dir.path().join("munge"), 0o755);
        let key = dir.path().join("munge/munge.key");
        let mut bytes = vec![0u8; 1024];
        File::open("/dev/urandom")
            .unwrap()
            .read_exact(&mut bytes)
            .unwrap();
        std::fs::write(&key, &bytes).unwrap();
        set_mode(&key, 0o600);
        let conf = dir.path().join("slurm.conf");
        std::fs::write(&conf, slurm_conf(dir.path())).unwrap();

        let munged = spawn_logged(
            Command::new(Path::new(SBIN).join("munged"))
                .arg("--foreground")
                // Our key and directories are private and root-owned;
                // --force accepts a socket directory under /tmp.
                .arg("--force")
                .arg(format!(
                    "--socket={}",
                    dir.path().join("munge/socket").display()
                ))
                .arg(format!("--key-file={}", key.display()))
                .arg(format!(
                    "--pid-file={}",
                    dir.path().join("munge/munged.pid").display()
                ))
                .arg(format!(
                    "--seed-file={}",
                    dir.path().join("munge/seed").display()
                ))
                .arg(format!(
                    "--log-file={}",
                    dir.path().join("log/munged.log").display()
                )),
            &dir.path().join("log/munged.out"),
        );
        let cluster = Cluster {
            conf,
            munged: Mutex::new(Some(munged)),
            slurmctld: Mutex::new(None),
            slurmd: Mutex::new(None),
            turns: Turns::default(),
            _lock: lock,
            dir,
        };
        wait_until("munged's socket", Duration::from_secs(10), || {
            let socket = cluster.dir.path().join("munge/socket");
            socket.exists().then_some(()).ok_or("absent")
        });
        *cluster.slurmctld.lock().unwrap() = Some(cluster.spawn_slurmctld());
        let slurmd = spawn_logged(
            Command::new(Path::new(SBIN).join("slurmd"))
                .args(["-D", "-N", NODE])
                .env("SLURM_CONF", &cluster.conf),
            &cluster.dir.path().join("log/slurmd.out"),
        );
        *cluster.slurmd.lock().unwrap() = Some(slurmd);
        cluster.wait_until_idle();
        cluster
    }

    fn spawn_slurmctld(&self) -> Child {
        // -i: start even if the state files are missing or from an
        // earlier run of this cluster (a restarted controller).
        spawn_logged(
            Command::new(Path::new(SBIN).join("slurmctld"))
                .args(["-D", "-i"])
                .env("SLURM_CONF", &self.conf),
            &self.dir.path().join("log/slurmctld.out"),
        )
    }

    fn wait_until_idle(&self) {
        let logs = self.dir.path().join("log");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let state = node_state(&self.conf);
            // A restarted controller finds the jobs still running.
            if matches!(state.as_str(), "idle" | "mixed" | "allocated") {
                return;
            }
            if Instant::now() > deadline {
                let tail = |name: &str| {
                    let text = std::fs::read_to_string(logs.join(name)).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    lines[lines.len().saturating_sub(15)..].join("\n")
                };
                panic!(
                    "node {NODE} not idle within 60 s (now {state:?})\n--- slurmctld\n{}\n--- slurmd\n{}\n--- munged\n{}",
                    tail("slurmctld.log"),
                    tail("slurmd.log"),
                    tail("munged.log")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn ctld_running(&self) -> bool {
        self.slurmctld.lock().map(|c| c.is_some()).unwrap_or(false)
    }

    /// Cancels every job and waits until none is left on the node, so
    /// that no job step (slurmstepd, reparented to init) outlives us.
    fn cancel_all(&self) {
        let ids = Command::new(Path::new(BIN).join("squeue"))
            .args([
                "--noheader",
                "--format=%A",
                "--states=PENDING,RUNNING,SUSPENDED,CONFIGURING,COMPLETING",
            ])
            .env("SLURM_CONF", &self.conf)
            .output();
        let Ok(ids) = ids else { return };
        let ids = String::from_utf8_lossy(&ids.stdout).into_owned();
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if ids.is_empty() {
            return;
        }
        let _ = Command::new(Path::new(BIN).join("scancel"))
            .args(&ids)
            .env("SLURM_CONF", &self.conf)
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let out = Command::new(Path::new(BIN).join("squeue"))
                .args([
                    "--noheader",
                    "--format=%A",
                    "--states=RUNNING,COMPLETING,SUSPENDED",
                ])
                .env("SLURM_CONF", &self.conf)
                .output();
            match out {
                Ok(out) if out.status.success() && out.stdout.trim_ascii().is_empty() => return,
                Ok(out) if out.status.success() => {}
                _ => return,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.ctld_running() {
            self.cancel_all();
        }
        for (daemon, name) in [
            (&self.slurmd, "slurmd"),
            (&self.slurmctld, "slurmctld"),
            (&self.munged, "munged"),
        ] {
            if let Some(child) = daemon.lock().unwrap_or_else(|e| e.into_inner()).take() {
                stop(child, name);
            }
        }
        // The lock file's lock goes with `_lock`.
    }
}

/// slurm.conf for one node with the CPUs and memory this machine has
/// (as `slurmd -C` measures them).
fn slurm_conf(dir: &Path) -> String {
    let hardware = Command::new(Path::new(SBIN).join("slurmd"))
        .arg("-C")
        .output()
        .expect("running slurmd -C");
    let hardware = String::from_utf8_lossy(&hardware.stdout);
    let first = hardware.lines().next().unwrap_or_default();
    // Keep CPUs= Boards= SocketsPerBoard= CoresPerSocket= ThreadsPerCore=
    // RealMemory=; the measured NodeName is the host's, ours is NODE.
    let measured: Vec<&str> = first
        .split_whitespace()
        .filter(|f| !f.starts_with("NodeName="))
        .collect();
    assert!(
        measured.iter().any(|f| f.starts_with("CPUs=")),
        "slurmd -C printed {hardware:?}"
    );
    let d = dir.display();
    format!(
        "\
ClusterName=satellite-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={CTLD_PORT}
SlurmdPort={SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge/socket
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
MailProg=/bin/true
# No cgroups in a container sandbox: processes are tracked by parent pid.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Ended jobs stay visible to squeue --states=all for two minutes.
MinJobAge=120
# A job past its limit, or cancelled, is killed within seconds.
KillWait=2
OverTimeLimit=0
SlurmdTimeout=10
SlurmctldTimeout=10
MessageTimeout=5
# A node set DOWN by an admin stays down until resumed.
ReturnToService=1
NodeName={NODE} NodeAddr=127.0.0.1 {measured} State=UNKNOWN
# Several test jobs share a core: they mostly sleep.
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
",
        measured = measured.join(" ")
    )
}

fn node_state(conf: &Path) -> String {
    Command::new(Path::new(BIN).join("sinfo"))
        .args(["--noheader", "--nodes", NODE, "--format=%T"])
        .env("SLURM_CONF", conf)
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn spawn_logged(command: &mut Command, log: &Path) -> Child {
    let out = File::create(log).unwrap();
    command
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {:?}: {e}", command.get_program()))
}

/// SIGTERM, then SIGKILL after 10 s; always reaped.
fn stop(mut child: Child, name: &str) {
    let pid = Pid::from_raw(child.id() as i32);
    // A frozen process does not act on SIGTERM.
    let _ = kill(pid, Signal::SIGCONT);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("{name} ignored SIGTERM for 10 s; killing it");
    let _ = child.kill();
    let _ = child.wait();
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Polls `check` until it returns `Ok`, panicking with its last `Err`
/// after `within`.
pub fn wait_until<T, E: std::fmt::Debug>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> Result<T, E>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match check() {
            Ok(value) => return value,
            Err(last) if Instant::now() > deadline => {
                panic!("waited {within:?} for {what}; last seen: {last:?}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}
