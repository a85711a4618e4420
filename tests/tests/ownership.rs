//! A client sees and touches only its own sessions (luod reads the peer's
//! credentials), and only root (or CAP_SYS_BOOT) drives transitions.
//!
//! Runs as root, as CI does: luod's socket is given to group 65534
//! (nogroup) with `--socket-group`, and a client runs as uid/gid 65534
//! (nobody) through the `luo-test-client` binary.

use liveupdate::protocol::{ErrorKind, PrepareArgs, Request, Response, SessionInfo};
use liveupdate::state::State;
use liveupdate_tests::*;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

const NOBODY: u32 = 65534;

/// A luod whose socket nobody can reach, with root's session `root-vm`
/// holding one file, and a copy of the test client nobody can run.
fn luod_shared_with_nobody() -> Luod {
    assert!(
        nix::unistd::geteuid().is_root(),
        "tests/ownership.rs must run as root (as CI does): it starts a client as uid {NOBODY}"
    );
    let luod = Luod::new("8M").arg("--socket-group").arg(NOBODY.to_string()).launched();
    std::fs::set_permissions(luod.dir(), std::fs::Permissions::from_mode(0o755)).expect("chmod 0755 the directory");
    let client = luod.dir().join("luo-test-client");
    liveupdate_tests::copy_binary("luo-test-client", &client);
    let mut c = luod.client();
    c.create("root-vm").expect("root creates root-vm");
    c.preserve("root-vm", 1, memfd_with("root-vm", &pattern(1, 4096)).as_fd())
        .expect("root preserves");
    luod
}

