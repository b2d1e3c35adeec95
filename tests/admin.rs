//! The `satellite` admin command on temporary trees, asserting on its
//! exact output.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use support::*;

fn satellite(site: &Site, args: &[&str]) -> Output {
    Command::new(program("satellite"))
        .args(args)
        .env("SATELLITE_CONFIG", &site.config)
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn list_show_stats_and_render_describe_the_tokens() {
    let site = Site::new();
    let pending = site.new_token();
    let live = site.redeemed_token(COMPUTE_NODE, 50123);
    site.cgi("linktoken")
        .remote(LOGIN_NODE)
        .query(format!("token={live}&jobid=4242"))
        .run();

    let list = stdout(&satellite(&site, &["list"]));
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 3, "{list}");
    assert!(lines[0].starts_with("TOKEN"));
    assert!(
        list.lines()
            .any(|l| l.starts_with(&pending) && l.contains("pending") && l.ends_with(" -")),
        "{list}"
    );
    assert!(
        list.lines().any(|l| l.starts_with(&live)
            && l.contains("proxied")
            && l.contains("10.21.3.4:50123")
            && l.ends_with("4242")),
        "{list}"
    );

    let json: serde_json::Value =
        serde_json::from_str(&stdout(&satellite(&site, &["list", "--json"]))).unwrap();
    let rows = json.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let live_row = rows.iter().find(|r| r["alias"] == live.as_str()).unwrap();
    assert_eq!(live_row["state"], "proxied");
    assert_eq!(live_row["dsthost"], COMPUTE_NODE);
    assert_eq!(live_row["dstport"], 50123);
    assert_eq!(live_row["jobid"], "4242");
    assert_eq!(live_row["modified"].as_str().unwrap().len(), 19);
    let pending_row = rows
        .iter()
        .find(|r| r["alias"] == pending.as_str())
        .unwrap();
    assert!(pending_row["dsthost"].is_null() && pending_row["jobid"].is_null());

    let show = stdout(&satellite(&site, &["show", &live]));
    assert!(show.starts_with(&format!("token:    {live}\nurl:      https://{live}.{EXT}/\nstate:    proxied\ntarget:   10.21.3.4:50123\njob:      4242\n")), "{show}");

    let stats = stdout(&satellite(&site, &["stats"]));
    assert!(
        stats.starts_with("tokens by state:\n  pending    1\n  proxied    1\n"),
        "{stats}"
    );
    assert!(
        stats.contains("job states: 0\nsessions per compute node:\n  10.21.3.4                1\n"),
        "{stats}"
    );

    assert_eq!(
        stdout(&satellite(&site, &["render"])),
        format!(
            "# Routes of map routing, as the routes table holds them.\n{live} 10.21.3.4:50123\n"
        )
    );
    let missing = satellite(&site, &["show", "no-such-token"]);
    assert!(!missing.status.success());
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr),
        "satellite: no token no-such-token\n"
    );
}

#[test]
fn revoke_removes_the_token_and_its_route_and_gc_expires_now() {
    let site = Site::with_config("ttl_secs = 3600");
    let live = site.redeemed_token(COMPUTE_NODE, 8888);
    let old = site.new_token();
    site.db()
        .execute(
            "UPDATE proxy SET modified = datetime('now', '-2 hours') WHERE alias = ?1",
            [&old],
        )
        .unwrap();

    assert_eq!(
        stdout(&satellite(&site, &["revoke", &live])),
        format!("revoked {live}; routes table updated (0 live)\n")
    );
    // A tombstone until its TTL: the page can say an administrator ended it.
    assert_eq!(site.state_of(&live).as_deref(), Some("ended"));
    let out = satellite(&site, &["revoke", &live]);
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("satellite: token {live} had already ended\n")
    );
    let routes: i64 = site
        .db()
        .query_row("SELECT count(*) FROM routes", [], |r| r.get(0))
        .unwrap();
    assert_eq!(routes, 0);
    assert_eq!(
        stdout(&satellite(&site, &["gc"])),
        "expired 1 token(s); routes table updated (0 live)\n"
    );
    assert_eq!(site.state_of(&old), None);
}

