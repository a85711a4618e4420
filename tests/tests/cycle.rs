//! The live-update cycle end to end through the simulated kexec: luod writes
//! the record and the preserved files into its region at `reboot` and exits
//! with status 75; a luod started again on the same region is the new
//! kernel's, in `updated`.

use liveupdate::protocol::StatusReport;
use liveupdate::record::{Outcome, Timestamps};
use liveupdate::state::State;
use liveupdate_tests::*;

const PAGE: usize = 4096;
const MIB_16: usize = 16 << 20;

/// Every timestamp of a finished cycle is set, in the order the steps ran.
#[track_caller]
fn assert_finished_timestamps(t: &Timestamps) {
    let steps = [
        ("prepared", t.prepared),
        ("freeze_started", t.freeze_started),
        ("frozen", t.frozen),
        ("reboot", t.reboot),
        ("luod_started", t.luod_started),
        ("updated", t.updated),
        ("finished", t.finished),
    ];
    let mut last = 0;
    for (name, at) in steps {
        let at = at.unwrap_or_else(|| panic!("timestamp {name} is not set: {t:?}"));
        assert!(
            at >= last,
            "timestamp {name} ({at}) is earlier than the step before it ({last}): {t:?}"
        );
        last = at;
    }
    assert_eq!(t.cancelled, None, "a finished cycle has no cancel time");
}

#[track_caller]
fn assert_sessions(status: &StatusReport, set: &[Preserved], incoming: bool) {
    assert_eq!(
        sessions_seen(&status.sessions),
        sessions_of(set),
        "sessions and their files"
    );
    for s in &status.sessions {
        assert_eq!(s.owner_uid, 0, "session {} is root's", s.name);
        assert_eq!(s.incoming, incoming, "session {} incoming", s.name);
        assert!(
            s.files.iter().all(|f| !f.retrieved),
            "nothing is retrieved yet in {}",
            s.name
        );
    }
}

#[test]
fn a_full_cycle_carries_three_sessions_of_three_memfds_through_the_kexec() {
    let mut luod = Luod::started("128M");
    let mut c = luod.client();
    let set = preserve_set(&mut c, &["vm0", "vm1", "vm2"], &[0, PAGE, MIB_16]);
    let bytes: u64 = set.iter().map(|p| p.bytes.len() as u64).sum();
    let before = c.status();
    assert_eq!(before.state, State::Normal);
    assert_eq!(before.backend, "file");
    assert_eq!(before.live_updates, 0);
    assert_sessions(&before, &set, false);

    let prepared = c.prepare().expect("prepare");
    assert_eq!((prepared.from, prepared.to), (State::Normal, State::Prepared));
    assert_eq!((prepared.sessions, prepared.files, prepared.bytes), (3, 9, bytes));
    let status = c.status();
    assert_eq!(status.state, State::Prepared);
    assert_eq!(
        status.last_cycle.as_ref().map(|l| l.outcome.as_str()),
        Some("in-progress")
    );

    let frozen = c.freeze().expect("freeze");
    assert_eq!((frozen.from, frozen.to), (State::Prepared, State::Frozen));
    assert_eq!(c.status().state, State::Frozen);

    let rebooted = c.reboot().expect("reboot");
    assert_eq!((rebooted.from, rebooted.to), (State::Frozen, State::Updated));
    assert_eq!((rebooted.sessions, rebooted.files, rebooted.bytes), (3, 9, bytes));
    drop(c);
    luod.expect_kexec_exit();

    luod.start();
    let mut c = luod.client();
    let status = c.status();
    assert_eq!(status.state, State::Updated);
    assert_sessions(&status, &set, true);
    assert!(
        status
            .notes
            .iter()
            .any(|n| n.starts_with("came up after a live update")),
        "status notes say a live update happened: {:?}",
        status.notes
    );

    retrieve_and_compare(&mut c, &set);
    let listed = c.list();
    assert!(
        listed.iter().all(|s| s.files.iter().all(|f| f.retrieved)),
        "every file is marked retrieved: {listed:?}"
    );

    let finished = c.finish().expect("finish");
    assert_eq!((finished.from, finished.to), (State::Updated, State::Normal));
    assert_eq!((finished.sessions, finished.files, finished.bytes), (3, 9, bytes));

    let status = c.status();
    assert_eq!(status.state, State::Normal);
    assert_eq!(status.live_updates, 1);
    assert!(
        status.sessions.is_empty(),
        "finish ends the sessions: {:?}",
        status.sessions
    );
    let last = status.last_cycle.expect("status shows the last cycle");
    assert_eq!((last.id, last.outcome.as_str()), (1, "finished"));
    assert_finished_timestamps(&last.timestamps);
    assert!(last.blackout_ns.is_some(), "the blackout is known");

    let history = c.history();
    assert_eq!(history.len(), 1, "{history:?}");
    let cycle = &history[0];
    assert_eq!((cycle.id, cycle.outcome), (1, Outcome::Finished));
    assert_eq!((cycle.sessions, cycle.files, cycle.bytes), (3, 9, bytes));
    assert_finished_timestamps(&cycle.timestamps);
}

