//! TLS client settings the host's outgoing connections share (PostgreSQL, origins outside the
//! host): servers verified against Mozilla's root authorities and those of an extra PEM file.

use anyhow::{Context as _, Result};
use std::path::Path;
use std::sync::Arc;

/// A rustls client configuration trusting Mozilla's roots and those in `ca_file`; `setting`
/// names the file's flag in errors (e.g. `STATE_CA_FILE`).
pub fn client_config(ca_file: Option<&Path>, setting: &str) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(file) = ca_file {
        let certs = CertificateDer::pem_file_iter(file)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("reading {setting} {}", file.display()))?;
        anyhow::ensure!(
            !certs.is_empty(),
            "{setting} {} holds no certificate",
            file.display()
        );
        for cert in certs {
            roots
                .add(cert)
                .with_context(|| format!("a certificate of {setting} {}", file.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
