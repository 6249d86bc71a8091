//! The production binary carries the gateway and its tools only: the upstream emulator and the
//! demo are in `liveness-gateway-dev`, and asking this one for them says where they went.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_liveness-gateway");

/// Run the binary with `args` (no organization key in its environment); its exit code and
/// stderr, or a failure if it is still running after 10 s.
fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("LIVENESS_ORG_API_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the binary");
    let until = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`liveness-gateway {}` is still running after 10 s",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn the_demo_and_the_emulator_are_unknown_subcommands_that_name_the_dev_binary() {
    for sub in ["demo", "emulator"] {
        let (code, stdout, stderr) = run(&[sub]);
        assert_eq!(code, Some(2), "{sub}: {stdout}{stderr}");
        assert!(stdout.is_empty(), "{sub}: {stdout}");
        assert!(
            stderr.contains(&format!("unrecognized subcommand '{sub}'")),
            "{sub}: {stderr}"
        );
        assert!(
            stderr.contains(&format!("liveness-gateway-dev {sub}")),
            "{sub}: {stderr}"
        );
    }
    // The subcommands it has are listed as before, without the two.
    let (code, stdout, _) = run(&["--help"]);
    assert_eq!(code, Some(0));
    for sub in ["serve", "check-config", "keys", "tokens", "healthcheck"] {
        assert!(stdout.contains(&format!("  {sub} ")), "{sub}: {stdout}");
    }
    assert!(
        !stdout.contains("  demo ") && !stdout.contains("  emulator "),
        "{stdout}"
    );
}

/// What is in the file, not only what it answers. (hyper's HTTP server, which only the emulator
/// and the demo used, is out of its dependency tree: `deploy/check` asks `cargo tree`, since the
/// binary these tests get is built with the tests' features.)
#[test]
fn the_binary_carries_no_emulator_and_no_demo() {
    let binary = std::fs::read(BIN).expect("read the binary");
    let has = |needle: &str| memchr::memmem::find(&binary, needle.as_bytes()).is_some();
    // What it must carry, so that a search of the wrong file fails here rather than passing.
    assert!(has("header_credentials_required"), "not the gateway?");
    for absent in [
        // The emulator's control and stats paths.
        "/__emulator/",
        // The demo's web page and the lines it prints.
        "<title>Liveness check</title>",
        "liveness-gateway demo",
    ] {
        assert!(!has(absent), "the production binary carries {absent:?}");
    }
}
