//! Engine tests of the target kernel's images (descriptors, never paths)
//! and of what goes through the kernel interface: the image check, the
//! "kexec image loaded" probe, the load itself. Over the fake kernel.

use super::test_support::host;
use super::*;
use crate::kernel::KernelError;
use crate::kernel::fake::{Failures, FakeKernel, Op};
use crate::kernel::memfd;
use crate::protocol::{ErrorKind, ImageFile};
use crate::region::MemRegion;
use sha2::{Digest, Sha256};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

fn engine(kernel: FakeKernel) -> Engine<MemRegion> {
    let store = RecordStore::new(MemRegion::zeroed(8 << 20)).unwrap();
    Engine::open(Box::new(kernel), Registry::new(), store, host()).unwrap()
}

/// An engine over a fake kernel whose kexec is real: the flag says whether
/// a kexec image is loaded.
fn real_kexec(loaded: bool) -> (Engine<MemRegion>, Failures, Arc<AtomicBool>) {
    let flag = Arc::new(AtomicBool::new(loaded));
    let (kernel, failures) = FakeKernel::real_kexec(flag.clone());
    (engine(kernel), failures, flag)
}

const USER: Caller = Caller {
    uid: 1000,
    pid: 1,
    privileged: false,
};

fn bzimage(dir: &Path) -> std::path::PathBuf {
    let mut bz = vec![0u8; 0x400];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    bz[0x300] = 0x42;
    let path = dir.join("vmlinuz");
    std::fs::write(&path, &bz).unwrap();
    path
}

fn kernel_args(name: &str) -> PrepareArgs {
    PrepareArgs {
        kernel: Some(ImageFile {
            fd: 0,
            name: name.into(),
        }),
        cmdline: Some("quiet".into()),
        ..Default::default()
    }
}

fn open(path: &Path) -> Vec<OwnedFd> {
    vec![std::fs::File::open(path).unwrap().into()]
}

fn item<'a>(r: &'a CheckReport, name: &str) -> &'a CheckItem {
    r.items.iter().find(|i| i.name == name).unwrap()
}

#[test]
fn the_image_check_is_the_kernels_and_its_refusal_loads_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let image = bzimage(dir.path());
    let (mut e, failures, loaded) = real_kexec(false);
    failures.lock().unwrap().insert(
        Op::CheckImage,
        KernelError::Load {
            path: "/boot/vmlinuz-next".into(),
            reason: "signature rejected".into(),
        },
    );
    let args = kernel_args("/boot/vmlinuz-next");
    let report = e.check(&Caller::ROOT, &args, open(&image));
    assert_eq!(
        (report.ok, item(&report, "target kernel").detail.as_str()),
        (false, "cannot load kernel /boot/vmlinuz-next: signature rejected")
    );
    let generation = e.generation();
    let err = e.prepare(&Caller::ROOT, &args, open(&image)).unwrap_err();
    assert_eq!(
        (err.kind(), err.to_string()),
        (
            ErrorKind::InvalidArgument,
            "cannot load kernel /boot/vmlinuz-next: signature rejected".into()
        )
    );
    assert_eq!((e.state(), e.generation()), (State::Normal, generation));
    assert!(!loaded.load(Ordering::SeqCst), "nothing was loaded");

    // Without the injected refusal, the kernel's own bzImage check passes
    // this image and refuses a file that is not one.
    failures.lock().unwrap().clear();
    let not_kernel = dir.path().join("not-a-kernel");
    std::fs::write(&not_kernel, vec![0u8; 4096]).unwrap();
    let err = e.prepare(&Caller::ROOT, &args, open(&not_kernel)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot load kernel /boot/vmlinuz-next: not a bzImage (no \"HdrS\" boot header at offset 0x202)"
    );
    e.prepare(&Caller::ROOT, &args, open(&image)).unwrap();
    assert!(loaded.load(Ordering::SeqCst));
}

#[test]
fn a_real_kexec_needs_a_target_unless_the_kernel_says_one_is_loaded() {
    let (mut e, _, loaded) = real_kexec(false);
    let none = PrepareArgs::default();
    let want = "the fake backend reboots by kexec: give the target with --kernel K (--cmdline S | --reuse-cmdline)";
    let report = e.check(&Caller::ROOT, &none, vec![]);
    assert_eq!(
        (report.ok, item(&report, "target kernel").detail.as_str()),
        (false, want)
    );
    let err = e.prepare(&Caller::ROOT, &none, vec![]).unwrap_err();
    assert_eq!((err.kind(), err.to_string()), (ErrorKind::InvalidArgument, want.into()));
    assert_eq!(e.state(), State::Normal);

    loaded.store(true, Ordering::SeqCst);
    let report = e.check(&Caller::ROOT, &none, vec![]);
    assert_eq!(
        (report.ok, item(&report, "target kernel").detail.as_str()),
        (true, "none given: a kexec image is loaded already")
    );
    e.prepare(&Caller::ROOT, &none, vec![]).unwrap();
    assert_eq!(e.state(), State::Prepared);
}

