//! TLS at the edge: certificates chosen by SNI, swapped in without a restart (on reload and when
//! the files change), and CA bundles for upstream TLS.
//!
//! The acceptor holds one [`Certificates`] for the life of the process; what changes is the
//! store inside it. A handshake reads the store once, so open connections keep the certificate
//! they were made with and new ones get the new certificate.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Where one certificate comes from and which names it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSource {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
    /// Host names (`api.example.com`, `*.example.com`) this certificate is chosen for.
    pub server_names: Vec<String>,
}

/// A loaded set of certificates; the first is the default when no name matches.
#[derive(Debug)]
struct Loaded {
    entries: Vec<(Vec<String>, Arc<CertifiedKey>)>,
    /// Each certificate's file and its leaf's notAfter (Unix seconds).
    expiry: Vec<(String, i64)>,
}

impl Loaded {
    fn load(sources: &[CertSource]) -> Result<Loaded, String> {
        if sources.is_empty() {
            return Err("at least one certificate is required".into());
        }
        let entries = sources
            .iter()
            .map(|s| {
                let names = s
                    .server_names
                    .iter()
                    .map(|n| n.to_ascii_lowercase())
                    .collect();
                Ok((names, Arc::new(certified_key(s)?)))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let expiry = sources
            .iter()
            .zip(&entries)
            .filter_map(|(s, (_, key))| {
                let leaf = key.cert.first()?;
                let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
                Some((
                    s.cert_file.display().to_string(),
                    cert.validity().not_after.timestamp(),
                ))
            })
            .collect();
        Ok(Loaded { entries, expiry })
    }

    fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let sni = sni.map(str::to_ascii_lowercase);
        let found = sni.as_deref().and_then(|host| {
            self.entries
                .iter()
                .find(|(names, _)| names.iter().any(|n| name_matches(n, host)))
        });
        found.or(self.entries.first()).map(|(_, key)| key.clone())
    }
}

/// `*.example.com` matches exactly one label in front of `example.com`.
fn name_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .strip_suffix(suffix)
            .and_then(|head| head.strip_suffix('.'))
            .is_some_and(|label| !label.is_empty() && !label.contains('.')),
        None => pattern == host,
    }
}

/// The process's one TLS crypto provider (installed as rustls's default on first use): `ring`,
/// or AWS-LC with the `aws-lc` feature. Chosen explicitly rather than by whichever crate
/// features happen to be enabled; README, Performance, has the handshake rates of both.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    #[cfg(feature = "aws-lc")]
    let chosen = rustls::crypto::aws_lc_rs::default_provider;
    #[cfg(not(feature = "aws-lc"))]
    let chosen = rustls::crypto::ring::default_provider;
    let _ = chosen().install_default();
    rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(chosen()))
}

fn certified_key(s: &CertSource) -> Result<CertifiedKey, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&s.cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", s.cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", s.cert_file.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&s.key_file)
        .map_err(|e| format!("{}: {e}", s.key_file.display()))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{}: unusable private key: {e}", s.key_file.display()))?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match().map_err(|e| {
        format!(
            "{}: the key does not match the certificate: {e}",
            s.key_file.display()
        )
    })?;
    Ok(ck)
}

/// The listener's certificates: an SNI resolver whose store can be replaced.
#[derive(Debug)]
pub struct Certificates {
    sources: Mutex<Vec<CertSource>>,
    store: ArcSwap<Loaded>,
    modified: Mutex<Vec<Option<SystemTime>>>,
}

impl Certificates {
    /// Loads every source; the error names the file.
    pub fn load(sources: Vec<CertSource>) -> Result<Certificates, String> {
        let store = Loaded::load(&sources)?;
        let modified = mtimes(&sources);
        Ok(Certificates {
            sources: Mutex::new(sources),
            store: ArcSwap::from_pointee(store),
            modified: Mutex::new(modified),
        })
    }

    /// Takes over the sources and loaded certificates of `other` (a reload's new set).
    pub fn adopt(&self, other: &Certificates) {
        let (Ok(mut sources), Ok(mut modified), Ok(new_sources), Ok(new_modified)) = (
            self.sources.lock(),
            self.modified.lock(),
            other.sources.lock(),
            other.modified.lock(),
        ) else {
            return;
        };
        self.store.store(other.store.load_full());
        *sources = new_sources.clone();
        *modified = new_modified.clone();
    }

    /// Each certificate file in use and its leaf's notAfter, in Unix seconds.
    pub fn expiry(&self) -> Vec<(String, i64)> {
        self.store.load().expiry.clone()
    }

    /// Re-reads the files when one of them changed; a set that does not load keeps the old one.
    pub fn reload_if_changed(&self) {
        let (Ok(sources), Ok(mut modified)) = (self.sources.lock(), self.modified.lock()) else {
            return;
        };
        let now = mtimes(&sources);
        if now == *modified {
            return;
        }
        match Loaded::load(&sources) {
            Ok(store) => {
                self.store.store(Arc::new(store));
                tracing::info!(certificates = sources.len(), "TLS certificates reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS certificates not reloaded, keeping the previous ones")
            }
        }
        *modified = now;
    }
}

fn mtimes(sources: &[CertSource]) -> Vec<Option<SystemTime>> {
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    sources
        .iter()
        .flat_map(|s| [mtime(&s.cert_file), mtime(&s.key_file)])
        .collect()
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.store.load().pick(hello.server_name())
    }
}

/// The certificates of a PEM CA bundle, as DER, checked to parse.
pub fn load_ca_bundle(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", path.display()));
    }
    for c in &certs {
        x509_parser::parse_x509_certificate(c.as_ref())
            .map_err(|e| format!("{}: not a valid certificate: {e}", path.display()))?;
    }
    Ok(certs.into_iter().map(|c| c.as_ref().to_vec()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_patterns() {
        assert!(name_matches("api.example.com", "api.example.com"));
        assert!(name_matches("*.example.com", "api.example.com"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(!name_matches("*.example.com", "a.b.example.com"));
        assert!(!name_matches("*.example.com", "apiexample.com"));
    }
}