/// Sends `requests` on one connection as uid/gid 65534; luod's answers.
fn as_nobody(luod: &Luod, requests: &[Request]) -> Vec<Reply<Response>> {
    let mut cmd = Command::new(luod.dir().join("luo-test-client"));
    cmd.arg(luod.socket()).uid(NOBODY).gid(NOBODY);
    for r in requests {
        cmd.arg(serde_json::to_string(r).expect("request as JSON"));
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

fn sessions(reply: &Reply<Response>) -> Vec<SessionInfo> {
    match reply {
        Ok(Response::Sessions(s)) => s.clone(),
        Ok(Response::Status(s)) => s.sessions.clone(),
        other => panic!("expected sessions, got {other:?}"),
    }
}

#[track_caller]
fn assert_refused_reply(reply: &Reply<Response>, kind: ErrorKind, message: &str) {
    match reply {
        Err(e) => assert_eq!((e.kind, e.message.as_str()), (kind, message)),
        Ok(r) => panic!("expected {kind:?} {message:?}, got {r:?}"),
    }
}

#[test]
fn another_user_does_not_see_roots_session_in_list_or_status() {
    let luod = luod_shared_with_nobody();
    let replies = as_nobody(&luod, &[Request::SessionList, Request::Status]);
    assert_eq!(sessions(&replies[0]), [], "session list");
    assert_eq!(sessions(&replies[1]), [], "status");
    match &replies[1] {
        Ok(Response::Status(s)) => assert_eq!(s.state, State::Normal, "status is otherwise answered"),
        other => panic!("status answered {other:?}"),
    }
}

#[test]
fn another_user_cannot_touch_roots_session() {
    let luod = luod_shared_with_nobody();
    let before = luod.status();
    let replies = as_nobody(
        &luod,
        &[
            Request::SessionRetrieve {
                name: "root-vm".into(),
                token: 1,
            },
            Request::SessionPreserve {
                name: "root-vm".into(),
                token: 2,
            },
            Request::SessionFinish { name: "root-vm".into() },
            // Names are host-wide, as in the kernel.
            Request::SessionCreate { name: "root-vm".into() },
        ],
    );
    assert_refused_reply(&replies[0], ErrorKind::NotFound, "no session named root-vm");
    assert_refused_reply(&replies[1], ErrorKind::NotFound, "no session named root-vm");
    assert_refused_reply(&replies[2], ErrorKind::NotFound, "no session named root-vm");
    assert_refused_reply(
        &replies[3],
        ErrorKind::AlreadyExists,
        "a session named root-vm exists already",
    );
    assert_unchanged(&before, &luod.status());
}

#[test]
fn another_user_cannot_drive_transitions() {
    let luod = luod_shared_with_nobody();
    let before = luod.status();
    let replies = as_nobody(
        &luod,
        &[
            Request::Prepare(PrepareArgs::default()),
            Request::Freeze,
            Request::Reboot,
            Request::Cancel,
            Request::Finish,
        ],
    );
    for (reply, what) in replies.iter().zip(["prepare", "freeze", "reboot", "cancel", "finish"]) {
        assert_refused_reply(
            reply,
            ErrorKind::PermissionDenied,
            &format!("{what} needs root or CAP_SYS_BOOT"),
        );
    }
    assert_unchanged(&before, &luod.status());
}

#[test]
fn another_users_own_session_is_in_roots_status_but_not_in_roots_list() {
    let luod = luod_shared_with_nobody();
    let replies = as_nobody(
        &luod,
        &[
            Request::SessionCreate {
                name: "nobody-vm".into(),
            },
            Request::SessionPreserve {
                name: "nobody-vm".into(),
                token: 1,
            },
            Request::SessionList,
            Request::Status,
        ],
    );
    assert!(matches!(replies[0], Ok(Response::Done)), "create: {:?}", replies[0]);
    assert!(matches!(replies[1], Ok(Response::Done)), "preserve: {:?}", replies[1]);
    let own = |s: &[SessionInfo]| s.iter().map(|s| (s.name.clone(), s.owner_uid)).collect::<Vec<_>>();
    let nobody_vm = vec![("nobody-vm".to_string(), NOBODY)];
    assert_eq!(own(&sessions(&replies[2])), nobody_vm, "nobody's list");
    assert_eq!(own(&sessions(&replies[3])), nobody_vm, "nobody's status");

    let mut c = luod.client();
    assert_eq!(
        own(&c.list()),
        [("root-vm".to_string(), 0)],
        "root's list shows root's sessions only"
    );
    let status = c.status();
    assert_eq!(
        own(&status.sessions),
        [("root-vm".to_string(), 0), ("nobody-vm".to_string(), NOBODY)],
        "root's status shows every session with its owner"
    );
    let files: Vec<_> = status.sessions[1].files.iter().map(|f| (f.token, f.size)).collect();
    assert_eq!(files, [(1, 4096)], "nobody's preserved file");
}

#[test]
fn another_users_session_comes_through_the_update_still_theirs() {
    let mut luod = luod_shared_with_nobody();
    let replies = as_nobody(
        &luod,
        &[
            Request::SessionCreate {
                name: "nobody-vm".into(),
            },
            Request::SessionPreserve {
                name: "nobody-vm".into(),
                token: 1,
            },
        ],
    );
    assert!(replies.iter().all(|r| matches!(r, Ok(Response::Done))), "{replies:?}");
    let mut c = luod.client();
    c.prepare().expect("prepare");
    c.reboot().expect("reboot");
    drop(c);
    luod.expect_kexec_exit();
    luod.start();

    let mut c = luod.client();
    let owners: Vec<_> = c
        .status()
        .sessions
        .iter()
        .map(|s| (s.name.clone(), s.owner_uid, s.incoming))
        .collect();
    assert_eq!(
        owners,
        [
            ("root-vm".to_string(), 0, true),
            ("nobody-vm".to_string(), NOBODY, true)
        ]
    );
    assert_refused(
        c.retrieve("nobody-vm", 1),
        ErrorKind::NotFound,
        "no session named nobody-vm",
    );

    let replies = as_nobody(
        &luod,
        &[
            Request::SessionList,
            Request::SessionRetrieve {
                name: "root-vm".into(),
                token: 1,
            },
            Request::SessionRetrieve {
                name: "nobody-vm".into(),
                token: 1,
            },
        ],
    );
    let listed: Vec<_> = sessions(&replies[0])
        .iter()
        .map(|s| (s.name.clone(), s.incoming))
        .collect();
    assert_eq!(
        listed,
        [("nobody-vm".to_string(), true)],
        "nobody's list after the update"
    );
    assert_refused_reply(&replies[1], ErrorKind::NotFound, "no session named root-vm");
    assert!(
        matches!(replies[2], Ok(Response::Fd { size: 4096 })),
        "nobody takes its file back: {:?}",
        replies[2]
    );

    c.retrieve("root-vm", 1).expect("root takes its file back");
    c.finish().expect("finish once both owners took their files back");
}
