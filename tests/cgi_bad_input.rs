//! Nothing a client can send panics a program or changes the database
//! unless the request is valid.

mod support;
