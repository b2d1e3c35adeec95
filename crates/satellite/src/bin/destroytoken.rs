//! The `destroytoken.cgi` endpoint as a CGI program.
fn main() -> std::process::ExitCode {
    satellite::run_cgi(satellite_core::Endpoint::DestroyToken)
}
