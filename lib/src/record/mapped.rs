//! Reading a preserved memfd through a mapping kept since its preserve.
//!
//! `pread` out of shmem runs far below memory speed (the kernel copies page
//! by page); a plain copy out of a mapping whose page tables are already
//! filled runs at it. A mapping is only safe to read while the file cannot
//! shrink under it: a read past the end of a file that shrank raises
//! `SIGBUS`, which would kill luod. So a memfd is mapped only when its seals
//! forbid shrinking (`F_SEAL_SHRINK`, which QEMU's `memory-backend-memfd`
//! sets by default, with `F_SEAL_GROW`): seals are never removed, so the
//! mapped length stays readable for as long as the mapping lives. Every other
//! file is read with `pread` (see the `BorrowedFd` impl of [`DataSource`]).
//!
//! The mapping is made, and its page tables filled (`MADV_POPULATE_READ`),
//! when the file is preserved, outside any blackout; it costs luod no memory
//! for the data (the pages are the memfd's own), only page tables (2 MiB per
//! GiB mapped with 4 KiB pages). Small files are not mapped (see
//! [`MAP_MIN`]): `pread` costs them little, and every mapping is an entry of
//! luod's address space, whose number is limited (`vm.max_map_count`).

use super::DataSource;
use memmap2::{Advice, Mmap, MmapOptions};
use std::os::fd::{AsRawFd, BorrowedFd};

/// Files smaller than this are read with `pread`, never mapped.
pub const MAP_MIN: u64 = 1 << 20;

/// A read-only mapping of a memfd that cannot shrink.
#[derive(Debug)]
pub struct SealedMapping {
    map: Mmap,
}

/// True when `fd`'s seals forbid shrinking it.
pub fn shrink_sealed(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: F_GET_SEALS takes no argument and only reads the descriptor's
    // seals; an invalid or unsealable descriptor gives -1 (EBADF, EINVAL).
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_SHRINK != 0
}

impl SealedMapping {
    /// Maps `fd` whole (its size now) with its page tables filled, when it
    /// is sealed against shrinking and holds at least [`MAP_MIN`] bytes;
    /// `None` otherwise, or when the mapping fails (the file is then read
    /// with `pread`, as any other).
    pub fn of(fd: BorrowedFd<'_>) -> Option<SealedMapping> {
        if !shrink_sealed(fd) {
            return None;
        }
        let len = nix::sys::stat::fstat(fd).ok()?.st_size as u64;
        if len < MAP_MIN {
            return None;
        }
        let len = usize::try_from(len).ok()?;
        // SAFETY: the file is sealed against shrinking (checked above; seals
        // are never removed), so all `len` bytes mapped stay backed by the
        // file for the mapping's whole life and a read never faults past its
        // end. Writes by others through their own mappings may race with our
        // reads; the bytes read are then some mix of old and new, which is
        // what `pread` of a file being written gives too: no undefined
        // behaviour in luod, which only ever copies these bytes.
        let map = unsafe { MmapOptions::new().len(len).map(fd.as_raw_fd()) }.ok()?;
        // Fill the page tables now, not during the copy. A failure only
        // means the copy faults the pages in itself.
        if let Err(e) = map.advise(Advice::PopulateRead) {
            tracing::debug!("MADV_POPULATE_READ of a preserved memfd failed: {e}");
        }
        Some(SealedMapping { map })
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when nothing is mapped (never, as made by [`of`](Self::of)).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// A preserved file as a data source: read through its mapping where it has
/// one, with `pread` elsewhere (past the mapped length, if it grew, or when
/// it has no mapping). The size is the file's as it is now, as for `pread`.
#[derive(Debug, Clone, Copy)]
pub struct PreservedSource<'a> {
    /// The file.
    pub fd: BorrowedFd<'a>,
    /// Its mapping, if it has one.
    pub map: Option<&'a SealedMapping>,
}

impl DataSource for PreservedSource<'_> {
    fn data_len(&self) -> u64 {
        self.fd.data_len()
    }
    fn read_into(&self, dst: &mut [u8]) -> std::io::Result<()> {
        let len = nix::sys::stat::fstat(self.fd)?.st_size as u64;
        if len != dst.len() as u64 {
            return Err(super::size_changed(len, dst.len()));
        }
        self.read_at(0, dst)
    }
    fn can_read_at(&self) -> bool {
        true
    }
    fn read_at(&self, offset: u64, dst: &mut [u8]) -> std::io::Result<()> {
        let Some(map) = self.map else {
            return self.fd.read_at(offset, dst);
        };
        let mapped = map.map.len() as u64;
        let split = mapped.saturating_sub(offset).min(dst.len() as u64) as usize;
        let (head, tail) = dst.split_at_mut(split);
        if !head.is_empty() {
            let start = offset as usize;
            head.copy_from_slice(&map.map[start..start + head.len()]);
        }
        if !tail.is_empty() {
            self.fd.read_at(offset + split as u64, tail)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::memfd::{MFdFlags, memfd_create};
    use std::os::fd::{AsFd, OwnedFd};

    fn memfd(len: usize, seals: libc::c_int) -> OwnedFd {
        let fd = memfd_create("mapped-test", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap();
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        nix::sys::uio::pwrite(&fd, &bytes, 0).unwrap();
        if seals != 0 {
            // SAFETY: F_ADD_SEALS with an int of seal flags on our own memfd.
            assert_eq!(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) }, 0);
        }
        fd
    }

    #[test]
    fn only_a_file_sealed_against_shrinking_and_big_enough_is_mapped() {
        let len = MAP_MIN as usize;
        assert!(SealedMapping::of(memfd(len, 0).as_fd()).is_none());
        assert!(SealedMapping::of(memfd(len, libc::F_SEAL_GROW).as_fd()).is_none());
        assert!(SealedMapping::of(memfd(len - 1, libc::F_SEAL_SHRINK).as_fd()).is_none());
        let fd = memfd(len, libc::F_SEAL_SHRINK);
        assert_eq!(SealedMapping::of(fd.as_fd()).map(|m| m.len()), Some(len));
        // The seal is what makes it safe: the file cannot be cut short.
        assert_eq!(nix::unistd::ftruncate(&fd, 0), Err(nix::errno::Errno::EPERM));
    }

    #[test]
    fn reads_match_pread_inside_and_past_the_mapping_of_a_file_that_grew() {
        let len = MAP_MIN as usize + 100;
        let fd = memfd(len, libc::F_SEAL_SHRINK);
        let map = SealedMapping::of(fd.as_fd()).unwrap();
        // It grows after it was mapped: the new bytes come by pread.
        nix::sys::uio::pwrite(&fd, &[7u8; 5000], len as i64).unwrap();
        let source = PreservedSource {
            fd: fd.as_fd(),
            map: Some(&map),
        };
        let plain = PreservedSource {
            fd: fd.as_fd(),
            map: None,
        };
        assert_eq!(source.data_len(), len as u64 + 5000);
        for (offset, n) in [(0, 4096), (len as u64 - 10, 2000), (len as u64 + 1, 4000), (12345, 1)] {
            let mut a = vec![0u8; n];
            let mut b = vec![0u8; n];
            source.read_at(offset, &mut a).unwrap();
            plain.read_at(offset, &mut b).unwrap();
            assert_eq!(a, b, "{n} bytes at {offset}");
        }
        let mut whole = vec![0u8; len + 5000];
        source.read_into(&mut whole).unwrap();
        let mut short = vec![0u8; len];
        let err = source.read_into(&mut short).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "the source is {} bytes but {len} were expected: it changed size during the write",
                len + 5000
            )
        );
    }
}
