//! The `host` binary: flags, logging and span export, then `app::run`.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = host::config::Args::parse();
    let telemetry = match host::telemetry::init(args.otlp_endpoint.as_deref()) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    raise_open_files_limit();
    let ran = host::app::run(args).await;
    telemetry.shutdown(std::time::Duration::from_secs(5)).await;
    match ran {
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
