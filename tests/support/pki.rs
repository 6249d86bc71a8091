//! TLS for the tests: a test CA, leaves for `localhost`, clients that trust it, and a gateway
//! config with a TLS listener.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::*;

/// A test CA and leaf certificates for `localhost` it signs.
pub struct TestPki {
    pub ca: rcgen::Certificate,
    pub ca_key: rcgen::KeyPair,
}

impl TestPki {
    pub fn new() -> TestPki {
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "liveness-gateway test CA");
        let ca = params.self_signed(&ca_key).expect("ca");
        TestPki { ca, ca_key }
    }

    /// Write a new leaf for `localhost` (chain and key) to `dir`; its DER.
    pub fn leaf(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf, Vec<u8>) {
        self.leaf_for(dir, name, "localhost")
    }

    /// Write a new leaf for `host` (a name, or an IP address) to `dir`; its DER.
    pub fn leaf_for(&self, dir: &Path, name: &str, host: &str) -> (PathBuf, PathBuf, Vec<u8>) {
        let params = rcgen::CertificateParams::new(vec![host.to_string()]).expect("params");
        self.write_leaf(dir, name, params, "")
    }

    /// A leaf for `localhost` valid until midnight UTC `days` from today, written as `name`
    /// with `tail` (PEM certificates) after it in the chain file; the leaf's notAfter in Unix
    /// seconds.
    pub fn leaf_expiring(
        &self,
        dir: &Path,
        name: &str,
        days: i64,
        tail: &str,
    ) -> (PathBuf, PathBuf, i64) {
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        let end = expire_at_midnight_in(&mut params, days);
        let (c, k, _) = self.write_leaf(dir, name, params, tail);
        (c, k, end)
    }

    /// Sign `params` with a new key, and write the chain (the leaf, then `tail`) and the key
    /// as `name` in `dir`; the leaf's DER.
    fn write_leaf(
        &self,
        dir: &Path,
        name: &str,
        params: rcgen::CertificateParams,
        tail: &str,
    ) -> (PathBuf, PathBuf, Vec<u8>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("leaf");
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, format!("{}{tail}", cert.pem())).expect("cert");
        std::fs::write(&k, key.serialize_pem()).expect("key");
        (c, k, cert.der().to_vec())
    }

    /// A CA certificate named `cn`, valid until midnight UTC `days` from today, to put in a
    /// chain after a leaf: its PEM and its notAfter in Unix seconds.
    pub fn intermediate_expiring(&self, cn: &str, days: i64) -> (String, i64) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let end = expire_at_midnight_in(&mut params, days);
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("intermediate");
        (cert.pem(), end)
    }

    /// The CA's certificate as a PEM file in `dir`.
    pub fn ca_file(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, self.ca.pem()).expect("ca");
        path
    }

    pub fn client(&self, tls: SocketAddr, http1_only: bool) -> reqwest::Client {
        let root = reqwest::Certificate::from_pem(self.ca.pem().as_bytes()).expect("root");
        let mut b = reqwest::Client::builder()
            .add_root_certificate(root)
            .resolve("localhost", tls)
            .timeout(Duration::from_secs(30));
        if http1_only {
            b = b.http1_only();
        }
        b.build().expect("client")
    }

    /// The leaf certificate a new TLS connection to `addr` is shown.
    pub async fn presented(&self, addr: SocketAddr) -> Vec<u8> {
        use tokio_rustls::rustls;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).expect("root");
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let tls = connector.connect(name, tcp).await.expect("handshake");
        tls.get_ref().1.peer_certificates().expect("certs")[0].to_vec()
    }
}

pub fn tls_gateway(
    emu: &liveness_gateway_dev::emulator::EmulatorHandle,
    cert: &Path,
    key: &Path,
) -> (TestGateway, SocketAddr) {
    let port = free_port();
    let gw = TestGateway::for_emulator(emu).set(
        "server.tls",
        &format!(
            "{{ listen = \"127.0.0.1:{port}\", cert_file = {:?}, key_file = {:?} }}",
            cert.display().to_string(),
            key.display().to_string()
        ),
    );
    (gw, format!("127.0.0.1:{port}").parse().expect("addr"))
}

/// The common start of a TLS test: a folder, a test CA, a leaf for `localhost`, the emulator,
/// and a gateway config with a TLS listener on a free port.
pub struct TlsSetup {
    pub dir: tempfile::TempDir,
    pub pki: TestPki,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub leaf: Vec<u8>,
    pub emu: liveness_gateway_dev::emulator::EmulatorHandle,
    pub builder: TestGateway,
    pub tls: SocketAddr,
}

pub fn setup() -> TlsSetup {
    let dir = tempfile::tempdir().expect("dir");
    let pki = TestPki::new();
    let (cert, key, leaf) = pki.leaf(dir.path(), "leaf");
    let emu = start_emulator();
    let (builder, tls) = tls_gateway(&emu, &cert, &key);
    TlsSetup {
        dir,
        pki,
        cert,
        key,
        leaf,
        emu,
        builder,
        tls,
    }
}

/// Make `params` expire at midnight UTC `days` from today; that time in Unix seconds.
fn expire_at_midnight_in(params: &mut rcgen::CertificateParams, days: i64) -> i64 {
    use chrono::Datelike;
    let day = (chrono::Utc::now() + chrono::Duration::days(days)).date_naive();
    params.not_after = rcgen::date_time_ymd(day.year(), day.month() as u8, day.day() as u8);
    day.and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc()
        .timestamp()
}
