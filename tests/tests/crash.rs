//! luod killed with SIGKILL in the middle of a cycle: the luod started again
//! resumes where the record says, with every preserved file (they survive in
//! the fd holder process), and the cycle can complete or be cancelled.

use liveupdate::protocol::StatusReport;
use liveupdate::state::State;
use liveupdate_tests::*;

const PAGE: usize = 4096;

/// Two sessions of two files, in a luod with room for them.
fn luod_with_files() -> (Luod, Vec<Preserved>) {
    let luod = Luod::started("16M");
    let set = preserve_set(&mut luod.client(), &["vm0", "vm1"], &[PAGE, (1 << 20) + 3]);
    (luod, set)
}

/// Kills luod, starts it again, and checks that it came back in `state`
/// with the same sessions, tokens and sizes as before the kill.
#[track_caller]
fn kill_and_restart(luod: &mut Luod, set: &[Preserved], state: State) -> StatusReport {
    let before = luod.status();
    assert_eq!(before.state, state);
    luod.kill();
    luod.start();
    let after = luod.status();
    assert_eq!(after.state, state, "state after the restart");
    assert_eq!(
        sessions_seen(&after.sessions),
        sessions_of(set),
        "sessions and tokens after the restart"
    );
    assert_eq!(after.sessions, before.sessions, "sessions as status shows them");
    assert_eq!(after.last_cycle, before.last_cycle, "the cycle in flight");
    after
}

/// From `prepared` or `frozen`: reboot, start the new kernel's luod, take
/// every file back and finish.
#[track_caller]
fn complete_the_cycle(luod: &mut Luod, set: &[Preserved]) {
    let mut c = luod.client();
    c.reboot().expect("reboot");
    drop(c);
    luod.expect_kexec_exit();
    luod.start();
    let mut c = luod.client();
    assert_eq!(c.status().state, State::Updated);
    retrieve_and_compare(&mut c, set);
    c.finish().expect("finish");
    let status = c.status();
    assert_eq!((status.state, status.live_updates), (State::Normal, 1));
}

#[test]
fn luod_killed_in_normal_comes_back_with_its_preserved_files() {
    let (mut luod, set) = luod_with_files();
    kill_and_restart(&mut luod, &set, State::Normal);
    luod.client().prepare().expect("prepare after the restart");
    complete_the_cycle(&mut luod, &set);
}

#[test]
fn luod_killed_after_prepare_comes_back_prepared_and_the_cycle_completes() {
    let (mut luod, set) = luod_with_files();
    luod.client().prepare().expect("prepare");
    kill_and_restart(&mut luod, &set, State::Prepared);
    luod.client().freeze().expect("freeze after the restart");
    complete_the_cycle(&mut luod, &set);
}

#[test]
fn luod_killed_after_freeze_comes_back_frozen_and_the_cycle_completes() {
    let (mut luod, set) = luod_with_files();
    let mut c = luod.client();
    c.prepare().expect("prepare");
    c.freeze().expect("freeze");
    drop(c);
    kill_and_restart(&mut luod, &set, State::Frozen);
    complete_the_cycle(&mut luod, &set);
}

#[test]
fn luod_killed_after_prepare_can_cancel_and_keeps_the_sessions() {
    let (mut luod, set) = luod_with_files();
    luod.client().prepare().expect("prepare");
    kill_and_restart(&mut luod, &set, State::Prepared);
    let mut c = luod.client();
    let cancelled = c.cancel().expect("cancel after the restart");
    assert_eq!((cancelled.from, cancelled.to), (State::Prepared, State::Normal));
    let status = c.status();
    assert_eq!(status.state, State::Normal);
    assert_eq!(sessions_seen(&status.sessions), sessions_of(&set));
    assert_eq!(status.last_cycle.map(|l| l.outcome), Some("cancelled".to_string()));
    drop(c);

    // The files are still preserved: a new cycle carries them.
    luod.client().prepare().expect("prepare again");
    complete_the_cycle(&mut luod, &set);
}

#[test]
fn luod_killed_in_updated_keeps_the_files_not_yet_retrieved() {
    let (mut luod, set) = luod_with_files();
    let mut c = luod.client();
    c.prepare().expect("prepare");
    c.reboot().expect("reboot");
    drop(c);
    luod.expect_kexec_exit();
    luod.start();
    // One file is taken back before the crash, the others after it.
    let mut c = luod.client();
    retrieve_and_compare(&mut c, &set[..1]);
    drop(c);

    luod.kill();
    luod.start();
    let mut c = luod.client();
    let status = c.status();
    assert_eq!(status.state, State::Updated);
    assert_eq!(
        sessions_seen(&status.sessions),
        sessions_of(&set),
        "every file is still listed"
    );
    let retrieved: Vec<bool> = status
        .sessions
        .iter()
        .flat_map(|s| s.files.iter().map(|f| f.retrieved))
        .collect();
    assert_eq!(
        retrieved,
        [true, false, false, false],
        "the first file was retrieved before the crash"
    );
    retrieve_and_compare(&mut c, &set[1..]);
    c.finish().expect("finish");
    assert_eq!(c.status().live_updates, 1);
}
