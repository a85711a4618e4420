//! Engine tests of pinned targets, of a kernel that refuses the image's
//! signature, and of "already on target". Over the fake kernel.

use super::test_support::host;
use super::*;
use crate::kernel::KernelError;
use crate::kernel::fake::{FakeKernel, Op};
use crate::kernel::sigpolicy::SignaturePolicy;
use crate::protocol::{ErrorKind, ImageFile};
use crate::region::MemRegion;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

fn bzimage(dir: &Path, name: &str, version: &str, seed: u8) -> std::path::PathBuf {
    let mut bz = vec![seed; 0x800];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    bz[0x20e..0x210].copy_from_slice(&0x0300u16.to_le_bytes());
    bz[0x500..0x500 + version.len()].copy_from_slice(version.as_bytes());
    bz[0x500 + version.len()] = 0;
    let path = dir.join(name);
    std::fs::write(&path, &bz).unwrap();
    path
}

fn args(name: &str, pin: Option<[u8; 32]>) -> PrepareArgs {
    PrepareArgs {
        kernel: Some(ImageFile {
            fd: 0,
            name: name.into(),
        }),
        cmdline: Some("quiet".into()),
        kernel_sha256: pin,
        ..Default::default()
    }
}

fn open(path: &Path) -> Vec<OwnedFd> {
    vec![std::fs::File::open(path).unwrap().into()]
}

fn digest(path: &Path) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(path).unwrap()).into()
}

fn running_version() -> String {
    let u = nix::sys::utsname::uname().unwrap();
    format!(
        "{} (b@h) {}",
        u.release().to_string_lossy(),
        u.version().to_string_lossy()
    )
}

#[test]
fn a_pin_mismatch_is_refused_before_the_kernel_loads() {
    let flag = Arc::new(AtomicBool::new(false));
    let (kernel, _) = FakeKernel::real_kexec(flag.clone());
    let store = RecordStore::new(MemRegion::zeroed(8 << 20)).unwrap();
    let mut e = Engine::open(Box::new(kernel), Registry::new(), store, host()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let k = bzimage(dir.path(), "vmlinuz", "x", 1);
    let generation = e.generation();
    let err = e
        .prepare(&Caller::ROOT, &args("k", Some([7; 32])), open(&k))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DigestMismatch);
    assert_eq!(
        err.to_string(),
        format!(
            "kernel image k has sha256 {}, not the pinned {}: it is not the image the pin names, so nothing was loaded",
            hex(&digest(&k)),
            "07".repeat(32)
        )
    );
    assert!(!flag.load(Ordering::SeqCst), "nothing was loaded");
    assert_eq!((e.state(), e.generation()), (State::Normal, generation));
    // An initrd pin without an initrd.
    let no_initrd = PrepareArgs {
        initrd_sha256: Some([1; 32]),
        ..args("k", None)
    };
    let err = e.prepare(&Caller::ROOT, &no_initrd, open(&k)).unwrap_err();
    assert_eq!(
        (err.kind(), err.to_string()),
        (
            ErrorKind::InvalidArgument,
            "--initrd-sha256 pins an initrd, but no --initrd was given".to_string()
        )
    );
    e.prepare(&Caller::ROOT, &args("k", Some(digest(&k))), open(&k))
        .unwrap();
    assert!(flag.load(Ordering::SeqCst));
    assert_eq!(
        e.record()
            .update
            .as_ref()
            .unwrap()
            .target
            .as_ref()
            .unwrap()
            .kernel_sha256,
        digest(&k)
    );
}

#[test]
fn a_refused_signature_is_a_kernel_error_in_words_and_changes_nothing() {
    let (kernel, failures) = FakeKernel::new();
    let store = RecordStore::new(MemRegion::zeroed(8 << 20)).unwrap();
    let mut e = Engine::open(Box::new(kernel), Registry::new(), store, host()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let k = bzimage(dir.path(), "vmlinuz", "x", 1);
    let policy = SignaturePolicy {
        lockdown: Some("integrity".into()),
        ..Default::default()
    };
    let reason = policy.explain_refusal(nix::errno::Errno::EPERM).unwrap();
    failures.lock().unwrap().insert(
        Op::LoadKernel,
        KernelError::SignatureRejected {
            path: "k".into(),
            reason: reason.clone(),
        },
    );
    let generation = e.generation();
    let err = e.prepare(&Caller::ROOT, &args("k", None), open(&k)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Kernel);
    assert_eq!(err.to_string(), format!("cannot load kernel k: {reason}"));
    assert!(reason.starts_with(
        "the kernel is locked down (integrity) and refused the image because it has no valid signature (EPERM): load \
         an image signed with a key the kernel trusts; signed kexec images required"
    ));
    assert_eq!(
        err.hint(),
        "`luoctl check --kernel K` shows the kernel's signature policy"
    );
    assert_eq!((e.state(), e.generation()), (State::Normal, generation));
}

#[test]
fn on_target_needs_the_running_version_and_the_last_loaded_digest() {
    let (kernel, _) = FakeKernel::new();
    let store = RecordStore::new(MemRegion::zeroed(8 << 20)).unwrap();
    let mut e = Engine::open(Box::new(kernel), Registry::new(), store, host()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let k = bzimage(dir.path(), "k", &running_version(), 1);
    let other = bzimage(dir.path(), "other", &running_version(), 2);
    let check = |e: &Engine<MemRegion>, p: &Path, who: &Caller| e.check(who, &args(p.to_str().unwrap(), None), open(p));
    assert!(!check(&e, &k, &Caller::ROOT).already_on_target);
    // A cycle that loaded K and finished: the simulated kexec, a new
    // engine on the same region in `updated`, then finish.
    e.prepare(&Caller::ROOT, &args(k.to_str().unwrap(), None), open(&k))
        .unwrap();
    let Rebooted::Simulated(_) = e.reboot(&Caller::ROOT).unwrap();
    let store = e.into_store();
    let (kernel, _) = FakeKernel::new();
    let mut e = Engine::open(Box::new(kernel), Registry::new(), store, host()).unwrap();
    assert_eq!(e.state(), State::Updated);
    assert!(check(&e, &k, &Caller::ROOT).already_on_target);
    e.finish(&Caller::ROOT).unwrap();
    let report = check(&e, &k, &Caller::ROOT);
    assert!(report.already_on_target, "{report:?}");
    assert!(!check(&e, &other, &Caller::ROOT).already_on_target);
    // A caller that may not prepare: the image is not read whole, so no.
    let user = Caller {
        uid: 1000,
        pid: std::process::id() as i32,
        privileged: false,
    };
    let report = check(&e, &k, &user);
    assert!(!report.already_on_target);
    assert_eq!(
        report.items.iter().find(|i| i.name == "running kernel").unwrap().detail,
        "not compared: the image is digested only for a caller that may prepare"
    );
}
