//! The LUO uAPI (`include/uapi/linux/liveupdate.h`, Linux 6.19+), mirrored.
//!
//! This module owns every live-update ioctl. Each argument struct starts with
//! `__u32 size`, which the kernel reads first and uses with
//! `copy_struct_from_user`: a larger struct with a non-zero tail fails with
//! `E2BIG`, a smaller one than the kernel's minimum with `EINVAL`. The ioctl
//! numbers are `_IO(0xBA, nr)`: no size or direction is encoded in them.
//!
//! Errnos, from `kernel/liveupdate/` and `mm/memfd_luo.c` (7.3):
//! `CREATE_SESSION`: `EEXIST` duplicate name, `EINVAL` empty or unterminated
//! name; `RETRIEVE_SESSION`: `ENOENT` no such incoming session, `EINVAL`
//! already retrieved; `PRESERVE_FD`: `EEXIST` token in use, `ENOENT` no
//! handler for this file type (only memfds in 7.2/7.3), `EBUSY` the file is
//! preserved already, `EBADF` bad fd, `ENOSPC` too many files, `EOPNOTSUPP`
//! memfd seals this kernel cannot carry, `EINVAL` not an outgoing session;
//! `RETRIEVE_FD`: `ENOENT` unknown token, `EINVAL` not an incoming session;
//! any: `EINVAL` for an ioctl number outside the kernel's table (not
//! `ENOTTY`), `ENOTTY` for a known number with other type or size bits,
//! `E2BIG` for a larger struct with a non-zero tail. Opening
//! `/dev/liveupdate`: `EBUSY` another process holds it (it is exclusive),
//! `EIO` the previous kernel's data could not be deserialized. (Observed in
//! QEMU on 7.2.13 and 7.3-rc7: see `qemu-tests/README.md`.)

use nix::errno::Errno;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `LIVEUPDATE_IOCTL_TYPE`.
pub const IOCTL_TYPE: u8 = 0xBA;
/// `LIVEUPDATE_SESSION_NAME_LENGTH` (including the NUL).
pub const NAME_LEN: usize = 64;

/// `struct liveupdate_ioctl_create_session` and `..._retrieve_session` (same layout).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SessionArg {
    /// `sizeof` this struct.
    pub size: u32,
    /// Out: the session's file descriptor.
    pub fd: i32,
    /// NUL-terminated name.
    pub name: [u8; NAME_LEN],
}

/// `struct liveupdate_session_preserve_fd` and `..._retrieve_fd` (same layout).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FdArg {
    /// `sizeof` this struct.
    pub size: u32,
    /// In (preserve) or out (retrieve): the file descriptor.
    pub fd: i32,
    /// The token (`__aligned_u64`).
    pub token: u64,
}

/// `struct liveupdate_session_finish`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FinishArg {
    /// `sizeof` this struct.
    pub size: u32,
    /// Must be zero.
    pub reserved: u32,
}

/// `struct liveupdate_session_get_name`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct GetNameArg {
    /// `sizeof` this struct.
    pub size: u32,
    /// Must be zero.
    pub reserved: u32,
    /// Out: NUL-terminated name.
    pub name: [u8; NAME_LEN],
}

// The layouts of the C header, checked at compile time.
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<SessionArg>() == 72);
    assert!(offset_of!(SessionArg, fd) == 4);
    assert!(offset_of!(SessionArg, name) == 8);
    assert!(size_of::<FdArg>() == 16);
    assert!(offset_of!(FdArg, fd) == 4);
    assert!(offset_of!(FdArg, token) == 8);
    assert!(size_of::<FinishArg>() == 8);
    assert!(size_of::<GetNameArg>() == 72);
    assert!(offset_of!(GetNameArg, name) == 8);
};

nix::ioctl_readwrite_bad!(
    ioctl_create_session,
    nix::request_code_none!(IOCTL_TYPE, 0x00),
    SessionArg
);
nix::ioctl_readwrite_bad!(
    ioctl_retrieve_session,
    nix::request_code_none!(IOCTL_TYPE, 0x01),
    SessionArg
);
nix::ioctl_readwrite_bad!(ioctl_preserve_fd, nix::request_code_none!(IOCTL_TYPE, 0x40), FdArg);
nix::ioctl_readwrite_bad!(ioctl_retrieve_fd, nix::request_code_none!(IOCTL_TYPE, 0x41), FdArg);
nix::ioctl_readwrite_bad!(ioctl_finish, nix::request_code_none!(IOCTL_TYPE, 0x42), FinishArg);
nix::ioctl_readwrite_bad!(ioctl_get_name, nix::request_code_none!(IOCTL_TYPE, 0x43), GetNameArg);

fn name_arg(name: &str) -> Result<[u8; NAME_LEN], Errno> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= NAME_LEN || bytes.contains(&0) {
        return Err(Errno::EINVAL);
    }
    let mut out = [0u8; NAME_LEN];
    out[..bytes.len()].copy_from_slice(bytes);
    Ok(out)
}

