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
    raise_open_files_limit();
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

/// Raises this process's limit of open files to the most it may have: each client connection
/// is a file, and the host holds up to `MAX_CONNECTIONS` per service port.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: both calls only read or write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            let wanted = limit.rlim_cur;
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!(open_files = wanted, "could not raise the open files limit");
            }
        }
    }
}
