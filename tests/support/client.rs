//! The HTTPS client of the tests and the bench (`satellite_demo::client`).

pub use satellite_demo::client::*;
