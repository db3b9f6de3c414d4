//! imagemirror: keeps container images mirrored between registries, as a Kubernetes operator
//! and as a one-shot CLI on the same `ImageMirror` YAML.
#![forbid(unsafe_code)]

pub mod api;
pub mod cli;
pub mod layout;
pub mod mirror;
pub mod registry;
pub mod transfer;

/// Installs ring as the process's rustls crypto provider (one backend for kube and reqwest).
/// Idempotent; every registry client calls it, so library users need not.
pub fn install_crypto_provider() {
    // An Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
pub mod controller;
