//! The `cron` program against a real database and real files, with the
//! Apache commands replaced by real programs whose outcome the test
//! chooses (the real-Apache runs are in apache_routing.rs).

mod support;

use std::process::Command;

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
    let mut apache = Command::new("sh")
        .args([
            "-c",
            "trap 'echo got-usr1; exit 0' USR1; echo ready; while :; do sleep 0.05; done",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Only once the trap is set may the signal come.
    let mut said = std::io::BufReader::new(apache.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut said, &mut line).unwrap();
    assert_eq!(line, "ready\n");
    let site = Site::with_config("routing = \"vhost\"\napache_configtest = [\"/bin/true\"]\napache_pidfile = \"../apache.pid\"");
    std::fs::write(site.path("apache.pid"), format!("{}\n", apache.id())).unwrap();
    let token = site.redeemed_token(COMPUTE_NODE, 8888);
    let out = cron(&site, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = apache.wait().unwrap();
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
    let map = std::fs::read_to_string(site.path("dynconf/routes.map")).unwrap();
    assert!(!map.contains(&old_mapped), "{map}");
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
    // The config test sleeps, so the first run holds the lock for a while.
    let site = Site::with_config(
        "routing = \"vhost\"\napache_configtest = [\"/bin/sleep\", \"5\"]\napache_reload = [\"/bin/true\"]",
    );
    site.redeemed_token(COMPUTE_NODE, 8888);
    let first = Command::new(program("cron"))
        .env("SATELLITE_CONFIG", &site.config)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the first run has taken the lock (its config test is running).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !site.path("dynconf/proxyconf.conf").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "first cron never wrote"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let second = cron(&site, &[]);
    assert!(second.status.success());
    assert_eq!(String::from_utf8_lossy(&second.stdout), "");
    let first = first.wait_with_output().unwrap();
    assert!(first.status.success());
}

#[test]
fn watch_publishes_a_redeem_without_a_manual_run() {
    let site = vhost_site("/bin/true", "/bin/true");
    let mut watcher = Command::new(program("cron"))
        .arg("--watch")
        .env("SATELLITE_CONFIG", &site.config)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
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
    watcher.kill().unwrap();
    watcher.wait().unwrap();
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

#[test]
fn dbm_maps_are_built_with_httxt2dbm_and_replaced_whole() {
    let site = Site::with_config("map_format = \"dbm\"");
    let token = site.redeemed_token(COMPUTE_NODE, 8888);
    let dbm = site.path("dynconf/routes.map.db");
    assert!(dbm.exists(), "no {}", dbm.display());
    // httxt2dbm's own reader agrees with the text beside it.
    let text = std::fs::read_to_string(site.path("dynconf/routes.map")).unwrap();
    assert!(
        text.contains(&format!("{token} {COMPUTE_NODE}:8888")),
        "{text}"
    );
    let first = std::fs::read(&dbm).unwrap();
    let second = site.redeemed_token(OTHER_COMPUTE_NODE, 9999);
    assert_ne!(
        std::fs::read(&dbm).unwrap(),
        first,
        "the dbm map was not rebuilt for {second}"
    );
    assert_eq!(site.state_of(&second).as_deref(), Some("proxied"));
    let leftovers: Vec<String> = std::fs::read_dir(site.path("dynconf"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
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
