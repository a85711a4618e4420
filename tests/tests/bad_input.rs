//! Bad session requests get the exact error and change nothing: invalid or
//! duplicate names, tokens, files that cannot be preserved, missing files.
//!
//! Each test checks the refusal (kind and message) and that `status` (state,
//! generation, sessions, files) is the same before and after.

use liveupdate::protocol::{ErrorKind, Request, Response};
use liveupdate::state::State;
use liveupdate_tests::*;
use std::os::fd::AsFd;

const PAGE: usize = 4096;

/// A luod with session `vm0` holding one page under token 1.
fn luod_with_vm0() -> (Luod, Conn) {
    let luod = Luod::started("8M");
    let mut c = luod.client();
    c.create("vm0").expect("create vm0");
    c.preserve("vm0", 1, memfd_with("vm0-1", &pattern(1, PAGE)).as_fd())
        .expect("preserve vm0/1");
    (luod, c)
}

#[test]
fn session_names_that_are_empty_too_long_or_not_c_strings_are_refused() {
    let luod = Luod::started("8M");
    let mut c = luod.client();
    let before = c.status();
    let long = "x".repeat(64);
    let refused = [
        ("", "session name is empty: give a name of 1 to 63 bytes"),
        (
            long.as_str(),
            "session name is 64 bytes long: the kernel allows at most 63 bytes",
        ),
        (
            "ab\0c",
            "session name contains a NUL byte at offset 2: names are C strings in the kernel",
        ),
        (
            "a/b",
            "session name contains '/' at offset 1: use printable characters other than '/'",
        ),
        (
            "a\nb",
            "session name contains '\\n' at offset 1: use printable characters other than '/'",
        ),
    ];
    for (name, message) in refused {
        assert_refused(c.create(name), ErrorKind::InvalidArgument, message);
        assert_unchanged(&before, &c.status());
    }
    // The longest name the kernel takes is fine.
    c.create(&"x".repeat(63)).expect("a 63-byte name");
}

#[test]
fn invalid_names_are_refused_by_every_session_request() {
    let (_luod, mut c) = luod_with_vm0();
    let before = c.status();
    let message = "session name is empty: give a name of 1 to 63 bytes";
    let file = memfd_with("spare", b"spare");
    assert_refused(c.preserve("", 2, file.as_fd()), ErrorKind::InvalidArgument, message);
    assert_refused(c.retrieve("", 1), ErrorKind::InvalidArgument, message);
    assert_refused(c.session_finish(""), ErrorKind::InvalidArgument, message);
    assert_unchanged(&before, &c.status());
}

#[test]
fn a_second_session_of_the_same_name_is_refused() {
    let (_luod, mut c) = luod_with_vm0();
    let before = c.status();
    assert_refused(
        c.create("vm0"),
        ErrorKind::AlreadyExists,
        "a session named vm0 exists already",
    );
    assert_unchanged(&before, &c.status());
}

#[test]
fn requests_on_a_session_that_does_not_exist_are_not_found() {
    let (_luod, mut c) = luod_with_vm0();
    let before = c.status();
    let file = memfd_with("spare", b"spare");
    assert_refused(
        c.preserve("ghost", 1, file.as_fd()),
        ErrorKind::NotFound,
        "no session named ghost",
    );
    assert_refused(c.retrieve("ghost", 1), ErrorKind::NotFound, "no session named ghost");
    assert_refused(c.session_finish("ghost"), ErrorKind::NotFound, "no session named ghost");
    assert_unchanged(&before, &c.status());
}

#[test]
fn a_token_already_used_in_the_session_is_refused() {
    let (_luod, mut c) = luod_with_vm0();
    let before = c.status();
    let other = memfd_with("other", &pattern(2, PAGE));
    assert_refused(
        c.preserve("vm0", 1, other.as_fd()),
        ErrorKind::AlreadyExists,
        "session vm0 already has a file under token 1",
    );
    assert_unchanged(&before, &c.status());
}

