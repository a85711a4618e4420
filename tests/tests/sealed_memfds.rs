//! The file backend reads a memfd sealed against shrinking (as QEMU's
//! `memory-backend-memfd` makes guest RAM) through a mapping it makes when
//! the file is preserved; every other file with `pread`. Either way the
//! kexec carries the file's bytes as they are at the handover.

use liveupdate::state::State;
use liveupdate_tests::*;
use nix::sys::memfd::{MFdFlags, memfd_create};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

const MIB: usize = 1 << 20;

fn memfd(name: &str, bytes: &[u8], seals: libc::c_int) -> OwnedFd {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).expect("memfd_create");
    nix::sys::uio::pwrite(&fd, bytes, 0).expect("fill memfd");
    if seals != 0 {
        // SAFETY: F_ADD_SEALS with an int of seal flags, on the test's own memfd.
        let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) };
        assert_eq!(r, 0, "seal {name}");
    }
    fd
}

/// The memfds luod has mapped, by name, from its `/proc/PID/maps`.
fn mapped_memfds(luod: &Luod) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", luod.pid())).expect("read luod's maps");
    let mut names: Vec<String> = maps
        .lines()
        .filter_map(|l| {
            l.split_once("/memfd:")
                .map(|(_, name)| name.trim_end_matches(" (deleted)").to_string())
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn sealed_memfds_are_mapped_at_preserve_and_carried_with_their_bytes_at_the_handover() {
    let mut luod = Luod::started("64M");
    let mut c = luod.client();
    c.create("vm").expect("create");
    let qemu_like = pattern(1, 4 * MIB);
    let growing = pattern(2, 2 * MIB);
    let unsealed = pattern(3, 2 * MIB);
    let small = pattern(4, MIB - 1);
    let files = [
        memfd(
            "sealed-grow-shrink",
            &qemu_like,
            libc::F_SEAL_GROW | libc::F_SEAL_SHRINK,
        ),
        memfd("sealed-shrink", &growing, libc::F_SEAL_SHRINK),
        memfd("unsealed", &unsealed, 0),
        memfd("sealed-small", &small, libc::F_SEAL_SHRINK),
    ];
    for (token, fd) in files.iter().enumerate() {
        c.preserve("vm", token as u64, fd.as_fd()).expect("preserve");
    }
    assert_eq!(
        mapped_memfds(&luod),
        vec!["sealed-grow-shrink".to_string(), "sealed-shrink".to_string()],
        "only the memfds sealed against shrinking, of 1 MiB or more, are mapped"
    );

    // After the preserve the guest keeps writing, and the file that may
    // grow does: the handover carries the bytes as they are then, the grown
    // tail included (read past the mapping with pread).
    let mut qemu_now = qemu_like.clone();
    qemu_now[MIB..MIB + 5].copy_from_slice(b"later");
    nix::sys::uio::pwrite(&files[0], b"later", MIB as i64).expect("write after preserve");
    let mut growing_now = growing.clone();
    growing_now.extend_from_slice(&pattern(5, 3000));
    nix::sys::uio::pwrite(&files[1], &growing_now[2 * MIB..], 2 * MIB as i64).expect("grow after preserve");

    c.prepare().expect("prepare");
    c.freeze().expect("freeze");
    let rebooted = c.reboot().expect("reboot");
    let total = qemu_now.len() + growing_now.len() + unsealed.len() + small.len();
    assert_eq!((rebooted.files, rebooted.bytes), (4, total as u64));
    drop(c);
    luod.expect_kexec_exit();

    luod.start();
    let mut c = luod.client();
    assert_eq!(c.status().state, State::Updated);
    for (token, want) in [&qemu_now, &growing_now, &unsealed, &small].into_iter().enumerate() {
        let (fd, size) = c.retrieve("vm", token as u64).expect("retrieve");
        assert_eq!(size, want.len() as u64, "size of file {token}");
        assert_file_holds(&format!("file {token}"), fd, want);
    }
    c.finish().expect("finish");
}
