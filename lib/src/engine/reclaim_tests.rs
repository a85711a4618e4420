//! A VM claimed in `updated` registers again (reclaim.rs): a rollback from
//! `updated` then freezes it and carries it to the previous kernel, and
//! `finish` keeps it registered for the next update. Fake kernel (simulated
//! kexec), in-memory region, a VMM thread on a real socket pair.

use super::test_support::host;
use super::*;
use crate::kernel::fake::FakeKernel;
use crate::kernel::memfd;
use crate::protocol::frame;
use crate::protocol::{ErrorKind, ImageFile, Request, Response, VmAnswer, VmCall};
use crate::region::MemRegion;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

const RAM: &[u8] = &[7u8; 8192];

/// A VMM thread that answers every call (its checkpoint at freeze is
/// `state`) and reports the calls it got.
fn vmm(sock: UnixStream, state: &'static [u8]) -> mpsc::Receiver<VmCall> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        while let Ok((Response::VmCall(call), _)) = frame::recv::<Response>(&sock) {
            let _ = tx.send(call);
            let state = (call == VmCall::Freeze).then(|| state.to_vec());
            if frame::send(&sock, &Request::VmAnswer(VmAnswer::Ok { state }), &[]).is_err() {
                return;
            }
        }
    });
    rx
}

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

/// An engine with the `kvm` subsystem whose running kernel is `k0`.
fn engine(store: RecordStore<MemRegion>, k0: &Path) -> Engine<MemRegion> {
    let vms = SharedVms::default();
    let mut registry = Registry::new();
    registry
        .register(Box::new(Kvm::new(vms.clone(), Duration::from_secs(2))))
        .unwrap();
    let mut e = Engine::open(Box::new(FakeKernel::new().0), registry, store, host()).unwrap();
    e.set_vms(vms);
    e.set_rollback(RollbackConfig {
        auto: false,
        kernel: Some(k0.to_path_buf()),
        initrd: None,
        cmdline: Some("console=ttyS0 k0".into()),
    });
    e
}

/// prepare (to `k`, or the rollback already prepared), freeze, simulated
/// kexec; the new kernel's engine.
fn kexec(mut e: Engine<MemRegion>, k: Option<&Path>, k0: &Path) -> Engine<MemRegion> {
    if let Some(k) = k {
        let args = PrepareArgs {
            kernel: Some(ImageFile {
                fd: 0,
                name: k.display().to_string(),
            }),
            cmdline: Some("console=ttyS0 k1".into()),
            ..PrepareArgs::default()
        };
        e.prepare(&Caller::ROOT, &args, vec![std::fs::File::open(k).unwrap().into()])
            .unwrap();
    }
    e.freeze(&Caller::ROOT).unwrap();
    e.reboot(&Caller::ROOT).unwrap();
    let next = engine(e.into_store(), k0);
    assert_eq!(next.state(), State::Updated);
    next
}

fn register(e: &mut Engine<MemRegion>, fds: Vec<OwnedFd>, state: &'static [u8]) -> mpsc::Receiver<VmCall> {
    let (luod_end, vmm_end) = UnixStream::pair().unwrap();
    e.vm_register(&Caller::ROOT, "web", &[1, 2], fds, luod_end).unwrap();
    vmm(vmm_end, state)
}

fn claim(e: &mut Engine<MemRegion>) -> (Vec<OwnedFd>, Vec<u8>) {
    let vms::Claimed { tokens, state, fds } = e.vm_claim(&Caller::ROOT, "web").unwrap();
    assert_eq!(tokens, vec![1, 2]);
    (fds, state)
}

fn bytes(fd: &OwnedFd) -> Vec<u8> {
    let mut buf = vec![0u8; memfd::size(fd.as_fd()).unwrap() as usize];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::from(fd.try_clone().unwrap()), &mut buf, 0).unwrap();
    buf
}

fn phase(e: &Engine<MemRegion>) -> String {
    e.vm_list(&Caller::ROOT)[0].phase.clone()
}

fn web_session(e: &Engine<MemRegion>) -> (bool, Vec<(u64, u64, bool)>) {
    let s = e
        .record()
        .sessions
        .iter()
        .find(|s| s.name.as_str() == "vm-web")
        .unwrap();
    (
        s.incoming,
        s.fds.iter().map(|f| (f.token, f.size, f.retrieved)).collect(),
    )
}

/// A VM on the host (RAM and a state buffer), updated to k1; returns the
/// new kernel's engine with the VM awaiting its claim.
fn updated_with_a_vm(dir: &Path) -> (Engine<MemRegion>, PathBuf) {
    let k0 = bzimage(dir, "k0", 0);
    let k1 = bzimage(dir, "k1", 1);
    let mut e = engine(RecordStore::new(MemRegion::zeroed(8 << 20)).unwrap(), &k0);
    let fds = vec![
        memfd::from_bytes("ram", RAM).unwrap(),
        memfd::from_bytes("state", &[0u8; 4096]).unwrap(),
    ];
    let calls = register(&mut e, fds, b"checkpoint 1");
    let e = kexec(e, Some(&k1), &k0);
    assert_eq!(calls.try_iter().collect::<Vec<_>>(), [VmCall::Prepare, VmCall::Freeze]);
    (e, k0)
}

