//! The core of satellite, the reverse-proxy broker that puts an HPC user's
//! notebook on the web: tokens drawn from the EFF word list, the SQLite store
//! of hashed alias → host:port mappings, job states, configuration, and the
//! endpoint handlers that the CGI programs and the native server share.
//!
//! Nothing here reads the process environment or writes to stdout except
//! [`config::Config::load`]; the transports live in their own crates.

pub mod config;
pub mod endpoints;
pub mod error;
pub mod files;
pub mod ipmask;
pub mod jobstate;
pub mod logid;
pub mod metrics;
pub mod publish;
pub mod query;
pub mod ratelimit;
pub mod routes;
pub mod sessions;
pub mod store;
/// Helper programs run with a deadline: see `satellite-process`.
pub use satellite_process as subprocess;
pub mod syslog;
pub mod token;
pub mod tunnels;

pub use config::Config;
pub use endpoints::{handle, ClientAddr, Context, Endpoint};
pub use error::{CoreError, Result};
pub use store::{PgStore, SqliteStore, Store};
