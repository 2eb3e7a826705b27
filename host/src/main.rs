//! The `host` binary: logging, flags, then `app::run`.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        // Colours for a terminal; a file or a pipe gets plain text.
        .with_ansi(std::io::stdout().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,wasmtime_wasi_http=warn".into()),
        )
        .init();
    match host::app::run(host::config::Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // A manifest that cannot be used: one message, the usage-error status, nothing started.
        Err(e) if e.is::<host::config::ManifestError>() => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("Error: {e:?}");
            std::process::ExitCode::FAILURE
        }
    }
}
