//! TLS termination: the certificate the listener presents comes from this store, so a renewed
//! certificate is taken by a reload (SIGHUP, `/admin/reload`, or the file watch) without a
//! restart and without dropping a connection. TLS 1.2 and 1.3 only (Pingora's rustls listener);
//! ALPN offers `h2` and `http/1.1`.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

/// Read a PEM certificate chain and its private key, and check that they belong together.
pub fn load(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, String> {
    let open = |p: &Path| {
        File::open(p)
            .map(BufReader::new)
            .map_err(|e| format!("cannot read {}: {e}", p.display()))
    };
    let certs = rustls_pemfile::certs(&mut open(cert_file)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", cert_file.display()));
    }
    let key = rustls_pemfile::private_key(&mut open(key_file)?)
        .map_err(|e| format!("{}: not a PEM private key: {e}", key_file.display()))?
        .ok_or_else(|| format!("{}: no private key in it", key_file.display()))?;
    let signer = tokio_rustls::rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("{}: an unsupported key: {e}", key_file.display()))?;
    let certified = CertifiedKey::new(certs, signer);
    certified.keys_match().map_err(|e| {
        format!(
            "{} does not match the certificate in {}: {e}",
            key_file.display(),
            cert_file.display()
        )
    })?;
    Ok(certified)
}

/// The certificate in force, swapped whole by `reload`.
#[derive(Debug)]
pub struct CertStore {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertStore {
    pub fn open(cert_file: &Path, key_file: &Path) -> Result<Arc<CertStore>, String> {
        let certified = load(cert_file, key_file)?;
        Ok(Arc::new(CertStore {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            current: RwLock::new(Arc::new(certified)),
        }))
    }

    /// Read the files again: the certificate to `install`, or why it cannot be (the old one
    /// then stays).
    pub fn read(&self) -> Result<CertifiedKey, String> {
        load(&self.cert_file, &self.key_file)
    }

    /// Present this certificate from now on (handshakes in progress keep theirs).
    pub fn install(&self, fresh: CertifiedKey) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}
