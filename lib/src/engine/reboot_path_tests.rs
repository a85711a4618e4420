//! Engine tests of the two reboot paths: an orderly `systemctl kexec` when a
//! LUO-aware systemd carries luod's fd store, luod's own kexec otherwise.
//! Over the fake kernel (which runs the LUO backend's reboot code) and a
//! fake `systemctl` that logs its calls.

use super::test_support::host;
use super::*;
use crate::kernel::fake::FakeKernel;
use crate::kernel::memfd;
use crate::protocol::ErrorKind;
use crate::region::MemRegion;
use crate::systemd::RebootPath;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A fake `systemctl` whose `kexec` exits with `exit` (with systemd's
/// message on stderr when it refuses); every call goes to `calls`.
fn fake_systemctl(dir: &Path, exit: i32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("systemctl");
    // Written beside and renamed: never executed while open for writing.
    let tmp = dir.join("systemctl.new");
    std::fs::write(
        &tmp,
        format!(
            "#!/bin/sh\necho \"$*\" >> {}\n[ {exit} = 0 ] || echo 'Failed to start kexec.target: Transaction for kexec.target/start is destructive (emergency.target has start job queued).' >&2\nexit {exit}\n",
            dir.join("calls").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

fn calls(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("calls")).unwrap_or_default()
}

fn systemd_path(systemctl: &Path) -> RebootPath {
    RebootPath::Systemd {
        version: 262,
        systemctl: systemctl.to_path_buf(),
        unit: "luod.service".into(),
    }
}

/// An engine over a fake LUO kernel with a kexec image loaded, on `path`,
/// in `prepared` with one session holding one memfd.
fn prepared(path: RebootPath) -> (Engine<MemRegion>, Arc<AtomicBool>) {
    let loaded = Arc::new(AtomicBool::new(true));
    let (mut kernel, _) = FakeKernel::real_kexec(loaded.clone());
    kernel.set_reboot_path(path);
    let store = RecordStore::new(MemRegion::zeroed(8 << 20)).unwrap();
    let mut e = Engine::open(Box::new(kernel), Registry::new(), store, host()).unwrap();
    e.session_create(&Caller::ROOT, "vm0").unwrap();
    let fd = memfd::from_bytes("guest-ram", b"guest memory").unwrap();
    e.session_preserve(&Caller::ROOT, "vm0", 1, fd).unwrap();
    e.prepare(&Caller::ROOT, &PrepareArgs::default(), vec![]).unwrap();
    (e, loaded)
}

fn reboot_item(e: &Engine<MemRegion>) -> String {
    let report = e.check(&Caller::ROOT, &PrepareArgs::default(), vec![]);
    let item = report
        .items
        .iter()
        .find(|i| i.name == "reboot path")
        .expect("a reboot path item");
    assert!(item.ok);
    item.detail.clone()
}

#[test]
fn check_and_status_name_the_systemd_path() {
    let dir = tempfile::tempdir().unwrap();
    let (e, _) = prepared(systemd_path(&fake_systemctl(dir.path(), 0)));
    let want = "orderly shutdown: reboot runs `systemctl kexec`; systemd 262 carries luod.service's fd store \
                (luod's sessions and record) through the kexec and hands it back to luod in the new kernel";
    assert_eq!(reboot_item(&e), format!("systemd: {want}"));
    let status = e.status(&Caller::ROOT).reboot_path.unwrap();
    assert_eq!((status.path.as_str(), status.detail.as_str()), ("systemd", want));
    assert_eq!(
        calls(dir.path()),
        "",
        "choosing the path is luod's start's work, not check's"
    );
}

#[test]
fn check_and_status_name_the_direct_path_and_why() {
    let (e, _) = prepared(RebootPath::Direct {
        why: "systemd 257 does not carry fd stores across a kexec; 261 and later do".into(),
    });
    let want = "direct kexec: luod holds the sessions and calls reboot(LINUX_REBOOT_CMD_KEXEC) itself after sync, \
                skipping the orderly shutdown (systemd 257 does not carry fd stores across a kexec; 261 and later do)";
    assert_eq!(reboot_item(&e), format!("direct: {want}"));
    assert_eq!(e.status(&Caller::ROOT).reboot_path.unwrap().detail, want);
}

#[test]
fn a_simulated_kexec_has_no_reboot_path() {
    let (kernel, _) = FakeKernel::new();
    let store = RecordStore::new(MemRegion::zeroed(8 << 20)).unwrap();
    let e = Engine::open(Box::new(kernel), Registry::new(), store, host()).unwrap();
    assert_eq!(e.status(&Caller::ROOT).reboot_path, None);
    let report = e.check(&Caller::ROOT, &PrepareArgs::default(), vec![]);
    assert!(report.items.iter().all(|i| i.name != "reboot path"));
}

#[test]
fn reboot_on_the_systemd_path_queues_systemctl_kexec_and_stays_frozen_with_the_handover() {
    let dir = tempfile::tempdir().unwrap();
    let (mut e, _) = prepared(systemd_path(&fake_systemctl(dir.path(), 0)));
    e.freeze(&Caller::ROOT).unwrap();
    let Rebooted::Orderly(report) = e.reboot(&Caller::ROOT).unwrap() else {
        panic!("the systemd path reboots in order");
    };
    assert_eq!(calls(dir.path()), "--no-block --no-ask-password kexec\n");
    assert_eq!((report.from, report.to), (State::Frozen, State::Frozen));
    assert_eq!(
        report.notes,
        [
            "orderly shutdown under way (`systemctl kexec` queued kexec.target): systemd stops the units, carries \
          luod's fd store (its sessions and record) through the kexec, and starts luod again in the new kernel"
        ]
    );
    // The record is final: written with its handover, and nothing changes it.
    assert!(e.handed_over());
    assert_eq!(e.state(), State::Frozen);
    let handover = e
        .record()
        .handover
        .clone()
        .expect("the handover is written before systemctl runs");
    assert_eq!(handover.boot_id, "boot-1");
    assert!(e.record().update.as_ref().unwrap().timestamps.reboot.is_some());
    let generation = e.generation();
    for err in [
        e.cancel(&Caller::ROOT).unwrap_err(),
        e.reboot(&Caller::ROOT).unwrap_err(),
        e.session_create(&Caller::ROOT, "late").unwrap_err(),
    ] {
        assert_eq!(
            (err.kind(), err.to_string()),
            (
                ErrorKind::WrongState,
                "luod has handed over to the next kernel and is exiting; nothing can change now".into()
            )
        );
    }
    assert_eq!(e.generation(), generation);
    assert_eq!(
        calls(dir.path()),
        "--no-block --no-ask-password kexec\n",
        "systemctl ran once"
    );
    assert_eq!(e.record().sessions[0].fds.len(), 1);
}

#[test]
fn reboot_from_prepared_freezes_first_then_runs_systemctl_kexec() {
    let dir = tempfile::tempdir().unwrap();
    let (mut e, _) = prepared(systemd_path(&fake_systemctl(dir.path(), 0)));
    let Rebooted::Orderly(report) = e.reboot(&Caller::ROOT).unwrap() else {
        panic!("the systemd path reboots in order");
    };
    assert_eq!((report.from, report.to), (State::Prepared, State::Frozen));
    assert_eq!(calls(dir.path()), "--no-block --no-ask-password kexec\n");
}

#[test]
fn a_refused_systemctl_kexec_unfreezes_back_to_prepared_with_systemds_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = fake_systemctl(dir.path(), 1);
    let (mut e, loaded) = prepared(systemd_path(&ctl));
    e.freeze(&Caller::ROOT).unwrap();
    let err = e.reboot(&Caller::ROOT).unwrap_err();
    assert_eq!(
        (err.kind(), err.to_string()),
        (
            ErrorKind::Kernel,
            format!(
                "reboot failed, unfroze back to prepared: reboot failed: systemd refused the orderly kexec: `{} \
                 --no-block --no-ask-password kexec` failed (exit status: 1): Failed to start kexec.target: \
                 Transaction for kexec.target/start is destructive (emergency.target has start job queued).",
                ctl.display()
            )
        )
    );
    assert_eq!(e.state(), State::Prepared);
    assert!(!e.handed_over());
    assert_eq!(e.record().handover, None);
    assert!(
        loaded.load(Ordering::SeqCst),
        "the target stays loaded for the next try"
    );
    assert_eq!(e.record().sessions[0].fds.len(), 1, "nothing preserved is lost");
    // Once systemd accepts, the same cycle goes on.
    fake_systemctl(dir.path(), 0);
    assert!(matches!(e.reboot(&Caller::ROOT).unwrap(), Rebooted::Orderly(_)));
    assert_eq!(
        calls(dir.path()),
        "--no-block --no-ask-password kexec\n--no-block --no-ask-password kexec\n"
    );
}

#[test]
fn an_image_unloaded_since_prepare_is_refused_before_systemctl_could_load_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let (mut e, loaded) = prepared(systemd_path(&fake_systemctl(dir.path(), 0)));
    loaded.store(false, Ordering::SeqCst);
    let err = e.reboot(&Caller::ROOT).unwrap_err();
    assert_eq!(
        err.to_string(),
        "reboot failed, unfroze back to prepared: reboot failed: no kernel is loaded for kexec any more \
         (/sys/kernel/kexec_loaded is 0: it was unloaded since prepare); prepare again"
    );
    assert_eq!(calls(dir.path()), "", "systemctl never ran");
    assert_eq!((e.state(), e.record().handover.clone()), (State::Prepared, None));
}

#[test]
fn the_direct_path_kexecs_itself_and_never_runs_systemctl() {
    let (mut e, _) = prepared(RebootPath::Direct {
        why: "luod does not run under systemd".into(),
    });
    let err = e.reboot(&Caller::ROOT).unwrap_err();
    assert_eq!(
        err.to_string(),
        "reboot failed, unfroze back to prepared: reboot failed: the fake kernel has nothing to kexec into"
    );
    assert_eq!(e.state(), State::Prepared);
}

#[test]
fn the_session_name_systemd_is_reserved() {
    let (kernel, _) = FakeKernel::new();
    let store = RecordStore::new(MemRegion::zeroed(8 << 20)).unwrap();
    let mut e = Engine::open(Box::new(kernel), Registry::new(), store, host()).unwrap();
    let err = e.session_create(&Caller::ROOT, "systemd").unwrap_err();
    assert_eq!(
        (err.kind(), err.to_string()),
        (
            ErrorKind::InvalidArgument,
            "session name systemd is reserved for systemd's own LUO session (systemd refuses it in a fd store); \
             choose another name"
                .into()
        )
    );
    assert!(e.record().sessions.is_empty());
}

#[test]
fn a_snapshot_does_not_wait_for_the_reboot_path_and_status_and_check_wait_for_it() {
    // luod detects the systemd path once it serves (two `systemctl show`):
    // the engine opens and publishes its state meanwhile, and a reader that
    // asks for the path gets the detected one, never a guess.
    let loaded = Arc::new(AtomicBool::new(true));
    let (mut kernel, _) = FakeKernel::real_kexec(loaded);
    let cell = crate::systemd::RebootPathCell::pending();
    kernel.set_reboot_path_cell(cell.clone());
    let store = RecordStore::new(MemRegion::zeroed(8 << 20)).unwrap();
    let e = Engine::open(Box::new(kernel), Registry::new(), store, host()).unwrap();
    let snapshot = e.snapshot();
    assert_eq!(cell.peek(), None, "opening the engine and snapshotting it did not wait");
    let direct = RebootPath::Direct {
        why: "systemd 257 does not carry fd stores across a kexec; 261 and later do".into(),
    };
    let reader = std::thread::spawn(move || snapshot.status(&Caller::ROOT).reboot_path.unwrap());
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(!reader.is_finished(), "status waits for the detection");
    cell.set(direct.clone());
    let status = reader.join().unwrap();
    assert_eq!(
        (status.path.as_str(), status.detail.as_str()),
        ("direct", direct.describe().as_str())
    );
    assert_eq!(reboot_item(&e), format!("direct: {}", direct.describe()));
}

#[test]
fn prepare_readies_the_kernel_for_the_cycle_and_a_failure_there_changes_nothing() {
    use crate::kernel::fake::Op;
    let loaded = Arc::new(AtomicBool::new(true));
    let (kernel, failures) = FakeKernel::real_kexec(loaded);
    let calls = kernel.before_cycle_calls();
    let store = RecordStore::new(MemRegion::zeroed(8 << 20)).unwrap();
    let mut e = Engine::open(Box::new(kernel), Registry::new(), store, host()).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 0, "not at the engine's start: at prepare");
    failures.lock().unwrap().insert(
        Op::BeforeCycle,
        crate::kernel::KernelError::Luo {
            op: "CREATE_SESSION luod".into(),
            errno: nix::errno::Errno::ENOSPC,
            why: "the kernel's table of sessions or files is full; preserve fewer".into(),
        },
    );
    let generation = e.generation();
    let err = e.prepare(&Caller::ROOT, &PrepareArgs::default(), vec![]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "CREATE_SESSION luod failed with ENOSPC: No space left on device: the kernel's table of sessions or files is full; preserve fewer"
    );
    assert_eq!((e.state(), e.generation()), (State::Normal, generation));
    failures.lock().unwrap().clear();
    e.prepare(&Caller::ROOT, &PrepareArgs::default(), vec![]).unwrap();
    assert_eq!((e.state(), calls.load(Ordering::SeqCst)), (State::Prepared, 1));
}
