//! Every request that a state does not allow is refused with a WrongState
//! error that names the state and where the request is allowed, and changes
//! nothing (same state, generation, sessions).
//!
//! Transitions follow `liveupdate::state::Event::allowed_from` (and `reboot`
//! from `prepared` freezes first, so it is allowed there); sessions are
//! created and files preserved only in `normal`, retrieved only in
//! `updated`, and sessions cannot finish while a cycle is in flight.

use liveupdate::protocol::{ErrorKind, PrepareArgs, Request, Request as R};
use liveupdate::state::State;
use liveupdate_tests::*;
use std::os::fd::AsFd;

/// A request the matrix sends, and the message its refusal must carry.
type Case = (Request, &'static str);

fn prepare() -> Request {
    Request::Prepare(PrepareArgs::default())
}

fn create() -> Request {
    Request::SessionCreate { name: "new".into() }
}

fn preserve() -> Request {
    Request::SessionPreserve {
        name: "vm0".into(),
        token: 2,
    }
}

fn retrieve() -> Request {
    Request::SessionRetrieve {
        name: "vm0".into(),
        token: 1,
    }
}

fn session_finish() -> Request {
    Request::SessionFinish { name: "vm0".into() }
}

/// A luod in `state`, with session `vm0` holding one page under token 1
/// (from `updated` on, as it came through the update).
fn luod_in(state: State) -> Luod {
    let mut luod = Luod::started("8M");
    let mut c = luod.client();
    c.create("vm0").expect("create vm0");
    c.preserve("vm0", 1, memfd_with("vm0-1", &pattern(1, 4096)).as_fd())
        .expect("preserve vm0/1");
    if state != State::Normal {
        c.prepare().expect("prepare");
    }
    if state == State::Frozen {
        c.freeze().expect("freeze");
    }
    if state == State::Updated {
        c.reboot().expect("reboot");
        drop(c);
        luod.expect_kexec_exit();
        luod.start();
    }
    assert_eq!(luod.status().state, state);
    luod
}

/// Sends each case to a luod in `state` and checks the refusal and that the
/// status did not change.
fn refused_in(state: State, cases: Vec<Case>) {
    let luod = luod_in(state);
    let mut c = luod.client();
    let before = c.status();
    for (req, message) in cases {
        let what = req.kind();
        // A preserve carries a file, as a real one would.
        let file = memfd_with("spare", b"spare");
        let fds = if matches!(req, Request::SessionPreserve { .. }) {
            vec![file.as_fd()]
        } else {
            vec![]
        };
        match c.call_fds(&req, &fds) {
            Ok((resp, _)) => panic!("{what} in {state}: accepted ({resp:?})"),
            Err(e) => assert_eq!(
                (e.kind, e.message.as_str()),
                (ErrorKind::WrongState, message),
                "{what} in {state}"
            ),
        }
        assert_unchanged(&before, &c.status());
    }
}

#[test]
fn in_normal_freeze_reboot_finish_cancel_and_retrieve_are_refused() {
    refused_in(
        State::Normal,
        vec![
            (
                R::Freeze,
                "cannot freeze in state normal: freeze is allowed only in prepared",
            ),
            (
                R::Reboot,
                "cannot reboot in state normal: reboot is allowed only in frozen",
            ),
            (
                R::Finish,
                "cannot finish in state normal: finish is allowed only in updated",
            ),
            (
                R::Cancel,
                "cannot cancel in state normal: cancel is allowed only in prepared or frozen",
            ),
            (retrieve(), "retrieving a file is not allowed in state normal"),
        ],
    );
}

#[test]
fn in_prepared_prepare_finish_and_every_session_change_are_refused() {
    refused_in(
        State::Prepared,
        vec![
            (
                prepare(),
                "cannot prepare in state prepared: prepare is allowed only in normal",
            ),
            (
                R::Finish,
                "cannot finish in state prepared: finish is allowed only in updated",
            ),
            (create(), "creating a session is not allowed in state prepared"),
            (preserve(), "preserving a file is not allowed in state prepared"),
            (retrieve(), "retrieving a file is not allowed in state prepared"),
            (session_finish(), "finishing a session is not allowed in state prepared"),
        ],
    );
}

#[test]
fn in_frozen_prepare_freeze_finish_and_every_session_change_are_refused() {
    refused_in(
        State::Frozen,
        vec![
            (
                prepare(),
                "cannot prepare in state frozen: prepare is allowed only in normal",
            ),
            (
                R::Freeze,
                "cannot freeze in state frozen: freeze is allowed only in prepared",
            ),
            (
                R::Finish,
                "cannot finish in state frozen: finish is allowed only in updated",
            ),
            (create(), "creating a session is not allowed in state frozen"),
            (preserve(), "preserving a file is not allowed in state frozen"),
            (retrieve(), "retrieving a file is not allowed in state frozen"),
            (session_finish(), "finishing a session is not allowed in state frozen"),
        ],
    );
}

#[test]
fn in_updated_prepare_freeze_reboot_cancel_create_and_preserve_are_refused() {
    refused_in(
        State::Updated,
        vec![
            (
                prepare(),
                "cannot prepare in state updated: prepare is allowed only in normal",
            ),
            (
                R::Freeze,
                "cannot freeze in state updated: freeze is allowed only in prepared",
            ),
            (
                R::Reboot,
                "cannot reboot in state updated: reboot is allowed only in frozen",
            ),
            (
                R::Cancel,
                "cannot cancel in state updated: cancel is allowed only in prepared or frozen",
            ),
            (create(), "creating a session is not allowed in state updated"),
            (preserve(), "preserving a file is not allowed in state updated"),
        ],
    );
}

#[test]
fn finish_is_refused_while_a_preserved_file_was_not_retrieved() {
    let luod = luod_in(State::Updated);
    let mut c = luod.client();
    let before = c.status();
    assert_refused(
        c.finish(),
        ErrorKind::WrongState,
        "1 preserved file(s) were not retrieved: vm0/1",
    );
    assert_unchanged(&before, &c.status());
    let (fd, _) = c.retrieve("vm0", 1).expect("retrieve vm0/1");
    assert_file_holds("vm0/1", &fd, &pattern(1, 4096));
    c.finish().expect("finish once everything is retrieved");
}
