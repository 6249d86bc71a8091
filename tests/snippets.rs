//! The customer-backend snippets of docs/app-tokens.md (Python with PyJWT, Node with `jose`) run
//! exactly as written, with a key from `tokens keygen`, and their tokens are accepted by a gateway; the
//! demo prints a token it accepts too.

mod support;

use std::path::Path;
use std::process::Command;

use support::*;

/// The fenced block of docs/app-tokens.md in `lang` that contains `marker`.
fn docs_block(lang: &str, marker: &str) -> String {
    support::docs_block("docs/app-tokens.md", lang, marker)
}

/// A signing key (`key-1`) and its JWKS in `dir`, made by the binary as docs/app-tokens.md says.
fn keygen(dir: &Path) {
    let jwks = tokens_keygen("ES256", "key-1", &dir.join("signing-key.pem"));
    std::fs::write(dir.join("jwks.json"), jwks).expect("jwks");
}

/// Run a snippet in `dir` and return the last line it printed (the token).
fn run(dir: &Path, program: &str, file: &str) -> String {
    let out = Command::new(program)
        .arg(file)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (.ci/install-deps installs it)"));
    assert!(
        out.status.success(),
        "{program} {file} failed (.ci/install-deps installs what it needs):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_backend_snippets_make_tokens_the_gateway_accepts() {
    let dir = tempfile::tempdir().expect("dir");
    keygen(dir.path());
    let python = docs_block("python", "def liveness_token(");
    std::fs::write(
        dir.path().join("backend.py"),
        format!("{python}\n\nprint(liveness_token(\"user-py\"))\n"),
    )
    .expect("py");
    let node = docs_block("js", "export async function livenessToken(");
    std::fs::write(
        dir.path().join("backend.mjs"),
        format!("{node}\n\nconsole.log(await livenessToken(\"user-js\"));\n"),
    )
    .expect("js");
    // The snippet imports `jose` as an app would: from a node_modules beside it.
    link_node_modules(dir.path());

    let emu = start_emulator();
    let jwks = dir.path().join("jwks.json").display().to_string();
    let gw = TestGateway::for_emulator(&emu)
        .set(
            "auth.issuers",
            &format!(
                "[{{ id = \"customer-backend\", issuer = \"https://auth.example.com\", audiences = [\"liveness-gateway\"], jwks_file = {jwks:?}, algorithms = [\"ES256\"], tenant = \"alpha\", single_use = true }}]"
            ),
        )
        .start();
    for (n, (program, file)) in [("python3", "backend.py"), ("node", "backend.mjs")]
        .into_iter()
        .enumerate()
    {
        let token = run(dir.path(), program, file);
        assert_eq!(token.split('.').count(), 3, "{program}: {token}");
        let a = post_image(
            &gw.url(),
            &token,
            "a.jpg",
            &variant(&fixture("face.jpg"), n as u64),
        )
        .await;
        assert_eq!(a.status, 200, "{program}: {}", a.text());
        // Each carries a jti: a second use of the same token is refused.
        let again = post_image(
            &gw.url(),
            &token,
            "a.jpg",
            &variant(&fixture("face.jpg"), 9),
        )
        .await;
        assert_eq!(again.code(), "token_replayed", "{program}");
    }
    assert_eq!(emu.stats().calls, 2);
}

/// `demo` configures an issuer, prints a ready token, and the gateway it runs accepts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_prints_a_token_it_accepts() {
    let demo = Demo::start();
    let lines = &demo.lines;
    let at = lines
        .iter()
        .position(|l| l.starts_with("An app token"))
        .unwrap_or_else(|| panic!("no token printed:\n{}", lines.join("\n")));
    let token = lines[at + 1].trim().to_string();
    let a = post_image(
        &demo.url,
        &token,
        "a.jpg",
        &variant(&fixture("face.jpg"), 1),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    // The curl line carries the same token.
    assert!(lines[at + 2].contains(&token));
}
