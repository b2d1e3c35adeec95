//! `cron`: expire tokens, publish routes, test and reload Apache. Run it
//! every minute from cron, or once as `cron --watch` under systemd.
fn main() -> std::process::ExitCode {
    satellite::run_cron(std::env::args_os().skip(1).collect())
}
