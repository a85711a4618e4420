//! CLI and protocol edges (issue 7, item 10): `luoctl --json session` and
//! `--json vm` print JSON; luoctl checks luod's protocol version and exits
//! with the documented code; a VMM whose connection closed is
//! `disconnected` in `vm list`; bytes after a complete message are a
//! protocol error; a timeout that is not a finite number of seconds is a
//! usage error of luod, not a panic.

use liveupdate::kernel::memfd;
use liveupdate::protocol::client::Client;
use liveupdate::protocol::frame::{self, FrameError};
use liveupdate::protocol::{ErrorKind, PROTOCOL_VERSION, Request, Response};
use liveupdate_tests::*;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::time::Duration;

fn stdout_json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {:?}; stderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn json_session_and_vm_without_a_subcommand_print_a_json_usage_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("none.sock");
    let cases = [
        (
            vec!["--json", "session"],
            "luoctl session needs a subcommand: create, list, preserve, retrieve, finish, evict",
            "luoctl session",
        ),
        (
            vec!["--json", "vm"],
            "luoctl vm needs a subcommand: list, abandon",
            "luoctl vm",
        ),
    ];
    for (args, message, usage) in cases {
        let out = luoctl_command(&socket).args(&args).output().expect("run luoctl");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            out.stderr.is_empty(),
            "{args:?}: nothing on stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json = stdout_json(&out);
        assert_eq!(
            json,
            serde_json::json!({
                "ok": false,
                "error": {
                    "kind": "usage",
                    "code": 2,
                    "what": "command line",
                    "message": message,
                    "hint": format!("usage: {usage} [OPTIONS] <COMMAND>"),
                    "step": null,
                }
            }),
            "{args:?}"
        );
    }
    // Without --json the help stays the answer.
    let out = luoctl_command(&socket).arg("session").output().expect("run luoctl");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Usage: luoctl session [OPTIONS] <COMMAND>"));
}

/// A fake luod that answers hello with `version`, once.
fn fake_luod(socket: &std::path::Path, version: u32) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(socket).expect("bind");
    std::thread::spawn(move || {
        let (conn, _) = listener.accept().expect("accept");
        let (req, _) = frame::recv::<Request>(&conn).expect("hello");
        assert!(matches!(req, Request::Hello { .. }), "{req:?}");
        let hello = Response::Hello {
            version,
            server: "luod 9.9.9".into(),
        };
        frame::send(&conn, &hello, &[]).expect("answer hello");
        // luoctl must stop here: it sends nothing more.
        conn.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        assert!(matches!(frame::recv::<Request>(&conn), Err(FrameError::Closed)));
    })
}

#[test]
fn luoctl_refuses_a_luod_speaking_another_protocol_version_with_exit_5() {
    let dir = tempfile::tempdir().expect("tempdir");
    let other = PROTOCOL_VERSION + 1;
    let message = format!("luod (luod 9.9.9) speaks protocol version {other}, this client {PROTOCOL_VERSION}");
    let hint = "use a client built with the same version as luod";

    let socket = dir.path().join("human.sock");
    let server = fake_luod(&socket, other);
    let out = luoctl_command(&socket).arg("status").output().expect("run luoctl");
    server.join().expect("fake luod");
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("luoctl: status: {message}; {hint}\n")
    );
    assert!(out.stdout.is_empty());

    let socket = dir.path().join("json.sock");
    let server = fake_luod(&socket, other);
    let out = luoctl_command(&socket)
        .args(["--json", "prepare"])
        .output()
        .expect("run luoctl");
    server.join().expect("fake luod");
    assert_eq!(out.status.code(), Some(5));
    let json = stdout_json(&out);
    assert_eq!(json["error"]["kind"], "protocol");
    assert_eq!(json["error"]["code"], 5);
    assert_eq!(json["error"]["message"], message.as_str());
    assert_eq!(json["error"]["hint"], hint);
}

