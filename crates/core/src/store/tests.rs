//! The store's semantics, tested against both backends: each test is a
//! function of a store, instantiated once on a new SQLite file and once
//! on a new database of the tests' private PostgreSQL cluster. What is
//! about one backend only (SQLite's legacy files and locks, PostgreSQL's
//! connections) is tested beside it.

use chrono::{DateTime, Utc};

use super::{
    route_expiry, DestroyOutcome, EndCause, PgStore, ProxyState, PublishedRoute, RedeemOutcome,
    RoutePublication, RouteSync, SessionEnd, SqliteStore, Store, WATCHER_FORGET_SECS,
};
use crate::error::Result;
use crate::ratelimit::Limits;

/// What the shared tests need of a store beyond [`Store`]: the data
/// plane's view, and SQL run as another program would run it.
pub(crate) trait TestStore: Store {
    fn proxy_state(&self, alias: &str, now: DateTime<Utc>, ttl: i64) -> Result<Option<ProxyState>>;
    fn live_route(&self, alias: &str, now: DateTime<Utc>) -> Result<Option<String>>;
    /// Runs SQL outside satellite's code (a Perl script, a hand edit).
    fn exec(&self, sql: &str);
    /// The first column of every row, as text.
    fn strings(&self, sql: &str) -> Vec<String>;
}

impl TestStore for SqliteStore {
    fn proxy_state(&self, alias: &str, now: DateTime<Utc>, ttl: i64) -> Result<Option<ProxyState>> {
        SqliteStore::proxy_state(self, alias, now, ttl)
    }
    fn live_route(&self, alias: &str, now: DateTime<Utc>) -> Result<Option<String>> {
        SqliteStore::live_route(self, alias, now)
    }
    fn exec(&self, sql: &str) {
        self.connection().execute_batch(sql).unwrap();
    }
    fn strings(&self, sql: &str) -> Vec<String> {
        let conn = self.connection();
        let mut stmt = conn.prepare(sql).unwrap();
        let rows = stmt.query_map([], |r| r.get(0)).unwrap();
        rows.collect::<rusqlite::Result<_>>().unwrap()
    }
}

impl TestStore for PgStore {
    fn proxy_state(&self, alias: &str, now: DateTime<Utc>, ttl: i64) -> Result<Option<ProxyState>> {
        PgStore::proxy_state(self, alias, now, ttl)
    }
    fn live_route(&self, alias: &str, now: DateTime<Utc>) -> Result<Option<String>> {
        PgStore::live_route(self, alias, now)
    }
    fn exec(&self, sql: &str) {
        self.client().batch_execute(sql).unwrap();
    }
    fn strings(&self, sql: &str) -> Vec<String> {
        self.client()
            .query(sql, &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }
}

/// A store under test and what must live as long as it.
pub(crate) struct Fixture {
    pub(crate) store: Box<dyn TestStore>,
    _dir: Option<tempfile::TempDir>,
}

pub(crate) fn sqlite() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (store, migration) = SqliteStore::open_or_create(
        &dir.path().join("state.sqlite"),
        std::time::Duration::from_secs(1),
    )
    .unwrap();
    assert!(migration.created);
    Fixture {
        store: Box::new(store),
        _dir: Some(dir),
    }
}

pub(crate) fn postgres() -> Fixture {
    let url = super::pg_harness::new_database();
    let (store, migration) =
        PgStore::open_or_create(&url, std::time::Duration::from_secs(5)).unwrap();
    assert!(migration.created);
    Fixture {
        store: Box::new(store),
        _dir: None,
    }
}

/// Instantiates each named test once per backend.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test]
            fn $name() {
                let mut fixture = super::sqlite();
                super::$name(fixture.store.as_mut());
            })*
        }
        mod postgres {
            $(#[test]
            fn $name() {
                let mut fixture = super::postgres();
                super::$name(fixture.store.as_mut());
            })*
        }
    };
}

on_both_stores!(
    unknown_answers_are_counted_per_client_and_pay_back_over_time,
    drained_rows_go_at_the_next_charge,
    a_token_is_redeemed_once_and_destroyed_only_from_its_host,
    an_expired_token_behaves_as_unknown_before_cron_deletes_it,
    modified_keeps_the_legacy_text_format,
    a_live_redeem_routes_in_its_own_transaction_until_the_ttl_ends,
    any_delete_or_state_change_of_a_token_drops_its_route,
    sync_routes_writes_only_differences_and_unroutes_refused_rows,
    the_repair_pass_never_undoes_a_write_made_after_its_read,
    every_way_a_route_ends_is_recorded_for_the_watchers,
    route_ends_are_kept_until_every_watcher_has_acted_on_them,
    every_way_a_session_ends_is_counted_once_by_its_cause,
);

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

