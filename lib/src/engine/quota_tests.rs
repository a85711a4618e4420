//! Per-uid quotas, root's eviction and finish of another uid's session, and
//! the events they record, over the fake kernel and an in-memory region.

use super::test_support::host;
use super::*;
use crate::kernel::fake::FakeKernel;
use crate::kernel::memfd;
use crate::protocol::ErrorKind;
use crate::region::MemRegion;
use std::os::fd::{AsFd, OwnedFd};

const NOBODY: Caller = Caller {
    uid: 65534,
    pid: 2,
    privileged: false,
};

const OTHER: Caller = Caller {
    uid: 1000,
    pid: 3,
    privileged: false,
};

/// A privileged caller whose uid is not 0 (CAP_SYS_BOOT).
const OPERATOR: Caller = Caller {
    uid: 500,
    pid: 4,
    privileged: true,
};

const SMALL: Quotas = Quotas {
    sessions: 2,
    files: 3,
    bytes: 10_000,
};

fn open(store: RecordStore<MemRegion>) -> Engine<MemRegion> {
    let mut e = Engine::open(Box::new(FakeKernel::new().0), Registry::new(), store, host()).unwrap();
    e.set_quotas(SMALL);
    e
}

fn engine() -> Engine<MemRegion> {
    open(RecordStore::new(MemRegion::zeroed(8 << 20)).unwrap())
}

fn memfd_of(len: usize) -> OwnedFd {
    memfd::from_bytes("q", &vec![7u8; len]).unwrap()
}

/// Preserves a memfd of `len` bytes; returns a second descriptor of it.
fn preserve(e: &mut Engine<MemRegion>, who: &Caller, session: &str, token: u64, len: usize) -> OwnedFd {
    let fd = memfd_of(len);
    let keep = fd.as_fd().try_clone_to_owned().unwrap();
    e.session_preserve(who, session, token, fd).unwrap();
    keep
}

fn grow(fd: &OwnedFd, len: u64) {
    std::fs::File::from(fd.try_clone().unwrap()).set_len(len).unwrap();
}

#[track_caller]
fn refused<T: std::fmt::Debug>(r: Result<T, EngineError>, kind: ErrorKind, message: &str) -> EngineError {
    let e = r.unwrap_err();
    assert_eq!((e.kind(), e.to_string().as_str()), (kind, message));
    e
}

#[test]
fn each_quota_refuses_what_passes_it_and_changes_nothing() {
    let mut e = engine();
    e.session_create(&NOBODY, "a").unwrap();
    e.session_create(&NOBODY, "b").unwrap();
    let generation = e.generation();
    let err = refused(
        e.session_create(&NOBODY, "c"),
        ErrorKind::QuotaExceeded,
        "quota exceeded: uid 65534 holds 2 session(s), and 1 more would pass its quota of 2 (luod --max-sessions-per-uid)",
    );
    assert_eq!(
        err.hint(),
        "finish a session you no longer need, or ask the operator to raise luod --max-sessions-per-uid"
    );
    assert_eq!(e.generation(), generation);
    assert_eq!(e.record().sessions.len(), 2);

    preserve(&mut e, &NOBODY, "a", 1, 4096);
    preserve(&mut e, &NOBODY, "b", 2, 4096);
    let generation = e.generation();
    refused(
        e.session_preserve(&NOBODY, "a", 3, memfd_of(4096)),
        ErrorKind::QuotaExceeded,
        "quota exceeded: uid 65534 holds 8192 bytes of preserved files, and 4096 more would pass its quota of 10000 (luod --max-bytes-per-uid)",
    );
    assert_eq!(e.generation(), generation);
    assert!(
        e.kernel.preserved().iter().all(|(_, t, _)| *t != 3),
        "nothing preserved"
    );

    preserve(&mut e, &NOBODY, "a", 3, 0);
    let err = refused(
        e.session_preserve(&NOBODY, "b", 4, memfd_of(0)),
        ErrorKind::QuotaExceeded,
        "quota exceeded: uid 65534 holds 3 preserved file(s), and 1 more would pass its quota of 3 (luod --max-files-per-uid)",
    );
    assert!(err.hint().ends_with("raise luod --max-files-per-uid"), "{}", err.hint());
    // Token 3 went to the journal (no new generation); the refusal wrote nothing.
    assert_eq!(e.generation(), generation);
    assert_eq!(e.record().sessions.iter().map(|s| s.fds.len()).sum::<usize>(), 3);

    // Another uid has quotas of its own.
    e.session_create(&OTHER, "o").unwrap();
    preserve(&mut e, &OTHER, "o", 1, 9000);
    // The session quota counts sessions, not names: finishing one frees room.
    e.session_finish(&NOBODY, "b").unwrap();
    e.session_create(&NOBODY, "c").unwrap();
}