#[test]
fn reboot_from_prepared_freezes_first() {
    let mut luod = Luod::started("8M");
    let mut c = luod.client();
    let set = preserve_set(&mut c, &["vm0"], &[PAGE, 3 * PAGE + 1]);
    c.prepare().expect("prepare");

    let rebooted = c.reboot().expect("reboot from prepared");
    assert_eq!((rebooted.from, rebooted.to), (State::Prepared, State::Updated));
    drop(c);
    luod.expect_kexec_exit();

    luod.start();
    let mut c = luod.client();
    assert_eq!(c.status().state, State::Updated);
    retrieve_and_compare(&mut c, &set);
    c.finish().expect("finish");
    let history = c.history();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].outcome, Outcome::Finished);
    assert_finished_timestamps(&history[0].timestamps);
}

/// Cancels in the state `prepare` (and `freeze` when `freeze_first`) left,
/// and checks that the host is back in `normal` with its sessions.
fn cancel_keeps_sessions(freeze_first: bool) {
    let luod = Luod::started("8M");
    let mut c = luod.client();
    let set = preserve_set(&mut c, &["vm0", "vm1"], &[PAGE, 2 * PAGE]);
    c.prepare().expect("prepare");
    let from = if freeze_first {
        c.freeze().expect("freeze");
        State::Frozen
    } else {
        State::Prepared
    };

    let cancelled = c.cancel().expect("cancel");
    assert_eq!((cancelled.from, cancelled.to), (from, State::Normal));

    let status = c.status();
    assert_eq!(status.state, State::Normal);
    assert_eq!(status.live_updates, 0);
    assert_sessions(&status, &set, false);
    let last = status.last_cycle.expect("status shows the cancelled cycle");
    assert_eq!((last.id, last.outcome.as_str()), (1, "cancelled"));
    let history = c.history();
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!((history[0].id, history[0].outcome), (1, Outcome::Cancelled));
    let t = &history[0].timestamps;
    assert!(
        t.prepared.is_some() && t.cancelled.is_some(),
        "prepared and cancelled are set: {t:?}"
    );
    assert!(t.prepared <= t.cancelled, "{t:?}");
    assert_eq!(
        t.frozen.is_some(),
        freeze_first,
        "frozen is set only when the cycle froze: {t:?}"
    );
    assert_eq!((t.reboot, t.updated, t.finished), (None, None, None), "{t:?}");
}

#[test]
fn cancel_from_prepared_returns_to_normal_and_keeps_the_sessions() {
    cancel_keeps_sessions(false);
}

#[test]
fn cancel_from_frozen_returns_to_normal_and_keeps_the_sessions() {
    cancel_keeps_sessions(true);
}

#[test]
fn a_second_cycle_after_a_cancel_goes_through() {
    let mut luod = Luod::started("8M");
    let mut c = luod.client();
    let set = preserve_set(&mut c, &["vm0", "vm1"], &[PAGE, 5 * PAGE]);
    c.prepare().expect("first prepare");
    c.freeze().expect("first freeze");
    c.cancel().expect("cancel");

    c.prepare().expect("second prepare");
    c.freeze().expect("second freeze");
    c.reboot().expect("reboot");
    drop(c);
    luod.expect_kexec_exit();

    luod.start();
    let mut c = luod.client();
    assert_eq!(c.status().state, State::Updated);
    retrieve_and_compare(&mut c, &set);
    c.finish().expect("finish");

    let status = c.status();
    assert_eq!((status.state, status.live_updates), (State::Normal, 1));
    assert_eq!(
        status.last_cycle.map(|l| (l.id, l.outcome)),
        Some((2, "finished".to_string()))
    );
    let history: Vec<_> = c.history().iter().map(|h| (h.id, h.outcome)).collect();
    assert_eq!(history, [(1, Outcome::Cancelled), (2, Outcome::Finished)]);
}
