//! `berthctl`: parse the command line, run it, exit with its code. Everything else lives in the
//! library so that tests can reach it.

use std::process::ExitCode;

fn main() -> ExitCode {
    berth_http::tls::install_crypto_provider();
    let invocation = berthctl::Invocation::from_env();
    ExitCode::from(berthctl::run(invocation))
}
