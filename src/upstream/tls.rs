//! rustls set-up: one crypto provider (ring) for the whole process, and the upstream client config.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

/// Installs ring as the process-wide rustls provider. Idempotent; an already installed provider
/// is kept (DEPENDENCIES.md: two providers in one process panic at start-up).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Client config with webpki roots, plus the PEM certificates in `ca_file` when set.
/// Certificate verification is always on.
pub fn client_config(ca_file: Option<&Path>) -> anyhow::Result<rustls::ClientConfig> {
    install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca_path) = ca_file {
        let ca_file = ca_path.display();
        let pem = std::fs::read(ca_path)
            .map_err(|e| anyhow::anyhow!("upstream.ca_file: {ca_file}: {e}"))?;
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| anyhow::anyhow!("upstream.ca_file: {ca_file}: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| anyhow::anyhow!("upstream.ca_file: {ca_file}: {e}"))?;
            added += 1;
        }
        if added == 0 {
            anyhow::bail!("upstream.ca_file: {ca_file}: no PEM certificate found");
        }
    }
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(Arc::new(roots))
        .with_no_client_auth())
}

/// A TLS acceptor for the client listener from PEM files.
pub fn server_acceptor(
    cert_path: &Path,
    key_path: &Path,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let (cert_file, key_file) = (cert_path.display(), key_path.display());
    install_crypto_provider();
    let pem = std::fs::read(cert_path)
        .map_err(|e| anyhow::anyhow!("server.tls_cert: {cert_file}: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("server.tls_cert: {cert_file}: {e}"))?;
    if certs.is_empty() {
        anyhow::bail!("server.tls_cert: {cert_file}: no PEM certificate found");
    }
    let pem =
        std::fs::read(key_path).map_err(|e| anyhow::anyhow!("server.tls_key: {key_file}: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            anyhow::anyhow!("server.tls_key: {key_file}: no PEM private key found")
        }
        e => anyhow::anyhow!("server.tls_key: {key_file}: {e}"),
    })?;
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| anyhow::anyhow!("server.tls_cert/tls_key: {e}"))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
