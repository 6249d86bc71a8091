//! A config where the gateway runs: its plain checks (`config`), then what it names beyond its
//! text, read here: the certificate and its key (they load and match), the upstream's and the
//! store's CAs, the folder of the budget state file, the issuers' JWKS files (they parse), the
//! receipts' signing key and listed public keys.
//! `serve`, every reload and `check-config` load a file through here, and every problem of both
//! kinds is reported at once, each with its path in the file. The live objects are built from
//! the files afterwards (`AppState`), and fail the same way should one change in between.

use std::path::Path;

use crate::auth::KeySet;
use crate::config::{Config, ConfigErrors, ConfigIssue, EnvLookup, NamedFiles, RawConfig};

/// Read, parse and check a config file, and read the files it names.
pub fn load(path: &Path, env: EnvLookup<'_>) -> Result<Config, ConfigErrors> {
    let raw = RawConfig::read(path)?;
    let files = raw.named_files();
    let checked = Config::validate_file(raw, path, env);
    let mut issues = match &checked {
        Ok(_) => Vec::new(),
        Err(e) => e.0.clone(),
    };
    issues.extend(file_issues(&files));
    // The receipts' signing key (from its file or its variable) and the listed public keys.
    if let Ok(Some(receipts)) = checked.as_ref().map(|c| c.receipts.as_ref()) {
        if let Err(message) = crate::receipt::Receipts::new(receipts) {
            issues.push(ConfigIssue {
                path: "receipts".into(),
                message,
            });
        }
    }
    match checked {
        Ok(config) if issues.is_empty() => Ok(config),
        _ => Err(ConfigErrors(issues)),
    }
}

/// What is wrong with the files a config names: each one that cannot be read here, or does not
/// hold what it should.
pub fn file_issues(files: &NamedFiles) -> Vec<ConfigIssue> {
    let mut out = Vec::new();
    let mut issue = |path: &str, message: String| {
        out.push(ConfigIssue {
            path: path.into(),
            message,
        })
    };
    if let Some(ca) = files.upstream_ca.as_ref().filter(|ca| !ca.is_file()) {
        issue(
            "upstream.ca_file",
            format!("{} is not a readable file", ca.display()),
        );
    }
    for (at, file) in &files.jwks {
        if let Err(m) = KeySet::from_file(file.clone()) {
            issue(at, m);
        }
    }
    if let Some(f) = &files.state_file {
        let dir = f
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.is_dir() {
            issue(
                "budgets.state_file",
                format!("the folder {} does not exist", dir.display()),
            );
        }
    }
    if let Some(message) = files.store_ca.as_deref().and_then(pem_problem) {
        issue("store.ca_file", message);
    }
    if let Some((cert, key)) = &files.tls {
        if let Err(m) = super::tls::load(cert, key) {
            issue("server.tls", m);
        }
    }
    out
}

/// Why a CA file cannot serve: unreadable, or no PEM certificate in it.
fn pem_problem(ca: &Path) -> Option<String> {
    let certs = std::fs::File::open(ca)
        .map_err(|e| format!("cannot read {}: {e}", ca.display()))
        .map(|f| {
            rustls_pemfile::certs(&mut std::io::BufReader::new(f))
                .filter(Result::is_ok)
                .count()
        });
    match certs {
        Ok(0) => Some(format!("{}: no PEM certificate in it", ca.display())),
        Ok(_) => None,
        Err(e) => Some(e),
    }
}

/// What the files of a valid config warn of (`check-config`; the gateway itself says it when it
/// loads them): a certificate chain that expires within `tls::EXPIRY_WARNING`, or has expired.
/// A file that cannot be read is an issue of `file_issues`, not a warning.
pub fn file_warnings(config: &Config) -> Vec<ConfigIssue> {
    let Some(t) = &config.tls else {
        return Vec::new();
    };
    super::tls::load(&t.cert_file, &t.key_file)
        .ok()
        .and_then(|c| super::tls::expiry(&c))
        .and_then(|e| e.warning(chrono::Utc::now().timestamp()))
        .map(|message| ConfigIssue {
            path: "server.tls".into(),
            message,
        })
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[upstream]
url = "http://127.0.0.1:8081"
api_key_env = "ORG_KEY"
[[tenants]]
id = "a"
key_sha256 = ["0000000000000000000000000000000000000000000000000000000000000000"]
"#;

    fn env(_: &str) -> Option<String> {
        Some("org-key-for-tests".into())
    }

    #[test]
    fn the_store_ca_file_is_read_where_the_gateway_runs() {
        let dir = tempfile::tempdir().expect("dir");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").expect("junk");
        for (path, want) in [
            (dir.path().join("missing.pem"), "cannot read"),
            (junk, "no PEM certificate"),
        ] {
            let text = format!(
                "[store]\nbackend = \"redis\"\nurl = \"rediss://127.0.0.1:6380/0\"\nca_file = {:?}\n{MINIMAL}",
                path.display().to_string()
            );
            let file = dir.path().join("gateway.toml");
            std::fs::write(&file, &text).expect("config");
            Config::check_offline(&file).expect("offline: not read");
            let issues = load(&file, &env).expect_err("read here").0;
            assert!(
                issues
                    .iter()
                    .any(|i| i.path == "store.ca_file" && i.message.contains(want)),
                "{issues:?}"
            );
        }
    }

    /// A file's problems are reported with the plain ones: an unreadable JWKS file, a missing
    /// certificate and an upstream CA that is not there, beside a tenant id that is not valid.
    #[test]
    fn the_files_are_read_even_when_the_rest_is_invalid() {
        let dir = tempfile::tempdir().expect("dir");
        let missing = |name: &str| format!("{:?}", dir.path().join(name).display().to_string());
        let text = format!(
            "[server.tls]\nlisten = \"127.0.0.1:8443\"\ncert_file = {}\nkey_file = {}\n\
             [budgets]\nstate_file = {}\n\
             [[auth.issuers]]\nid = \"app\"\nissuer = \"https://issuer.test\"\naudiences = [\"gw\"]\n\
             algorithms = [\"ES256\"]\ntenant = \"a\"\njwks_file = {}\n{}",
            missing("cert.pem"),
            missing("key.pem"),
            missing("gone/state.json"),
            missing("jwks.json"),
            MINIMAL
                .replace("id = \"a\"", "id = \"a b\"")
                .replace("api_key_env", "ca_file = \"/nonexistent/ca.pem\"\napi_key_env"),
        );
        let file = dir.path().join("gateway.toml");
        std::fs::write(&file, &text).expect("config");
        let issues = load(&file, &env).expect_err("invalid").0;
        let paths: Vec<&str> = issues.iter().map(|i| i.path.as_str()).collect();
        for want in [
            "tenants[0].id",
            "upstream.ca_file",
            "auth.issuers[0].jwks_file",
            "budgets.state_file",
            "server.tls",
        ] {
            assert!(paths.contains(&want), "{want} missing from {issues:?}");
        }
    }
}