#[test]
fn a_vm_registered_again_after_its_claim_is_frozen_and_carried_by_a_rollback_from_updated() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "run as root: luod takes rollback images only from root's files"
    );
    let dir = tempfile::tempdir().unwrap();
    let (mut e, k0) = updated_with_a_vm(dir.path());
    assert_eq!(phase(&e), "awaiting-claim");
    let (fds, state) = claim(&mut e);
    assert_eq!(
        (bytes(&fds[0]).as_slice(), state.as_slice()),
        (RAM, b"checkpoint 1".as_slice())
    );
    assert_eq!(phase(&e), "claimed");

    // Claimed but not registered again: a rollback could not carry it.
    let err = e.rollback(&Caller::ROOT).unwrap_err();
    assert_eq!(
        err.to_string(),
        "rollback refused: clients took back 2 file(s) already (vm-web/1, vm-web/2), which a rollback from updated \
         could not carry: finish the cycle (`luoctl finish --accept-failed-validation` if its validation failed), let \
         the clients preserve again, then `luoctl rollback` from normal"
    );

    let calls = register(&mut e, fds, b"checkpoint 2");
    assert_eq!(phase(&e), "registered");
    assert_eq!(web_session(&e), (false, vec![(1, 8192, false), (2, 4096, false)]));

    let report = e.rollback(&Caller::ROOT).unwrap();
    assert_eq!(
        (report.from, report.to, report.files),
        (State::Updated, State::Prepared, 2)
    );
    let mut e = kexec(e, None, &k0);
    assert_eq!(calls.try_iter().collect::<Vec<_>>(), [VmCall::Prepare, VmCall::Freeze]);
    assert_eq!(e.record().update.as_ref().unwrap().rollback_of, Some(1));

    // In the previous kernel the VM comes back with its RAM and the rollback's checkpoint.
    assert_eq!(phase(&e), "awaiting-claim");
    let (fds, state) = claim(&mut e);
    assert_eq!(
        (bytes(&fds[0]).as_slice(), state.as_slice()),
        (RAM, b"checkpoint 2".as_slice())
    );
    let _calls = register(&mut e, fds, b"checkpoint 3");
    e.finish(&Caller::ROOT).unwrap();
    assert_eq!(e.state(), State::Normal);
    assert_eq!(phase(&e), "registered");
}

#[test]
fn finish_keeps_a_vm_registered_again_so_the_next_update_carries_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut e, k0) = updated_with_a_vm(dir.path());
    let (fds, _) = claim(&mut e);
    let calls = register(&mut e, fds, b"checkpoint 2");
    let report = e.finish(&Caller::ROOT).unwrap();
    assert_eq!((report.from, report.to), (State::Updated, State::Normal));
    assert_eq!(web_session(&e), (false, vec![(1, 8192, false), (2, 4096, false)]));
    assert_eq!(phase(&e), "registered");

    let k2 = bzimage(dir.path(), "k2", 2);
    let mut e = kexec(e, Some(&k2), &k0);
    assert_eq!(calls.try_iter().collect::<Vec<_>>(), [VmCall::Prepare, VmCall::Freeze]);
    let (fds, state) = claim(&mut e);
    assert_eq!(
        (bytes(&fds[0]).as_slice(), state.as_slice()),
        (RAM, b"checkpoint 2".as_slice())
    );
}

#[test]
fn registering_again_is_refused_before_the_claim_and_with_other_memfds_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut e, _k0) = updated_with_a_vm(dir.path());
    let other = || {
        vec![
            memfd::from_bytes("ram", RAM).unwrap(),
            memfd::from_bytes("state", &[0u8; 4096]).unwrap(),
        ]
    };
    let (luod_end, _vmm_end) = UnixStream::pair().unwrap();
    let err = e
        .vm_register(&Caller::ROOT, "web", &[1, 2], other(), luod_end)
        .unwrap_err();
    assert_eq!(
        (err.kind(), err.to_string().as_str()),
        (ErrorKind::AlreadyExists, "a session named vm-web exists already")
    );
    assert_eq!(web_session(&e), (true, vec![(1, 8192, false), (2, 4096, false)]));

    let (fds, _) = claim(&mut e);
    let claimed = web_session(&e);
    assert_eq!(claimed, (true, vec![(1, 8192, true), (2, 4096, true)]));
    let small = vec![
        fds[0].try_clone().unwrap(),
        memfd::from_bytes("state", &[0u8; 100]).unwrap(),
    ];
    let (luod_end, _vmm_end) = UnixStream::pair().unwrap();
    let err = e
        .vm_register(&Caller::ROOT, "web", &[1, 2], small, luod_end)
        .unwrap_err();
    assert_eq!(
        (err.kind(), err.to_string()),
        (
            ErrorKind::InvalidArgument,
            "VM web: the memfd under token 2 is 100 bytes, but the one it claimed was 4096 bytes: \
             register the memfds claimed"
                .to_string()
        )
    );
    let (luod_end, _vmm_end) = UnixStream::pair().unwrap();
    let err = e
        .vm_register(&Caller::ROOT, "web", &[1], vec![fds[0].try_clone().unwrap()], luod_end)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "other tokens: {err}");
    assert_eq!(web_session(&e), claimed, "nothing changed");
    assert_eq!(phase(&e), "claimed");
}
