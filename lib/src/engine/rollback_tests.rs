//! Rollback and validation over the fake kernel (simulated kexec) and an
//! in-memory region: what a rollback goes back to, what it carries, when it
//! is refused, and the finish that a failed validation holds back.

use super::test_support::host;
use super::*;
use crate::hooks::Hooks;
use crate::kernel::fake::FakeKernel;
use crate::kernel::memfd;
use crate::protocol::{ErrorKind, ImageFile};
use crate::record::Outcome;
use crate::region::MemRegion;
use sha2::{Digest, Sha256};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Hooks and rollback images are taken only from root's files: these tests
/// run as root, as CI runs them.
fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "run as root: luod takes hooks and rollback images only from files root owns"
    );
}

/// A bzImage the check takes, with `tag` making it byte-different.
fn bzimage(dir: &Path, name: &str, tag: u8) -> PathBuf {
    let path = dir.join(name);
    let mut bz = vec![0u8; 0x400];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    bz[0x300] = tag;
    std::fs::write(&path, &bz).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    path
}

fn sha(path: &Path) -> [u8; 32] {
    Sha256::digest(std::fs::read(path).unwrap()).into()
}

/// An engine whose running kernel is `k0` (the operator's --rollback-kernel).
fn engine(store: RecordStore<MemRegion>, k0: &Path, hooks: Option<&Path>, auto: bool) -> Engine<MemRegion> {
    let (kernel, _) = FakeKernel::new();
    let mut e = Engine::open(Box::new(kernel), Registry::new(), store, host()).unwrap();
    e.set_rollback(RollbackConfig {
        auto,
        kernel: Some(k0.to_path_buf()),
        initrd: None,
        cmdline: Some("console=ttyS0 k0".into()),
    });
    if let Some(h) = hooks {
        e.set_hooks(Hooks {
            root: h.to_path_buf(),
            timeout: std::time::Duration::from_secs(5),
        });
    }
    e
}

fn preserve(e: &mut Engine<MemRegion>, session: &str, token: u64, bytes: &[u8]) {
    let fd = memfd::from_bytes("t", bytes).unwrap();
    e.session_preserve(&Caller::ROOT, session, token, fd).unwrap();
}

fn read(fd: std::os::fd::OwnedFd) -> Vec<u8> {
    let len = memfd::size(fd.as_fd()).unwrap() as usize;
    let mut buf = vec![0u8; len];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::from(fd), &mut buf, 0).unwrap();
    buf
}

/// Prepares, freezes and reboots (simulated) into `k1`; returns the new kernel's engine.
fn update_to(mut e: Engine<MemRegion>, k0: &Path, k1: &Path, hooks: Option<&Path>) -> Engine<MemRegion> {
    let args = PrepareArgs {
        kernel: Some(ImageFile {
            fd: 0,
            name: k1.display().to_string(),
        }),
        cmdline: Some("console=ttyS0 k1".into()),
        ..PrepareArgs::default()
    };
    let fd = std::fs::File::open(k1).unwrap().into();
    e.prepare(&Caller::ROOT, &args, vec![fd]).unwrap();
    e.freeze(&Caller::ROOT).unwrap();
    let Rebooted::Simulated(_) = e.reboot(&Caller::ROOT).unwrap() else {
        panic!("the fake kernel simulates the reboot")
    };
    let next = engine(e.into_store(), k0, hooks, false);
    assert_eq!(next.state(), State::Updated);
    next
}

fn store() -> RecordStore<MemRegion> {
    RecordStore::new(MemRegion::zeroed(8 << 20)).unwrap()
}

