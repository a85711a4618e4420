//! One luod per region and per socket: a second one refuses to start and
//! the first keeps serving; SIGTERM stops luod cleanly and it comes back
//! with its state.

use liveupdate::state::State;
use liveupdate_tests::*;
use std::process::{Command, Stdio};

/// Runs a second luod with `args` and returns its exit code and stderr.
fn second_luod(args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let out = Command::new(binary("luod"))
        .args(["--backend", "file", "--region-size", "8M"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run a second luod");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_second_luod_on_the_same_region_refuses_to_start_and_the_first_keeps_serving() {
    let mut luod = Luod::started("8M");
    luod.client().create("vm0").expect("create");
    let before = luod.status();
    let other = luod.dir().join("other");
    let (code, stderr) = second_luod(&[
        "--socket".as_ref(),
        other.join("luod.sock").as_os_str(),
        "--state-dir".as_ref(),
        other.join("state").as_os_str(),
        "--region".as_ref(),
        luod.region().as_os_str(),
    ]);
    assert_eq!(code, Some(1), "stderr: {stderr}");
    let expected = format!(
        "luod: region {} is in use by another luod (it holds the region's lock); stop that one first",
        luod.region().display()
    );
    assert!(stderr.lines().any(|l| l == expected), "stderr says why: {stderr}");
    assert!(luod.is_running());
    assert_unchanged(&before, &luod.status());
}

#[test]
fn a_second_luod_on_the_same_socket_refuses_to_start_and_the_first_keeps_serving() {
    let mut luod = Luod::started("8M");
    luod.client().create("vm0").expect("create");
    let before = luod.status();
    let other = luod.dir().join("other");
    let (code, stderr) = second_luod(&[
        "--socket".as_ref(),
        luod.socket().as_os_str(),
        "--state-dir".as_ref(),
        other.join("state").as_os_str(),
        "--region".as_ref(),
        other.join("region").as_os_str(),
    ]);
    assert_eq!(code, Some(1), "stderr: {stderr}");
    let expected = format!(
        "luod: another luod already serves {}; stop it first, or pass another --socket",
        luod.socket().display()
    );
    assert!(stderr.lines().any(|l| l == expected), "stderr says why: {stderr}");
    assert!(luod.is_running());
    assert_unchanged(&before, &luod.status());
}

#[test]
fn sigterm_stops_luod_cleanly_and_it_comes_back_with_its_state() {
    let mut luod = Luod::started("8M");
    let set = preserve_set(&mut luod.client(), &["vm0"], &[4096]);
    luod.client().prepare().expect("prepare");
    let before = luod.status();

    let status = luod.stop();
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
    assert!(!luod.socket().exists(), "luod removes its socket when it stops");

    luod.start();
    let after = luod.status();
    assert_eq!(after.state, State::Prepared);
    assert_eq!(
        (after.generation, &after.sessions),
        (before.generation, &before.sessions)
    );
    let mut c = luod.client();
    c.reboot().expect("reboot");
    drop(c);
    luod.expect_kexec_exit();
    luod.start();
    retrieve_and_compare(&mut luod.client(), &set);
}
