//! The shipped systemd unit lets the operator group in (issue 7, item 11).
//!
//! The test reads `luod/luod.service`, sets up what systemd would from it
//! (the runtime directory with `RuntimeDirectoryMode=`, owned by root and the
//! unit's `Group=`; luod started with the unit's `ExecStart=` arguments as
//! uid 0 with that group), and connects as uid 65534 that is in the group
//! only as a supplementary group, as `usermod -aG` makes it: it gets in. A
//! uid outside the group does not, and neither does the member once the
//! directory is root:root as before the fix. Runs as root, as CI does.

use liveupdate::protocol::client::Client;
use liveupdate_tests::attack::{self, Who};
use liveupdate_tests::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The gid that stands for the unit's `Group=` in the test (the group does
/// not exist on a test machine): 65534, nogroup.
const GROUP: u32 = 65534;

/// The `[Service]` settings of the unit, in order.
fn service_settings() -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../luod/luod.service");
    let text = std::fs::read_to_string(&path).expect("read luod/luod.service");
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (key, value) = line.split_once('=').expect("KEY=VALUE");
        if section == "Service" {
            out.push((key.trim().to_string(), value.trim().to_string()));
        }
    }
    out
}

fn setting<'a>(settings: &'a [(String, String)], key: &str) -> Option<&'a str> {
    settings.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// luod, killed on drop.
struct Daemon(Child, PathBuf);

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("luod log:\n{}", std::fs::read_to_string(&self.1).unwrap_or_default());
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_member_of_the_units_group_reaches_the_socket_and_no_one_else_does() {
    let settings = service_settings();
    assert_eq!(setting(&settings, "User"), None, "luod runs as root");
    let group = setting(&settings, "Group").expect("the unit sets Group= (the operators' group)");
    assert_eq!(group, "luod");
    let runtime = setting(&settings, "RuntimeDirectory").expect("RuntimeDirectory=");
    let mode = setting(&settings, "RuntimeDirectoryMode").expect("RuntimeDirectoryMode=");
    let mode = u32::from_str_radix(mode, 8).expect("an octal mode");
    let mut exec: Vec<String> = setting(&settings, "ExecStart")
        .expect("ExecStart=")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    // What the unit leaves to luod's defaults (and /etc/luod/luod.toml),
    // spelled out so that the paths below move into the test's directory.
    for (flag, default) in [
        ("--socket", liveupdate::protocol::DEFAULT_SOCKET),
        ("--state-dir", "/run/luod"),
        ("--backend", "auto"),
        ("--fd-store", "auto"),
    ] {
        if !exec.iter().any(|a| a == flag) {
            exec.extend([flag.to_string(), default.to_string()]);
        }
    }
    let socket_arg = exec
        .windows(2)
        .find(|w| w[0] == "--socket")
        .map(|w| w[1].clone())
        .expect("--socket, from the unit or luod's default");
    assert_eq!(
        Path::new(&socket_arg).parent(),
        Some(Path::new("/run").join(runtime).as_path()),
        "the socket lives in the runtime directory"
    );
    let socket_group = exec.windows(2).find(|w| w[0] == "--socket-group").map(|w| w[1].clone());
    assert!(
        socket_group.is_none() || socket_group.as_deref() == Some(group),
        "the socket goes to the unit's group"
    );

    // What systemd does: /run/RUNTIME with the unit's mode, owned by
    // root:Group=, and luod started as uid 0 with gid Group=.
    let root = tempfile::Builder::new()
        .prefix("luod-unit-")
        .tempdir()
        .expect("tempdir");
    attack::share_dir(root.path());
    let run = root.path().join("run");
    std::fs::create_dir(&run).expect("mkdir run");
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).expect("chmod run");
    let dir = run.join(runtime);
    std::fs::create_dir(&dir).expect("mkdir the runtime directory");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).expect("chmod");
    nix::unistd::chown(
        &dir,
        Some(nix::unistd::Uid::from_raw(0)),
        Some(nix::unistd::Gid::from_raw(GROUP)),
    )
    .expect("chown root:GROUP");

    let mut args: Vec<String> = Vec::new();
    let mut it = exec[1..].iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            // No live-update kernel and no systemd here: the file backend
            // and the holder stand in; everything else is the unit's.
            "--backend" | "--fd-store" => {
                let v = it.next().expect("a value");
                args.push(a.clone());
                args.push(if a == "--backend" { "file" } else { "holder" }.to_string());
                assert!(["auto", "systemd"].contains(&v.as_str()), "{a} {v}");
            }
            "--socket-group" => {
                it.next();
                args.extend(["--socket-group".to_string(), GROUP.to_string()]);
            }
            p if p.starts_with("/run/") => args.push(format!("{}{p}", root.path().display())),
            other => args.push(other.to_string()),
        }
    }
    args.extend(["--region".into(), root.path().join("region").display().to_string()]);
    args.extend(["--region-size".into(), "8M".into()]);
    let socket = PathBuf::from(format!("{}{socket_arg}", root.path().display()));
    let log = root.path().join("luod.log");
    let mut cmd = Command::new(binary("luod"));
    cmd.args(&args)
        .env("LUOD_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"));
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls setgroups and setgid, which are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setgroups(&[])?;
            nix::unistd::setgid(nix::unistd::Gid::from_raw(GROUP))?;
            Ok(())
        });
    }
    let _luod = Daemon(cmd.spawn().expect("spawn luod"), log.clone());
    let deadline = Instant::now() + STARTUP_DEADLINE;
    while Client::connect(&socket, "root").is_err() {
        assert!(
            Instant::now() < deadline,
            "luod did not serve; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let meta = std::fs::metadata(&socket).expect("the socket");
    assert_eq!(
        (meta.mode() & 0o777, meta.uid(), meta.gid()),
        (0o660, 0, GROUP),
        "socket root:GROUP 0660"
    );

    // A member of the group (supplementary only) gets in.
    let out = attack::luoctl_as(Who::MemberOf(GROUP), root.path(), &socket, &["--json", "status"]);
    assert_eq!(out.status.code(), Some(0), "a member: {}", attack::stderr(&out));
    assert_eq!(attack::json(&out)["state"], "normal");

    // Someone outside the group does not.
    let refused = format!(
        "luoctl: status: cannot connect to luod at {}: Permission denied (os error 13); \
         the socket is mode 0660: run as root or as a member of its group\n",
        socket.display()
    );
    let out = attack::luoctl_as(Who::Outsider, root.path(), &socket, &["status"]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(attack::stderr(&out), refused);

    // The directory as it was before (root:root 0750) shuts the member out:
    // the group ownership of the directory is what lets it in.
    nix::unistd::chown(&dir, None, Some(nix::unistd::Gid::from_raw(0))).expect("chown root:root");
    let out = attack::luoctl_as(Who::MemberOf(GROUP), root.path(), &socket, &["status"]);
    assert_eq!(out.status.code(), Some(4), "{}", attack::stderr(&out));
    assert_eq!(attack::stderr(&out), refused);
}
