//! The glue between the transports and the core: running one endpoint as a
//! CGI program, and the admin command's subcommands (the cron program's
//! front end is `satellite_cron::cli`). The binaries in `src/bin/` are one
//! line each.

pub mod admin;
pub mod apache_status;
pub mod check;
pub mod install;
pub mod jobstates;
pub mod live;
pub use satellite_core::subprocess;
pub use satellite_cron::cli::{cron_main, run_cron, CRON_HELP};

use std::io::{self, Write};
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::process::ExitCode;

use http::StatusCode;
use satellite_cgi::CgiError;
use satellite_core::endpoints::{bug_response, config_error_response, oops, Body};
use satellite_core::syslog::Syslog;
use satellite_core::{handle, ClientAddr, Config, Context, Endpoint};

/// Context for an error about one file that names the file once: the
/// configuration's and the store's errors name their path already, a bare
/// SQLite or I/O error does not.
pub trait AboutPath<T> {
    /// Adds `<what> <path>` unless the error's message names `path`.
    fn about_path(self, what: &str, path: &Path) -> anyhow::Result<T>;
}

impl<T, E> AboutPath<T> for Result<T, E>
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn about_path(self, what: &str, path: &Path) -> anyhow::Result<T> {
        self.map_err(|err| {
            let path = path.display().to_string();
            let names_path = err.to_string().contains(&path);
            let err = anyhow::Error::new(err);
            if names_path {
                err
            } else {
                err.context(format!("{what} {path}"))
            }
        })
    }
}

/// Answers the one request of this process for `endpoint`, as Apache's
/// mod_cgi expects: meta-variables in, a `Status:` header and body out, and
/// diagnostics on stderr (Apache's error log).
pub fn run_cgi(endpoint: Endpoint) -> ExitCode {
    let name = endpoint.name();
    // A panic would be a bug; it must still not leave Apache with a
    // half-written answer (and any open transaction rolls back on unwind).
    panic::set_hook(Box::new(move |info| {
        eprintln!("satellite {name}: bug: {info}")
    }));
    let answered = panic::catch_unwind(AssertUnwindSafe(|| answer(endpoint)))
        .unwrap_or_else(|_| Some(bug_response()));
    let Some(response) = answered else {
        return ExitCode::from(2);
    };
    match satellite_cgi::write_response(io::stdout().lock(), &response) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let _ = writeln!(io::stderr(), "satellite {name}: writing the answer: {err}");
            ExitCode::FAILURE
        }
    }
}

fn answer(endpoint: Endpoint) -> Option<http::Response<Body>> {
    let name = endpoint.name();
    if !satellite_cgi::started_by_web_server() {
        eprintln!(
            "{name}: this is a CGI program: install it as {name}.cgi and let the web server run it \
             (GATEWAY_INTERFACE is not set)"
        );
        return None;
    }
    let config = match Config::load() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("satellite {name}: {err}");
            return Some(config_error_response());
        }
    };
    let cgi = satellite_cgi::read_request(
        std::env::vars_os(),
        io::stdin().lock(),
        config.max_body_bytes,
    );
    let cgi = match cgi {
        Ok(cgi) => cgi,
        Err(err) => {
            eprintln!("satellite {name}: {err}");
            return Some(refusal(&config, &err));
        }
    };
    let mut request = cgi.request;
    if let Some(addr) = cgi.remote_addr {
        request.extensions_mut().insert(ClientAddr(addr));
    }
    let syslog = Syslog::new(&config.syslog_socket, "satellite").quiet_when_missing();
    let mut ctx = Context::new(config, syslog);
    Some(handle(&mut ctx, endpoint, &request))
}

/// The answer to a request the CGI environment could not describe.
fn refusal(config: &Config, err: &CgiError) -> http::Response<Body> {
    let (status, message) = match err {
        CgiError::BodyTooLarge { limit } => (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Request body too large (at most {limit} bytes)"),
        ),
        CgiError::UriTooLong => (StatusCode::URI_TOO_LONG, "Request URI too long".to_owned()),
        _ => (StatusCode::BAD_REQUEST, "Malformed request".to_owned()),
    };
    oops(config, status, &message)
}

/// Writes `text` to standard output for a long-running loop: a closed
/// stdout (the journal restarted, a pipe whose reader went) must not end
/// the loop, so errors are dropped, never a panic as `print!` would.
pub fn say(text: &str) {
    let mut out = io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// [`say`] for standard error.
pub fn complain(text: &str) {
    let _ = writeln!(io::stderr().lock(), "{text}");
}