#[test]
fn admin_commands_refuse_a_bad_config_a_missing_database_and_one_from_the_future() {
    let site = Site::without_database("");
    let out = satellite(&site, &["list"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("does not exist (create it with `satellite migrate`)"));
    assert!(!site.db.exists());

    let site = Site::new();
    site.db().execute_batch("PRAGMA user_version = 99").unwrap();
    let out = satellite(&site, &["stats"]);
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("written by a newer satellite (schema version 99, this build knows 5)"));
    let out = satellite(&site, &["migrate", "--dry-run"]);
    assert!(!out.status.success());

    std::fs::write(&site.config, "words_per_token = 9\n").unwrap();
    let out = satellite(&site, &["list"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("words_per_token must be 2 to 6"));
}

/// A database of the previous satellite (schema 4) needs only what this
/// one adds, and says so before anything is written.
#[test]
fn migrate_dry_run_of_a_schema_4_database_names_only_what_is_new() {
    let site = Site::new();
    site.db()
        .execute_batch(
            "DROP TRIGGER proxy_delete_records_route_end; DROP TRIGGER proxy_update_records_route_end; \
             DROP TRIGGER routes_delete_records_route_end; DROP TABLE route_ends; DROP TABLE watchers; \
             ALTER TABLE proxy DROP COLUMN end_kind; PRAGMA user_version = 4;",
        )
        .unwrap();
    let db = site.db.to_str().unwrap().to_owned();
    let dry = stdout(&satellite(&site, &["migrate", "--db", &db, "--dry-run"]));
    assert_eq!(
        dry,
        format!(
            "{db}:\n  schema version 4 (this build writes 5)\n  legacy schema variant: master\n  will add column proxy.end_kind\n  will add the record of ended routes that each frontend's cron --watch cuts the tunnels of\n  will add the table of watchers (each frontend's place in that record, and its heartbeat)\n  will switch the file to WAL (if it is not already)\n  no colliding aliases\n"
        )
    );
    let done = stdout(&satellite(&site, &["migrate", "--db", &db]));
    assert!(done.contains("  migrated"), "{done}");
    let version: i64 = site
        .db()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 5);
}

#[test]
fn migrate_takes_a_perl_database_in_place_with_a_backup() {
    let site = Site::without_database("");
    write_perl_era_database(&site.db);
    let before = std::fs::read(&site.db).unwrap();
    let db = site.db.to_str().unwrap().to_owned();

    let dry = stdout(&satellite(&site, &["migrate", "--db", &db, "--dry-run"]));
    assert_eq!(
        dry,
        format!(
            "{db}:\n  schema version 0 (this build writes 5)\n  legacy schema variant: base (no jobid)\n  1 mapped token(s)\n  1 pending token(s)\n  1 proxied token(s)\n  will add column proxy.jobid\n  will add column proxy.linked_at\n  will add column proxy.ended_at\n  will add column proxy.end_cause\n  will add column proxy.end_kind\n  will add a unique index on alias_compare_hash and lookup indexes\n  will add the routes table that Apache reads (map routing) and its triggers\n  will add the table that counts unknown-token answers per client (rate limit)\n  will add the table of what the scheduler says of each job (reason, start, limit, nodes)\n  will add the table that counts ended sessions by cause (metrics)\n  will add the record of ended routes that each frontend's cron --watch cuts the tunnels of\n  will add the table of watchers (each frontend's place in that record, and its heartbeat)\n  will switch the file to WAL (if it is not already)\n  no colliding aliases\n"
        )
    );
    assert_eq!(
        std::fs::read(&site.db).unwrap(),
        before,
        "a dry run changed the file"
    );

    let done = stdout(&satellite(&site, &["migrate", "--db", &db]));
    assert!(done.contains("  backup written to "), "{done}");
    assert!(
        done.ends_with(
            "  migrated; in map routing run `satellite cron` once to fill the routes table\n"
        ),
        "{done}"
    );
    let backup = done
        .lines()
        .find_map(|l| l.strip_prefix("  backup written to "))
        .unwrap();
    let copy = rusqlite::Connection::open(backup).unwrap();
    let rows: i64 = copy
        .query_row("SELECT count(*) FROM proxy", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 3);
    assert!(stdout(&satellite(&site, &["migrate", "--db", &db]))
        .ends_with("already current; nothing to do\n"));

    // The legacy flows on the migrated database.
    let answer = site
        .cgi("redeemtoken")
        .remote(COMPUTE_NODE)
        .query("token=abacus-zoom-apple&port=9999")
        .run();
    assert_eq!(answer.status_and_text(), (200, "Success!\n".into()));
    let answer = site
        .cgi("linktoken")
        .remote(LOGIN_NODE)
        .query("token=zen-yak-bat&jobid=77")
        .run();
    assert_eq!(answer.status, 200);
    let answer = site
        .cgi("destroytoken")
        .remote("10.21.5.6")
        .query("token=zen-yak-bat")
        .run();
    assert_eq!(
        answer.status_and_text(),
        (200, "Success! Token destroyed.\n".into())
    );
}