#[test]
fn prepare_records_the_running_kernel_and_rollback_goes_back_to_it_carrying_everything() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let k0 = bzimage(dir.path(), "k0", 0);
    let k1 = bzimage(dir.path(), "k1", 1);
    let mut e = engine(store(), &k0, None, false);
    e.session_create(&Caller::ROOT, "vm0").unwrap();
    preserve(&mut e, "vm0", 1, b"guest ram of vm0");
    preserve(&mut e, "vm0", 2, b"device state");

    let mut e = update_to(e, &k0, &k1, None);
    let u = e.record().update.clone().unwrap();
    let previous = u.previous.clone().unwrap();
    assert_eq!(
        (
            previous.kernel.as_str(),
            previous.kernel_sha256,
            previous.cmdline.as_str()
        ),
        (k0.to_str().unwrap(), sha(&k0), "console=ttyS0 k0")
    );
    let booted = e.record().booted.clone().unwrap();
    assert_eq!((booted.boot_id.as_str(), booted.cycle), ("boot-1", 1));
    assert_eq!(booted.image.unwrap().kernel_sha256, sha(&k1));

    // Nothing taken back yet: the rollback carries the incoming files again.
    let report = e.rollback(&Caller::ROOT).unwrap();
    assert_eq!(
        (report.from, report.to, report.files),
        (State::Updated, State::Prepared, 2)
    );
    let u = e.record().update.clone().unwrap();
    assert_eq!((u.id, u.rollback_of), (2, Some(1)));
    let target = u.target.clone().unwrap();
    assert_eq!(
        (target.kernel.as_str(), target.kernel_sha256),
        (k0.to_str().unwrap(), sha(&k0))
    );
    assert!(
        target.cmdline.starts_with("console=ttyS0 k0 luod.handover="),
        "{}",
        target.cmdline
    );
    // Its own rollback would go back to k1, the kernel this boot runs.
    assert_eq!(u.previous.unwrap().kernel_sha256, sha(&k1));
    let c1 = e.record().history.last().unwrap().clone();
    assert_eq!(
        (c1.id, c1.outcome, c1.rolled_back_by),
        (1, Outcome::RolledBack, Some(2))
    );
    assert!(e.record().sessions.iter().all(|s| !s.incoming));

    e.freeze(&Caller::ROOT).unwrap();
    let Rebooted::Simulated(_) = e.reboot(&Caller::ROOT).unwrap() else {
        panic!("the fake kernel simulates the reboot")
    };
    let mut e = engine(e.into_store(), &k0, None, false);
    assert_eq!(e.state(), State::Updated);
    let (fd, _) = e.session_retrieve(&Caller::ROOT, "vm0", 1).unwrap();
    assert_eq!(read(fd), b"guest ram of vm0");
    let (fd, _) = e.session_retrieve(&Caller::ROOT, "vm0", 2).unwrap();
    assert_eq!(read(fd), b"device state");
    e.finish(&Caller::ROOT).unwrap();
    let h = e.history();
    let view: Vec<(u64, Outcome, Option<u64>, Option<u64>)> = h
        .iter()
        .map(|c| (c.id, c.outcome, c.rollback_of, c.rolled_back_by))
        .collect();
    assert_eq!(
        view,
        [
            (1, Outcome::RolledBack, None, Some(2)),
            (2, Outcome::Finished, Some(1), None)
        ]
    );
    assert_eq!(e.record().live_updates, 2);
    // A rollback is not rolled back in turn.
    let err = e.rollback(&Caller::ROOT).unwrap_err();
    assert_eq!(
        err.to_string(),
        "rollback refused: cycle 2 was itself a rollback (of cycle 1): prepare the update again instead"
    );
}

#[test]
fn rollback_after_finish_on_the_same_boot_is_an_update_back() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let k0 = bzimage(dir.path(), "k0", 0);
    let k1 = bzimage(dir.path(), "k1", 1);
    let mut e = update_to(engine(store(), &k0, None, false), &k0, &k1, None);
    e.finish(&Caller::ROOT).unwrap();
    e.session_create(&Caller::ROOT, "s").unwrap();
    preserve(&mut e, "s", 7, b"kept across the rollback");
    let report = e.rollback(&Caller::ROOT).unwrap();
    assert_eq!((report.from, report.to), (State::Normal, State::Prepared));
    // Cycle 1 is marked when its rollback finishes, not before.
    assert_eq!(e.record().history[0].outcome, Outcome::Finished);
    e.freeze(&Caller::ROOT).unwrap();
    let Rebooted::Simulated(_) = e.reboot(&Caller::ROOT).unwrap() else {
        panic!("the fake kernel simulates the reboot")
    };
    let mut e = engine(e.into_store(), &k0, None, false);
    let (fd, _) = e.session_retrieve(&Caller::ROOT, "s", 7).unwrap();
    assert_eq!(read(fd), b"kept across the rollback");
    e.finish(&Caller::ROOT).unwrap();
    let c1 = &e.record().history[0];
    assert_eq!((c1.outcome, c1.rolled_back_by), (Outcome::RolledBack, Some(2)));
}

