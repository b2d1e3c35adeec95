//! A real Chromium driven over W3C WebDriver: Debian's `chromedriver`
//! started on a loopback port of its own, spoken to with a few lines of
//! HTTP/1.1 and JSON. Only what the browser tests use: open a URL, run a
//! script in the page, find, click and type into elements, take
//! screenshots, resize the window.
//!
//! Chromium resolves the test domain to 127.0.0.1 by a host resolver rule
//! (no DNS, no /etc/hosts) and accepts the test CA's certificate; it runs
//! headless with a fresh profile and none of its background traffic.

#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

/// The key WebDriver names an element reference by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    driver: Option<Child>,
    addr: SocketAddr,
    session: String,
    _profile: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts chromedriver on a free port and waits until it is ready. The
/// port is picked before chromedriver binds it, so another process may take
/// it in between: a chromedriver that exits is started again on another.
fn start_driver() -> (Child, SocketAddr) {
    for _attempt in 0..5 {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut driver = Command::new("chromedriver")
            .arg(format!("--port={}", addr.port()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver (Debian package chromium-driver)");
        let started = Instant::now();
        loop {
            let ready = call(addr, "GET", "/status", None)
                .ok()
                .and_then(|v| v.get("ready").and_then(Value::as_bool));
            if ready == Some(true) {
                return (driver, addr);
            }
            if driver.try_wait().unwrap().is_some() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "chromedriver did not get ready"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
    panic!("chromedriver exited at start five times");
}

/// One request to chromedriver on a fresh connection; the JSON answer's
/// `value`, or its error as text.
fn call(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
    let io = |e: io::Error| format!("{method} {path}: {e}");
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(io)?;
    tcp.set_read_timeout(Some(Duration::from_secs(300)))
        .map_err(io)?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).map_err(io)?;
    // chromedriver keeps the connection open: read the head, then exactly
    // the body it announces.
    let mut raw = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    let split = loop {
        if let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break split;
        }
        let n = tcp.read(&mut chunk).map_err(io)?;
        if n == 0 {
            return Err(format!("{method} {path}: no HTTP answer"));
        }
        raw.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let mut payload = raw[split + 4..].to_vec();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = head.contains("transfer-encoding: chunked");
    loop {
        let complete = match length {
            Some(length) => payload.len() >= length,
            None if chunked => payload.windows(5).any(|w| w == b"0\r\n\r\n"),
            None => false,
        };
        if complete {
            break;
        }
        let n = tcp.read(&mut chunk).map_err(io)?;
        if n == 0 {
            break;
        }
        payload.extend_from_slice(&chunk[..n]);
    }
    if chunked {
        payload = dechunk(&payload);
    }
    let answer: Value = serde_json::from_slice(&payload).map_err(|e| {
        format!(
            "{method} {path}: not JSON ({e}): {}",
            String::from_utf8_lossy(&payload)
        )
    })?;
    let value = answer.get("value").cloned().unwrap_or(Value::Null);
    if value.get("error").is_some() {
        return Err(format!("{method} {path}: {value}"));
    }
    Ok(value)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&data[..eol])
                .split(';')
                .next()
                .unwrap_or("")
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = eol + 2;
        let end = (start + size).min(data.len());
        out.extend_from_slice(&data[start..end]);
        data = &data[(end + 2).min(data.len())..];
    }
    out
}

impl Browser {
    /// Starts chromedriver and a headless Chromium for which `domain` and
    /// its subdomains are 127.0.0.1.
    pub fn start(domain: &str) -> Browser {
        let (driver, addr) = start_driver();
        let profile = tempfile::Builder::new()
            .prefix("satellite-chromium-")
            .tempdir()
            .unwrap();
        let mut browser = Browser {
            driver: Some(driver),
            addr,
            session: String::new(),
            _profile: profile,
        };
        let args = vec![
            "--headless".to_owned(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            "--ignore-certificate-errors".into(),
            format!("--user-data-dir={}", browser._profile.path().display()),
            format!("--host-resolver-rules=MAP {domain} 127.0.0.1, MAP *.{domain} 127.0.0.1"),
            "--window-size=800,900".into(),
            "--lang=en-US".into(),
        ];
        let capabilities = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "acceptInsecureCerts": true,
                "goog:chromeOptions": { "binary": "/usr/bin/chromium", "args": args }
            }}
        });
        let session = call(addr, "POST", "/session", Some(&capabilities))
            .unwrap_or_else(|e| panic!("no Chromium session: {e}"));
        browser.session = session["sessionId"].as_str().unwrap_or_default().to_owned();
        assert!(!browser.session.is_empty(), "no session id in {session}");
        browser.post(
            "/timeouts",
            json!({ "script": 120_000, "pageLoad": 120_000 }),
        );
        browser
    }

    fn post(&self, path: &str, body: Value) -> Value {
        self.try_post(path, body).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_post(&self, path: &str, body: Value) -> Result<Value, String> {
        call(
            self.addr,
            "POST",
            &format!("/session/{}{path}", self.session),
            Some(&body),
        )
    }

    /// Opens `url` and waits for its load event.
    pub fn goto(&self, url: &str) {
        self.post("/url", json!({ "url": url }));
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the
    /// page and returns its result.
    pub fn eval(&self, script: &str, args: Value) -> Result<Value, String> {
        self.try_post("/execute/sync", json!({ "script": script, "args": args }))
    }

    /// Like [`Browser::eval`], for a script that calls its last argument
    /// (the callback) when done, e.g. after `fetch`.
    pub fn eval_async(&self, script: &str, args: Value) -> Result<Value, String> {
        self.try_post("/execute/async", json!({ "script": script, "args": args }))
    }

    /// `document.querySelector(css).textContent`, if there is one.
    pub fn text(&self, css: &str) -> Option<String> {
        self.eval(
            "var e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
            json!([css]),
        )
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
    }

    pub fn url(&self) -> String {
        self.eval("return window.location.href;", json!([]))
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    pub fn title(&self) -> String {
        self.eval("return document.title;", json!([]))
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    fn element(&self, css: &str) -> Result<String, String> {
        let found = self.try_post("/element", json!({ "using": "css selector", "value": css }))?;
        found[ELEMENT]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no element reference in {found}"))
    }

    pub fn click(&self, css: &str) -> Result<(), String> {
        let id = self.element(css)?;
        self.try_post(&format!("/element/{id}/click"), json!({}))
            .map(|_| ())
    }

    /// Types `keys` into the element (WebDriver key codes allowed, e.g.
    /// `\u{E008}` Shift, `\u{E007}` Enter, `\u{E000}` release all).
    pub fn type_into(&self, css: &str, keys: &str) -> Result<(), String> {
        let id = self.element(css)?;
        self.try_post(&format!("/element/{id}/value"), json!({ "text": keys }))
            .map(|_| ())
    }

    /// Presses keys with the focus where it is.
    pub fn keys(&self, keys: &str) -> Result<(), String> {
        let actions: Vec<Value> = keys
            .chars()
            .flat_map(|c| {
                let c = c.to_string();
                [
                    json!({ "type": "keyDown", "value": c }),
                    json!({ "type": "keyUp", "value": c }),
                ]
            })
            .collect();
        self.try_post(
            "/actions",
            json!({ "actions": [{ "type": "key", "id": "keyboard", "actions": actions }] }),
        )
        .map(|_| ())
    }

    pub fn resize(&self, width: u32, height: u32) {
        self.post("/window/rect", json!({ "width": width, "height": height }));
    }

    /// Saves a PNG of the viewport to `path`.
    pub fn screenshot(&self, path: &Path) {
        let shot = call(
            self.addr,
            "GET",
            &format!("/session/{}/screenshot", self.session),
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot.as_str().unwrap_or_default())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// Polls `f` until it gives `Ok`, for up to `limit`; panics with `what`
    /// and the last observation otherwise.
    #[track_caller]
    pub fn wait_for<T>(
        &self,
        what: &str,
        limit: Duration,
        mut f: impl FnMut(&Browser) -> Result<T, String>,
    ) -> T {
        let start = Instant::now();
        loop {
            match f(self) {
                Ok(value) => return value,
                Err(last) if start.elapsed() > limit => {
                    panic!(
                        "{what}: not within {limit:?}; last: {last}; at {}",
                        self.url()
                    )
                }
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = call(
                self.addr,
                "DELETE",
                &format!("/session/{}", self.session),
                None,
            );
        }
        if let Some(mut driver) = self.driver.take() {
            let _ = driver.kill();
            let _ = driver.wait();
        }
    }
}
