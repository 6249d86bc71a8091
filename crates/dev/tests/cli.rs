//! `liveness-gateway-dev emulator` as the load harness and compose run it: the line it prints,
//! the provider's endpoint and its stats over a real socket, a clean stop on SIGTERM, and clear
//! refusals of what it cannot run with.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_liveness-gateway-dev");

/// One HTTP/1.0 exchange: the status code and the body.
fn exchange(addr: &str, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(request.as_bytes()).expect("write");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

#[test]
fn the_emulator_serves_counts_and_stops_on_sigterm() {
    let mut child = Command::new(BIN)
        .args(["emulator", "--listen", "127.0.0.1:0", "--latency-ms", "0"])
        .env("LIVENESS_ORG_API_KEY", "cli-test-org-key")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("line");
    let addr = line
        .trim()
        .strip_prefix("emulator listening on http://")
        .unwrap_or_else(|| panic!("printed {line:?}"))
        .to_string();

    // The provider's endpoint, without the organization key: its documented refusal.
    let body = "--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\nContent-Type: image/jpeg\r\n\r\nnot really\r\n--b--\r\n";
    let (status, answer) = exchange(
        &addr,
        &format!(
            "POST /api/v1/backend/liveness/short/ HTTP/1.0\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    );
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer.contains("Client does not have subscription"),
        "{answer}"
    );
    let (status, stats) = exchange(&addr, "GET /__emulator/stats HTTP/1.0\r\n\r\n");
    assert_eq!(status, 200, "{stats}");
    assert!(stats.contains("\"calls\":1"), "{stats}");
    assert!(stats.contains("\"wrong_key_calls\":1"), "{stats}");

    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    let until = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > until {
            let _ = child.kill();
            panic!("still running 10 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn the_emulator_says_what_it_lacks() {
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .env_remove("LIVENESS_ORG_API_KEY")
            .env("CLI_TEST_KEY", "k")
            .output()
            .expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, err) = run(&["emulator", "--listen", "127.0.0.1:0"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("set LIVENESS_ORG_API_KEY to the organization key the emulator should accept"),
        "{err}"
    );
    let (code, err) = run(&[
        "emulator",
        "--listen",
        "127.0.0.1:0",
        "--api-key-env",
        "CLI_TEST_KEY",
        "--fault",
        "sometimes",
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--fault must be one of none, hang,"), "{err}");
    let (code, err) = run(&[
        "emulator",
        "--listen",
        "127.0.0.1:0",
        "--api-key-env",
        "CLI_TEST_KEY",
        "--key",
        "retail",
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--key retail: write it as ID=VAR"), "{err}");
}
