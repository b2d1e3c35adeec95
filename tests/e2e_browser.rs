//! The user's whole path in a real browser (issue 9): Chromium (Debian's,
//! over WebDriver) opens a user's URL while the job is pending, sees each
//! state of the waiting page, and turns into a real JupyterLab by itself
//! once the job's stand-in redeems from the compute node's address; in
//! JupyterLab it runs a cell through the kernel websocket, creates, opens,
//! saves and deep-links files with awkward names, shuts down, and sees the
//! ended page. Everything goes through the shipped `httpd-conf/` in a
//! private Apache with TLS.
//!
//! JupyterLab comes from PyPI into `target/e2e-venv` (created on the first
//! run, about a minute; reused after). Screenshots of every state go to
//! `target/e2e-screenshots/`. Every wait is on a condition in the page.

mod support;

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::apache::{Apache, Routing, Running, DOMAIN};
use support::backend::ReservedPort;
use support::client::Request;
use support::repo_root;
use support::webdriver::Browser;

/// The compute node: JupyterLab listens here and redeems from here.
const COMPUTE_NODE: &str = "127.0.0.3";
const JOB_ID: &str = "4242";
const JUPYTERLAB: &str = "jupyterlab==4.6.6";
/// A page state may take a few polls to show (the page backs off up to
/// 30 s between polls when nothing changes).
const STATE_WAIT: Duration = Duration::from_secs(90);
/// JupyterLab's first start on a cold 2-core machine.
const LAB_WAIT: Duration = Duration::from_secs(180);
/// Names that mean something in URLs: each file must round-trip.
const FILE_NAMES: [&str; 5] = [
    "with space.txt",
    "hash#1.txt",
    "100%.txt",
    "what?.txt",
    "\u{e9}t\u{e9}.txt",
];

/// The virtualenv with JupyterLab, created on first use.
fn jupyterlab() -> PathBuf {
    let venv = repo_root().join("target/e2e-venv");
    let marker = venv.join(format!(".installed-{JUPYTERLAB}"));
    if !marker.exists() {
        let started = Instant::now();
        let run = |cmd: &mut Command| {
            let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
            assert!(
                out.status.success(),
                "{cmd:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        // The system's Python (Debian's python3-venv), not whatever a
        // version manager puts first on PATH.
        let python = ["/usr/bin/python3", "python3"]
            .into_iter()
            .find(|p| !p.starts_with('/') || Path::new(p).exists())
            .unwrap();
        let _ = fs::remove_dir_all(&venv);
        run(Command::new(python).args(["-m", "venv"]).arg(&venv));
        run(Command::new(venv.join("bin/python")).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            JUPYTERLAB,
        ]));
        fs::write(&marker, "").unwrap();
        eprintln!("installed {JUPYTERLAB} in {:?}", started.elapsed());
    }
    venv.join("bin/jupyter-lab")
}