fn session_call(
    dev: BorrowedFd<'_>,
    name: &str,
    call: unsafe fn(i32, *mut SessionArg) -> nix::Result<i32>,
) -> Result<OwnedFd, Errno> {
    let mut arg = SessionArg {
        size: std::mem::size_of::<SessionArg>() as u32,
        fd: -1,
        name: name_arg(name)?,
    };
    // SAFETY: `dev` is an open fd for the caller's borrow; `arg` is a live,
    // properly sized `#[repr(C)]` struct matching the uAPI (asserted above)
    // that outlives the call, and the kernel writes only within `size` bytes.
    unsafe { call(dev.as_raw_fd(), &mut arg) }?;
    // SAFETY: on success the kernel installed a new session fd in `arg.fd`
    // for this process; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(arg.fd) })
}

/// `LIVEUPDATE_IOCTL_CREATE_SESSION` on `/dev/liveupdate`: a new outgoing session.
pub fn create_session(dev: BorrowedFd<'_>, name: &str) -> Result<OwnedFd, Errno> {
    session_call(dev, name, ioctl_create_session)
}

/// `LIVEUPDATE_IOCTL_RETRIEVE_SESSION` on `/dev/liveupdate`: a session of the previous kernel.
pub fn retrieve_session(dev: BorrowedFd<'_>, name: &str) -> Result<OwnedFd, Errno> {
    session_call(dev, name, ioctl_retrieve_session)
}

/// `LIVEUPDATE_SESSION_PRESERVE_FD` on a session fd.
pub fn preserve_fd(session: BorrowedFd<'_>, fd: BorrowedFd<'_>, token: u64) -> Result<(), Errno> {
    let mut arg = FdArg {
        size: std::mem::size_of::<FdArg>() as u32,
        fd: fd.as_raw_fd(),
        token,
    };
    // SAFETY: both fds are open for the borrows; `arg` matches the uAPI
    // layout (asserted above) and lives across the call.
    unsafe { ioctl_preserve_fd(session.as_raw_fd(), &mut arg) }?;
    Ok(())
}

/// `LIVEUPDATE_SESSION_RETRIEVE_FD` on a session fd of the previous kernel.
pub fn retrieve_fd(session: BorrowedFd<'_>, token: u64) -> Result<OwnedFd, Errno> {
    let mut arg = FdArg {
        size: std::mem::size_of::<FdArg>() as u32,
        fd: -1,
        token,
    };
    // SAFETY: the session fd is open for the borrow; `arg` matches the uAPI
    // layout (asserted above) and lives across the call.
    unsafe { ioctl_retrieve_fd(session.as_raw_fd(), &mut arg) }?;
    // SAFETY: on success the kernel installed a new fd in `arg.fd` for this
    // process; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(arg.fd) })
}

/// `LIVEUPDATE_SESSION_FINISH` on a session fd of the previous kernel.
pub fn finish(session: BorrowedFd<'_>) -> Result<(), Errno> {
    let mut arg = FinishArg {
        size: std::mem::size_of::<FinishArg>() as u32,
        reserved: 0,
    };
    // SAFETY: the session fd is open for the borrow; `arg` matches the uAPI
    // layout (asserted above) and lives across the call.
    unsafe { ioctl_finish(session.as_raw_fd(), &mut arg) }?;
    Ok(())
}

/// `LIVEUPDATE_SESSION_GET_NAME` on a session fd.
pub fn get_name(session: BorrowedFd<'_>) -> Result<String, Errno> {
    let mut arg = GetNameArg {
        size: std::mem::size_of::<GetNameArg>() as u32,
        reserved: 0,
        name: [0; NAME_LEN],
    };
    // SAFETY: the session fd is open for the borrow; `arg` matches the uAPI
    // layout (asserted above) and lives across the call.
    unsafe { ioctl_get_name(session.as_raw_fd(), &mut arg) }?;
    let end = arg.name.iter().position(|b| *b == 0).unwrap_or(NAME_LEN);
    Ok(String::from_utf8_lossy(&arg.name[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_io_of_type_0xba() {
        assert_eq!(nix::request_code_none!(IOCTL_TYPE, 0x00), 0xBA00);
        assert_eq!(nix::request_code_none!(IOCTL_TYPE, 0x43), 0xBA43);
    }

    #[test]
    fn names_are_checked_like_the_kernel_does() {
        assert_eq!(name_arg(""), Err(Errno::EINVAL));
        assert_eq!(name_arg(&"x".repeat(64)), Err(Errno::EINVAL));
        assert_eq!(name_arg("a\0b"), Err(Errno::EINVAL));
        let n = name_arg(&"x".repeat(63)).unwrap();
        assert_eq!(n[62], b'x');
        assert_eq!(n[63], 0);
    }

    #[test]
    fn an_ioctl_on_a_file_that_is_not_luo_fails_with_enotty() {
        let f = tempfile::tempfile().unwrap();
        use std::os::fd::AsFd;
        assert_eq!(create_session(f.as_fd(), "x").unwrap_err(), Errno::ENOTTY);
        assert_eq!(finish(f.as_fd()).unwrap_err(), Errno::ENOTTY);
    }
}
