//! The `kinesis-chat` binary as an operator meets it: configuration errors,
//! `--help`, the listening line, and SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_kinesis-chat");

fn run_with(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("CHAT_BACKEND").env_remove("CHAT_LISTEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run binary");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn invalid_configuration_is_one_clear_line() {
    let cases: Vec<(Vec<&str>, Vec<(&str, &str)>, &str)> = vec![
        (vec!["--listen", "nowhere"], vec![], "--listen"),
        (vec!["--backend", "redis"], vec![], "redis"),
        (vec![], vec![("CHAT_BACKEND", "postgres")], "postgres"),
        (vec![], vec![("CHAT_LISTEN", "1.2.3.4")], "1.2.3.4"),
        (vec!["--stream", "bad name!"], vec![], "--stream"),
        (vec!["--history-per-room", "0"], vec![], "history-per-room"),
        (vec!["--ws-ping-interval", "soon"], vec![], "ws-ping-interval"),
        (vec!["--no-such-flag"], vec![], "--no-such-flag"),
    ];
    for (args, env, mention) in cases {
        let (code, _, stderr) = run_with(&args, &env);
        assert_eq!(code, 2, "{args:?} {env:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line, got {stderr:?}");
        assert!(lines[0].starts_with("kinesis-chat: "), "{stderr}");
        assert!(lines[0].contains(mention), "{stderr} should mention {mention}");
        assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"));
    }
}

#[test]
fn help_documents_every_setting_and_its_variable() {
    let (code, stdout, _) = run_with(&["--help"], &[]);
    assert_eq!(code, 0);
    for var in ["CHAT_LISTEN", "CHAT_BACKEND", "CHAT_STREAM", "CHAT_CREATE_STREAM", "CHAT_HISTORY_PER_ROOM", "CHAT_RATE_LIMIT"] {
        assert!(stdout.contains(var), "--help lacks {var}:\n{stdout}");
    }
}

#[test]
fn sigterm_shuts_down_cleanly_with_exit_0() {
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0"])
        .env_remove("CHAT_BACKEND")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("kinesis-chat listening on ").expect("listening line").to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    // It serves.
    let addr = url.trim_start_matches("http://");
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    use std::io::{Read, Write};
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    tcp.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");

    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}