/// A JupyterLab as galyleo starts one: on the compute node's address, its
/// own token, any Origin (Apache sends `Host: <ip>:<port>`).
fn start_jupyterlab(dir: &Path, port: u16, token: &str) -> Running {
    let home = dir.join("home");
    let notebooks = dir.join("notebooks");
    fs::create_dir_all(&home).unwrap();
    fs::create_dir_all(&notebooks).unwrap();
    let log = fs::File::create(dir.join("jupyterlab.log")).unwrap();
    let child = Command::new(jupyterlab())
        .args([
            "--no-browser",
            "--allow-root",
            &format!("--ip={COMPUTE_NODE}"),
            &format!("--port={port}"),
            "--port-retries=0",
            &format!("--IdentityProvider.token={token}"),
            "--ServerApp.allow_origin=*",
            // No traffic beyond loopback: no update or news checks.
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.news_url=None",
        ])
        .arg(format!("--ServerApp.root_dir={}", notebooks.display()))
        .env("HOME", &home)
        .env("JUPYTER_CONFIG_DIR", home.join("config"))
        .env("JUPYTER_DATA_DIR", home.join("data"))
        .env("JUPYTER_RUNTIME_DIR", home.join("runtime"))
        .env("IPYTHONDIR", home.join("ipython"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting jupyter-lab");
    Running(child)
}

fn jupyter_log(dir: &Path) -> String {
    fs::read_to_string(dir.join("jupyterlab.log")).unwrap_or_default()
}

/// A request to the management host from `from` (login node, Slurm).
fn manage(apache: &Apache, from: &str, request: Request) -> String {
    let r = apache
        .client()
        .bind(from)
        .request(&request)
        .unwrap_or_else(|e| panic!("{request:?}: {e}\n{}", apache.error_log()));
    assert_eq!(r.status, 200, "{request:?}: {r}");
    r.text()
}

/// What the broker's job-state pusher does: job `id` in `state` to
/// update-jobs, in the extended form (reason, start, time limit).
fn push_job(apache: &Apache, id: &str, state: &str, reason: &str, start_in: i64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let line = format!("{id} {state} {reason} {} 3600 - - -\n", now + start_in);
    let encoded: String = line
        .bytes()
        .map(|c| match c {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (c as char).to_string(),
            _ => format!("%{c:02X}"),
        })
        .collect();
    let body = format!("jobstates={encoded}&taken={now}").into_bytes();
    let request = Request::post(&apache.host_port("manage"), "/update-jobs.cgi", body)
        .header("Content-Type", "application/x-www-form-urlencoded");
    let text = manage(apache, "127.0.0.1", request);
    assert_eq!(text, "Successfully updated jobs! \n");
}

fn link_job(apache: &Apache, token: &str, id: &str) {
    let linked = manage(
        apache,
        "127.0.0.1",
        Request::get(
            &apache.host_port("manage"),
            &format!("/linktoken.cgi?token={token}&jobid={id}"),
        ),
    );
    assert_eq!(linked, "Success! Token linked to jobid.\n");
}

/// The waiting page shows `name` in its job details (`#v-<name>`).
fn detail(b: &Browser, name: &str) -> Result<String, String> {
    let shown = b.eval(
        "var e = document.getElementById('v-' + arguments[0]); return e && !e.hidden ? e.textContent : null;",
        json!([name]),
    )?;
    shown
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no {name} shown"))
}

/// The page's title says `title` (final states set it).
fn title_is(b: &Browser, title: &str) -> Result<(), String> {
    let now = b.title();
    if now == title {
        Ok(())
    } else {
        Err(format!("title {now:?}, body {:?}", b.text("body")))
    }
}

fn shots() -> PathBuf {
    let dir = repo_root().join("target/e2e-screenshots");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// The waiting page's status line says `text`.
fn status_is(b: &Browser, text: &str) -> Result<(), String> {
    match b.text("#status") {
        Some(now) if now == text => Ok(()),
        other => Err(format!("status {other:?}")),
    }
}

/// Runs an async script that resolves to a list of problems; `Ok` if empty.
fn problems(b: &Browser, script: &str, args: Value) -> Result<(), String> {
    let value = b.eval_async(script, args)?;
    match value.as_array() {
        Some(list) if list.is_empty() => Ok(()),
        _ => Err(value.to_string()),
    }
}

const ROUND_TRIP_FILES: &str = r#"
var done = arguments[arguments.length - 1];
var names = arguments[0];
var xsrf = (document.cookie.match(/(?:^|; )_xsrf=([^;]*)/) || [])[1] || "";
var headers = { "Content-Type": "application/json", "X-XSRFToken": decodeURIComponent(xsrf) };
(async function () {
  var out = [];
  for (const name of names) {
    const url = "/api/contents/" + encodeURIComponent(name);
    const put = (text) => fetch(url, { method: "PUT", headers: headers,
      body: JSON.stringify({ type: "file", format: "text", content: text }) });
    let r = await put("created " + name);
    if (!r.ok) { out.push(name + ": create answered " + r.status); continue; }
    r = await fetch(url + "?type=file&format=text&content=1", { headers: headers });
    const model = r.ok ? await r.json() : {};
    if (model.name !== name || model.content !== "created " + name) {
      out.push(name + ": open answered " + r.status + " " + JSON.stringify(model).slice(0, 200));
      continue;
    }
    r = await put("saved " + name);
    if (!r.ok) { out.push(name + ": save answered " + r.status); continue; }
    r = await fetch("/files/" + encodeURIComponent(name), { headers: headers });
    const text = await r.text();
    if (text !== "saved " + name) { out.push(name + ": /files answered " + r.status + " " + text.slice(0, 100)); }
  }
  return out;
})().then(done, function (e) { done(["script failed: " + e]); });
"#;

/// Every visible text element whose contrast with the page's background is
/// below WCAG 2.1 AA (4.5:1; 3:1 for large or bold-large text).
const LOW_CONTRAST: &str = r#"
function lum(c) {
  var m = c.match(/[0-9.]+/g).slice(0, 3).map(Number).map(function (v) {
    v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4);
  });
  return 0.2126 * m[0] + 0.7152 * m[1] + 0.0722 * m[2];
}
function background(e) {
  for (; e; e = e.parentElement) {
    var b = getComputedStyle(e).backgroundColor;
    if (b && b !== "transparent" && !/rgba\(.*, 0\)$/.test(b)) { return b; }
  }
  return "rgb(255, 255, 255)";
}
var bad = [];
document.querySelectorAll("body *").forEach(function (e) {
  var own = Array.prototype.some.call(e.childNodes, function (n) { return n.nodeType === 3 && n.textContent.trim(); });
  if (!own || !e.offsetParent && getComputedStyle(e).position !== "fixed") { return; }
  var st = getComputedStyle(e);
  var a = lum(st.color), b = lum(background(e));
  var ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
  var size = parseFloat(st.fontSize), bold = parseInt(st.fontWeight, 10) >= 700;
  var need = size >= 24 || (bold && size >= 18.66) ? 3 : 4.5;
  if (ratio < need) { bad.push(e.tagName + " '" + e.textContent.trim().slice(0, 30) + "' " + ratio.toFixed(2)); }
});
return bad;
"#;

/// `Ok` if no visible text on the page is below AA contrast.
fn contrast_ok(b: &Browser) -> Result<(), String> {
    let bad = b.eval(LOW_CONTRAST, json!([]))?;
    if bad.as_array().is_some_and(Vec::is_empty) {
        Ok(())
    } else {
        Err(format!("low contrast: {bad}"))
    }
}

const SHUT_DOWN: &str = r#"
var done = arguments[arguments.length - 1];
var xsrf = (document.cookie.match(/(?:^|; )_xsrf=([^;]*)/) || [])[1] || "";
fetch("/api/shutdown", { method: "POST", headers: { "X-XSRFToken": decodeURIComponent(xsrf) } })
  .then(function (r) { done(r.ok ? [] : ["shutdown answered " + r.status]); },
        function (e) { done(["shutdown failed: " + e]); });
"#;

#[test]
fn a_user_waits_in_the_browser_then_works_in_jupyterlab_through_the_proxy() {
    let started = Instant::now();
    let lab = jupyterlab();
    assert!(lab.exists(), "no {}", lab.display());
    let shots = shots();
    let work = tempfile::tempdir().unwrap();
    let apache = Apache::start(Routing::Map);

    // galyleo on the login node: a token, then the job id.
    let token = apache.getlink();
    link_job(&apache, &token, JOB_ID);
    let jupyter_token = format!("e2e{}", std::process::id());
    let url = format!("{}/lab?token={jupyter_token}", apache.origin(&token));

    let b = Browser::start(DOMAIN);
    b.goto(&url);
    b.wait_for("the pending state", STATE_WAIT, |b| {
        status_is(b, "Waiting for your job to be scheduled.")
    });
    // The shipped site.json names no site: the page shows the domain.
    assert_eq!(b.text("#site").as_deref(), Some(DOMAIN));
    fs::write(
        apache.path("html/satellite/site.json"),
        r#"{"name": "Example Supercomputer Center", "help": "https://example.test/help", "help_text": "User guide"}"#,
    )
    .unwrap();
    b.goto(&url);
    b.wait_for("the site's own name", STATE_WAIT, |b| {
        let shown = b.text("#site");
        match shown.as_deref() {
            Some("Example Supercomputer Center") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let help = b
        .eval(
            "var a = document.getElementById('help'); return [a.hidden, a.href, a.textContent];",
            json!([]),
        )
        .unwrap();
    assert_eq!(
        help,
        json!([false, "https://example.test/help", "User guide"])
    );
    b.screenshot(&shots.join("01-pending.png"));
    // Keyboard: the first Tab reaches the help link.
    b.keys("\u{E004}").unwrap();
    let focused = b.eval("return document.activeElement.id;", json!([]));
    assert_eq!(focused, Ok(json!("help")), "Tab should reach the help link");

    push_job(&apache, JOB_ID, "PENDING", "Priority", 600);
    b.wait_for("the queued state with the job's details", STATE_WAIT, |b| {
        status_is(b, "Your job is in the queue.")?;
        if detail(b, "id")? != JOB_ID || detail(b, "reason")? != "Priority" {
            return Err("job id or reason".into());
        }
        detail(b, "eta")
    });
    b.screenshot(&shots.join("02-queued.png"));
    contrast_ok(&b).unwrap();
    // The check itself notices light grey on white (2.3:1).
    b.eval(
        "var p = document.createElement('p'); p.id = 'probe'; p.textContent = 'probe';\
         p.style.color = '#aaaaaa'; document.querySelector('main').appendChild(p);",
        json!([]),
    )
    .unwrap();
    assert!(
        contrast_ok(&b).is_err(),
        "the contrast check missed a probe"
    );
    b.eval("document.getElementById('probe').remove();", json!([]))
        .unwrap();
    // A phone: nothing wider than the screen.
    b.resize(390, 800);
    b.wait_for("the page fitting a phone", STATE_WAIT, |b| {
        let fits = b.eval(
            "return document.documentElement.scrollWidth <= window.innerWidth;",
            json!([]),
        )?;
        if fits == json!(true) {
            Ok(())
        } else {
            Err("wider than the window".into())
        }
    });
    b.screenshot(&shots.join("02-queued-phone.png"));
    b.resize(800, 900);

    push_job(&apache, JOB_ID, "RUNNING", "None", -5);
    b.wait_for(
        "the starting state with time run and left",
        STATE_WAIT,
        |b| {
            status_is(b, "Your job is running and starting your application.")?;
            detail(b, "since")?;
            detail(b, "left")
        },
    );
    let current = b.eval(
        "return document.querySelector('#steps li[aria-current=step]').dataset.step;",
        json!([]),
    );
    assert_eq!(current, Ok(json!("starting")));
    b.screenshot(&shots.join("03-starting.png"));

    // The job redeems before Jupyter listens (as galyleo does): the page
    // reloads into the retry page, which keeps trying.
    let reserved = ReservedPort::on(COMPUTE_NODE);
    let port = reserved.port;
    apache.redeem_ok(&token, COMPUTE_NODE, port);
    b.wait_for("the retry page", STATE_WAIT, |b| {
        let title = b.title();
        if title == "Your session is almost ready" {
            Ok(())
        } else {
            Err(format!("title {title:?}"))
        }
    });
    assert_eq!(b.url(), url, "the reload must keep the URL and its query");
    b.screenshot(&shots.join("04-retry.png"));
    contrast_ok(&b).unwrap();

    // Jupyter binds the port itself: the reservation ends just before, and
    // with --port-retries=0 a port taken in between fails loudly.
    drop(reserved);
    let mut jupyter = start_jupyterlab(work.path(), port, &jupyter_token);
    b.wait_for("JupyterLab, by itself", LAB_WAIT, |b| {
        if let Ok(Some(status)) = jupyter.0.try_wait() {
            panic!(
                "JupyterLab exited ({status}):\n{}",
                jupyter_log(work.path())
            );
        }
        let ready = b.eval(
            "return !!document.querySelector('.jp-LauncherCard') && window.location.pathname;",
            json!([]),
        )?;
        if ready.as_str().is_some_and(|p| p.starts_with("/lab")) {
            Ok(())
        } else {
            Err(format!(
                "{ready}; jupyter log:\n{}",
                jupyter_log(work.path())
            ))
        }
    });
    b.screenshot(&shots.join("05-jupyterlab.png"));
    let protocol = b.eval(
        "return performance.getEntriesByType('navigation')[0].nextHopProtocol;",
        json!([]),
    );
    assert_eq!(protocol, Ok(json!("h2")), "the browser should speak HTTP/2");

    // A notebook; a cell through the kernel's websocket.
    b.wait_for("a new notebook", LAB_WAIT, |b| {
        b.click(".jp-LauncherCard[data-category='Notebook']")?;
        Ok(())
    });
    b.wait_for("the notebook's first cell", LAB_WAIT, |b| {
        b.click(".jp-NotebookPanel .jp-Cell .cm-content")
    });
    // On a loaded machine the kernel may still be starting when the cell is
    // run, and JupyterLab can drop the keystrokes: whenever no output has
    // come for a while, type what is missing and run the cell again (running
    // `print(6*7)` twice changes nothing).
    const CELL: &str = ".jp-NotebookPanel .jp-Cell .cm-content";
    const RUN: &str = "\u{E008}\u{E007}\u{E000}";
    let mut last_try: Option<Instant> = None;
    b.wait_for("the cell's output", LAB_WAIT, |b| {
        match b.text(".jp-NotebookPanel .jp-OutputArea-output") {
            Some(text) if text.trim() == "42" => return Ok(()),
            _ => {}
        }
        if last_try.is_none_or(|at| at.elapsed() > Duration::from_secs(15)) {
            last_try = Some(Instant::now());
            let typed = b.text(CELL).unwrap_or_default();
            let keys = if typed.contains("print(6*7)") {
                RUN.to_owned()
            } else {
                format!("print(6*7){RUN}")
            };
            b.click(CELL)?;
            b.type_into(CELL, &keys)?;
        }
        Err(format!(
            "output {:?}",
            b.text(".jp-NotebookPanel .jp-OutputArea-output")
        ))
    });
    b.screenshot(&shots.join("06-cell-42.png"));

    // Files whose names hold URL syntax: create, open, save, download.
    b.wait_for("files round-tripping", STATE_WAIT, |b| {
        problems(b, ROUND_TRIP_FILES, json!([FILE_NAMES]))
    });
    // Deep links open each file in the editor (JupyterLab keeps the tabs
    // of earlier loads open, hidden: the visible editor is the one linked).
    for name in FILE_NAMES {
        let encoded: String = name
            .bytes()
            .map(|c| match c {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_' => {
                    (c as char).to_string()
                }
                _ => format!("%{c:02X}"),
            })
            .collect();
        b.goto(&format!("{}/lab/tree/{encoded}", apache.origin(&token)));
        b.wait_for(&format!("{name} opened by a deep link"), LAB_WAIT, |b| {
            let found = b.eval(
                "var want = arguments[0];\
                 var tabs = document.querySelectorAll('#jp-main-dock-panel .lm-TabBar-tabLabel');\
                 var named = Array.prototype.some.call(tabs, function (t) { return t.textContent === want; });\
                 var editor = document.querySelector('#jp-main-dock-panel .jp-FileEditor:not(.lm-mod-hidden) .cm-content');\
                 return named && !!editor && editor.textContent;",
                json!([name]),
            )?;
            if found.as_str() == Some(&format!("saved {name}")) {
                Ok(())
            } else {
                Err(found.to_string())
            }
        });
    }
    b.screenshot(&shots.join("07-deep-link.png"));

    // The user shuts JupyterLab down; the job ends and says so.
    b.wait_for("JupyterLab shutting down", STATE_WAIT, |b| {
        problems(b, SHUT_DOWN, json!([]))
    });
    let down = Instant::now();
    while TcpStream::connect((COMPUTE_NODE, port)).is_ok() {
        assert!(
            down.elapsed() < LAB_WAIT,
            "JupyterLab still listens after shutdown"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The job's script destroys its token as galyleo's does, then ends;
    // the scheduler says so. The page says the user shut it down.
    apache.destroy_ok(&token, COMPUTE_NODE);
    push_job(&apache, JOB_ID, "COMPLETED", "None", -60);
    b.goto(&url);
    b.wait_for("the ended page", STATE_WAIT, |b| {
        title_is(b, "This session was shut down.")?;
        detail(b, "ended")
    });
    b.screenshot(&shots.join("08-ended.png"));
    contrast_ok(&b).unwrap();

    // A link nobody issued, and a job that died before it redeemed.
    b.goto(&format!("{}/lab", apache.origin("no-such-token-here")));
    b.wait_for("the unknown-link page", STATE_WAIT, |b| {
        title_is(b, "This link has expired or is unknown.")
    });
    b.screenshot(&shots.join("09-unknown.png"));
    let failed = apache.getlink();
    link_job(&apache, &failed, "4343");
    push_job(&apache, "4343", "FAILED", "NonZeroExitCode", -30);
    b.goto(&apache.origin(&failed));
    b.wait_for("the failed-to-start page", STATE_WAIT, |b| {
        title_is(b, "The job failed to start.")
    });
    b.screenshot(&shots.join("10-failed.png"));

    // Each other ending tells its own news.
    let endings = [
        (
            "4401",
            "revoke",
            "This session was ended by an administrator.",
        ),
        ("4402", "TIMEOUT", "This session reached its time limit."),
        ("4403", "CANCELLED", "This session's job was cancelled."),
    ];
    for (job, ending, title) in endings {
        let ended = apache.getlink();
        link_job(&apache, &ended, job);
        if ending == "revoke" {
            apache.revoke_ok(&ended);
        } else {
            push_job(&apache, job, ending, "None", -30);
        }
        b.goto(&apache.origin(&ended));
        b.wait_for(&format!("the page after {ending}"), STATE_WAIT, |b| {
            title_is(b, title)
        });
        b.screenshot(&shots.join(format!("11-{}.png", ending.to_ascii_lowercase())));
    }
    eprintln!("browser path done in {:?}", started.elapsed());
}