#[test]
fn rollback_is_refused_when_the_previous_image_changed_or_is_gone_and_nothing_changes() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let k0 = bzimage(dir.path(), "k0", 0);
    let k1 = bzimage(dir.path(), "k1", 1);
    let mut e = engine(store(), &k0, None, false);
    e.session_create(&Caller::ROOT, "s").unwrap();
    preserve(&mut e, "s", 1, b"data");
    let mut e = update_to(e, &k0, &k1, None);
    let before = (e.record().clone(), e.generation());
    let recorded = sha(&k0);
    bzimage(dir.path(), "k0", 9);
    let err = e.rollback(&Caller::ROOT).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WrongState);
    assert_eq!(
        err.to_string(),
        format!(
            "rollback refused: the previous kernel {} changed since cycle 1 recorded it (sha256 {} now, {} recorded): \
             put the original back, or prepare an update to the kernel you want",
            k0.display(),
            hex(&sha(&k0)),
            hex(&recorded)
        )
    );
    assert_eq!((e.record().clone(), e.generation()), before);
    std::fs::remove_file(&k0).unwrap();
    let err = e.rollback(&Caller::ROOT).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "rollback refused: the previous kernel {} cannot be opened: No such file or directory (os error 2): \
             it must be there as it was when cycle 1 recorded it",
            k0.display()
        )
    );
    assert_eq!((e.record().clone(), e.generation()), before);
}

#[test]
fn rollback_from_updated_is_refused_once_a_client_took_a_file_back() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let k0 = bzimage(dir.path(), "k0", 0);
    let k1 = bzimage(dir.path(), "k1", 1);
    let mut e = engine(store(), &k0, None, false);
    e.session_create(&Caller::ROOT, "s").unwrap();
    preserve(&mut e, "s", 1, b"data");
    let mut e = update_to(e, &k0, &k1, None);
    e.session_retrieve(&Caller::ROOT, "s", 1).unwrap();
    let err = e.rollback(&Caller::ROOT).unwrap_err();
    assert_eq!(
        err.to_string(),
        "rollback refused: clients took back 1 file(s) already (s/1), which a rollback from updated could not \
         carry: finish the cycle (`luoctl finish --accept-failed-validation` if its validation failed), let the \
         clients preserve again, then `luoctl rollback` from normal"
    );
    assert_eq!(e.state(), State::Updated);
}

#[test]
fn rollback_needs_a_boot_that_came_from_a_luod_update() {
    let dir = tempfile::tempdir().unwrap();
    let k0 = bzimage(dir.path(), "k0", 0);
    let mut e = engine(store(), &k0, None, false);
    let err = e.rollback(&Caller::ROOT).unwrap_err();
    assert_eq!(
        err.to_string(),
        "rollback refused: this boot did not come from a luod live update: there is no cycle to roll back"
    );
    let user = Caller {
        uid: 1000,
        pid: 1,
        privileged: false,
    };
    assert_eq!(
        e.rollback(&user).unwrap_err().to_string(),
        "rollback needs root or CAP_SYS_BOOT"
    );
}

fn hook(root: &Path, phase: &str, name: &str, body: &str) {
    let d = root.join(format!("{phase}.d"));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let p = d.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn a_failed_validation_holds_finish_until_accepted_and_is_recorded() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let hooks = dir.path().join("hooks");
    hook(
        &hooks,
        "post-update",
        "50-check",
        "echo checking; echo 'vm0 does not answer' >&2; exit 4",
    );
    let k0 = bzimage(dir.path(), "k0", 0);
    let k1 = bzimage(dir.path(), "k1", 1);
    let e = engine(store(), &k0, Some(&hooks), false);
    let mut e = update_to(e, &k0, &k1, Some(&hooks));
    assert_eq!(e.post_update(), AfterValidation::Serve);
    // Once per cycle: a restart of luod does not run them again.
    assert_eq!(e.post_update(), AfterValidation::Serve);
    let u = e.record().update.clone().unwrap();
    assert_eq!(u.hooks.iter().filter(|h| h.phase == "post-update").count(), 1);
    let v = u.validation.unwrap();
    assert_eq!(
        (v.hook.as_str(), v.reason.as_str(), v.accepted_by),
        ("50-check", "vm0 does not answer", None)
    );
    let before = e.generation();
    let err = e.finish(&Caller::ROOT).unwrap_err();
    assert_eq!(
        (err.kind(), err.to_string()),
        (
            ErrorKind::Vetoed,
            "the update failed validation: post-update hook 50-check: vm0 does not answer".to_string()
        )
    );
    assert_eq!((e.state(), e.generation()), (State::Updated, before));
    e.finish_accepting(&Caller::ROOT, true).unwrap();
    let c = e.history().pop().unwrap();
    let v = c.validation.unwrap();
    assert_eq!((c.outcome, v.accepted_by), (Outcome::Finished, Some(0)));
    assert!(v.accepted_at.is_some());
    assert_eq!(
        c.hooks
            .iter()
            .map(|h| (h.phase.as_str(), h.status.as_str()))
            .collect::<Vec<_>>(),
        [("post-update", "exit 4")]
    );
}

