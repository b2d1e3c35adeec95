//! Every ending seen and acted on (issue 15): whatever ends a session
//! (revoke, destroy, the job's end, the TTL, a delete by another program),
//! `cron --watch`, run as its unit runs it, cuts the open websockets of its
//! route through a real Apache, in the hard orderings too: the watcher
//! started before the first session, a session ended milliseconds after
//! it started, endings while the watcher was down, a locked database.
//!
//! The 2-second bounds are the requirement of the product (a cut
//! within 2 s of the commit), checked as a read timeout on the websocket;
//! the watcher polls every 200 ms, so a pass leaves ample room.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::apache::{Apache, Routing, Running};
use support::backend::Backend;
use support::client::Conn;

const JUPYTER_WS: &str = "v1.kernel.websocket.jupyter.org";
const BACKEND_A: &str = "127.0.0.3";
const BACKEND_B: &str = "127.0.0.4";
/// What the issue asks: an ended session's websocket closes within 2 s.
const CUT_WITHIN: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    Revoke,
    Destroy,
    JobEnd,
    Ttl,
    /// A delete by a program that is not satellite (a Perl script).
    ForeignDelete,
}

const EVERY_ENDING: [Ending; 5] = [
    Ending::Revoke,
    Ending::Destroy,
    Ending::JobEnd,
    Ending::Ttl,
    Ending::ForeignDelete,
];

/// `cron --watch` as the unit runs it, with its output lines on a channel.
struct Watcher {
    process: Running,
    lines: mpsc::Receiver<String>,
}

impl Watcher {
    fn start(apache: &Apache) -> Watcher {
        Self::start_command(apache.cron_command())
    }