const LIMITS: Limits = Limits {
    burst: 3.0,
    per_sec: 0.5,
};

fn unknown_answers_are_counted_per_client_and_pay_back_over_time(store: &mut dyn TestStore) {
    assert_eq!(
        store.unknown_debt("192.0.2.1", &LIMITS, 100.0).unwrap(),
        0.0
    );
    for _ in 0..3 {
        store.charge_unknown("192.0.2.1", &LIMITS, 100.0).unwrap();
    }
    assert_eq!(
        store.unknown_debt("192.0.2.1", &LIMITS, 100.0).unwrap(),
        3.0
    );
    assert_eq!(
        store.unknown_debt("192.0.2.1", &LIMITS, 102.0).unwrap(),
        2.0
    );
    assert_eq!(
        store.unknown_debt("192.0.2.2", &LIMITS, 100.0).unwrap(),
        0.0
    );
    store.charge_unknown("192.0.2.1", &LIMITS, 102.0).unwrap();
    assert_eq!(
        store.unknown_debt("192.0.2.1", &LIMITS, 102.0).unwrap(),
        3.0
    );
    // A clock that went back neither pays back nor moves `at` back.
    store.charge_unknown("192.0.2.1", &LIMITS, 90.0).unwrap();
    assert_eq!(
        store.unknown_debt("192.0.2.1", &LIMITS, 102.0).unwrap(),
        4.0
    );
}

fn drained_rows_go_at_the_next_charge(store: &mut dyn TestStore) {
    store.charge_unknown("192.0.2.1", &LIMITS, 100.0).unwrap();
    store.charge_unknown("192.0.2.2", &LIMITS, 101.0).unwrap();
    // 192.0.2.1 has paid its 1 back at 102; 192.0.2.2 still owes.
    store.charge_unknown("192.0.2.3", &LIMITS, 102.5).unwrap();
    let clients = store.strings("SELECT client FROM unknown_answers ORDER BY client");
    assert_eq!(clients, ["192.0.2.2", "192.0.2.3"]);
}

fn a_token_is_redeemed_once_and_destroyed_only_from_its_host(store: &mut dyn TestStore) {
    let now = at("2026-01-01T12:00:00Z");
    assert!(store.insert_pending("able-acorn-zoo", now).unwrap());
    assert!(!store.insert_pending("able-acorn-zoo", now).unwrap());
    assert_eq!(
        store
            .redeem(
                "able-acorn-zoo",
                "10.0.0.5",
                8888,
                now,
                100,
                RoutePublication::Deferred
            )
            .unwrap(),
        RedeemOutcome::Redeemed
    );
    assert_eq!(
        store
            .redeem(
                "able-acorn-zoo",
                "10.0.0.6",
                9999,
                now,
                100,
                RoutePublication::Deferred
            )
            .unwrap(),
        RedeemOutcome::AlreadyRedeemed
    );
    assert_eq!(
        store.destroy("able-acorn-zoo", "10.0.0.6", now).unwrap(),
        DestroyOutcome::WrongHost
    );
    assert_eq!(
        store.destroy("able-acorn-zoo", "10.0.0.5", now).unwrap(),
        DestroyOutcome::Destroyed
    );
    assert_eq!(
        store.destroy("able-acorn-zoo", "10.0.0.5", now).unwrap(),
        DestroyOutcome::Unknown
    );
}

fn an_expired_token_behaves_as_unknown_before_cron_deletes_it(store: &mut dyn TestStore) {
    store
        .insert_pending("old-token-here", at("2026-01-01T00:00:00Z"))
        .unwrap();
    let later = at("2026-01-01T00:01:41Z");
    assert_eq!(
        store
            .redeem(
                "old-token-here",
                "10.0.0.5",
                8888,
                later,
                100,
                RoutePublication::Deferred
            )
            .unwrap(),
        RedeemOutcome::Unknown
    );
    assert_eq!(
        store.proxy_state("old-token-here", later, 100).unwrap(),
        None
    );
    assert_eq!(store.expire(later, 100).unwrap(), 1);
}

fn modified_keeps_the_legacy_text_format(store: &mut dyn TestStore) {
    store
        .insert_pending("a-b-c", at("2026-03-04T05:06:07Z"))
        .unwrap();
    let modified = store.strings("SELECT modified FROM proxy");
    assert_eq!(modified, ["2026-03-04 05:06:07"]);
}

