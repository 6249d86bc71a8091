//! The command line's client of the admin API: `liveness-gateway keys create|list|rotate|
//! revoke` send what the admin routes take and print what comes back. A secret is printed on
//! standard output, alone on its line, only by `create` and `rotate`; everything else a
//! person reads goes to standard error.

use std::time::Duration;

use serde_json::Value;

/// Where the admin API is, and the token it asks for.
#[derive(Debug, Clone)]
pub struct AdminApi {
    pub url: url::Url,
    pub token: Option<String>,
}

/// What the admin API answered: its status and its JSON.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Answer {
    /// The refusal as one line for a person: its code and detail.
    pub fn refusal(&self) -> String {
        let text = |k: &str| self.body.get(k).and_then(Value::as_str).unwrap_or("");
        let mut line = format!("HTTP {}: {}: {}", self.status, text("code"), text("detail"));
        if !text("hint").is_empty() {
            line.push_str(&format!(" ({})", text("hint")));
        }
        line
    }
}

impl AdminApi {
    /// Send `method path` with `body` (JSON) and read the answer.
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Answer> {
        let url = self.url.join(path.trim_start_matches('/'))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .redirect(reqwest::redirect::Policy::none())
                .build()?;
            let mut req = client.request(method.parse()?, url.clone());
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            if let Some(b) = body {
                req = req
                    .header("content-type", "application/json")
                    .body(b.to_string());
            }
            // The URL as told: without a user or password it may carry.
            let mut shown = url.clone();
            let _ = shown.set_username("");
            let _ = shown.set_password(None);
            let answer = req
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("{shown}: {}", e.without_url()))?;
            let status = answer.status().as_u16();
            let text = answer
                .text()
                .await
                .map_err(|e| anyhow::anyhow!("{shown}: {}", e.without_url()))?;
            let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
            Ok(Answer { status, body })
        })
    }
}

/// A list of keys as a table: one line each, never a secret.
pub fn keys_table(answer: &Value) -> String {
    let mut out = format!(
        "{:<20} {:<8} {:<21} {:<21} {:<21} {}\n",
        "KEY_ID", "SOURCE", "CREATED", "LAST_USED", "EXPIRES", "LABEL"
    );
    let text = |k: &Value, f: &str| match k.get(f) {
        Some(Value::String(s)) => s.clone(),
        _ => "-".into(),
    };
    for k in answer
        .get("keys")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let mut expires = text(k, "expires_at");
        if k.get("expired").and_then(Value::as_bool) == Some(true) {
            expires.push_str(" (expired)");
        }
        out.push_str(&format!(
            "{:<20} {:<8} {:<21} {:<21} {:<21} {}\n",
            text(k, "key_id"),
            text(k, "source"),
            text(k, "created"),
            text(k, "last_used"),
            expires,
            text(k, "label"),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_has_a_line_per_key_and_no_secret() {
        let v = serde_json::json!({"tenant": "t", "keys": [
            {"key_id": "config-0123456789ab", "source": "config", "label": null, "created": null, "last_used": null, "expires_at": null, "expired": false},
            {"key_id": "0123456789ab", "source": "runtime", "label": "ci", "created": "2026-12-07T00:00:00Z", "last_used": null, "expires_at": "2026-12-08T00:00:00Z", "expired": true, "key": "lgr_secret"},
        ]});
        let t = keys_table(&v);
        assert_eq!(t.lines().count(), 3);
        assert!(t.contains("(expired)") && t.contains(" ci"));
        assert!(!t.contains("lgr_secret"));
    }
}