#[test]
fn prepare_loads_the_sent_image_and_records_the_clients_name_and_the_digest() {
    let dir = tempfile::tempdir().unwrap();
    let image = bzimage(dir.path());
    let initrd = dir.path().join("initrd");
    std::fs::write(&initrd, b"initrd bytes").unwrap();
    let (mut e, _, loaded) = real_kexec(false);
    let args = PrepareArgs {
        initrd: Some(ImageFile {
            fd: 1,
            name: "/boot/initrd-next".into(),
        }),
        ..kernel_args("/boot/vmlinuz-next")
    };
    let mut fds = open(&image);
    fds.extend(open(&initrd));
    let report = e.prepare(&Caller::ROOT, &args, fds).unwrap();
    let want: [u8; 32] = Sha256::digest(std::fs::read(&image).unwrap()).into();
    let nonce = e.record().update.as_ref().unwrap().nonce.clone().unwrap();
    assert_eq!(
        report.notes,
        [
            format!("loaded /boot/vmlinuz-next (sha256 {})", hex(&want)),
            format!(
                "the target command line carries luod.handover={nonce}: only a boot that shows it takes this \
                 update's handover"
            )
        ]
    );
    let target = e.record().update.as_ref().unwrap().target.clone().unwrap();
    assert_eq!(
        (target.kernel.as_str(), target.kernel_sha256, target.initrd.as_deref()),
        ("/boot/vmlinuz-next", want, Some("/boot/initrd-next"))
    );
    assert_eq!(target.initrd_sha256, Some(Sha256::digest(b"initrd bytes").into()));
    assert!(loaded.load(Ordering::SeqCst), "the kernel loaded it");
    e.cancel(&Caller::ROOT).unwrap();
    assert!(!loaded.load(Ordering::SeqCst), "cancel unloads it");
}

#[test]
fn check_digests_the_image_only_for_a_caller_that_may_prepare() {
    let dir = tempfile::tempdir().unwrap();
    let image = bzimage(dir.path());
    let (e, _, _) = real_kexec(false);
    let args = kernel_args("/boot/vmlinuz-next");
    let want: [u8; 32] = Sha256::digest(std::fs::read(&image).unwrap()).into();
    let root = e.check(&Caller::ROOT, &args, open(&image));
    assert_eq!(
        item(&root, "target kernel").detail,
        format!(
            "/boot/vmlinuz-next loads (sha256 {}), cmdline \"quiet luod.handover=<nonce>\" (prepare chooses the \
             nonce: a boot whose command line lacks it never takes the update's handover)",
            hex(&want)
        )
    );
    let user = e.check(&USER, &args, open(&image));
    assert_eq!(
        item(&user, "target kernel").detail,
        "/boot/vmlinuz-next is a kernel image luod can load (1024 bytes; digested only for a caller that may \
         prepare), cmdline \"quiet luod.handover=<nonce>\""
    );
}

#[test]
fn a_non_regular_image_is_refused_before_the_kernel_sees_it() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let (mut e, failures, loaded) = real_kexec(false);
    // Were the kernel asked, this would be the answer.
    failures
        .lock()
        .unwrap()
        .insert(Op::CheckImage, KernelError::Reboot("the kernel was asked".into()));
    let fd = || -> Vec<OwnedFd> {
        vec![
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&fifo)
                .unwrap()
                .into(),
        ]
    };
    let want = format!(
        "kernel image {} is a FIFO, not a regular file: luod reads only regular files, which cannot block it",
        fifo.display()
    );
    let args = kernel_args(&fifo.display().to_string());
    let report = e.check(&Caller::ROOT, &args, fd());
    assert_eq!(item(&report, "target kernel").detail, want);
    let generation = e.generation();
    let err = e.prepare(&Caller::ROOT, &args, fd()).unwrap_err();
    assert_eq!((err.kind(), err.to_string()), (ErrorKind::InvalidArgument, want));
    assert_eq!((e.state(), e.generation()), (State::Normal, generation));
    assert!(!loaded.load(Ordering::SeqCst));
}

#[test]
fn a_memfd_not_open_read_write_is_not_preserved_and_nothing_changes() {
    let (kernel, _) = FakeKernel::new();
    let mut e = engine(kernel);
    e.session_create(&Caller::ROOT, "vm0").unwrap();
    let ram = memfd::from_bytes("ram", b"guest ram").unwrap();
    let before = e.status(&Caller::ROOT);
    let reopen = |flags: nix::fcntl::OFlag| {
        let path = format!("/proc/self/fd/{}", ram.as_raw_fd());
        nix::fcntl::open(
            path.as_str(),
            flags | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap()
    };
    for (flags, mode) in [
        (nix::fcntl::OFlag::O_PATH, "with O_PATH"),
        (nix::fcntl::OFlag::O_WRONLY, "write-only"),
        (nix::fcntl::OFlag::O_RDONLY, "read-only"),
    ] {
        let err = e.session_preserve(&Caller::ROOT, "vm0", 1, reopen(flags)).unwrap_err();
        assert_eq!(
            (err.kind(), err.to_string()),
            (
                ErrorKind::InvalidArgument,
                format!(
                    "cannot preserve /memfd:luod:ram (deleted): it is open {mode}; only a memfd open read-write \
                     (O_RDWR) can be preserved"
                )
            )
        );
        assert_eq!(e.status(&Caller::ROOT), before, "nothing preserved, no new record");
    }
    // The same memfd, read-write, is preserved (and carried).
    e.session_preserve(&Caller::ROOT, "vm0", 1, reopen(nix::fcntl::OFlag::O_RDWR))
        .unwrap();
    e.prepare(&Caller::ROOT, &PrepareArgs::default(), vec![]).unwrap();
    let Rebooted::Simulated(report) = e.reboot(&Caller::ROOT).unwrap() else {
        panic!("a simulated kexec");
    };
    assert_eq!((report.files, report.bytes), (1, 9));
}
