//! memfd helpers: create, recognise, size.

use super::KernelError;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

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

/// True when `fd` is a memfd: a file on the kernel's internal memfd mount.
/// The name is not enough (a file of any other filesystem, e.g. a FUSE one,
/// can be called `memfd:x`) and not needed: a memfd the kernel's LUO hands
/// back after a kexec is on that mount but shows as `/ (deleted)`. Reads
/// `/proc` only, never the file's filesystem.
pub fn is_memfd(fd: BorrowedFd<'_>) -> bool {
    let mounts = memfd_mounts();
    if mounts.is_empty() {
        // Without /proc/self/fdinfo, the name is all there is.
        return describe(fd).starts_with("/memfd:");
    }
    mount_id(fd).is_some_and(|id| mounts.contains(&id))
}

/// The id of the mount `fd`'s file is on (`mnt_id` in `/proc/self/fdinfo`),
/// read from `/proc`, never from the file's filesystem.
pub fn mount_id(fd: BorrowedFd<'_>) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|id| id.trim().parse().ok())
}

/// The kernel's internal mounts memfds live on (shmem, and hugetlbfs when
/// the kernel has it), learnt once from memfds of luod's own.
fn memfd_mounts() -> &'static [u64] {
    static MOUNTS: std::sync::OnceLock<Vec<u64>> = std::sync::OnceLock::new();
    MOUNTS.get_or_init(|| {
        [MFdFlags::MFD_CLOEXEC, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_HUGETLB]
            .into_iter()
            .filter_map(|flags| memfd_create(c"luod:probe", flags).ok())
            .filter_map(|fd| mount_id(fd.as_fd()))
            .collect()
    })
}

/// Refuses a memfd (or any `O_PATH` descriptor) that is not open read-write.
///
/// An `O_PATH` or write-only descriptor passes every other check but cannot
/// be read when its contents are copied at the handover, inside the
/// blackout; a read-only one would come back writable after the update
/// (every backend restores memfds read-write, as the kernel's memfd LUO
/// does). So only read-write is taken, at `session preserve`. A file that is
/// no memfd is left to the kernel's own refusal.
pub fn require_read_write(fd: BorrowedFd<'_>) -> Result<(), KernelError> {
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(|errno| KernelError::Sys {
        op: "fcntl(F_GETFL)".into(),
        errno,
    })?;
    let flags = OFlag::from_bits_truncate(flags);
    let mode = if flags.contains(OFlag::O_PATH) {
        "with O_PATH"
    } else if !is_memfd(fd) {
        return Ok(());
    } else {
        match flags & OFlag::O_ACCMODE {
            OFlag::O_RDWR => return Ok(()),
            OFlag::O_WRONLY => "write-only",
            _ => "read-only",
        }
    };
    Err(KernelError::NotReadWrite {
        what: describe(fd),
        mode,
    })
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

    #[test]
    fn memfds_are_recognised_and_files_are_not() {
        let m = from_bytes("t", b"hello").unwrap();
        assert!(is_memfd(m.as_fd()));
        assert_eq!(size(m.as_fd()).unwrap(), 5);
        let f = tempfile::tempfile().unwrap();
        assert!(!is_memfd(f.as_fd()));
        // The memfd mount is learnt, and a memfd is on it.
        assert!(!memfd_mounts().is_empty());
        assert!(memfd_mounts().contains(&mount_id(m.as_fd()).unwrap()));
    }

    fn reopen(fd: BorrowedFd<'_>, flags: OFlag) -> OwnedFd {
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        nix::fcntl::open(path.as_str(), flags | OFlag::O_CLOEXEC, nix::sys::stat::Mode::empty()).unwrap()
    }

    #[test]
    fn only_a_memfd_open_read_write_may_be_preserved() {
        let m = from_bytes("ram", b"hello").unwrap();
        require_read_write(m.as_fd()).unwrap();
        require_read_write(reopen(m.as_fd(), OFlag::O_RDWR).as_fd()).unwrap();
        for (flags, mode) in [
            (OFlag::O_PATH, "with O_PATH"),
            (OFlag::O_WRONLY, "write-only"),
            (OFlag::O_RDONLY, "read-only"),
        ] {
            let fd = reopen(m.as_fd(), flags);
            assert_eq!(
                require_read_write(fd.as_fd()).unwrap_err().to_string(),
                format!(
                    "cannot preserve /memfd:luod:ram (deleted): it is open {mode}; only a memfd open read-write \
                     (O_RDWR) can be preserved"
                )
            );
        }
        // Not a memfd: left to the kernel, which says only memfds are preserved.
        let f = tempfile::tempfile().unwrap();
        require_read_write(f.as_fd()).unwrap();
    }
}
