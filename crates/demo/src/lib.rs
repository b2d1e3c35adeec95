//! Machinery for trying satellite out and for testing it, kept out of the
//! product: a private Apache httpd that runs the shipped
//! `httpd-conf/satellite.conf` on a loopback port ([`private_apache`]), the
//! whole stack on loopback for a newcomer ([`demo`], behind `satellite
//! demo`), and `satellite serve` started as a child on a port the system
//! picks ([`serve_child`]); and, for the tests and the bench's soak
//! (feature `harness`), an HTTPS and websocket client (`client`) and a
//! stand-in notebook (`backend`).
//!
//! Only the `satellite` admin program, the integration tests' harness and
//! the bench use this crate. The product library and the CGI programs never name it, so
//! none of its code is linked into what Apache runs. It does not depend on
//! the `satellite` library either (that would be a cycle with the admin
//! program): the install tree the demo needs is made by a function its
//! caller passes in (`satellite init`'s).

#[cfg(feature = "harness")]
pub mod backend;
#[cfg(feature = "harness")]
pub mod client;
pub mod demo;
pub mod private_apache;
pub mod serve_child;
