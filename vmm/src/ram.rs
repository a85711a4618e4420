//! Guest RAM: a memfd (or any shared-mappable fd) mapped shared into this process.

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};
use nix::sys::stat::fstat;
use nix::unistd::ftruncate;

/// Creates a memfd of `size` bytes (zero-filled) to serve as guest RAM.
pub fn create_memfd(name: &str, size: usize) -> std::io::Result<OwnedFd> {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC)?;
    ftruncate(&fd, size as i64)?;
    Ok(fd)
}

/// The guest RAM mapping. The fd stays open as long as the mapping exists so
/// it can be handed to luod (or another process) at any time.
#[derive(Debug)]
pub struct GuestRam {
    ptr: NonNull<u8>,
    size: usize,
    fd: OwnedFd,
}

// SAFETY: GuestRam owns its mapping exclusively (nothing else in this process
// holds the pointer except KVM, which accesses it from the kernel); moving it
// to another thread moves that ownership.
unsafe impl Send for GuestRam {}

impl GuestRam {
    /// Maps the first `size` bytes of `fd` shared, read-write. The fd must be
    /// at least `size` bytes long (checked).
    pub fn map(fd: OwnedFd, size: usize) -> std::io::Result<Self> {
        let st = fstat(&fd)?;
        if (st.st_size as u64) < size as u64 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("RAM fd is {} bytes, {} needed", st.st_size, size),
            ));
        }
        let len = NonZeroUsize::new(size)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "RAM size 0"))?;
        // SAFETY: a fresh mapping (addr None) of a file we own, checked above to
        // be at least `size` bytes long, so every mapped page is backed; it
        // overlaps no existing Rust object.
        let ptr = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &fd,
                0,
            )?
        };
        Ok(GuestRam {
            ptr: ptr.cast(),
            size,
            fd,
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Host address of guest-physical address 0 (for `KVM_SET_USER_MEMORY_REGION`).
    pub fn host_addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// The backing fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The RAM as bytes. Only meaningful while no vCPU runs on it; the `Vm`
    /// API hands this out only from `&self`, while running needs `&mut self`.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is a live mapping of exactly `size` bytes owned by self;
        // the vCPU (the only other writer) runs only under `&mut Vm`, so no
        // write happens while this shared borrow lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.size) }
    }

    /// The RAM as mutable bytes (same conditions as [`GuestRam::as_slice`]).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and `&mut self` excludes every other borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.size) }
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: ptr/size are the mapping made in `map`; no slice borrowed from
        // it outlives `self`, and the VM using it was dropped first (Vm's field order).
        let _ = unsafe { munmap(self.ptr.cast(), self.size) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfd_maps_and_is_shared() {
        let fd = create_memfd("t", 8192).unwrap();
        let dup = fd.try_clone().unwrap();
        let mut ram = GuestRam::map(fd, 8192).unwrap();
        ram.as_mut_slice()[100] = 42;
        let other = GuestRam::map(dup, 8192).unwrap();
        assert_eq!(other.as_slice()[100], 42);
        assert_eq!(ram.size(), 8192);
    }

    #[test]
    fn too_small_fd_is_refused() {
        let fd = create_memfd("t", 4096).unwrap();
        let err = GuestRam::map(fd, 8192).unwrap_err();
        assert!(err.to_string().contains("4096 bytes, 8192 needed"), "{err}");
    }
}
