//! The stand-in notebook of the tests and the bench
//! (`satellite_demo::backend`).

pub use satellite_demo::backend::*;