#[test]
fn uid_0_is_exempt_and_a_privileged_uid_is_not() {
    let mut e = engine();
    for name in ["r1", "r2", "r3"] {
        e.session_create(&Caller::ROOT, name).unwrap();
    }
    preserve(&mut e, &Caller::ROOT, "r1", 1, 20_000);
    e.session_create(&OPERATOR, "op1").unwrap();
    e.session_create(&OPERATOR, "op2").unwrap();
    refused(
        e.session_create(&OPERATOR, "op3"),
        ErrorKind::QuotaExceeded,
        "quota exceeded: uid 500 holds 2 session(s), and 1 more would pass its quota of 2 (luod --max-sessions-per-uid)",
    );
    // Root's bytes over the quota do not stop the cycle.
    e.prepare(&Caller::ROOT, &PrepareArgs::default(), Vec::new()).unwrap();
}

#[test]
fn a_memfd_grown_after_preservation_stops_prepare_freeze_and_reboot() {
    let mut e = engine();
    e.session_create(&NOBODY, "grows").unwrap();
    let fd = preserve(&mut e, &NOBODY, "grows", 1, 4096);

    let overrun = "uid 65534 holds 1048576 bytes of preserved files, over its quota of 10000 (luod --max-bytes-per-uid): \
                   a file grew after it was preserved, or the quota was lowered (session(s) grows)";
    // In normal: prepare is refused, nothing changes.
    grow(&fd, 1 << 20);
    let generation = e.generation();
    let err = refused(
        e.prepare(&Caller::ROOT, &PrepareArgs::default(), Vec::new()),
        ErrorKind::QuotaExceeded,
        overrun,
    );
    assert_eq!(
        err.hint(),
        "the owner shrinks or finishes grows, or root releases it with `luoctl session evict NAME` \
         (`luoctl cancel` first when frozen); or restart luod with a larger --max-bytes-per-uid"
    );
    assert_eq!((e.state(), e.generation()), (State::Normal, generation));

    // In prepared: freeze is refused, still prepared.
    grow(&fd, 4096);
    e.prepare(&Caller::ROOT, &PrepareArgs::default(), Vec::new()).unwrap();
    grow(&fd, 1 << 20);
    let generation = e.generation();
    refused(e.freeze(&Caller::ROOT), ErrorKind::QuotaExceeded, overrun);
    assert_eq!((e.state(), e.generation()), (State::Prepared, generation));
    // reboot from prepared freezes first: refused the same way.
    refused(e.reboot(&Caller::ROOT), ErrorKind::QuotaExceeded, overrun);
    assert_eq!((e.state(), e.generation()), (State::Prepared, generation));

    // In frozen (the handover is written at the reboot): reboot is refused, still frozen.
    grow(&fd, 4096);
    e.freeze(&Caller::ROOT).unwrap();
    grow(&fd, 1 << 20);
    let generation = e.generation();
    refused(e.reboot(&Caller::ROOT), ErrorKind::QuotaExceeded, overrun);
    assert_eq!((e.state(), e.generation()), (State::Frozen, generation));
    assert!(!e.handed_over());

    // Back within the quota, the cycle goes on and carries 4096 bytes.
    grow(&fd, 4096);
    let Rebooted::Simulated(report) = e.reboot(&Caller::ROOT).unwrap() else {
        panic!("a simulated kexec");
    };
    assert_eq!((report.files, report.bytes), (1, 4096));
}