fn live(target: &str) -> RoutePublication<'_> {
    RoutePublication::Live { target }
}

fn a_live_redeem_routes_in_its_own_transaction_until_the_ttl_ends(store: &mut dyn TestStore) {
    let now = at("2026-01-01T12:00:00Z");
    store.insert_pending("able-acorn-zoo", now).unwrap();
    assert_eq!(
        store
            .redeem(
                "able-acorn-zoo",
                "10.0.0.5",
                8888,
                now,
                100,
                live("10.0.0.5:8888")
            )
            .unwrap(),
        RedeemOutcome::Redeemed
    );
    assert_eq!(
        store.proxy_state("able-acorn-zoo", now, 100).unwrap(),
        Some(ProxyState::Proxied)
    );
    let at_ttl_end = at("2026-01-01T12:01:40Z");
    assert_eq!(
        store
            .live_route("able-acorn-zoo", at_ttl_end)
            .unwrap()
            .as_deref(),
        Some("10.0.0.5:8888")
    );
    assert_eq!(
        store
            .live_route("able-acorn-zoo", at("2026-01-01T12:01:41Z"))
            .unwrap(),
        None
    );
    // A refused redeem (of a revoked token's tombstone) writes no route
    // either.
    store.insert_pending("other-token-here", now).unwrap();
    store.revoke("other-token-here", now).unwrap();
    assert_eq!(
        store
            .redeem(
                "other-token-here",
                "10.0.0.6",
                8888,
                now,
                100,
                live("10.0.0.6:8888")
            )
            .unwrap(),
        RedeemOutcome::AlreadyRedeemed
    );
    assert_eq!(store.live_route_count(now).unwrap(), 1);
}

/// New tokens, each redeemed from 10.0.0.5:8888 with a live route (TTL 100 s).
fn redeemed_live(store: &mut dyn TestStore, aliases: &[&str], now: DateTime<Utc>) {
    for alias in aliases {
        store.insert_pending(alias, now).unwrap();
        store
            .redeem(alias, "10.0.0.5", 8888, now, 100, live("10.0.0.5:8888"))
            .unwrap();
    }
}

fn any_delete_or_state_change_of_a_token_drops_its_route(store: &mut dyn TestStore) {
    let now = at("2026-01-01T12:00:00Z");
    redeemed_live(store, &["one-a-b", "two-a-b", "three-a-b"], now);
    store.destroy("one-a-b", "10.0.0.5", now).unwrap();
    // What a Perl script or a hand edit does, with no satellite code.
    store.exec("UPDATE proxy SET state = 'mapped' WHERE alias = 'two-a-b'");
    assert_eq!(store.live_route("one-a-b", now).unwrap(), None);
    assert_eq!(store.live_route("two-a-b", now).unwrap(), None);
    assert!(store.live_route("three-a-b", now).unwrap().is_some());
    // The destroyed one stays as a tombstone until its TTL.
    assert_eq!(store.expire(at("2026-01-01T13:00:00Z"), 100).unwrap(), 3);
    assert_eq!(store.live_route_count(now).unwrap(), 0);
}

fn sync_routes_writes_only_differences_and_unroutes_refused_rows(store: &mut dyn TestStore) {
    let now = at("2026-01-01T12:00:00Z");
    redeemed_live(store, &["kept-a-b", "moved-a-b", "refused-a-b"], now);
    store.insert_pending("late-a-b", now).unwrap();
    store
        .redeem(
            "late-a-b",
            "10.0.0.7",
            8888,
            now,
            100,
            RoutePublication::Deferred,
        )
        .unwrap();
    let expires = route_expiry(now, 100);
    let route = |alias: &str, target: &str| PublishedRoute {
        alias: alias.into(),
        target: target.into(),
        expires: expires.clone(),
    };
    let wanted = [
        route("kept-a-b", "10.0.0.5:8888"),
        route("moved-a-b", "10.0.0.6:8888"),
        route("late-a-b", "10.0.0.7:8888"),
    ];
    let sync = store
        .sync_routes(&wanted, &["refused-a-b".to_owned()])
        .unwrap();
    assert_eq!(
        sync,
        RouteSync {
            written: 2,
            removed: 1,
            flipped: 1,
            unrouted: 1
        }
    );
    assert_eq!(
        store.proxy_state("refused-a-b", now, 100).unwrap(),
        Some(ProxyState::Mapped)
    );
    assert_eq!(
        store.live_route("moved-a-b", now).unwrap().as_deref(),
        Some("10.0.0.6:8888")
    );
    assert_eq!(
        store.sync_routes(&wanted, &[]).unwrap(),
        RouteSync::default()
    );
}