#[test]
fn the_same_memfd_cannot_be_preserved_twice() {
    let luod = Luod::started("8M");
    let mut c = luod.client();
    c.create("vm0").expect("create vm0");
    c.create("vm1").expect("create vm1");
    let ram = memfd_with("ram", &pattern(3, PAGE));
    c.preserve("vm0", 1, ram.as_fd()).expect("first preservation");
    let before = c.status();

    let message = "this file is already preserved (session vm0, token 1)";
    assert_refused(c.preserve("vm0", 2, ram.as_fd()), ErrorKind::AlreadyExists, message);
    assert_refused(c.preserve("vm1", 1, ram.as_fd()), ErrorKind::AlreadyExists, message);
    // A duplicate descriptor is the same file.
    let dup = ram.try_clone().expect("dup");
    assert_refused(c.preserve("vm1", 7, dup.as_fd()), ErrorKind::AlreadyExists, message);
    assert_unchanged(&before, &c.status());
}

#[test]
fn a_regular_file_cannot_be_preserved() {
    let (luod, mut c) = luod_with_vm0();
    let before = c.status();
    let path = luod.dir().join("not-a-memfd");
    std::fs::write(&path, b"plain file").expect("write a regular file");
    let path = path.canonicalize().expect("canonical path");
    let file = std::fs::File::open(&path).expect("open the regular file");
    assert_refused(
        c.preserve("vm0", 2, file.as_fd()),
        ErrorKind::InvalidArgument,
        &format!("cannot preserve {}: only memfds can be preserved", path.display()),
    );
    assert_unchanged(&before, &c.status());
}

#[test]
fn preserve_without_exactly_one_file_descriptor_is_refused() {
    let (_luod, mut c) = luod_with_vm0();
    let before = c.status();
    let message = "session-preserve needs exactly one file descriptor (sent with SCM_RIGHTS)";
    let req = Request::SessionPreserve {
        name: "vm0".into(),
        token: 2,
    };
    assert_refused(c.call_fds(&req, &[]), ErrorKind::InvalidArgument, message);
    let (a, b) = (memfd_with("a", b"a"), memfd_with("b", b"b"));
    assert_refused(
        c.call_fds(&req, &[a.as_fd(), b.as_fd()]),
        ErrorKind::InvalidArgument,
        message,
    );
    assert_unchanged(&before, &c.status());
}

#[test]
fn a_file_descriptor_sent_with_a_request_that_takes_none_is_refused() {
    let (_luod, mut c) = luod_with_vm0();
    let before = c.status();
    let file = memfd_with("stray", b"stray");
    assert_refused(
        c.call_fds(&Request::SessionCreate { name: "vm1".into() }, &[file.as_fd()]),
        ErrorKind::InvalidArgument,
        "session-create takes no file descriptor but 1 came with it",
    );
    assert_unchanged(&before, &c.status());
}

/// Goes through a cycle with `vm0`'s file, up to `updated`.
fn updated_with_vm0() -> (Luod, Conn) {
    let (mut luod, mut c) = luod_with_vm0();
    c.prepare().expect("prepare");
    c.reboot().expect("reboot");
    drop(c);
    luod.expect_kexec_exit();
    luod.start();
    let c = luod.client();
    (luod, c)
}

#[test]
fn retrieving_an_unknown_token_after_the_update_is_not_found() {
    let (_luod, mut c) = updated_with_vm0();
    let before = c.status();
    assert_eq!(before.state, State::Updated);
    assert_refused(
        c.retrieve("vm0", 99),
        ErrorKind::NotFound,
        "session vm0 has no file under token 99",
    );
    assert_refused(c.retrieve("ghost", 1), ErrorKind::NotFound, "no session named ghost");
    assert_unchanged(&before, &c.status());
}

#[test]
fn a_file_cannot_be_retrieved_twice() {
    let (_luod, mut c) = updated_with_vm0();
    let (fd, _) = c.retrieve("vm0", 1).expect("first retrieval");
    assert_file_holds("vm0/1", &fd, &pattern(1, PAGE));
    let before = c.status();
    assert_refused(
        c.retrieve("vm0", 1),
        ErrorKind::WrongState,
        "session vm0 token 1 was already retrieved",
    );
    assert_unchanged(&before, &c.status());
}

#[test]
fn hello_twice_is_refused_and_the_connection_stays_usable() {
    let (_luod, mut c) = luod_with_vm0();
    let before = c.status();
    let hello = Request::Hello {
        version: liveupdate::protocol::PROTOCOL_VERSION,
        client: "again".into(),
    };
    assert_refused(
        c.call(&hello),
        ErrorKind::InvalidArgument,
        "hello was already exchanged",
    );
    assert!(matches!(c.call(&Request::Status), Ok(Response::Status(_))));
    assert_unchanged(&before, &c.status());
}
