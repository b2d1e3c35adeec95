//! The stand-in notebook of the tests and the bench
//! (`satellite_demo::backend`).

// Not every test binary that includes the harness runs a backend.
#![allow(unused_imports)]

pub use satellite_demo::backend::*;