/// The repair pass reads the rows, then writes in its own transaction:
/// a redeem committed in between keeps its route (it was live when
/// `Success!` went out), and a session ended in between gets no route
/// back. (Found by the soak: a fresh redeem's host answered with the
/// waiting page when cron's run overlapped it.)
fn the_repair_pass_never_undoes_a_write_made_after_its_read(store: &mut dyn TestStore) {
    let now = at("2026-01-01T12:00:00Z");
    redeemed_live(store, &["early-a-b", "ending-a-b"], now);
    let expires = route_expiry(now, 100);
    let stale_wanted: Vec<PublishedRoute> = ["early-a-b", "ending-a-b"]
        .iter()
        .map(|alias| PublishedRoute {
            alias: (*alias).into(),
            target: "10.0.0.5:8888".into(),
            expires: expires.clone(),
        })
        .collect();
    // After the read: a redeem, and an ending.
    redeemed_live(store, &["fresh-a-b"], now);
    store.destroy("ending-a-b", "10.0.0.5", now).unwrap();
    store.sync_routes(&stale_wanted, &[]).unwrap();
    assert_eq!(
        store.live_route("fresh-a-b", now).unwrap().as_deref(),
        Some("10.0.0.5:8888")
    );
    assert_eq!(
        store.proxy_state("fresh-a-b", now, 100).unwrap(),
        Some(ProxyState::Proxied)
    );
    assert_eq!(store.live_route("ending-a-b", now).unwrap(), None);
    assert!(store.live_route("early-a-b", now).unwrap().is_some());
}

fn ended_targets(store: &dyn TestStore, after: i64) -> Vec<String> {
    let mut targets: Vec<String> = store
        .route_ends_after(after, 100)
        .unwrap()
        .into_iter()
        .map(|end| end.target)
        .collect();
    targets.dedup();
    targets
}

/// Whatever ends a route, in any program, records its target in the
/// same transaction; a pending token's end records nothing.
fn every_way_a_route_ends_is_recorded_for_the_watchers(store: &mut dyn TestStore) {
    let now = at("2026-01-01T12:00:00Z");
    let ways = [
        "by-destroy",
        "by-revoke",
        "by-job",
        "by-ttl",
        "by-perl",
        "by-move",
    ];
    for (n, alias) in ways.iter().enumerate() {
        store.insert_pending(alias, now).unwrap();
        let host = format!("10.0.0.{}", n + 1);
        let target = format!("{host}:8888");
        store
            .redeem(alias, &host, 8888, now, 100, live(&target))
            .unwrap();
    }
    store.insert_pending("never-redeemed", now).unwrap();
    store.insert_pending("v6-token", now).unwrap();
    store
        .redeem(
            "v6-token",
            "fd00::7",
            9000,
            now,
            100,
            live("[fd00::7]:9000"),
        )
        .unwrap();
    assert!(ended_targets(store, 0).is_empty());

    store.destroy("by-destroy", "10.0.0.1", now).unwrap();
    assert_eq!(ended_targets(store, 0), ["10.0.0.1:8888"]);
    store.revoke("by-revoke", now).unwrap();
    store
        .end_sessions(
            &[SessionEnd {
                alias: "by-job".into(),
                kind: EndCause::JobEnd,
                cause: "job 1 ended (TIMEOUT)".into(),
            }],
            now,
        )
        .unwrap();
    store.exec("delete from proxy where alias = 'by-perl'");
    store.exec("UPDATE proxy SET dstport = 9999 WHERE alias = 'by-move'");
    store.revoke("never-redeemed", now).unwrap();
    store.revoke("v6-token", now).unwrap();
    // The TTL: rows older than it go at cron's expiry.
    store.exec("UPDATE proxy SET modified = '2000-01-01 00:00:00' WHERE alias = 'by-ttl'");
    store.expire(now, 100).unwrap();
    let mut all = ended_targets(store, 0);
    all.sort();
    all.dedup();
    assert_eq!(
        all,
        [
            "10.0.0.1:8888",
            "10.0.0.2:8888",
            "10.0.0.3:8888",
            "10.0.0.4:8888",
            "10.0.0.5:8888",
            "10.0.0.6:8888",
            "[fd00::7]:9000"
        ]
    );
    // Ids only grow: a watcher's cursor says exactly what it has seen.
    let ids: Vec<i64> = store
        .route_ends_after(0, 100)
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
}

