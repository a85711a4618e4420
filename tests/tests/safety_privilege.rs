//! Privilege is judged in luod's (the initial) user namespace and bound to
//! the process that connected (issue 7, item 1).
//!
//! uid 65534 in the socket's group attacks luod with and without a user
//! namespace of its own (`unshare -Ur`: root with every capability in
//! there): every transition is refused with the exact message, root's
//! sessions stay invisible, nothing changes, and luod keeps answering root's
//! `status` promptly. `CAP_SYS_BOOT` in the host's namespace still counts.
//! Runs as root, as CI does.

use liveupdate::protocol::{ErrorKind, PrepareArgs, Request, Response, StatusReport};
use liveupdate::state::State;
use liveupdate_tests::attack::{self, NOBODY, Who};
use liveupdate_tests::*;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

const NOT_PRIVILEGED_HINT: &str = "run as root (or with CAP_SYS_BOOT) in the host's user namespace; \
                                   root inside a user namespace of your own does not count";

/// A luod whose socket group 65534 reaches, with root's session `root-vm`
/// holding one file.
fn shared_luod() -> Luod {
    let luod = Luod::new("8M").arg("--socket-group").arg(NOBODY.to_string()).launched();
    attack::share(&luod);
    let mut c = luod.client();
    c.create("root-vm").expect("root creates root-vm");
    c.preserve("root-vm", 1, memfd_with("root-vm", &pattern(1, 4096)).as_fd())
        .expect("root preserves");
    luod
}

/// luod runs and answers root's `status` within 2 s; the report.
#[track_caller]
fn root_status_promptly(luod: &mut Luod) -> StatusReport {
    assert!(luod.is_running(), "luod is still running");
    let started = Instant::now();
    let status = luod.status();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "root's status took {:?}",
        started.elapsed()
    );
    status
}

/// Sends `requests` on one connection as `who`, through the test client.
fn client_as(who: Who, luod: &Luod, requests: &[Request]) -> Vec<Reply<Response>> {
    let socket = luod.socket();
    let json: Vec<String> = requests
        .iter()
        .map(|r| serde_json::to_string(r).expect("request as JSON"))
        .collect();
    let mut args = vec![socket.to_str().expect("UTF-8 path")];
    args.extend(json.iter().map(String::as_str));
    let out = attack::command_as(who, &attack::test_client(luod.dir()), &args)
        .output()
        .expect("run the test client");
    assert!(
        out.status.success(),
        "the test client as {who:?} failed ({}): {}",
        out.status,
        attack::stderr(&out)
    );
    serde_json::from_slice(&out.stdout).expect("the client's JSON answers")
}

#[test]
fn nobody_with_or_without_a_user_namespace_of_its_own_cannot_prepare() {
    let mut luod = shared_luod();
    let before = root_status_promptly(&mut luod);
    for who in [Who::Nobody, Who::NobodyInOwnUserns, Who::RootInOwnUserns] {
        let out = attack::luoctl_as(who, luod.dir(), &luod.socket(), &["prepare"]);
        assert_eq!(out.status.code(), Some(12), "{who:?}: {}", attack::stderr(&out));
        assert_eq!(
            attack::stderr(&out),
            format!("luoctl: prepare: prepare needs root or CAP_SYS_BOOT; {NOT_PRIVILEGED_HINT}\n"),
            "{who:?}"
        );
        assert_unchanged(&before, &root_status_promptly(&mut luod));
    }
}

#[test]
fn root_inside_its_own_user_namespace_cannot_drive_any_transition() {
    let mut luod = shared_luod();
    // Root gets the cycle to frozen, so that every transition is allowed
    // by the state machine and only the privilege check can refuse.
    let mut c = luod.client();
    c.prepare().expect("root prepares");
    let prepared = root_status_promptly(&mut luod);
    let replies = client_as(
        Who::NobodyInOwnUserns,
        &luod,
        &[
            Request::Prepare(PrepareArgs::default()),
            Request::Freeze,
            Request::Cancel,
        ],
    );
    for (reply, what) in replies.iter().zip(["prepare", "freeze", "cancel"]) {
        match reply {
            Err(e) => assert_eq!(
                (e.kind, e.message.as_str(), e.hint.as_str()),
                (
                    ErrorKind::PermissionDenied,
                    format!("{what} needs root or CAP_SYS_BOOT").as_str(),
                    NOT_PRIVILEGED_HINT
                )
            ),
            Ok(r) => panic!("{what} as root of its own user namespace answered {r:?}"),
        }
    }
    assert_unchanged(&prepared, &root_status_promptly(&mut luod));
    c.freeze().expect("root freezes");
    let frozen = root_status_promptly(&mut luod);
    let replies = client_as(Who::NobodyInOwnUserns, &luod, &[Request::Reboot, Request::Cancel]);
    for (reply, what) in replies.iter().zip(["reboot", "cancel"]) {
        match reply {
            Err(e) => assert_eq!(
                (e.kind, e.message.as_str()),
                (
                    ErrorKind::PermissionDenied,
                    format!("{what} needs root or CAP_SYS_BOOT").as_str()
                )
            ),
            Ok(r) => panic!("{what} answered {r:?}"),
        }
    }
    assert_eq!(frozen.state, State::Frozen);
    assert_unchanged(&frozen, &root_status_promptly(&mut luod));
    c.cancel().expect("root cancels");
}