#[test]
fn jobstates_push_writes_squeue_output_into_the_database() {
    let site = Site::new();
    let token = site.new_token();
    site.cgi("linktoken")
        .remote(LOGIN_NODE)
        .query(format!("token={token}&jobid=4242"))
        .run();
    let squeue = site.path("squeue.txt");
    std::fs::write(&squeue, "   4242 RUNNING\n4243 PENDING\n").unwrap();
    let out = satellite(
        &site,
        &[
            "jobstates",
            "push",
            "--from",
            squeue.to_str().unwrap(),
            "--db",
            site.db.to_str().unwrap(),
        ],
    );
    assert_eq!(
        stdout(&out),
        format!("wrote 2 job state(s) to {}\n", site.db.display())
    );
    let state = site
        .cgi("tokenjobstate")
        .query(format!("token={token}"))
        .run();
    assert_eq!(state.text(), "R");
}

/// As root, `init` gives `var/` to the web server's group and `dynconf/`
/// (which Apache includes as root) to cron's user alone: the web server
/// user can write the database but gets EACCES on the configuration.
fn web_server_user_cannot_write_apache_configuration(top: &Path, prefix: &Path) {
    if !nix::unistd::Uid::effective().is_root() {
        return;
    }
    let Some(user) = ["www-data", "apache"]
        .into_iter()
        .find(|u| nix::unistd::User::from_name(u).ok().flatten().is_some())
    else {
        panic!("running as root but no web server user (www-data, apache) exists");
    };
    std::fs::set_permissions(top, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(prefix, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_web_server = |script: &str| {
        Command::new("runuser")
            .args(["-u", user, "--", "/bin/sh", "-c", script])
            .current_dir(prefix)
            .output()
            .unwrap()
    };
    let db = as_web_server("test -w var/state.sqlite && : >> var/state.sqlite");
    assert!(
        db.status.success(),
        "{}",
        String::from_utf8_lossy(&db.stderr)
    );
    for attack in [
        "echo '<VirtualHost *:1>ErrorLog \"|/bin/sh -c id\"</VirtualHost>' >> dynconf/proxyconf.conf",
        "echo 'Include /tmp/x' > dynconf/evil.conf",
        "mv dynconf/proxyconf.conf dynconf/old.conf",
    ] {
        let out = as_web_server(attack);
        assert!(!out.status.success(), "{attack} succeeded as {user}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "{attack}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn init_makes_the_install_tree_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("satellite");
    let init = || {
        Command::new(program("satellite"))
            .args([
                "init",
                "--prefix",
                prefix.to_str().unwrap(),
                "--extbasename",
                "hpc.example.edu",
            ])
            .output()
            .unwrap()
    };
    let first = init();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    web_server_user_cannot_write_apache_configuration(dir.path(), &prefix);
    let first_key = std::fs::read(prefix.join("etc/logkey")).unwrap();
    let written = std::fs::read_to_string(prefix.join("etc/satellite.toml")).unwrap();
    assert!(written.contains("\nwords_per_token = 4\n"), "{written}");
    let installed = satellite_core::Config::load_file(&prefix.join("etc/satellite.toml")).unwrap();
    assert_eq!(installed.words_per_token, 4);
    assert_eq!(
        (
            installed.unknown_token_limit,
            installed.unknown_token_burst,
            installed.unknown_token_rate
        ),
        (true, 20, 2.0)
    );
    std::fs::write(
        prefix.join("etc/satellite.toml"),
        "extbasename = \"hpc.example.edu\"\ntgtipmask = [\"10.21.0.0/16\"]\nsyslog_socket = \"\"\n",
    )
    .unwrap();
    // The waiting page's site.json names no site (the page shows the
    // domain); an earlier version's placeholder is replaced, an edited one
    // kept.
    let site_json = prefix.join("html/satellite/site.json");
    let shipped: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&site_json).unwrap()).unwrap();
    assert_eq!(shipped["name"], "");
    std::fs::write(
        &site_json,
        "{\"name\": \"localhost\", \"help\": \"\", \"help_text\": \"Help\"}",
    )
    .unwrap();
    let second = init();
    assert!(second.status.success());
    let replaced: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&site_json).unwrap()).unwrap();
    assert_eq!(replaced["name"], "");
    let edited = "{\"name\": \"localhost\", \"help\": \"https://help.example.edu/\"}";
    std::fs::write(&site_json, edited).unwrap();
    assert!(init().status.success());
    assert_eq!(std::fs::read_to_string(&site_json).unwrap(), edited);
    assert_eq!(std::fs::read(prefix.join("etc/logkey")).unwrap(), first_key);
    assert!(String::from_utf8_lossy(&second.stdout).contains("kept "));
    assert!(std::fs::read_to_string(prefix.join("etc/satellite.toml"))
        .unwrap()
        .contains("10.21.0.0/16"));
    for name in ENDPOINT_PROGRAMS {
        let cgi = prefix.join(format!("cgi/{name}.cgi"));
        assert_eq!(
            std::fs::metadata(&cgi).unwrap().permissions().mode() & 0o777,
            0o755,
            "{name}"
        );
    }
    let mode = |p: &str| {
        std::fs::metadata(prefix.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("var"), 0o2770);
    // Apache reads dynconf/ as configuration: never writable by the web
    // server's group.
    assert_eq!(mode("dynconf"), 0o755);
    assert_eq!(mode("dynconf/proxyconf.conf"), 0o644);
    assert_eq!(mode("var/state.sqlite"), 0o660);
    // The log key: 32 random bytes, kept across runs (ids stay stable).
    assert_eq!(mode("etc/logkey"), 0o640);
    assert_eq!(first_key.len(), 32);
    assert_ne!(first_key, vec![0u8; 32]);
    assert!(String::from_utf8_lossy(&first.stdout).contains("/etc/logkey\n"));
    assert!(prefix.join("bin/satellite").exists() && prefix.join("bin/cron").exists());
    for page in [
        "retry.html",
        "unavailable.html",
        "waiting.html",
        "default.txt",
    ] {
        assert!(prefix.join("html/satellite").join(page).exists(), "{page}");
    }
    // The installed programs find their config beside them and work.
    let answer = Command::new(prefix.join("cgi/getlink.cgi"))
        .env_clear()
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("REQUEST_METHOD", "GET")
        .env("REMOTE_ADDR", "10.21.0.10")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&answer.stdout).contains("\n\nYour token is \n"),
        "{}",
        String::from_utf8_lossy(&answer.stderr)
    );
}

