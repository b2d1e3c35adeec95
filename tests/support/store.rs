//! Which store a test's site runs on, and store-neutral access to its
//! tables, so that one test runs on SQLite and on PostgreSQL alike.
//!
//! A test that is about behaviour both stores must share is written once
//! as `fn name(store: StoreKind)` and listed in [`on_both_stores!`], which
//! makes a `sqlite::name` and a `postgres::name` test of it. Its SQL is
//! the subset both databases speak, with `$1`, `$2` … placeholders (SQLite
//! reads `$1` as a named parameter, bound by position) and text
//! parameters; times are computed in Rust, not with SQLite's date
//! functions.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use satellite_core::store::pg_harness;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// The SQLite file `var/state.sqlite`.
    Sqlite,
    /// A fresh database in the tests' private PostgreSQL cluster
    /// (`database_url`).
    Postgres,
}

impl StoreKind {
    /// For PostgreSQL a new, empty database (its schema is `satellite
    /// migrate`'s to make), else nothing.
    pub fn new_database_url(self) -> Option<String> {
        match self {
            StoreKind::Sqlite => None,
            StoreKind::Postgres => Some(pg_harness::new_database()),
        }
    }
}

/// Makes, for each listed `fn name(store: StoreKind)`, the tests
/// `sqlite::name` and `postgres::name`.
// Not every test binary has tests on both stores.
#[allow(unused_macros)]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test]
            fn $name() {
                super::$name($crate::support::StoreKind::Sqlite);
            })*
        }
        mod postgres {
            $(#[test]
            fn $name() {
                super::$name($crate::support::StoreKind::Postgres);
            })*
        }
    };
}
pub(crate) use on_both_stores;

/// A value read back from either database.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
}

impl Value {
    #[track_caller]
    pub fn int(&self) -> i64 {
        match self {
            Value::Int(n) => *n,
            other => panic!("not an integer: {other:?}"),
        }
    }

    #[track_caller]
    pub fn real(&self) -> f64 {
        match self {
            Value::Real(x) => *x,
            Value::Int(n) => *n as f64,
            other => panic!("not a number: {other:?}"),
        }
    }

    #[track_caller]
    pub fn text(&self) -> String {
        match self {
            Value::Text(s) => s.clone(),
            other => panic!("not text: {other:?}"),
        }
    }
}

/// A connection to a site's database, whichever store it is.
pub enum Db {
    Sqlite(rusqlite::Connection),
    Postgres(postgres::Client),
}

impl Db {
    /// Connects to the SQLite file `file` or, when given, the PostgreSQL
    /// database `url`.
    pub fn connect(file: &PathBuf, url: Option<&str>) -> Db {
        match url {
            None => {
                let conn = rusqlite::Connection::open(file).unwrap();
                conn.busy_timeout(Duration::from_secs(10)).unwrap();
                Db::Sqlite(conn)
            }
            Some(url) => Db::Postgres(
                postgres::Client::connect(url, postgres::NoTls)
                    .unwrap_or_else(|e| panic!("connecting to the test database: {e}")),
            ),
        }
    }

    /// Runs `sql`; the number of rows it changed.
    #[track_caller]
    pub fn execute(&mut self, sql: &str, params: &[&str]) -> u64 {
        match self {
            Db::Sqlite(conn) => conn
                .execute(sql, rusqlite::params_from_iter(params))
                .unwrap_or_else(|e| panic!("{sql}: {e}")) as u64,
            Db::Postgres(client) => client
                .execute(sql, &pg_params(params))
                .unwrap_or_else(|e| panic!("{sql}: {e}")),
        }
    }

