//! The `cron` program against a real database and real files, with the
//! Apache commands replaced by real programs whose outcome the test
//! chooses (the real-Apache runs are in apache_routing.rs).

mod support;

use std::process::Command;

use support::apache::Running;
use support::*;

/// `cron --verbose`, so that the output tells what a run did.
fn cron(site: &Site, args: &[&str]) -> std::process::Output {
    Command::new(program("cron"))
        .arg("--verbose")
        .args(args)
        .env("SATELLITE_CONFIG", &site.config)
        .output()
        .unwrap()
}

fn vhost_site(configtest: &str, reload: &str) -> Site {
    Site::with_config(&format!(
        "routing = \"vhost\"\napache_configtest = [\"{configtest}\"]\napache_reload = [\"{reload}\"]"
    ))
}

#[test]
fn vhost_routing_writes_tests_reloads_and_only_then_marks_proxied() {
    let site = vhost_site("/bin/true", "/bin/true");
    let token = site.redeemed_token(COMPUTE_NODE, 8888);
    assert_eq!(site.state_of(&token).as_deref(), Some("mapped"));
    let out = cron(&site, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "satellite cron: 1 route(s) published, Apache reloaded, 1 now proxied\n"
    );
    assert_eq!(site.state_of(&token).as_deref(), Some("proxied"));
    let conf = std::fs::read_to_string(site.path("dynconf/proxyconf.conf")).unwrap();
    assert!(
        conf.contains(&format!("ServerName {token}.{EXT}\n")),
        "{conf}"
    );
    assert!(conf.contains(&format!("ProxyPass \"/\" \"http://{COMPUTE_NODE}:8888/\"")));

    // Nothing changed: nothing written, nothing reloaded, nothing printed.
    let mtime = std::fs::metadata(site.path("dynconf/proxyconf.conf"))
        .unwrap()
        .modified()
        .unwrap();
    let out = cron(&site, &[]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    let again = std::fs::metadata(site.path("dynconf/proxyconf.conf"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(mtime, again);
}

#[test]
fn a_failing_config_test_puts_the_previous_file_back_and_leaves_rows_mapped() {
    let site = vhost_site("/bin/true", "/bin/true");
    let first = site.redeemed_token(COMPUTE_NODE, 8888);
    assert!(cron(&site, &[]).status.success());
    let good = std::fs::read(site.path("dynconf/proxyconf.conf")).unwrap();

    let broken = site.config.clone();
    let text = std::fs::read_to_string(&broken).unwrap().replace(
        "apache_configtest = [\"/bin/true\"]",
        "apache_configtest = [\"/bin/sh\", \"-c\", \"echo AH00526: Syntax error >&2; exit 1\"]",
    );
    std::fs::write(&broken, text).unwrap();
    let second = site.redeemed_token(OTHER_COMPUTE_NODE, 9999);
    let out = cron(&site, &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("config test failed"), "{stderr}");
    assert!(stderr.contains("AH00526: Syntax error"), "{stderr}");
    assert_eq!(
        std::fs::read(site.path("dynconf/proxyconf.conf")).unwrap(),
        good
    );
    assert_eq!(site.state_of(&first).as_deref(), Some("proxied"));
    assert_eq!(site.state_of(&second).as_deref(), Some("mapped"));
}

#[test]
fn a_failed_reload_leaves_rows_mapped_and_the_next_run_reloads_again() {
    let site = vhost_site("/bin/true", "/bin/false");
    let token = site.redeemed_token(COMPUTE_NODE, 8888);
    let out = cron(&site, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("reload command `/bin/false` failed"));
    assert_eq!(site.state_of(&token).as_deref(), Some("mapped"));

    let fixed = std::fs::read_to_string(&site.config)
        .unwrap()
        .replace("/bin/false", "/bin/true");
    std::fs::write(&site.config, fixed).unwrap();
    let out = cron(&site, &[]);
    assert!(out.status.success());
    assert_eq!(site.state_of(&token).as_deref(), Some("proxied"));
}

#[test]
fn the_default_reload_signals_the_pid_in_the_pidfile() {
    // A real process stands in for Apache's parent: it must get SIGUSR1.
    let mut apache = Running(
        Command::new("sh")
            .args([
                "-c",
                "trap 'echo got-usr1; exit 0' USR1; echo ready; while :; do sleep 0.05; done",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Only once the trap is set may the signal come.
    let mut said = std::io::BufReader::new(apache.0.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut said, &mut line).unwrap();
    assert_eq!(line, "ready\n");
    let site = Site::with_config("routing = \"vhost\"\napache_configtest = [\"/bin/true\"]\napache_pidfile = \"../apache.pid\"");
    std::fs::write(site.path("apache.pid"), format!("{}\n", apache.0.id())).unwrap();
    let token = site.redeemed_token(COMPUTE_NODE, 8888);
    let out = cron(&site, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = std::time::Instant::now() + support::apache::DEADLINE;
    let status = loop {
        if let Some(status) = apache.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the stand-in for Apache got no SIGUSR1"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(status.success());
    line.clear();
    std::io::Read::read_to_string(&mut said, &mut line).unwrap();
    assert_eq!(line, "got-usr1\n");
    assert_eq!(site.state_of(&token).as_deref(), Some("proxied"));
}

#[test]
fn expired_rows_of_every_state_go_and_fresh_ones_stay() {
    let site = Site::with_config("ttl_secs = 3600\napache_configtest = [\"/bin/true\"]");
    let fresh = site.new_token();
    let old_pending = site.new_token();
    let old_mapped = site.redeemed_token(COMPUTE_NODE, 8888);
    let conn = site.db();
    conn.execute(
        "UPDATE proxy SET modified = datetime('now', '-2 hours') WHERE alias IN (?1, ?2)",
        [&old_pending, &old_mapped],
    )
    .unwrap();
    let out = cron(&site, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("expired 2 token(s)"));
    assert_eq!(site.state_of(&fresh).as_deref(), Some("pending"));
    assert_eq!(site.state_of(&old_pending), None);
    assert_eq!(site.state_of(&old_mapped), None);
    assert!(
        routes_table(&site)
            .iter()
            .all(|(alias, _)| *alias != old_mapped),
        "{:?}",
        routes_table(&site)
    );
}

#[test]
fn rows_that_fail_validation_are_never_written() {
    let site = vhost_site("/bin/true", "/bin/true");
    let good = site.redeemed_token(COMPUTE_NODE, 8888);
    let conn = site.db();
    for (alias, host, port) in [
        ("evil-row-one", "10.21.3.4\n<Directory />", "8888"),
        ("evil-row-two", "192.0.2.66", "8888"),
        ("evil-row-three", "10.21.3.5", "22"),
        ("Bad_Alias", "10.21.3.6", "8888"),
    ] {
        conn.execute(
            "INSERT INTO proxy (alias, alias_compare_hash, dsthost, dstport, state) VALUES (?1, ?1, ?2, ?3, 'mapped')",
            [alias, host, port],
        )
        .unwrap();
    }
    let out = cron(&site, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conf = std::fs::read_to_string(site.path("dynconf/proxyconf.conf")).unwrap();
    assert_eq!(conf.matches("<VirtualHost").count(), 1, "{conf}");
    assert!(conf.contains(&good));
    for bad in ["Directory", "192.0.2.66", ":22/", "Bad_Alias"] {
        assert!(!conf.contains(bad), "{bad} in {conf}");
    }
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("not written")
            .count(),
        4
    );
    assert_eq!(site.state_of("evil-row-two").as_deref(), Some("mapped"));
}

#[test]
fn a_deleted_generated_file_is_recreated() {
    let site = vhost_site("/bin/true", "/bin/true");
    let token = site.redeemed_token(COMPUTE_NODE, 8888);
    assert!(cron(&site, &[]).status.success());
    std::fs::remove_file(site.path("dynconf/proxyconf.conf")).unwrap();
    let out = cron(&site, &[]);
    assert!(out.status.success());
    let conf = std::fs::read_to_string(site.path("dynconf/proxyconf.conf")).unwrap();
    assert!(conf.contains(&token));
}

#[test]
fn a_second_cron_while_one_runs_exits_zero_at_once() {
    let site = vhost_site("/bin/true", "/bin/true");
    let token = site.redeemed_token(COMPUTE_NODE, 8888);
    // The test is the run in progress: it holds the run lock until the
    // second cron has exited. A cron that waited for the lock instead of
    // skipping would never exit while the lock is held.
    let lock = std::fs::File::open(site.path("dynconf/.satellite.lock"))
        .or_else(|_| std::fs::File::create(site.path("dynconf/.satellite.lock")))
        .unwrap();
    lock.lock().unwrap();
    let mut second = Command::new(program("cron"))
        .arg("--verbose")
        .env("SATELLITE_CONFIG", &site.config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + support::apache::DEADLINE;
    while second.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            second.kill().unwrap();
            panic!("the second cron waited for the lock instead of exiting");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let second = second.wait_with_output().unwrap();
    assert_eq!(second.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&second.stdout), "");
    assert_eq!(String::from_utf8_lossy(&second.stderr), "");
    // It skipped: nothing written, nothing marked.
    assert_eq!(site.state_of(&token).as_deref(), Some("mapped"));
    assert!(
        !std::fs::read_to_string(site.path("dynconf/proxyconf.conf"))
            .unwrap_or_default()
            .contains(&token)
    );
    // Once the lock is free, the same command does the run.
    drop(lock);
    let third = cron(&site, &[]);
    assert!(third.status.success());
    assert_eq!(site.state_of(&token).as_deref(), Some("proxied"));
}

#[test]
fn watch_publishes_a_redeem_without_a_manual_run() {
    let site = vhost_site("/bin/true", "/bin/true");
    let watcher = Running(
        Command::new(program("cron"))
            .arg("--watch")
            .env("SATELLITE_CONFIG", &site.config)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let token = site.redeemed_token(COMPUTE_NODE, 8888);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while site.state_of(&token).as_deref() != Some("proxied") {
        assert!(
            std::time::Instant::now() < deadline,
            "watch never published"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // While the watcher runs, a crontab cron exits at once.
    assert!(cron(&site, &[]).status.success());
    drop(watcher);
}

/// A redeem committed while a watcher's run is in progress (here: held in
/// Apache's config test) is published by the next run, not at the idle run
/// a minute later.
#[test]
fn watch_publishes_a_redeem_committed_during_a_run_without_waiting() {
    let site = Site::new();
    let started = site.path("configtest-started");
    let gate = site.path("configtest-gate");
    let held_test = format!(
        "touch '{}'; while [ ! -e '{}' ]; do sleep 0.05; done",
        started.display(),
        gate.display()
    );
    let text = std::fs::read_to_string(&site.config).unwrap();
    std::fs::write(
        &site.config,
        format!(
            "{text}\nrouting = \"vhost\"\napache_configtest = [\"/bin/sh\", \"-c\", {held_test:?}]\napache_reload = [\"/bin/true\"]\n"
        ),
    )
    .unwrap();
    // On a failure below, the held config test must still end: the gate
    // opens (before the site's directory goes) and the watcher is stopped.
    let _open_gate_at_end = OpenGate(gate.clone());
    let watcher = Running(
        Command::new(program("cron"))
            .arg("--watch")
            .env("SATELLITE_CONFIG", &site.config)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let first = site.redeemed_token(COMPUTE_NODE, 8888);
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        // Half the idle run: a lost wake-up would wait for the idle run.
        let deadline = std::time::Instant::now() + satellite_cron::WATCH_IDLE_RUN / 2;
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    wait_for("the watcher's run never reached the config test", &|| {
        started.exists()
    });
    let second = site.redeemed_token(OTHER_COMPUTE_NODE, 9999);
    std::fs::write(&gate, "").unwrap();
    wait_for(
        "the redeem made during the run waited for the idle run",
        &|| site.state_of(&second).as_deref() == Some("proxied"),
    );
    assert_eq!(site.state_of(&first).as_deref(), Some("proxied"));
    drop(watcher);
}

/// Creates the gate file when dropped, so that a config test held until
/// it exists does not outlive a failed test.
struct OpenGate(std::path::PathBuf);

impl Drop for OpenGate {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, "");
    }
}

/// A writer killed mid-write leaves a temporary file; one with the same pid
/// later must still publish, and the leftover goes at the next write.
#[test]
fn leftovers_of_a_killed_writer_never_block_publication_and_are_cleaned() {
    let site = vhost_site("/bin/true", "/bin/true");
    let leftover = site.path(&format!(
        "dynconf/.proxyconf.conf.tmp.{}",
        std::process::id()
    ));
    std::fs::write(&leftover, "half a <VirtualHost").unwrap();
    let token = site.redeemed_token(COMPUTE_NODE, 8888);
    let out = cron(&site, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(site.state_of(&token).as_deref(), Some("proxied"));
    assert!(!leftover.exists());
    let temps: Vec<String> = std::fs::read_dir(site.path("dynconf"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp."))
        .collect();
    assert!(temps.is_empty(), "{temps:?}");
}

#[test]
fn cron_refuses_a_missing_database_and_a_bad_config_clearly() {
    let site = Site::without_database("");
    let out = cron(&site, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not exist"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!site.db.exists());

    std::fs::write(&site.config, "tgtipmask = [\"10.1.1.1/24\"]\n").unwrap();
    let out = cron(&site, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has host bits set"));
}

fn routes_table(site: &Site) -> Vec<(String, String)> {
    let conn = site.db();
    let mut stmt = conn
        .prepare("SELECT alias, target FROM routes ORDER BY alias")
        .unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    rows
}

/// Map routing: cron is the repair pass. A row another program redeemed
/// (the Perl script, a hand edit) gets its route; a row whose route is
/// refused now (tgtipmask narrowed) loses it and is `mapped` again, so its
/// state says what is routed.
#[test]
fn in_map_routing_cron_routes_rows_others_wrote_and_unroutes_refused_ones() {
    let site = Site::new();
    let kept = site.redeemed_token(COMPUTE_NODE, 8888);
    let narrowed = site.redeemed_token(OTHER_COMPUTE_NODE, 8888);
    let by_perl = site.new_token();
    site.db()
        .execute(
            "UPDATE proxy SET state = 'mapped', dsthost = ?1, dstport = 9999 WHERE alias = ?2",
            [COMPUTE_NODE, by_perl.as_str()],
        )
        .unwrap();
    let text = std::fs::read_to_string(&site.config)
        .unwrap()
        .replace("\"10.21.0.0/16\"", "\"10.21.3.0/24\"");
    std::fs::write(&site.config, text).unwrap();

    let out = cron(&site, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("is outside tgtipmask"), "{stdout}");
    let mut expected = vec![
        (kept.clone(), format!("{COMPUTE_NODE}:8888")),
        (by_perl.clone(), format!("{COMPUTE_NODE}:9999")),
    ];
    expected.sort();
    assert_eq!(routes_table(&site), expected);
    assert_eq!(site.state_of(&by_perl).as_deref(), Some("proxied"));
    assert_eq!(site.state_of(&narrowed).as_deref(), Some("mapped"));

    // Nothing left to repair: a second run changes nothing and says nothing
    // but the refusal.
    let again = cron(&site, &[]);
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(!stdout.contains("published"), "{stdout}");
    assert_eq!(routes_table(&site), expected);
}

/// Vhost routing keeps "`proxied` means routed" too: a row whose route
/// became invalid (tgtipmask narrowed) leaves the file and is `mapped`
/// again once Apache is reloaded without it, and its end is recorded for
/// the watchers, which cut its open tunnels.
#[test]
fn in_vhost_routing_a_row_whose_route_became_invalid_is_no_longer_proxied() {
    let site = vhost_site("/bin/true", "/bin/true");
    let kept = site.redeemed_token(COMPUTE_NODE, 8888);
    let narrowed = site.redeemed_token(OTHER_COMPUTE_NODE, 8888);
    let first = cron(&site, &[]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(site.state_of(&narrowed).as_deref(), Some("proxied"));
    let text = std::fs::read_to_string(&site.config)
        .unwrap()
        .replace("\"10.21.0.0/16\"", "\"10.21.3.0/24\"");
    std::fs::write(&site.config, text).unwrap();

    let out = cron(&site, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(site.state_of(&kept).as_deref(), Some("proxied"));
    assert_eq!(site.state_of(&narrowed).as_deref(), Some("mapped"));
    let ended: Vec<String> = {
        let db = site.db();
        let mut stmt = db.prepare("SELECT target FROM route_ends").unwrap();
        let rows = stmt.query_map([], |r| r.get(0)).unwrap();
        rows.map(Result::unwrap).collect()
    };
    assert_eq!(ended, [format!("{OTHER_COMPUTE_NODE}:8888")]);
    let conf = std::fs::read_to_string(site.path("dynconf/proxyconf.conf")).unwrap();
    assert!(!conf.contains(OTHER_COMPUTE_NODE), "{conf}");
}

#[test]
fn without_verbose_a_crontab_run_prints_nothing_but_failures() {
    let site = vhost_site("/bin/true", "/bin/true");
    site.redeemed_token(COMPUTE_NODE, 8888);
    let out = Command::new(program("cron"))
        .env("SATELLITE_CONFIG", &site.config)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!((out.stdout.len(), out.stderr.len()), (0, 0));
}

#[test]
fn cron_help_prints_the_usage_on_stdout_and_exits_zero() {
    let out = Command::new(program("cron"))
        .arg("--help")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), satellite::CRON_HELP);
    assert!(out.stderr.is_empty());
    let text = satellite::CRON_HELP;
    assert!(
        text.contains("\nusage: cron [--watch] [--verbose]\n"),
        "{text}"
    );
}

#[test]
fn cron_with_an_unknown_argument_says_how_to_get_help_and_exits_two() {
    let out = Command::new(program("cron"))
        .arg("--frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        "usage: cron [--watch] [--verbose]\nTry 'cron --help' for more information.\n"
    );
}