#[test]
fn the_handover_checks_the_sizes_it_records() {
    let mut e = engine();
    e.session_create(&NOBODY, "s").unwrap();
    let _fd = preserve(&mut e, &NOBODY, "s", 1, 4096);
    let mut next = e.record().clone();
    next.sessions[0].fds[0].size = 20_000;
    let err = e.check_bytes(&next).unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::QuotaOverrun {
                uid: 65534,
                bytes: 20_000,
                ..
            }
        ),
        "{err}"
    );
    next.sessions[0].fds[0].size = 10_000;
    e.check_bytes(&next).unwrap();
}

/// `NOBODY`'s session `n` with a file of 4096 bytes, and root's `r`, in `state`.
fn with_nobodys_session_in(state: State) -> Engine<MemRegion> {
    let mut e = engine();
    e.session_create(&NOBODY, "n").unwrap();
    preserve(&mut e, &NOBODY, "n", 1, 4096);
    e.session_create(&Caller::ROOT, "r").unwrap();
    preserve(&mut e, &Caller::ROOT, "r", 1, 10);
    if state == State::Normal {
        return e;
    }
    e.prepare(&Caller::ROOT, &PrepareArgs::default(), Vec::new()).unwrap();
    if state == State::Prepared {
        return e;
    }
    e.freeze(&Caller::ROOT).unwrap();
    if state == State::Frozen {
        return e;
    }
    e.reboot(&Caller::ROOT).unwrap();
    let e = open(e.into_store());
    assert_eq!(e.state(), State::Updated);
    e
}

#[track_caller]
fn assert_evicted_event(e: &Engine<MemRegion>, by: u32, action: &str, detail: &str) {
    let ev = e.record().events.last().expect("an event");
    assert_eq!(
        (ev.uid, ev.action.as_str(), ev.subject.as_str(), ev.detail.as_str()),
        (by, action, "n", detail)
    );
}

#[test]
fn root_evicts_in_normal_prepared_and_updated_and_the_cycle_finishes() {
    for state in [State::Normal, State::Prepared, State::Updated] {
        let mut e = with_nobodys_session_in(state);
        e.session_evict(&Caller::ROOT, "n").unwrap();
        assert_eq!(e.state(), state);
        let names: Vec<_> = e.record().sessions.iter().map(|s| s.name.to_string()).collect();
        assert_eq!(names, ["r"], "{state}");
        assert!(
            e.kernel.preserved().iter().all(|(n, _, _)| n.as_str() != "n"),
            "{state}"
        );
        assert_evicted_event(
            &e,
            0,
            SESSION_EVICTED,
            &format!("owner uid 65534; 1 file(s), 4096 bytes released (1 not retrieved) in state {state}"),
        );
        if state == State::Updated {
            // Root's own file is retrieved; nobody's no longer blocks finish.
            e.session_retrieve(&Caller::ROOT, "r", 1).unwrap();
            e.finish(&Caller::ROOT).unwrap();
            assert_eq!(e.state(), State::Normal);
        }
        // The event outlives a restart and the cycle.
        let e = open(e.into_store());
        assert_eq!(e.record().events.len(), 1, "{state}");
        assert_eq!(e.history_report(&Caller::ROOT).events[0].action, SESSION_EVICTED);
    }
}

#[test]
fn eviction_is_refused_in_frozen_with_a_hint_and_to_non_root() {
    let mut e = with_nobodys_session_in(State::Frozen);
    let generation = e.generation();
    let err = refused(
        e.session_evict(&Caller::ROOT, "n"),
        ErrorKind::WrongState,
        "evicting a session is not allowed in state frozen",
    );
    assert_eq!(
        err.hint(),
        "the host is frozen and its record is final: `luoctl cancel` first (the state goes back to normal), then evict"
    );
    assert_eq!(e.generation(), generation);
    e.cancel(&Caller::ROOT).unwrap();
    e.session_evict(&Caller::ROOT, "n").unwrap();

    let mut e = with_nobodys_session_in(State::Normal);
    let generation = e.generation();
    for who in [NOBODY, OTHER] {
        // Privilege is checked first, so a refusal says nothing about the name.
        for name in ["n", "r", "missing"] {
            refused(
                e.session_evict(&who, name),
                ErrorKind::PermissionDenied,
                "session evict needs root or CAP_SYS_BOOT",
            );
        }
    }
    refused(
        e.session_evict(&Caller::ROOT, "missing"),
        ErrorKind::NotFound,
        "no session named missing",
    );
    assert_eq!(e.generation(), generation);
    assert!(e.record().events.is_empty());
}