#[test]
fn a_vmm_whose_connection_closed_is_listed_disconnected() {
    let mut luod = Luod::started("8M");
    let ram = memfd::from_bytes("vm0-ram", &pattern(3, 8192)).expect("memfd");
    let client = Client::connect(&luod.socket(), "test-vmm").expect("connect");
    let vm = client.register_vm("vm0", &[(1, ram.as_fd())]).expect("register vm0");

    let phase = |luod: &Luod| {
        let out = luod.luoctl(&["--json", "vm", "list"]);
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        let json = stdout_json(&out);
        let vms = json["vms"].as_array().expect("vms").clone();
        assert_eq!(vms.len(), 1, "{json}");
        assert_eq!(vms[0]["name"], "vm0");
        vms[0]["phase"].as_str().expect("phase").to_string()
    };
    assert_eq!(phase(&luod), "registered");
    let before = luod.status();
    drop(vm);
    assert_eq!(
        phase(&luod),
        "disconnected",
        "as soon as the VMM's connection is closed"
    );
    assert_eq!(phase(&luod), "disconnected");
    let out = luod.luoctl(&["vm", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("disconnected"));
    assert!(luod.is_running());
    assert_unchanged(&before, &luod.status());
}

#[test]
fn bytes_after_a_complete_message_in_a_frame_are_a_protocol_error() {
    let mut luod = Luod::started("8M");
    let before = luod.status();
    for greet_first in [false, true] {
        let sock = UnixStream::connect(luod.socket()).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let req = if greet_first {
            let hello = Request::Hello {
                version: PROTOCOL_VERSION,
                client: "raw".into(),
            };
            frame::send(&sock, &hello, &[]).expect("hello");
            assert!(matches!(
                frame::recv::<Response>(&sock).expect("hello answer").0,
                Response::Hello { .. }
            ));
            Request::Status
        } else {
            Request::Hello {
                version: PROTOCOL_VERSION,
                client: "raw".into(),
            }
        };
        let mut payload = postcard::to_allocvec(&req).expect("encode");
        payload.extend_from_slice(&[0, 1, 2]);
        let mut bytes = (payload.len() as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&payload);
        frame::send_raw(&sock, &bytes, &[]).expect("send");
        match frame::recv::<Response>(&sock).expect("an answer").0 {
            Response::Error(e) => assert_eq!(
                (e.kind, e.message.as_str()),
                (
                    ErrorKind::Protocol,
                    "malformed frame: 3 bytes follow the message; closing the connection"
                )
            ),
            other => panic!("expected a protocol error, got {other:?}"),
        }
        assert!(matches!(frame::recv::<Response>(&sock), Err(FrameError::Closed)));
    }
    assert!(luod.is_running());
    assert_unchanged(&before, &luod.status());
}

#[test]
fn a_timeout_that_is_not_a_finite_number_of_seconds_is_a_usage_error_of_luod() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "--vm-timeout",
            "inf",
            "inf seconds is out of range: give more than 0 and at most 3600",
        ),
        (
            "--vm-timeout",
            "1e20",
            "1e20 seconds is out of range: give more than 0 and at most 3600",
        ),
        (
            "--vm-timeout",
            "NaN",
            "NaN seconds is out of range: give more than 0 and at most 3600",
        ),
        (
            "--vm-timeout",
            "-1",
            "-1 seconds is out of range: give more than 0 and at most 3600",
        ),
        (
            "--qmp-timeout",
            "inf",
            "inf seconds is out of range: give more than 0 and at most 3600",
        ),
        ("--client-timeout", "0", "0 is not in 1..=3600"),
        (
            "--client-timeout",
            "18446744073709551615",
            "18446744073709551615 is not in 1..=3600",
        ),
        ("--max-connections", "0", "0 is not in 1..=65536"),
        ("--max-connections-per-uid", "65537", "65537 is not in 1..=65536"),
    ];
    for (flag, value, why) in cases {
        let out = Command::new(binary("luod"))
            .args(["--backend", "file", "--region"])
            .arg(dir.path().join("region"))
            .arg("--socket")
            .arg(dir.path().join("luod.sock"))
            .arg(format!("{flag}={value}"))
            .stdin(Stdio::null())
            .output()
            .expect("run luod");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        let upper = flag.trim_start_matches("--").replace('-', "_").to_uppercase();
        assert!(
            stderr.starts_with(&format!(
                "error: invalid value '{value}' for '{flag} <{upper}>': {why}\n"
            )),
            "{flag} {value}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!dir.path().join("region").exists(), "luod did not start");
    }
}
