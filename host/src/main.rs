//! The `host` binary: logging, flags, then `app::run`.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,wasmtime_wasi_http=warn".into()),
        )
        .init();
    host::app::run(host::config::Args::parse()).await
}
