//! No unprivileged denial of service: per-uid quotas (sessions, files,
//! bytes), a memfd that grows after it was preserved, and root's way out of
//! a session that blocks the cycle (`session evict`, `session finish` of
//! another uid's session), recorded in `history`.
//!
//! Runs as root, as CI does: luod's socket is given to group 65534, and the
//! unprivileged side runs as uid/gid 65534 through `luo-test-client` (and
//! `luoctl`) copied into the test's directory.

use liveupdate::protocol::{ErrorKind, Request, Response, SessionInfo};
use liveupdate::state::State;
use liveupdate_tests::*;
use serde_json::Value;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const NOBODY: u32 = 65534;

/// Where an inherited memfd sits in the test client (`LUO_TEST_CLIENT_FD`).
const CHILD_FD: i32 = 100;

/// A luod with `flags`, whose socket group 65534 may use, with copies of
/// `luo-test-client` and `luoctl` that uid 65534 can run, and root's
/// session `root-vm` holding one file (`pattern(1, 4096)`).
fn luod_with(flags: &[&str]) -> Luod {
    let mut luod = Luod::new("8M").arg("--socket-group").arg(NOBODY.to_string());
    for f in flags {
        luod = luod.arg(f);
    }
    let luod = luod.launched();
    std::fs::set_permissions(luod.dir(), std::fs::Permissions::from_mode(0o755)).expect("chmod the directory");
    for bin in ["luo-test-client", "luoctl"] {
        let copy = luod.dir().join(bin);
        liveupdate_tests::copy_binary(bin, &copy);
    }
    let mut c = luod.client();
    c.create("root-vm").expect("root creates root-vm");
    c.preserve("root-vm", 1, memfd_with("root-vm", &pattern(1, 4096)).as_fd())
        .expect("root preserves");
    luod
}

/// Sends `requests` on one connection as uid/gid 65534; a `SessionPreserve`
/// carries `fd` when given (else a fresh 4096-byte memfd).
fn as_nobody(luod: &Luod, fd: Option<BorrowedFd<'_>>, requests: &[Request]) -> Vec<Reply<Response>> {
    let mut cmd = Command::new(luod.dir().join("luo-test-client"));
    cmd.arg(luod.socket()).uid(NOBODY).gid(NOBODY);
    for r in requests {
        cmd.arg(serde_json::to_string(r).expect("request as JSON"));
    }
    if let Some(fd) = fd {
        let raw = fd.as_raw_fd();
        assert_ne!(raw, CHILD_FD, "the memfd must not already sit where the client looks");
        cmd.env("LUO_TEST_CLIENT_FD", CHILD_FD.to_string());
        let dup = move || {
            // SAFETY: dup2 is async-signal-safe, so it may run between fork
            // and exec; `raw` is open in the parent (borrowed for the whole
            // spawn), hence in the child, and the new descriptor is not
            // close-on-exec.
            if unsafe { libc::dup2(raw, CHILD_FD) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        };
        // SAFETY: the closure only calls dup2 (see above): nothing that
        // allocates or takes a lock in the forked child.
        unsafe {
            cmd.pre_exec(dup);
        }
    }
    let out = cmd.output().expect("run the test client as nobody");
    assert!(
        out.status.success(),
        "the client as nobody failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the client's JSON answers")
}

/// Runs luoctl as uid/gid 65534.
fn luoctl_as_nobody(luod: &Luod, args: &[&str]) -> Output {
    Command::new(luod.dir().join("luoctl"))
        .arg("--socket")
        .arg(luod.socket())
        .args(args)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .expect("run luoctl as nobody")
}

#[track_caller]
fn assert_refused_reply(reply: &Reply<Response>, kind: ErrorKind, message: &str) {
    match reply {
        Err(e) => assert_eq!((e.kind, e.message.as_str()), (kind, message), "hint: {:?}", e.hint),
        Ok(r) => panic!("expected {kind:?} {message:?}, got {r:?}"),
    }
}

#[track_caller]
fn assert_done(replies: &[Reply<Response>]) {
    for r in replies {
        assert!(matches!(r, Ok(Response::Done)), "{replies:?}");
    }
}

/// luod runs and answers root's `status` within a second.
#[track_caller]
fn assert_prompt(luod: &mut Luod) -> liveupdate::protocol::StatusReport {
    assert!(luod.is_running(), "luod exited; its log:\n{}", luod.log());
    let started = Instant::now();
    let status = luod.status();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "status took {:?}",
        started.elapsed()
    );
    status
}