#[test]
fn demo_walkthrough_runs_the_whole_stack() {
    // Apache binds the port itself, so another process may take it between
    // our choosing and Apache's binding: then choose again.
    let mut out = None;
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let run = Command::new(program("satellite"))
            .args(["demo", "--walkthrough", "--port", &port.to_string()])
            .output()
            .unwrap();
        let port_taken = String::from_utf8_lossy(&run.stderr).contains("Address already in use");
        out = Some(run);
        if !port_taken {
            break;
        }
    }
    let out = out.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("walkthrough: 4. the URL reaches the notebook: Hello from the demo notebook! You asked for /lab?token=abc"), "{text}");
    assert!(text.ends_with("walkthrough: all steps passed\n"), "{text}");
}

/// The private Apache launcher and the demo live in satellite-demo, which
/// only the admin program names: what Apache runs carries none of it.
#[test]
fn the_cgi_programs_carry_none_of_the_demo_machinery() {
    let demo_symbols = |name: &str| {
        let out = Command::new("nm")
            .arg(program(name))
            .output()
            .unwrap_or_else(|e| panic!("nm (binutils) is needed: {e}"));
        assert!(out.status.success(), "nm {name}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|line| line.contains("satellite_demo"))
            .count()
    };
    // nm sees the crate where it is linked, so a zero below means absent.
    assert!(demo_symbols("satellite") > 0);
    for name in ENDPOINT_PROGRAMS.into_iter().chain(["cron"]) {
        assert_eq!(demo_symbols(name), 0, "{name} links satellite_demo");
    }
}

#[test]
fn check_reports_each_item_and_fails_on_a_certificate_that_does_not_cover_the_domain() {
    let site = Site::with_config(
        "apache_configtest = [\"/bin/true\"]\napache_reload = [\"/bin/true\"]\nwords_per_token = 4",
    );
    std::fs::create_dir_all(site.path("html/satellite")).unwrap();
    std::fs::write(site.path("html/satellite/retry.html"), "retry").unwrap();
    for dir in ["var", "dynconf"] {
        std::fs::set_permissions(site.path(dir), std::fs::Permissions::from_mode(0o2770)).unwrap();
    }
    let cert = |name: &str, sans: &str, days: &str| {
        let out = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", days, "-subj", "/CN=test",
            ])
            .args([
                "-keyout",
                site.path(&format!("{name}.key")).to_str().unwrap(),
            ])
            .args(["-out", site.path(&format!("{name}.pem")).to_str().unwrap()])
            .args(["-addext", &format!("subjectAltName={sans}")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        site.path(&format!("{name}.pem"))
    };
    let good = cert("good", &format!("DNS:{EXT},DNS:*.{EXT}"), "400");
    let out = satellite(&site, &["check", "--cert", good.to_str().unwrap()]);
    let report = stdout(&out);
    assert!(
        report.contains("WARN no cron --watch has run on this database"),
        "{report}"
    );
    // What a frontend's running watcher records.
    site.db()
        .execute(
            "INSERT INTO watchers (name, last_end_id, heartbeat) VALUES ('frontend-a', 0, datetime('now'))",
            [],
        )
        .unwrap();
    let out = satellite(&site, &["check", "--cert", good.to_str().unwrap()]);
    let report = stdout(&out);
    assert!(
        report.contains("OK   watcher frontend-a alive "),
        "{report}"
    );
    // The suite runs as root, which can cut tunnels.
    assert!(
        report.contains("OK   open tunnels of ended sessions can be cut here"),
        "{report}"
    );
    // No serve line: without Apache's run config there is nothing to probe
    // (check says OK only for what it tried).
    assert_eq!(
        report.lines().filter(|l| l.starts_with("OK   ")).count(),
        14,
        "{report}"
    );
    assert!(
        !report.contains("FAIL") && !report.contains("WARN"),
        "{report}"
    );
    assert!(
        report.contains("7772 words, 51.7 bits per 4-word token"),
        "{report}"
    );

    let expiring = cert("expiring", &format!("DNS:{EXT},DNS:*.{EXT}"), "2");
    let report = stdout(&satellite(
        &site,
        &["check", "--cert", expiring.to_str().unwrap()],
    ));
    assert!(
        report.contains(&format!(
            "WARN {} expires within 30 days",
            expiring.display()
        )),
        "{report}"
    );

    let apex_only = cert("apex", &format!("DNS:{EXT}"), "400");
    let out = satellite(&site, &["check", "--cert", apex_only.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains(&format!(
            "FAIL {} does not cover *.{EXT}\n     fix: ",
            apex_only.display()
        )),
        "{report}"
    );
}

#[test]
fn check_warns_about_three_word_tokens_with_their_entropy_and_the_fix() {
    for (config, warned) in [
        ("", true),
        ("words_per_token = 3", true),
        ("words_per_token = 4", false),
        ("words_per_token = 5", false),
    ] {
        let site = Site::with_config(config);
        let report = stdout(&satellite(&site, &["check"]));
        let warning = "WARN words_per_token = 3: tokens carry 38.8 bits, which guessing from many addresses can find\n     fix: set words_per_token = 4 (51.7 bits) in the configuration; tokens already issued keep working\n";
        assert_eq!(report.contains(warning), warned, "{config:?}: {report}");
        assert_eq!(
            report.contains("WARN words_per_token"),
            warned,
            "{config:?}: {report}"
        );
    }
}

#[test]
fn error_messages_name_each_path_once() {
    let site = Site::without_database("");
    let missing = site.path("etc/missing.toml");
    let without_config = |command: &str| {
        let out = Command::new(program("satellite"))
            .arg("--config")
            .arg(&missing)
            .arg(command)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        out
    };
    let out = without_config("list");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "satellite: configuration file {}: No such file or directory (os error 2)\n",
            missing.display()
        )
    );

    let out = without_config("check");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "FAIL configuration file {}: No such file or directory (os error 2)\n     \
             fix: correct the file (every key is described in the installed etc/satellite.toml)\n",
            missing.display()
        )
    );

    let out = satellite(&site, &["list"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "satellite: database {} does not exist (create it with `satellite migrate`)\n",
            site.db.display()
        )
    );

    // An I/O error is said once, not once by the message and again as its
    // source.
    std::fs::remove_dir(site.path("dynconf")).unwrap();
    let out = Command::new(program("satellite"))
        .args(["migrate", "--config"])
        .arg(&site.config)
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = satellite(&site, &["cron"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "satellite cron: opening lock file {}: No such file or directory (os error 2)\n",
            site.path("dynconf/.satellite.lock").display()
        )
    );
}