#[test]
fn root_finishes_another_uids_session_where_its_owner_could_and_it_is_recorded() {
    let mut e = with_nobodys_session_in(State::Normal);
    refused(e.session_finish(&OTHER, "n"), ErrorKind::NotFound, "no session named n");
    // Root's own session: no event.
    e.session_finish(&Caller::ROOT, "r").unwrap();
    assert!(e.record().events.is_empty());
    e.session_finish(&OPERATOR, "n").unwrap();
    assert_evicted_event(
        &e,
        500,
        SESSION_FINISHED_BY_ROOT,
        "owner uid 65534; 1 file(s), 4096 bytes released (1 not retrieved) in state normal",
    );

    let mut e = with_nobodys_session_in(State::Prepared);
    refused(
        e.session_finish(&Caller::ROOT, "n"),
        ErrorKind::WrongState,
        "finishing a session is not allowed in state prepared",
    );

    let mut e = with_nobodys_session_in(State::Updated);
    e.session_retrieve(&Caller::ROOT, "r", 1).unwrap();
    refused(
        e.finish(&Caller::ROOT),
        ErrorKind::WrongState,
        "1 preserved file(s) were not retrieved: n/1",
    );
    e.session_finish(&Caller::ROOT, "n").unwrap();
    e.finish(&Caller::ROOT).unwrap();
    assert_eq!(e.record().events.len(), 1);
}

#[test]
fn a_caller_sees_the_events_it_caused_or_about_its_own_sessions() {
    let mut e = with_nobodys_session_in(State::Normal);
    e.session_create(&OTHER, "o").unwrap();
    e.session_evict(&Caller::ROOT, "n").unwrap();
    e.session_evict(&OPERATOR, "o").unwrap();
    let subjects =
        |who: &Caller| -> Vec<String> { e.history_report(who).events.into_iter().map(|ev| ev.subject).collect() };
    assert_eq!(subjects(&Caller::ROOT), ["n", "o"]);
    assert_eq!(subjects(&OPERATOR), ["n", "o"]);
    assert_eq!(subjects(&NOBODY), ["n"]);
    assert_eq!(subjects(&OTHER), ["o"]);
    assert_eq!(
        subjects(&Caller {
            uid: 7,
            pid: 9,
            privileged: false
        }),
        Vec::<String>::new()
    );
}

#[test]
fn evicting_a_vms_session_forgets_the_vm() {
    let mut e = engine();
    let vms = SharedVms::default();
    e.set_vms(vms.clone());
    let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    e.vm_register(&NOBODY, "g", &[1], vec![memfd_of(4096)], ours).unwrap();
    assert_eq!(e.vm_list(&Caller::ROOT).len(), 1);
    e.session_evict(&Caller::ROOT, "vm-g").unwrap();
    assert!(e.vm_list(&Caller::ROOT).is_empty());
    assert!(vms.lock().unwrap().is_empty());
}

#[test]
fn vm_registration_counts_against_the_quotas_and_leaves_nothing_behind() {
    let mut e = engine();
    e.set_vms(SharedVms::default());
    let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let fds = (0..4).map(|_| memfd_of(1)).collect();
    refused(
        e.vm_register(&NOBODY, "big", &[1, 2, 3, 4], fds, ours),
        ErrorKind::QuotaExceeded,
        "quota exceeded: uid 65534 holds 3 preserved file(s), and 1 more would pass its quota of 3 (luod --max-files-per-uid)",
    );
    assert!(e.record().sessions.is_empty());
    assert!(e.kernel.preserved().is_empty());
}
