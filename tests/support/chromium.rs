//! A headless Chromium and its page, driven over the DevTools protocol (Chromium is a Debian
//! package that `.ci/install-deps` installs).

use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::{client, KillOnDrop};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A headless Chromium and its page, driven over the DevTools protocol.
pub struct Browser {
    socket: Socket,
    next_id: u64,
    _chromium: KillOnDrop,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Chromium with these command-line switches beside the headless ones.
    pub async fn launch_with(switches: &[&str]) -> Browser {
        let profile = tempfile::tempdir().expect("profile");
        let chromium = KillOnDrop(
            std::process::Command::new("chromium")
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--no-first-run",
                    "--remote-debugging-port=0",
                ])
                .args(switches)
                .arg(format!("--user-data-dir={}", profile.path().display()))
                .arg("about:blank")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("chromium (.ci/install-deps installs it)"),
        );
        // Chromium writes the port it chose into the profile.
        let port_file = profile.path().join("DevToolsActivePort");
        let until = Instant::now() + Duration::from_secs(30);
        let port: u16 = loop {
            let text = std::fs::read_to_string(&port_file).unwrap_or_default();
            if let Some(p) = text.lines().next().and_then(|l| l.trim().parse().ok()) {
                break p;
            }
            assert!(Instant::now() < until, "Chromium did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let page = loop {
            let targets: Value = match client()
                .get(format!("http://127.0.0.1:{port}/json/list"))
                .send()
                .await
            {
                Ok(r) => r.json().await.unwrap_or(Value::Null),
                Err(_) => Value::Null,
            };
            let ws = targets.as_array().and_then(|ts| {
                ts.iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_string))
            });
            if let Some(ws) = ws {
                break ws;
            }
            assert!(Instant::now() < until, "Chromium shows no page");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (socket, _) = tokio_tungstenite::connect_async(page.as_str())
            .await
            .expect("DevTools");
        Browser {
            socket,
            next_id: 0,
            _chromium: chromium,
            _profile: profile,
        }
    }

    /// One DevTools command and its result (events in between are passed over).
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({ "id": id, "method": method, "params": params }).to_string();
        self.socket
            .send(Message::Text(msg.into()))
            .await
            .expect("send");
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(30), self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"))
                .expect("socket open")
                .expect("message");
            let Message::Text(text) = msg else { continue };
            let v: Value = serde_json::from_str(&text).expect("json");
            if v["id"] == id {
                assert!(v["error"].is_null(), "{method}: {}", v["error"]);
                return v["result"].clone();
            }
        }
    }

    /// The value of a JavaScript expression in the page (of the promise's result, for a promise).
    pub async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        assert!(
            r["exceptionDetails"].is_null(),
            "{expression}: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }

    /// Wait until `expression` is true in the page.
    pub async fn until(&mut self, expression: &str) {
        let until = Instant::now() + Duration::from_secs(20);
        while self.eval(expression).await != Value::Bool(true) {
            assert!(Instant::now() < until, "never true: {expression}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Choose `file` in the page's file input `#photo`, as the file dialog would.
    pub async fn choose(&mut self, file: &Path) {
        let doc = self.call("DOM.getDocument", json!({ "depth": 0 })).await;
        let node = self
            .call(
                "DOM.querySelector",
                json!({ "nodeId": doc["root"]["nodeId"], "selector": "#photo" }),
            )
            .await;
        self.call(
            "DOM.setFileInputFiles",
            json!({ "files": [file.display().to_string()], "nodeId": node["nodeId"] }),
        )
        .await;
    }
}