#[test]
fn check_fails_without_a_private_log_key_or_a_reachable_syslog() {
    use std::os::unix::fs::PermissionsExt;
    let site = Site::new();
    let report = String::from_utf8(satellite(&site, &["check"]).stdout).unwrap();
    let key = site.path("etc/logkey");
    assert!(
        report.contains(&format!("OK   log key {} is private\n", key.display())),
        "{report}"
    );
    assert!(
        report.contains(&format!(
            "OK   syslog {} accepts messages\n",
            site.path("syslog.sock").display()
        )),
        "{report}"
    );

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = satellite(&site, &["check"]);
    assert_eq!(out.status.code(), Some(1));
    let report = String::from_utf8(out.stdout).unwrap();
    assert!(
        report.contains(&format!(
            "FAIL log key: {} is readable or writable by others (mode 644); log lines name no token\n     fix: satellite init creates it",
            key.display()
        )),
        "{report}"
    );
    std::fs::remove_file(&key).unwrap();
    let report = String::from_utf8(satellite(&site, &["check"]).stdout).unwrap();
    assert!(
        report.contains(&format!(
            "FAIL log key: {}: No such file or directory (os error 2); log lines name no token\n",
            key.display()
        )),
        "{report}"
    );

    let gone = Site::with_config("syslog_socket = \"../no-syslog-here.sock\"");
    let out = satellite(&gone, &["check"]);
    assert_eq!(out.status.code(), Some(1));
    let report = String::from_utf8(out.stdout).unwrap();
    assert!(
        report.contains(&format!(
            "FAIL syslog {}: No such file or directory (os error 2); audit lines are lost\n     fix: ",
            gone.path("no-syslog-here.sock").display()
        )),
        "{report}"
    );
    let off = Site::with_config("syslog_socket = \"\"");
    let report = String::from_utf8(satellite(&off, &["check"]).stdout).unwrap();
    assert!(
        report.contains("WARN syslog_socket is empty: no audit log"),
        "{report}"
    );
}

