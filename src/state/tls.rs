//! TLS termination: the certificate the listener presents comes from this store, so a renewed
//! certificate is taken by a reload (SIGHUP, `/admin/reload`, or the file watch) without a
//! restart and without dropping a connection. TLS 1.2 and 1.3 only (Pingora's rustls listener);
//! ALPN offers `h2` and `http/1.1`.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

/// A chain is warned about this long before its first certificate expires: automated renewals
/// (ACME) come 30 days before, so a chain this close has missed its renewal.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 86_400);

/// When a chain stops working: the first of its certificates to expire (an intermediate can go
/// before the leaf), and which one that is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiry {
    /// Its `notAfter`, in Unix seconds.
    pub not_after: i64,
    pub subject: String,
}

/// The expiry of the chain `certified` presents; `None` when no certificate in it parses (rustls
/// has already taken the chain: it is served all the same).
pub fn expiry(certified: &CertifiedKey) -> Option<Expiry> {
    certified
        .cert
        .iter()
        .filter_map(|der| {
            let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
            Some(Expiry {
                not_after: cert.validity().not_after.timestamp(),
                subject: cert.subject().to_string(),
            })
        })
        .min_by_key(|e| e.not_after)
}

impl Expiry {
    /// What to tell an operator at `now` (Unix seconds): an expired chain, or one with less than
    /// `EXPIRY_WARNING` left; nothing otherwise.
    pub fn warning(&self, now: i64) -> Option<String> {
        let left = self.not_after - now;
        let when = chrono::DateTime::from_timestamp(self.not_after, 0)
            .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
            .unwrap_or_else(|| self.not_after.to_string());
        if left <= 0 {
            Some(format!(
                "the certificate \"{}\" in the chain expired on {when}: clients refuse the chain",
                self.subject
            ))
        } else if left < EXPIRY_WARNING.as_secs() as i64 {
            let hours = left / 3600;
            let within = if hours >= 48 {
                format!("{} days", hours / 24)
            } else {
                format!("{hours} h")
            };
            Some(format!(
                "the certificate \"{}\" in the chain expires on {when} (in {within}): renew it; a reload takes the renewed files",
                self.subject,
            ))
        } else {
            None
        }
    }
}

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
    /// `tls_certificate_expiry_timestamp_seconds`.
    expiry: prometheus::IntGauge,
}

impl CertStore {
    pub fn open(
        cert_file: &Path,
        key_file: &Path,
        expiry: prometheus::IntGauge,
    ) -> Result<Arc<CertStore>, String> {
        let certified = load(cert_file, key_file)?;
        note_expiry(&certified, &expiry);
        Ok(Arc::new(CertStore {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            current: RwLock::new(Arc::new(certified)),
            expiry,
        }))
    }

    /// Read the files again: the certificate to `install`, or why it cannot be (the old one
    /// then stays).
    pub fn read(&self) -> Result<CertifiedKey, String> {
        load(&self.cert_file, &self.key_file)
    }

    /// Present this certificate from now on (handshakes in progress keep theirs).
    pub fn install(&self, fresh: CertifiedKey) {
        note_expiry(&fresh, &self.expiry);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
    }
}

/// Export when the chain stops working, and warn when that is near.
fn note_expiry(certified: &CertifiedKey, gauge: &prometheus::IntGauge) {
    let Some(e) = expiry(certified) else {
        tracing::warn!(
            "server.tls: no certificate of the chain parses as X.509: its expiry is not known"
        );
        return;
    };
    gauge.set(e.not_after);
    if let Some(w) = e.warning(chrono::Utc::now().timestamp()) {
        tracing::warn!("server.tls: {w}");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warned_within_14_days_and_once_expired() {
        let day = 86_400;
        let e = Expiry {
            not_after: 100 * day,
            subject: "CN=gw".into(),
        };
        assert_eq!(e.warning(100 * day - 15 * day), None);
        let soon = e.warning(100 * day - 5 * day).expect("5 days left");
        assert!(
            soon.contains("CN=gw") && soon.contains("in 5 days"),
            "{soon}"
        );
        let close = e.warning(100 * day - 3600 * 30).expect("30 h left");
        assert!(close.contains("in 30 h"), "{close}");
        let gone = e.warning(100 * day).expect("expired");
        assert!(gone.contains("expired on 1970-04-11 00:00 UTC"), "{gone}");
    }
}
