//! TLS trust for the HTTP clients: the system's root certificates, loaded once per process
//! (from a thread of their own when [`preload`] is called at start-up), plus any private CA,
//! in one rustls configuration that a registry's two clients share.
//!
//! Why not reqwest's own: it loads and parses the system store for every client it builds
//! (~35 ms here, twice per TLS setting since blobs and metadata have a client each), on the
//! path of the first request. Loaded once, in the background while the command reads its
//! input, the first handshake finds the roots ready or nearly so.

use std::sync::{Arc, OnceLock};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

static SYSTEM: OnceLock<Arc<RootCertStore>> = OnceLock::new();

/// Starts loading the system's root certificates on a thread of their own; the first client
/// built waits for what is left of it. Calling it again, or never, is fine.
pub fn preload() {
    if SYSTEM.get().is_none() {
        let _ = std::thread::Builder::new()
            .name("root-certificates".into())
            .spawn(system);
    }
}

/// The system's root certificates, loaded on first use (waiting for a load in progress).
fn system() -> Arc<RootCertStore> {
    SYSTEM
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for error in &found.errors {
                tracing::warn!(%error, "reading the system's CA certificates");
            }
            let mut store = RootCertStore::empty();
            let (added, ignored) = store.add_parsable_certificates(found.certs);
            tracing::debug!(added, ignored, "system root certificates loaded");
            Arc::new(store)
        })
        .clone()
}

/// The rustls configuration for one TLS setting, without ALPN (each client sets its own).
pub(crate) fn client_config(
    options: &super::RegistryOptions,
) -> Result<rustls::ClientConfig, String> {
    crate::install_crypto_provider();
    let provider = CryptoProvider::get_default()
        .cloned()
        .ok_or("no TLS crypto provider is installed")?;
    let extra = match &options.ca_pem {
        Some(pem) => {
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("CA certificates do not parse: {e}"))?;
            if certs.is_empty() {
                return Err("CA bundle holds no certificate".into());
            }
            certs
        }
        None => Vec::new(),
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?;
    let builder = if options.insecure_skip_tls_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
    } else {
        let mut roots = (*system()).clone();
        for cert in extra {
            roots
                .add(cert)
                .map_err(|e| format!("CA certificates do not parse: {e}"))?;
        }
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| format!("no CA certificates to verify with: {e}"))?;
        builder.with_webpki_verifier(verifier)
    };
    Ok(builder.with_no_client_auth())
}

/// `insecureSkipTLSVerify`: any certificate is accepted; the handshake's signatures are still
/// checked (they prove the server holds the key of the certificate it sent).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