/// `(name, owner, tokens)` of each session root sees.
fn sessions(list: &[SessionInfo]) -> Vec<(String, u32, Vec<u64>)> {
    list.iter()
        .map(|s| (s.name.clone(), s.owner_uid, s.files.iter().map(|f| f.token).collect()))
        .collect()
}

fn owned(name: &str, uid: u32, tokens: &[u64]) -> (String, u32, Vec<u64>) {
    (name.to_string(), uid, tokens.to_vec())
}

/// Runs luoctl as root; asserts it exits with `code`; its stderr.
#[track_caller]
fn luoctl_exits(luod: &Luod, args: &[&str], code: i32) -> String {
    let out = luod.luoctl(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "luoctl {args:?}: {stderr}");
    stderr
}

/// `luoctl --json history`'s events, as root.
fn events(luod: &Luod) -> Vec<Value> {
    let out = luod.luoctl(&["--json", "history"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("history JSON");
    assert!(v["cycles"].is_array(), "{v}");
    v["events"].as_array().expect("events").clone()
}

/// `(uid, action, subject, detail)` of a JSON event.
fn event(e: &Value) -> (u64, &str, &str, &str) {
    (
        e["uid"].as_u64().expect("uid"),
        e["action"].as_str().expect("action"),
        e["subject"].as_str().expect("subject"),
        e["detail"].as_str().expect("detail"),
    )
}

#[test]
fn each_quota_refuses_the_uid_with_the_exact_error_and_adds_nothing() {
    let mut luod = luod_with(&[
        "--max-sessions-per-uid",
        "2",
        "--max-files-per-uid",
        "2",
        "--max-bytes-per-uid",
        "1M",
    ]);
    let preserve = |name: &str, token| Request::SessionPreserve {
        name: name.into(),
        token,
    };
    let create = |name: &str| Request::SessionCreate { name: name.into() };
    let replies = as_nobody(
        &luod,
        None,
        &[
            create("a"),
            create("b"),
            create("c"),
            preserve("a", 1),
            preserve("a", 2),
            preserve("b", 3),
        ],
    );
    assert_done(&replies[..2]);
    assert_refused_reply(
        &replies[2],
        ErrorKind::QuotaExceeded,
        "quota exceeded: uid 65534 holds 2 session(s), and 1 more would pass its quota of 2 (luod --max-sessions-per-uid)",
    );
    assert_done(&replies[3..5]);
    assert_refused_reply(
        &replies[5],
        ErrorKind::QuotaExceeded,
        "quota exceeded: uid 65534 holds 2 preserved file(s), and 1 more would pass its quota of 2 (luod --max-files-per-uid)",
    );
    let status = assert_prompt(&mut luod);
    assert_eq!(
        sessions(&status.sessions),
        [
            owned("root-vm", 0, &[1]),
            owned("a", NOBODY, &[1, 2]),
            owned("b", NOBODY, &[])
        ],
        "nothing of the refused requests was added"
    );
    // Root is exempt.
    let mut c = luod.client();
    c.create("root-2").expect("root's second session");
    c.create("root-3").expect("root's third session");

    // The bytes quota, through luoctl: exit 19 and the flag to raise.
    let mut luod = luod_with(&["--max-bytes-per-uid", "10000"]);
    let file = luod.dir().join("file");
    std::fs::write(&file, pattern(2, 4096)).expect("write the file");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod the file");
    let file = file.to_str().expect("utf-8 path");
    assert!(luoctl_as_nobody(&luod, &["session", "create", "a"]).status.success());
    for token in ["1", "2"] {
        let out = luoctl_as_nobody(&luod, &["session", "preserve", "a", "--token", token, "--file", file]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let before = assert_prompt(&mut luod);
    let out = luoctl_as_nobody(&luod, &["session", "preserve", "a", "--token", "3", "--file", file]);
    assert_eq!(out.status.code(), Some(19), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "luoctl: session preserve a token 3: quota exceeded: uid 65534 holds 8192 bytes of preserved files, \
         and 4096 more would pass its quota of 10000 (luod --max-bytes-per-uid); finish a session you no longer \
         need, or ask the operator to raise luod --max-bytes-per-uid\n"
    );
    assert_unchanged(&before, &assert_prompt(&mut luod));
    let out = luoctl_as_nobody(&luod, &["--json", "session", "create", "b"]);
    assert!(
        out.status.success(),
        "a session with no file passes the bytes quota: {out:?}"
    );
}

#[test]
fn a_memfd_grown_after_preservation_stops_prepare_freeze_and_reboot_until_it_is_released() {
    let mut luod = luod_with(&["--max-bytes-per-uid", "10000"]);
    let grows = memfd_with("grows", &pattern(3, 4096));
    let replies = as_nobody(
        &luod,
        Some(grows.as_fd()),
        &[
            Request::SessionCreate { name: "grows".into() },
            Request::SessionPreserve {
                name: "grows".into(),
                token: 1,
            },
        ],
    );
    assert_done(&replies);
    let overrun = "uid 65534 holds 1048576 bytes of preserved files, over its quota of 10000 (luod --max-bytes-per-uid): \
                   a file grew after it was preserved, or the quota was lowered (session(s) grows); the owner shrinks or \
                   finishes grows, or root releases it with `luoctl session evict NAME` (`luoctl cancel` first when \
                   frozen); or restart luod with a larger --max-bytes-per-uid\n";

    // normal: prepare refused.
    set_len(grows.as_fd(), 1 << 20);
    let before = assert_prompt(&mut luod);
    let stderr = luoctl_exits(&luod, &["prepare"], 19);
    assert_eq!(stderr, format!("luoctl: prepare: {overrun}"));
    assert_unchanged(&before, &assert_prompt(&mut luod));

    // prepared: freeze refused.
    set_len(grows.as_fd(), 4096);
    luoctl_exits(&luod, &["prepare"], 0);
    set_len(grows.as_fd(), 1 << 20);
    let before = assert_prompt(&mut luod);
    assert_eq!(
        luoctl_exits(&luod, &["freeze"], 19),
        format!("luoctl: freeze: {overrun}")
    );
    assert_unchanged(&before, &assert_prompt(&mut luod));

    // frozen: reboot refused (the file backend copies at the reboot), still frozen.
    set_len(grows.as_fd(), 4096);
    luoctl_exits(&luod, &["freeze"], 0);
    set_len(grows.as_fd(), 1 << 20);
    let before = assert_prompt(&mut luod);
    assert_eq!(
        luoctl_exits(&luod, &["reboot"], 19),
        format!("luoctl: reboot: {overrun}")
    );
    assert_unchanged(&before, &assert_prompt(&mut luod));
    assert_eq!(before.state, State::Frozen);

    // Eviction waits for the cancel; then the cycle goes on without it.
    assert_eq!(
        luoctl_exits(&luod, &["session", "evict", "grows"], 11),
        "luoctl: session evict grows: evicting a session is not allowed in state frozen; the host is frozen and \
         its record is final: `luoctl cancel` first (the state goes back to normal), then evict\n"
    );
    luoctl_exits(&luod, &["cancel"], 0);
    luoctl_exits(&luod, &["session", "evict", "grows"], 0);
    luoctl_exits(&luod, &["prepare"], 0);
    luoctl_exits(&luod, &["reboot"], 0);
    luod.expect_kexec_exit();
    luod.start();
    let mut c = luod.client();
    assert_eq!(sessions(&c.status().sessions), [owned("root-vm", 0, &[1])]);
    let (fd, _) = c.retrieve("root-vm", 1).expect("root's file came through");
    assert_same_bytes("root-vm/1", &read_all(fd.as_fd()), &pattern(1, 4096));
    c.finish().expect("finish");
    let evs = events(&luod);
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(
        event(&evs[0]),
        (
            0,
            "session-evicted",
            "grows",
            "owner uid 65534; 1 file(s), 1048576 bytes released (1 not retrieved) in state normal"
        )
    );
}

#[test]
fn root_evicts_a_uids_sessions_in_normal_prepared_and_updated_and_the_cycle_finishes() {
    let mut luod = luod_with(&[]);
    let mut requests = Vec::new();
    for (token, name) in ["n1", "n2", "n3"].into_iter().enumerate() {
        requests.push(Request::SessionCreate { name: name.into() });
        requests.push(Request::SessionPreserve {
            name: name.into(),
            token: token as u64,
        });
    }
    assert_done(&as_nobody(&luod, None, &requests));

    luoctl_exits(&luod, &["session", "evict", "n1"], 0);
    assert_eq!(assert_prompt(&mut luod).state, State::Normal);
    luoctl_exits(&luod, &["prepare"], 0);
    let out = luod.luoctl(&["--json", "session", "evict", "n2"]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!((v["ok"].as_bool(), v["session"].as_str()), (Some(true), Some("n2")));
    let status = assert_prompt(&mut luod);
    assert_eq!(status.state, State::Prepared);
    assert_eq!(
        sessions(&status.sessions),
        [owned("root-vm", 0, &[1]), owned("n3", NOBODY, &[2])]
    );
    luoctl_exits(&luod, &["reboot"], 0);
    luod.expect_kexec_exit();
    luod.start();

    let mut c = luod.client();
    c.retrieve("root-vm", 1).expect("root retrieves its file");
    assert_refused(
        c.finish(),
        ErrorKind::WrongState,
        "1 preserved file(s) were not retrieved: n3/2",
    );
    luoctl_exits(&luod, &["session", "evict", "n3"], 0);
    c.finish().expect("finish once the blocking session is evicted");
    assert_eq!(assert_prompt(&mut luod).state, State::Normal);

    let evs = events(&luod);
    let got: Vec<_> = evs.iter().map(event).collect();
    let detail =
        |state: &str| format!("owner uid 65534; 1 file(s), 4096 bytes released (1 not retrieved) in state {state}");
    assert_eq!(
        got,
        [
            (0, "session-evicted", "n1", detail("normal").as_str()),
            (0, "session-evicted", "n2", detail("prepared").as_str()),
            (0, "session-evicted", "n3", detail("updated").as_str()),
        ]
    );
    assert!(evs.iter().all(|e| e["at"].as_u64().is_some_and(|at| at > 0)));
    // The owner sees the events about its sessions too.
    match &as_nobody(&luod, None, &[Request::History])[0] {
        Ok(Response::History(h)) => {
            let subjects: Vec<_> = h.events.iter().map(|e| e.subject.as_str()).collect();
            assert_eq!(subjects, ["n1", "n2", "n3"]);
        }
        other => panic!("history answered {other:?}"),
    }
    // The text output lists them too.
    let out = luod.luoctl(&["history"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("events\n"), "{text}");
    assert_eq!(text.matches("session-evicted").count(), 3, "{text}");
}

#[test]
fn non_root_cannot_evict_or_finish_another_uids_session_and_root_can_finish_it() {
    let mut luod = luod_with(&[]);
    let before = assert_prompt(&mut luod);
    let replies = as_nobody(
        &luod,
        None,
        &[
            Request::SessionEvict { name: "root-vm".into() },
            Request::SessionFinish { name: "root-vm".into() },
            Request::SessionEvict { name: "missing".into() },
        ],
    );
    assert_refused_reply(
        &replies[0],
        ErrorKind::PermissionDenied,
        "session evict needs root or CAP_SYS_BOOT",
    );
    assert_refused_reply(&replies[1], ErrorKind::NotFound, "no session named root-vm");
    assert_refused_reply(
        &replies[2],
        ErrorKind::PermissionDenied,
        "session evict needs root or CAP_SYS_BOOT",
    );
    assert_unchanged(&before, &assert_prompt(&mut luod));
    let out = luoctl_as_nobody(&luod, &["session", "evict", "root-vm"]);
    assert_eq!(out.status.code(), Some(12), "{out:?}");

    // Nobody's own session: nobody cannot evict it either; root finishes it.
    let replies = as_nobody(
        &luod,
        None,
        &[
            Request::SessionCreate { name: "mine".into() },
            Request::SessionPreserve {
                name: "mine".into(),
                token: 5,
            },
            Request::SessionEvict { name: "mine".into() },
        ],
    );
    assert_done(&replies[..2]);
    assert_refused_reply(
        &replies[2],
        ErrorKind::PermissionDenied,
        "session evict needs root or CAP_SYS_BOOT",
    );
    luoctl_exits(&luod, &["session", "finish", "mine"], 0);
    assert_eq!(
        sessions(&assert_prompt(&mut luod).sessions),
        [owned("root-vm", 0, &[1])]
    );
    let evs = events(&luod);
    assert_eq!(
        evs.iter().map(event).collect::<Vec<_>>(),
        [(
            0,
            "session-finished-by-root",
            "mine",
            "owner uid 65534; 1 file(s), 4096 bytes released (1 not retrieved) in state normal"
        )]
    );
}