    fn start_command(mut command: std::process::Command) -> Watcher {
        let mut child: Child = command
            .arg("--watch")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (send, lines) = mpsc::channel();
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let send = send.clone();
            std::thread::spawn(move || {
                for line in std::io::BufRead::lines(std::io::BufReader::new(pipe)) {
                    let Ok(line) = line else { break };
                    if send.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Watcher {
            process: Running(child),
            lines,
        }
    }

    /// Waits until the watcher says it is watching (its first run done).
    fn wait_watching(&self) {
        self.wait_saying("watching the database");
    }

    fn wait_saying(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("the watcher never said {what:?}"));
            if line.contains(what) {
                return;
            }
        }
    }

    fn alive(&mut self) -> bool {
        self.process.0.try_wait().unwrap().is_none()
    }

    /// Everything it has said so far.
    fn said(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    fn kill(mut self) {
        let _ = self.process.0.kill();
        let _ = self.process.0.wait();
    }
}

/// A session: a token redeemed for `backend`, with a websocket open
/// through Apache.
struct Session {
    alias: String,
    ws: Conn,
}

fn open_session(apache: &Apache, backend: &Backend, jobid: Option<&str>) -> Session {
    let alias = apache.getlink();
    if let Some(jobid) = jobid {
        apache.link_ok(&alias, jobid);
    }
    apache.redeem_ok(&alias, &backend.ip(), backend.port());
    let ws = open_websocket(apache, &alias);
    Session { alias, ws }
}

/// Opens a websocket through Apache to `alias`'s backend; in vhost routing
/// the route is live only once the watcher has reloaded Apache, so it is
/// waited for.
fn open_websocket(apache: &Apache, alias: &str) -> Conn {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut ws = apache.client().connect(&apache.host(alias)).unwrap();
        let r = ws
            .websocket(
                &apache.host_port(alias),
                "/api/kernels/k/channels",
                JUPYTER_WS,
            )
            .unwrap();
        if r.status == 101 {
            ws.send_text("before").unwrap();
            assert_eq!(ws.recv_text().unwrap(), "before");
            return ws;
        }
        assert!(Instant::now() < deadline, "no websocket to {alias}: {r}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn end(apache: &Apache, session: &Session, ending: Ending, jobid: &str) {
    let alias = &session.alias;
    match ending {
        Ending::Revoke => apache.revoke_ok(alias),
        Ending::Destroy => apache.destroy_ok(alias, BACKEND_A),
        Ending::JobEnd => apache.push_jobs_ok(&format!("{jobid} TIMEOUT\n")),
        Ending::Ttl => {
            // As if redeemed longer ago than the TTL: the watcher's next
            // run expires it, with nothing else happening.
            let db = db(apache);
            db.execute(
                "UPDATE proxy SET modified = '2000-01-01 00:00:00' WHERE alias = ?1",
                [alias],
            )
            .unwrap();
        }
        Ending::ForeignDelete => {
            db(apache)
                .execute("delete from proxy where alias = ?", [alias])
                .unwrap();
        }
    }
}

fn db(apache: &Apache) -> rusqlite::Connection {
    let db = rusqlite::Connection::open(apache.db_file()).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    db
}

/// How long after `since` the websocket was closed by the other side;
/// an error if it carried data or stayed open until `since + limit`.
fn closed_within(ws: &mut Conn, since: Instant, limit: Duration) -> Result<Duration, String> {
    let left = (since + limit).saturating_duration_since(Instant::now());
    ws.set_read_timeout(left.max(Duration::from_millis(1)))
        .unwrap();
    match ws.recv_text() {
        Ok(text) => Err(format!("the websocket still carried {text:?}")),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Err(format!("the websocket was still open after {limit:?}"))
        }
        Err(_) => Ok(since.elapsed()),
    }
}

fn still_open(ws: &mut Conn, what: &str) {
    ws.set_read_timeout(Duration::from_secs(30)).unwrap();
    ws.send_text("after").unwrap();
    assert_eq!(ws.recv_text().unwrap(), "after", "{what}");
}

/// Whether connections of this test's own user are told apart from
/// Apache's workers': only when the workers run as another user (nobody,
/// under root).
fn apache_runs_as_another_user() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// The watcher starts first, on a fresh install with no route, as the
/// unit does at boot; then each kind of ending ends a session within
/// milliseconds of its redeem and websocket, and the websocket closes
/// within 2 s. A session on another backend, a tunnel to a backend that a
/// live route still names, and a connection to the ended backend that is
/// not Apache's keep working.
fn every_ending_cuts_a_session_started_after_the_watcher(routing: Routing) {
    let apache = Apache::start(routing);
    let a = Backend::start("alpha", BACKEND_A);
    let b = Backend::start("bravo", BACKEND_B);
    let watcher = Watcher::start(&apache);
    watcher.wait_watching();
    let mut kept = open_session(&apache, &b, None);
    let mut direct = TcpStream::connect(a.addr).unwrap();
    let endings: &[Ending] = if routing == Routing::Map {
        &EVERY_ENDING
    } else {
        &[Ending::Destroy, Ending::JobEnd]
    };
    for (n, &ending) in endings.iter().enumerate() {
        let jobid = format!("{}", 7100 + n);
        let mut ended = open_session(&apache, &a, Some(&jobid));
        let started = Instant::now();
        end(&apache, &ended, ending, &jobid);
        let took = closed_within(&mut ended.ws, started, CUT_WITHIN)
            .unwrap_or_else(|e| panic!("{ending:?}: {e}\nwatcher: {:?}", watcher.said()));
        eprintln!("{routing:?} {ending:?}: websocket closed {took:?} after the ending");
        still_open(&mut kept.ws, "a session on another backend");
    }
    // Two sessions on one backend (two tokens redeemed for one port): the
    // end of one leaves the backend routed, so no tunnel to it is cut.
    let twin = open_session(&apache, &b, None);
    end(&apache, &twin, Ending::Revoke, "");
    std::thread::sleep(Duration::from_millis(1500));
    still_open(
        &mut kept.ws,
        "a session whose backend another route still names",
    );
    if apache_runs_as_another_user() {
        // Not Apache's: never cut, though its backend's routes ended.
        direct
            .write_all(b"GET /direct HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        direct
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut head = [0u8; 12];
        direct.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200", "{}", String::from_utf8_lossy(&head));
    }
    drop(watcher);
}

#[test]
fn map_mode_every_ending_cuts_a_session_started_after_the_watcher() {
    every_ending_cuts_a_session_started_after_the_watcher(Routing::Map);
}

#[test]
fn vhost_mode_every_ending_cuts_a_session_started_after_the_watcher() {
    every_ending_cuts_a_session_started_after_the_watcher(Routing::Vhost);
}

/// Sessions that end while the watcher is down (killed, as a crash or an
/// OOM kill would) lose their websockets within 2 s of its start: its
/// place in the record of endings is in the database, not in its memory.
#[test]
fn endings_while_the_watcher_was_down_are_cut_when_it_starts_again() {
    let apache = Apache::start(Routing::Map);
    let a = Backend::start("alpha", BACKEND_A);
    let b = Backend::start("bravo", BACKEND_B);
    let watcher = Watcher::start(&apache);
    watcher.wait_watching();
    let endings = [Ending::Revoke, Ending::Destroy, Ending::JobEnd];
    let mut sessions: Vec<Session> = endings
        .iter()
        .enumerate()
        .map(|(n, _)| open_session(&apache, &a, Some(&format!("{}", 7200 + n))))
        .collect();
    let mut kept = open_session(&apache, &b, None);
    watcher.kill();
    for (n, (session, ending)) in sessions.iter().zip(endings).enumerate() {
        end(&apache, session, ending, &format!("{}", 7200 + n));
    }
    // Nothing cuts them meanwhile.
    std::thread::sleep(Duration::from_millis(500));
    for session in &mut sessions {
        still_open(&mut session.ws, "an ended session, with no watcher running");
    }
    let started = Instant::now();
    let watcher = Watcher::start(&apache);
    for (session, ending) in sessions.iter_mut().zip(endings) {
        let took = closed_within(&mut session.ws, started, CUT_WITHIN)
            .unwrap_or_else(|e| panic!("{ending:?}: {e}\nwatcher: {:?}", watcher.said()));
        eprintln!("{ending:?} while down: closed {took:?} after the watcher started");
    }
    still_open(&mut kept.ws, "a live session");
}

/// A database held locked by another process for 10 s (a long admin
/// transaction, a backup) does not end the watcher: it keeps trying, and
/// an ending committed at the end of that transaction is cut within 2 s.
#[test]
fn a_watcher_facing_a_locked_database_keeps_running_and_catches_up() {
    let apache = Apache::start(Routing::Map);
    let a = Backend::start("alpha", BACKEND_A);
    let mut watcher = Watcher::start(&apache);
    watcher.wait_watching();
    let mut session = open_session(&apache, &a, None);
    let mut locker = db(&apache);
    let tx = locker
        .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
        .unwrap();
    tx.execute(
        "delete from proxy where alias = ?",
        [session.alias.as_str()],
    )
    .unwrap();
    // Longer than the watcher's busy timeout, and past its heartbeat.
    std::thread::sleep(Duration::from_secs(12));
    assert!(watcher.alive(), "the watcher died: {:?}", watcher.said());
    let started = Instant::now();
    tx.commit().unwrap();
    let took = closed_within(&mut session.ws, started, CUT_WITHIN)
        .unwrap_or_else(|e| panic!("{e}\nwatcher: {:?}", watcher.said()));
    eprintln!("after a 12 s lock: closed {took:?} after the commit");
    assert!(watcher.alive(), "the watcher died: {:?}", watcher.said());
}

/// Sixty endings of every kind, half with the watcher running since before
/// the session, half with it started after the session opened: every
/// websocket is cut within 2 s of its ending's commit. Prints the
/// distribution (the figure the issue asks for: p50 and max).
#[test]
fn sixty_endings_are_each_cut() {
    const EACH: usize = 30;
    let apache = Apache::start(Routing::Map);
    let a = Backend::start("alpha", BACKEND_A);
    let kinds = [
        Ending::Revoke,
        Ending::Destroy,
        Ending::JobEnd,
        Ending::ForeignDelete,
    ];
    let mut watcher = Some(Watcher::start(&apache));
    watcher.as_ref().unwrap().wait_watching();
    let mut report = Vec::new();
    for started_after in [false, true] {
        let mut took = Vec::new();
        for n in 0..EACH {
            let ending = kinds[n % kinds.len()];
            let jobid = format!("{}", 7300 + n + if started_after { EACH } else { 0 });
            if started_after {
                if let Some(old) = watcher.take() {
                    old.kill();
                }
            }
            let mut session = open_session(&apache, &a, Some(&jobid));
            if started_after {
                let fresh = Watcher::start(&apache);
                fresh.wait_watching();
                watcher = Some(fresh);
            }
            let since = Instant::now();
            end(&apache, &session, ending, &jobid);
            took.push(
                closed_within(&mut session.ws, since, CUT_WITHIN).unwrap_or_else(|e| {
                    panic!(
                        "ending {n} ({ending:?}): {e}\nwatcher: {:?}",
                        watcher.as_ref().map(Watcher::said)
                    )
                }),
            );
        }
        took.sort();
        report.push(format!(
            "watcher started {}: {} endings, p50 {:?}, max {:?}",
            if started_after {
                "after the session"
            } else {
                "before the session"
            },
            took.len(),
            took[took.len() / 2],
            took[took.len() - 1]
        ));
    }
    eprintln!("{}", report.join("\n"));
}

/// A watcher started by hand (no service manager to restart it) whose
/// program an upgrade replaces, as a package does (the new file renamed
/// over the old): it starts the new program in its own place, same pid,
/// and that one cuts the next ending's websocket.
#[test]
fn a_watcher_whose_program_is_upgraded_runs_the_new_one() {
    let apache = Apache::start(Routing::Map);
    let backend = Backend::start("alpha", BACKEND_A);
    let installed = apache.path("bin/cron");
    let install = |to: &std::path::Path| {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        let new = to.with_extension("new");
        std::fs::copy(support::apache::CRON, &new).unwrap();
        std::fs::rename(&new, to).unwrap();
    };
    install(&installed);
    let mut command = std::process::Command::new(&installed);
    command.env("SATELLITE_CONFIG", apache.config_file());
    let mut watcher = Watcher::start_command(command);
    watcher.wait_watching();
    let pid = watcher.process.0.id();

    install(&installed);
    watcher.wait_saying("was replaced (an upgrade): starting the new program");
    watcher.wait_watching();
    assert!(watcher.alive(), "the watcher ended instead");
    let image = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(image, installed, "pid {pid} still runs the old program");

    let mut session = open_session(&apache, &backend, None);
    let started = Instant::now();
    end(&apache, &session, Ending::Destroy, "");
    closed_within(&mut session.ws, started, CUT_WITHIN)
        .unwrap_or_else(|e| panic!("after the upgrade: {e}\nwatcher: {:?}", watcher.said()));
}