/// Each watcher keeps its own place; records go once every watcher
/// has passed them, and a watcher silent for a day no longer holds
/// them back.
fn route_ends_are_kept_until_every_watcher_has_acted_on_them(store: &mut dyn TestStore) {
    let now = at("2026-01-01T12:00:00Z");
    redeemed_live(store, &["one-a-b", "two-a-b"], now);
    store.revoke("one-a-b", now).unwrap();
    // A new watcher starts before the first retained record.
    let a = store.watcher_cursor("frontend-a", 1, now).unwrap();
    let b = store.watcher_cursor("frontend-b", 2, now).unwrap();
    assert_eq!(a, b);
    let pending = store.route_ends_after(a, 100).unwrap();
    assert!(!pending.is_empty());
    let last = pending.last().unwrap().id;
    store.watcher_advance("frontend-a", last, 1, now).unwrap();
    // b has not acted: the records stay for it, across its restart.
    assert_eq!(store.watcher_cursor("frontend-b", 3, now).unwrap(), b);
    assert_eq!(store.route_ends_after(b, 100).unwrap(), pending);
    store.watcher_advance("frontend-b", last, 3, now).unwrap();
    assert!(store.route_ends_after(0, 100).unwrap().is_empty());
    // A cursor never moves back.
    store.watcher_advance("frontend-a", 0, 1, now).unwrap();
    assert_eq!(store.watcher_cursor("frontend-a", 1, now).unwrap(), last);

    store.revoke("two-a-b", now).unwrap();
    let day_later = now + chrono::Duration::seconds(WATCHER_FORGET_SECS + 1);
    store
        .watcher_advance("frontend-a", i64::MAX, 1, day_later)
        .unwrap();
    let watchers = store.watchers().unwrap();
    assert_eq!(
        watchers.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(),
        ["frontend-a"]
    );
    assert!(store.route_ends_after(0, 100).unwrap().is_empty());
}

fn every_way_a_session_ends_is_counted_once_by_its_cause(store: &mut dyn TestStore) {
    let now = at("2026-01-01T12:00:00Z");
    for alias in [
        "by-destroy-a",
        "by-revoke-a",
        "by-ttl-a",
        "job-over-a",
        "intruder-a",
        "twice-a",
    ] {
        store.insert_pending(alias, now).unwrap();
    }
    store
        .redeem(
            "by-destroy-a",
            "10.0.0.5",
            8888,
            now,
            100,
            live("10.0.0.5:8888"),
        )
        .unwrap();
    // A refused destroy ends nothing.
    assert_eq!(
        store.destroy("by-destroy-a", "10.0.0.9", now).unwrap(),
        DestroyOutcome::WrongHost
    );
    store.destroy("by-destroy-a", "10.0.0.5", now).unwrap();
    assert!(store.revoke("by-revoke-a", now).unwrap());
    let ends = |text: &str, alias: &str| SessionEnd {
        alias: alias.to_owned(),
        kind: if text.starts_with("job ") {
            EndCause::JobEnd
        } else {
            EndCause::BindingMismatch
        },
        cause: text.to_owned(),
    };
    let ended = store
        .end_sessions(
            &[
                ends("job 7 ended (TIMEOUT)", "job-over-a"),
                ends(
                    "redeemed from 10.9.9.9, which is not a node of job 8 (c1)",
                    "intruder-a",
                ),
                ends("job 9 is no longer known to the scheduler", "twice-a"),
            ],
            now,
        )
        .unwrap();
    assert_eq!(ended, 3);
    // Ending a tombstone again, revoking or destroying it, or its TTL
    // counts nothing more.
    let again = store
        .end_sessions(&[ends("job 9 ended (CANCELLED)", "twice-a")], now)
        .unwrap();
    assert_eq!(again, 0);
    assert!(!store.revoke("twice-a", now).unwrap());
    assert_eq!(
        store.destroy("twice-a", "10.0.0.5", now).unwrap(),
        DestroyOutcome::Destroyed
    );
    let later = at("2026-01-01T12:05:00Z");
    // Every row goes at its TTL, tombstones included.
    assert_eq!(store.expire(later, 100).unwrap(), 6);

    let counted = store.gauges(later, 100).unwrap().ends_total;
    assert_eq!(
        counted,
        [
            (EndCause::Destroy, 1),
            (EndCause::Revoke, 1),
            (EndCause::Ttl, 1),
            (EndCause::JobEnd, 2),
            (EndCause::BindingMismatch, 1),
        ]
    );
}
