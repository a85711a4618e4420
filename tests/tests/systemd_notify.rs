//! luod under systemd's notification protocol (issue 9, "luod under
//! systemd"): `READY=1` only once the record is loaded and the socket
//! answers, and `STATUS=` names the state, and the step in progress, after
//! every change. A datagram socket plays systemd's `NOTIFY_SOCKET`.

use liveupdate::protocol::client::Client;
use liveupdate_tests::*;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// luod, killed on drop (its log printed if the test failed).
struct Daemon(Child, std::path::PathBuf);

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("luod log:\n{}", std::fs::read_to_string(&self.1).unwrap_or_default());
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The next notification that is not an fd-store one (`FDSTORE=1` carries
/// preserved files), within 10 s.
fn next_state(systemd: &UnixDatagram) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no notification from luod within 10 s");
        systemd.set_read_timeout(Some(left)).unwrap();
        let n = systemd.recv(&mut buf).expect("a notification from luod");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if !msg.starts_with("FDSTORE") {
            return msg;
        }
    }
}

#[test]
fn ready_comes_after_the_record_is_loaded_and_status_follows_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify");
    let systemd = UnixDatagram::bind(&notify).unwrap();
    let socket = dir.path().join("luod.sock");
    let log = dir.path().join("luod.log");
    let child = Command::new(binary("luod"))
        .args(["--backend", "file", "--fd-store", "systemd", "--socket"])
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--region")
        .arg(dir.path().join("region"))
        .args(["--region-size", "8M"])
        .env("NOTIFY_SOCKET", &notify)
        .env("LUOD_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _luod = Daemon(child, log.clone());

    // The first state notification is READY=1, and luod answers by then.
    assert_eq!(next_state(&systemd), "READY=1\nSTATUS=state normal");
    let client = Client::connect(&socket, "systemd-notify-test").expect("luod serves once it said READY=1");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("serving"),
        "the record was loaded before READY=1:\n{text}"
    );
    let mut conn = Conn::new(client);

    conn.prepare().unwrap();
    assert_eq!(next_state(&systemd), "STATUS=state normal; prepare in progress");
    assert_eq!(next_state(&systemd), "STATUS=state prepared");

    // A refused change still says where luod is.
    let report = conn.prepare();
    assert!(report.is_err());
    assert_eq!(next_state(&systemd), "STATUS=state prepared; prepare in progress");
    assert_eq!(next_state(&systemd), "STATUS=state prepared");

    conn.freeze().unwrap();
    assert_eq!(next_state(&systemd), "STATUS=state prepared; freeze in progress");
    assert_eq!(next_state(&systemd), "STATUS=state frozen");

    conn.cancel().unwrap();
    assert_eq!(next_state(&systemd), "STATUS=state frozen; cancel in progress");
    assert_eq!(next_state(&systemd), "STATUS=state normal");

    // The file backend simulates its kexec: no reboot path to name.
    assert_eq!(conn.status().reboot_path, None);
}