#[test]
fn nobody_in_its_own_user_namespace_does_not_see_roots_sessions() {
    let mut luod = shared_luod();
    let before = root_status_promptly(&mut luod);
    for who in [Who::Nobody, Who::NobodyInOwnUserns] {
        let out = attack::luoctl_as(who, luod.dir(), &luod.socket(), &["--json", "status"]);
        assert_eq!(out.status.code(), Some(0), "{who:?}: {}", attack::stderr(&out));
        let status = attack::json(&out);
        assert_eq!(
            status["sessions"],
            serde_json::json!([]),
            "{who:?}: status shows no session"
        );
        assert_eq!(status["state"], "normal");

        let replies = client_as(
            who,
            &luod,
            &[
                Request::SessionList,
                Request::SessionRetrieve {
                    name: "root-vm".into(),
                    token: 1,
                },
                Request::SessionFinish { name: "root-vm".into() },
                Request::VmAbandon { name: "x".into() },
            ],
        );
        assert!(
            matches!(&replies[0], Ok(Response::Sessions(s)) if s.is_empty()),
            "{who:?}: {:?}",
            replies[0]
        );
        for reply in &replies[1..3] {
            match reply {
                Err(e) => assert_eq!(
                    (e.kind, e.message.as_str()),
                    (ErrorKind::NotFound, "no session named root-vm")
                ),
                Ok(r) => panic!("{who:?} touched root's session: {r:?}"),
            }
        }
        assert_unchanged(&before, &root_status_promptly(&mut luod));
    }
}

#[test]
fn roots_preserved_data_comes_through_an_update_after_the_attacks() {
    let mut luod = shared_luod();
    for who in [Who::Nobody, Who::NobodyInOwnUserns, Who::RootInOwnUserns] {
        for cmd in ["prepare", "freeze", "reboot", "cancel"] {
            let out = attack::luoctl_as(who, luod.dir(), &luod.socket(), &[cmd]);
            assert_eq!(out.status.code(), Some(12), "{who:?} {cmd}: {}", attack::stderr(&out));
        }
        // Root inside its own namespace is still uid 0 on the host, the
        // owner of root-vm: sessions belong to uids, so only the others try.
        if who != Who::RootInOwnUserns {
            let out = attack::luoctl_as(who, luod.dir(), &luod.socket(), &["session", "finish", "root-vm"]);
            assert_eq!(out.status.code(), Some(15), "{who:?}: {}", attack::stderr(&out));
        }
    }
    let status = root_status_promptly(&mut luod);
    assert_eq!(status.state, State::Normal);
    let mut c = luod.client();
    c.prepare().expect("root prepares");
    c.reboot().expect("root reboots");
    drop(c);
    luod.expect_kexec_exit();
    luod.start();
    let set = [Preserved {
        session: "root-vm".into(),
        token: 1,
        bytes: pattern(1, 4096),
    }];
    retrieve_and_compare(&mut luod.client(), &set);
}

#[test]
fn cap_sys_boot_in_the_hosts_namespace_is_privileged() {
    let mut luod = shared_luod();
    let who = Who::NobodyWithCapSysBoot;
    let out = attack::luoctl_as(who, luod.dir(), &luod.socket(), &["--json", "status"]);
    assert_eq!(out.status.code(), Some(0), "{}", attack::stderr(&out));
    let names: Vec<_> = attack::json(&out)["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .map(|s| s["name"].clone())
        .collect();
    assert_eq!(names, ["root-vm"], "a privileged caller sees every session");
    let out = attack::luoctl_as(who, luod.dir(), &luod.socket(), &["prepare"]);
    assert_eq!(out.status.code(), Some(0), "{}", attack::stderr(&out));
    assert_eq!(root_status_promptly(&mut luod).state, State::Prepared);
    let out = attack::luoctl_as(who, luod.dir(), &luod.socket(), &["cancel"]);
    assert_eq!(out.status.code(), Some(0), "{}", attack::stderr(&out));
    assert_eq!(root_status_promptly(&mut luod).state, State::Normal);
}