/// `satellite list | head`: the reader is gone before the first write.
#[test]
fn list_into_a_closed_pipe_exits_zero_without_a_message() {
    let site = Site::new();
    for _ in 0..3 {
        site.new_token();
    }
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(program("satellite"))
        .arg("list")
        .env("SATELLITE_CONFIG", &site.config)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}

#[test]
fn generate_writes_a_man_page_per_visible_command_and_three_completions() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = Command::new(program("satellite"))
        .args(["generate", "--out"])
        .arg(out_dir.path())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!(
            "wrote man pages into {0}/man and completions into {0}/completions\n",
            out_dir.path().display()
        )
    );
    assert!(out.status.success());
    let names = |dir: &str| {
        let mut names: Vec<String> = std::fs::read_dir(out_dir.path().join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(
        names("man"),
        [
            "satellite-check.1",
            "satellite-cron.1",
            "satellite-demo.1",
            "satellite-gc.1",
            "satellite-init.1",
            "satellite-jobstates-poll.1",
            "satellite-jobstates-push.1",
            "satellite-jobstates.1",
            "satellite-list.1",
            "satellite-metrics.1",
            "satellite-migrate.1",
            "satellite-render.1",
            "satellite-revoke.1",
            "satellite-serve.1",
            "satellite-show.1",
            "satellite-stats.1",
            "satellite.1",
        ]
    );
    assert_eq!(
        names("completions"),
        ["_satellite", "satellite.bash", "satellite.fish"]
    );
    let page = std::fs::read_to_string(out_dir.path().join("man/satellite-list.1")).unwrap();
    assert!(page.starts_with(".ie \\n(.g .ds Aq \\(aq\n"), "{page}");
    assert!(page.contains(".TH satellite-list 1"), "{page}");
    let bash = std::fs::read_to_string(out_dir.path().join("completions/satellite.bash")).unwrap();
    assert!(bash.contains("satellite,list)"), "{bash}");
}

/// `print!` and `println!` panic when standard output is closed (a pipe
/// whose reader went, a restarted journal): the long-running loops
/// (`jobstates push --every`, `jobstates poll`, `cron --watch`, serve) and
/// every program write through functions that drop such errors. Kept true
/// here for every crate but the bench, a developer's tool.
#[test]
fn no_program_prints_with_the_panicking_macros() {
    let mut offenders = Vec::new();
    for krate in ["cgi", "core", "cron", "demo", "satellite", "sched", "serve"] {
        let mut dirs = vec![repo_root().join("crates").join(krate).join("src")];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                for (n, line) in text.lines().enumerate() {
                    let code = line.split("//").next().unwrap_or_default();
                    let bare = code.replace("eprint", "").replace("writeln!", "");
                    if bare.contains("print!(") || bare.contains("println!(") {
                        offenders.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                    }
                }
            }
        }
    }
    assert!(offenders.is_empty(), "{}", offenders.join("\n"));
}