    /// Runs statements without parameters (`BEGIN`, `ROLLBACK`, …).
    #[track_caller]
    pub fn batch(&mut self, sql: &str) {
        match self {
            Db::Sqlite(conn) => conn.execute_batch(sql),
            Db::Postgres(client) => {
                return client
                    .batch_execute(sql)
                    .unwrap_or_else(|e| panic!("{sql}: {e}"))
            }
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Every row `sql` gives.
    #[track_caller]
    pub fn rows(&mut self, sql: &str, params: &[&str]) -> Vec<Vec<Value>> {
        match self {
            Db::Sqlite(conn) => {
                let mut stmt = conn.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
                let columns = stmt.column_count();
                let mut rows = stmt
                    .query(rusqlite::params_from_iter(params))
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
                let mut all = Vec::new();
                while let Some(row) = rows.next().unwrap_or_else(|e| panic!("{sql}: {e}")) {
                    all.push((0..columns).map(|i| sqlite_value(row, i)).collect());
                }
                all
            }
            Db::Postgres(client) => client
                .query(sql, &pg_params(params))
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .iter()
                .map(|row| {
                    (0..row.len())
                        .map(|i| pg_value(row, i).unwrap_or_else(|e| panic!("{sql}: {e}")))
                        .collect()
                })
                .collect(),
        }
    }

    /// The first row `sql` gives, if any.
    #[track_caller]
    pub fn row(&mut self, sql: &str, params: &[&str]) -> Option<Vec<Value>> {
        self.rows(sql, params).into_iter().next()
    }

    /// The first column of the first row, if there is a row.
    #[track_caller]
    pub fn value(&mut self, sql: &str, params: &[&str]) -> Option<Value> {
        self.row(sql, params).map(|row| row[0].clone())
    }

    /// `SELECT count(*) …`.
    #[track_caller]
    pub fn count(&mut self, sql: &str, params: &[&str]) -> i64 {
        self.value(sql, params)
            .unwrap_or_else(|| panic!("no row from {sql}"))
            .int()
    }

    /// Holds the store's writers' lock until [`batch`](Self::batch)
    /// ("ROLLBACK"): SQLite's write lock, PostgreSQL's row of
    /// `satellite_changes`, which every satellite writer takes first.
    pub fn begin_holding_the_write_lock(&mut self) {
        match self {
            Db::Sqlite(_) => self.batch("BEGIN IMMEDIATE"),
            Db::Postgres(_) => self.batch("BEGIN; SELECT 1 FROM satellite_changes FOR UPDATE"),
        }
    }
}

fn pg_params<'a>(params: &'a [&str]) -> Vec<&'a (dyn postgres::types::ToSql + Sync)> {
    params.iter().map(|p| p as _).collect()
}

fn sqlite_value(row: &rusqlite::Row, i: usize) -> Value {
    match row.get::<_, rusqlite::types::Value>(i).unwrap() {
        rusqlite::types::Value::Null => Value::Null,
        rusqlite::types::Value::Integer(n) => Value::Int(n),
        rusqlite::types::Value::Real(x) => Value::Real(x),
        rusqlite::types::Value::Text(s) => Value::Text(s),
        rusqlite::types::Value::Blob(b) => Value::Text(format!("{b:?}")),
    }
}

fn pg_value(row: &postgres::Row, i: usize) -> Result<Value, postgres::Error> {
    use postgres::types::Type;
    let ty = row.columns()[i].type_().clone();
    Ok(if ty == Type::INT2 {
        row.get::<_, Option<i16>>(i)
            .map_or(Value::Null, |n| Value::Int(n.into()))
    } else if ty == Type::INT4 {
        row.get::<_, Option<i32>>(i)
            .map_or(Value::Null, |n| Value::Int(n.into()))
    } else if ty == Type::INT8 {
        row.try_get::<_, Option<i64>>(i)?
            .map_or(Value::Null, Value::Int)
    } else if ty == Type::FLOAT8 {
        row.try_get::<_, Option<f64>>(i)?
            .map_or(Value::Null, Value::Real)
    } else {
        row.try_get::<_, Option<String>>(i)?
            .map_or(Value::Null, Value::Text)
    })
}

/// `YYYY-MM-DD HH:MM:SS` UTC, `offset_secs` from now: the text both
/// stores keep times in (SQLite's `datetime('now', …)`).
pub fn utc_text(offset_secs: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::seconds(offset_secs))
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

/// Seconds since the epoch (`lastseen`'s unit).
pub fn epoch_now() -> i64 {
    chrono::Utc::now().timestamp()
}