#[test]
fn with_auto_rollback_a_failed_validation_asks_for_the_rollback() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let hooks = dir.path().join("hooks");
    hook(&hooks, "post-update", "10-fail", "exit 1");
    let k0 = bzimage(dir.path(), "k0", 0);
    let k1 = bzimage(dir.path(), "k1", 1);
    let e = update_to(engine(store(), &k0, Some(&hooks), true), &k0, &k1, None);
    let mut e = engine(e.into_store(), &k0, Some(&hooks), true);
    assert_eq!(e.post_update(), AfterValidation::RollBack);
    e.rollback(&Caller::ROOT).unwrap();
    assert_eq!(
        e.record().history.last().unwrap().validation.as_ref().unwrap().reason,
        "exit 1"
    );
}

/// An engine that runs the `kvm` subsystem, as [`engine`] otherwise.
fn engine_with_vms(store: RecordStore<MemRegion>, k0: &Path) -> Engine<MemRegion> {
    let vms = SharedVms::default();
    let mut registry = Registry::new();
    registry
        .register(Box::new(Kvm::new(vms.clone(), std::time::Duration::from_millis(500))))
        .unwrap();
    let (kernel, _) = FakeKernel::new();
    let mut e = Engine::open(Box::new(kernel), registry, store, host()).unwrap();
    e.set_vms(vms);
    e.set_rollback(RollbackConfig {
        auto: false,
        kernel: Some(k0.to_path_buf()),
        initrd: None,
        cmdline: Some("console=ttyS0 k0".into()),
    });
    e
}

#[test]
fn a_rollback_from_updated_carries_an_unclaimed_vm_which_a_new_vmm_claims_after_both_kexecs() {
    use crate::protocol::{Request, Response, VmAnswer, VmCall, frame};
    use std::os::unix::net::UnixStream;
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let k0 = bzimage(dir.path(), "k0", 0);
    let k1 = bzimage(dir.path(), "k1", 1);
    let mut e = engine_with_vms(store(), &k0);
    let (luod_end, vmm_end) = UnixStream::pair().unwrap();
    let ram = memfd::from_bytes("vm0", &[7u8; 4096]).unwrap();
    e.vm_register(&Caller::ROOT, "vm0", &[1], vec![ram], luod_end).unwrap();
    // The VMM: answers every call, with its registers at freeze.
    let vmm = std::thread::spawn(move || {
        while let Ok((Response::VmCall(call), _)) = frame::recv::<Response>(&vmm_end) {
            let state = (call == VmCall::Freeze).then(|| b"regs".to_vec());
            if frame::send(&vmm_end, &Request::VmAnswer(VmAnswer::Ok { state }), &[]).is_err() {
                return;
            }
        }
    });
    let args = PrepareArgs {
        kernel: Some(ImageFile {
            fd: 0,
            name: k1.display().to_string(),
        }),
        cmdline: Some("console=ttyS0 k1".into()),
        ..PrepareArgs::default()
    };
    e.prepare(&Caller::ROOT, &args, vec![std::fs::File::open(&k1).unwrap().into()])
        .unwrap();
    e.freeze(&Caller::ROOT).unwrap();
    let Rebooted::Simulated(_) = e.reboot(&Caller::ROOT).unwrap() else {
        panic!("the fake kernel simulates the reboot")
    };
    let store = e.into_store();
    vmm.join().unwrap();

    // The new kernel: nobody claims vm0; the rollback carries it back.
    let mut e = engine_with_vms(store, &k0);
    assert_eq!(e.vm_list(&Caller::ROOT)[0].phase, "awaiting-claim");
    e.rollback(&Caller::ROOT).unwrap();
    e.freeze(&Caller::ROOT).unwrap();
    let Rebooted::Simulated(_) = e.reboot(&Caller::ROOT).unwrap() else {
        panic!("the fake kernel simulates the reboot")
    };

    // The previous kernel: a new VMM claims vm0 with its memory and state.
    let mut e = engine_with_vms(e.into_store(), &k0);
    assert_eq!(e.vm_list(&Caller::ROOT)[0].phase, "awaiting-claim");
    let Claimed { tokens, state, fds } = e.vm_claim(&Caller::ROOT, "vm0").unwrap();
    assert_eq!((tokens, state.as_slice()), (vec![1], b"regs".as_slice()));
    assert_eq!(read(fds.into_iter().next().unwrap()), vec![7u8; 4096]);
    e.finish(&Caller::ROOT).unwrap();
    let outcomes: Vec<Outcome> = e.history().iter().map(|c| c.outcome).collect();
    assert_eq!(outcomes, [Outcome::RolledBack, Outcome::Finished]);
}
