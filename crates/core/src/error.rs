//! The typed error of the core crate.

use std::path::PathBuf;

/// Everything that can go wrong below the HTTP layer.
///
/// Endpoint handlers turn these into `Oops!` answers with a fitting status;
/// binaries wrap them with `anyhow::Context`.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("configuration file {path}: {message}")]
    Config { path: PathBuf, message: String },

    #[error("configuration: {0}")]
    ConfigValue(String),

    #[error("word list {path}: {message}")]
    Wordlist { path: PathBuf, message: String },

    #[error("only {usable} usable words (at least {needed} are needed for tokens worth the name)")]
    TooFewWords { usable: usize, needed: usize },

    #[error("database {path} does not exist (create it with `satellite migrate`)")]
    DatabaseMissing { path: PathBuf },

    #[error("database {path} has no satellite tables (create them with `satellite migrate`)")]
    DatabaseEmpty { path: PathBuf },

    #[error("database {path} was written by a newer satellite (schema version {found}, this build knows {known})")]
    DatabaseFromFuture {
        path: PathBuf,
        found: i64,
        known: i64,
    },

    #[error("database {path} is not a satellite database: {why}")]
    NotSatelliteDatabase { path: PathBuf, why: String },

    #[error("route for token-id {token_id} refused: {why}")]
    RouteRefused { token_id: String, why: String },

    #[error("publishing routes: {0}")]
    Publication(String),

    #[error(
        "database {path}: rows share an alias_compare_hash, so it cannot be made unique: {aliases}"
    )]
    DuplicateAliases { path: PathBuf, aliases: String },

    #[error("database is busy (another writer held the lock past the busy timeout)")]
    Busy,

    #[error("database or disk is full (nothing was written)")]
    Full,

    #[error(
        "{database} already holds {tokens} token(s): a site moves only into a database without any"
    )]
    NotEmpty { database: String, tokens: i64 },

    #[error("database is read-only")]
    ReadOnly,

    #[error("database: {0}")]
    Sqlite(rusqlite::Error),

    /// A PostgreSQL failure that a retry would not mend (a bad query, a
    /// permission, a value of the wrong type in a row).
    #[error("database: {0}")]
    Postgres(postgres::Error),

    /// The PostgreSQL server cannot be reached or dropped the connection:
    /// temporary, as [`CoreError::Busy`] (a restart, a failover).
    #[error("database {database} is unreachable: {why}")]
    Unreachable { database: String, why: String },

    #[error("PostgreSQL database {database} has no satellite schema (create it with `satellite migrate`)")]
    PgNoSchema { database: String },

    #[error("PostgreSQL database {database}: {why}")]
    PgSchema { database: String, why: String },

    /// The I/O error is part of the message and not also its `source()`:
    /// a chain printed whole (`{:#}`) would say it twice.
    #[error("{context}: {error}")]
    Io {
        context: String,
        error: std::io::Error,
    },
}

impl CoreError {
    pub fn io(context: impl Into<String>, error: std::io::Error) -> Self {
        CoreError::Io {
            context: context.into(),
            error,
        }
    }

    /// Classifies SQLite failures that callers treat differently:
    /// a busy database is worth a retry (503), a read-only one is not.
    pub fn from_sqlite(err: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode;
        // Growing the wal-index (-shm) of a new connection fails so when
        // the disk is full: every CGI process opens one.
        if err
            .sqlite_error()
            .is_some_and(|e| e.extended_code == rusqlite::ffi::SQLITE_IOERR_SHMSIZE)
        {
            return CoreError::Full;
        }
        match err.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked) => CoreError::Busy,
            Some(ErrorCode::ReadOnly) => CoreError::ReadOnly,
            Some(ErrorCode::DiskFull) => CoreError::Full,
            _ => CoreError::Sqlite(err),
        }
    }

    /// True when the failure is temporary and the client may simply try
    /// again: a busy database at once, a full disk once an admin has made
    /// room (nothing was written either way).
    pub fn is_temporary(&self) -> bool {
        matches!(
            self,
            CoreError::Busy | CoreError::Full | CoreError::Unreachable { .. }
        )
    }
}

impl From<rusqlite::Error> for CoreError {
    fn from(err: rusqlite::Error) -> Self {
        CoreError::from_sqlite(err)
    }
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;
