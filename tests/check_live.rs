//! Issue 20: `satellite check --live` passes on a working site and fails,
//! naming the cause, when the listener, the domain or the watcher is
//! wrong (the certificate and the database: tests/apache_routing.rs).

mod support;

use support::apache::{Apache, Routing};

/// `check --live` trusting the test's private CA.
fn check_live(apache: &Apache) -> String {
    let ca = apache.path("check-ca.pem");
    std::fs::write(&ca, &apache.ca_pem).unwrap();
    apache.check_live(&["--cacert", ca.to_str().unwrap()])
}

/// The watcher is what closes an ended session's websocket: without one,
/// `--live` fails on it; with one, it passes, each step said.
#[test]
fn check_live_fails_on_the_missing_watcher_and_passes_with_one() {
    let apache = Apache::start(Routing::Map);
    let report = check_live(&apache);
    for line in [
        "OK   live: a websocket to https://",
        "FAIL live: after destroy, the websocket to https://",
        "was still open 5 s later: ended sessions keep their open connections",
        "fix: run the watcher (systemctl enable --now satellite-cron, or cron --watch under your supervisor)",
    ] {
        assert!(report.contains(line), "{line}\n{report}");
    }

    let _watcher = apache.run_watcher();
    apache.await_watcher_saying("watching the database");
    let report = check_live(&apache);
    for line in [
        "OK   watcher ",
        "OK   live: getlink from 127.0.0.1 gave a token",
        "OK   live: redeem from 127.0.0.1 to a temporary backend on port ",
        "OK   live: a websocket to https://",
        "ms later (cron --watch cut it)",
        "OK   live: after destroy, https://",
    ] {
        assert!(report.contains(line), "{line}\n{report}");
    }
    assert!(!report.contains("FAIL live"), "{report}");
}

/// Apache's domain not the configuration's: said, with the fix.
#[test]
fn check_live_names_a_domain_apache_does_not_serve() {
    let apache = Apache::start(Routing::Map);
    apache.write_config(&[("extbasename", "\"example.net\"".to_owned())]);
    let report = check_live(&apache);
    for line in [
        "FAIL Apache's SATELLITE_DOMAIN is \"example.test\" but extbasename is \"example.net\": users' URLs would not reach satellite",
        "fix: Define SATELLITE_DOMAIN example.net before satellite.conf is read",
        "FAIL the certificate Apache serves on 127.0.0.1:",
    ] {
        assert!(report.contains(line), "{line}\n{report}");
    }
}

/// Nothing listening on Apache's HTTPS port: every step says so, and
/// where to look.
#[test]
fn check_live_names_a_missing_listener() {
    let mut apache = Apache::start(Routing::Map);
    apache.stop();
    let report = check_live(&apache);
    for line in [
        "FAIL live: getlink: `curl ",
        "Connection refused",
        "fix: Apache must answer TLS there (see the TLS findings); --connect names another listener",
    ] {
        assert!(report.contains(line), "{line}\n{report}");
    }
    assert!(!report.contains("OK   live:"), "{report}");
}