/// The .deb's postrm runs after package-setup is gone, so it carries its
/// own copy of the purge list: the two must name the same files (a page
/// missing from one was left behind by a purge).
#[test]
fn the_debian_postrm_purges_the_files_package_setup_purges() {
    let files = |path: &str| -> std::collections::BTreeSet<String> {
        let text = std::fs::read_to_string(repo_root().join(path)).unwrap();
        let purge = &text[text.find("purge").unwrap()..];
        purge
            .split('"')
            .filter(|part| part.starts_with("$prefix/") && part.len() > "$prefix/".len())
            .map(str::to_owned)
            .collect()
    };
    // What purge deletes: the files init wrote (not the programs, which
    // remove takes, nor the directories, removed when empty).
    let purged = |all: std::collections::BTreeSet<String>| -> std::collections::BTreeSet<String> {
        all.into_iter()
            .filter(|f| {
                ["etc/", "var/", "dynconf/", "html/"]
                    .iter()
                    .any(|dir| f.starts_with(&format!("$prefix/{dir}")))
            })
            .collect()
    };
    let setup_files = purged(files("dist/package-setup"));
    let postrm_files = purged(files("dist/debian/postrm"));
    assert!(setup_files.contains("$prefix/html/satellite/unavailable.html"));
    assert_eq!(setup_files, postrm_files);
}
