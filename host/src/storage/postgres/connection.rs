//! Connections to PostgreSQL: the session settings every connection gets, TLS, and sessions
//! that leave the pool unless their transaction ended.

use anyhow::{Context as _, Result};
use std::path::Path;
use std::time::Duration;
use tokio_postgres_rustls::MakeRustlsConnect;

/// The settings every connection of `url` gets: a commit waits at most `wait` for a lock
/// (the invocation's deadline), a session idle in a transaction (its host died mid-commit, or
/// was cut off) is ended by the server, with the locks it held, and TCP keepalives notice a
/// peer that is gone.
pub(super) fn connection_config(url: &str, wait: Duration) -> Result<tokio_postgres::Config> {
    let mut config: tokio_postgres::Config = url.parse().context("STATE_URL")?;
    let ms = wait.as_millis().max(1);
    // READ COMMITTED whatever the server's default: a commit re-reads what it read after
    // taking its locks, which a snapshot older than the locks would not see.
    let ours = format!(
        "-c lock_timeout={ms} -c statement_timeout={} -c idle_in_transaction_session_timeout={} \
         -c default_transaction_isolation=read\\ committed",
        ms * 2,
        (ms * 2).max(10_000)
    );
    // The URL's own options (`?options=...`) come last, so that they win.
    let options = match config.get_options() {
        Some(theirs) => format!("{ours} {theirs}"),
        None => ours,
    };
    config
        .options(&options)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(30));
    Ok(config)
}

/// TLS for connections whose `sslmode` asks for it: servers verified against Mozilla's root
/// authorities and those in `ca_file` (PEM).
pub(super) fn tls(ca_file: Option<&Path>) -> Result<MakeRustlsConnect> {
    let config =
        crate::types::tls::client_config(ca_file, "STATE_CA_FILE").context("TLS for PostgreSQL")?;
    Ok(MakeRustlsConnect::new(config))
}

/// A pooled connection that goes back to the pool only once its transaction is known to have
/// ended; dropped before ([`Session::ended`]), its session is closed and the server rolls back.
pub(super) struct Session(Option<deadpool_postgres::Object>);

impl Session {
    pub(super) fn new(client: deadpool_postgres::Object) -> Session {
        Session(Some(client))
    }

    pub(super) fn ended(mut self) {
        drop(self.0.take());
    }
}

impl std::ops::Deref for Session {
    type Target = deadpool_postgres::Object;

    fn deref(&self) -> &Self::Target {
        self.0
            .as_ref()
            .expect("a session is used only until it ended")
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}
