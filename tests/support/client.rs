//! The HTTPS client of the tests and the bench (`satellite_demo::client`).

// Not every test binary that includes the harness talks to Apache.
#![allow(unused_imports)]

pub use satellite_demo::client::*;
