//! memfd helpers: create, recognise, size.

use nix::sys::memfd::{MFdFlags, memfd_create};
use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

/// Creates a memfd named `name` (close-on-exec, sealing allowed).
pub fn create(name: &str) -> std::io::Result<OwnedFd> {
    let name = format!("luod:{name}");
    let name = std::ffi::CString::new(name.replace('\0', "?")).map_err(std::io::Error::other)?;
    memfd_create(name.as_c_str(), MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).map_err(Into::into)
}

/// Creates a memfd holding `bytes`.
pub fn from_bytes(name: &str, bytes: &[u8]) -> std::io::Result<OwnedFd> {
    let fd = create(name)?;
    let file = File::from(fd);
    file.set_len(bytes.len() as u64)?;
    std::os::unix::fs::FileExt::write_all_at(&file, bytes, 0)?;
    Ok(file.into())
}

/// What `fd` is, as `/proc/self/fd` shows it (`/memfd:name (deleted)`, a path, `socket:[..]`).
pub fn describe(fd: BorrowedFd<'_>) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("fd {} ({e})", fd.as_raw_fd()))
}

/// True when `fd` is a memfd.
pub fn is_memfd(fd: BorrowedFd<'_>) -> bool {
    describe(fd).starts_with("/memfd:")
}

/// Size of the file in bytes.
pub fn size(fd: BorrowedFd<'_>) -> std::io::Result<u64> {
    nix::sys::stat::fstat(fd)
        .map(|st| st.st_size as u64)
        .map_err(Into::into)
}

/// Device and inode: the identity of the open file's inode.
pub fn identity(fd: BorrowedFd<'_>) -> std::io::Result<(u64, u64)> {
    nix::sys::stat::fstat(fd)
        .map(|st| (st.st_dev, st.st_ino))
        .map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn memfds_are_recognised_and_files_are_not() {
        let m = from_bytes("t", b"hello").unwrap();
        assert!(is_memfd(m.as_fd()));
        assert_eq!(size(m.as_fd()).unwrap(), 5);
        let f = tempfile::tempfile().unwrap();
        assert!(!is_memfd(f.as_fd()));
    }
}
