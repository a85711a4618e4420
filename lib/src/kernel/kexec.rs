//! kexec: loading the target kernel with `kexec_file_load(2)` and rebooting
//! into it with `reboot(LINUX_REBOOT_CMD_KEXEC)`.
//!
//! `kexec_file_load` (not the old `kexec_load`) is what KHO and LUO need: the
//! kernel parses the image itself, so a bad image fails at load time, which
//! luod does at `prepare`.

use super::{KernelError, KernelLoad};
use nix::errno::Errno;
use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `KEXEC_FILE_UNLOAD`.
const KEXEC_FILE_UNLOAD: libc::c_ulong = 0x1;
/// `KEXEC_FILE_NO_INITRAMFS`.
const KEXEC_FILE_NO_INITRAMFS: libc::c_ulong = 0x4;

/// What `kexec_file_load`'s errno means, for a person.
pub fn explain_load_errno(errno: Errno) -> String {
    let why = match errno {
        Errno::ENOEXEC => "the running kernel cannot kexec this image (not a bzImage, or wrong architecture)",
        Errno::EPERM => {
            "kexec is not permitted (needs CAP_SYS_BOOT; kernel.kexec_load_disabled or lockdown may forbid it)"
        }
        Errno::EKEYREJECTED | Errno::EBADMSG | Errno::ENOKEY => {
            "the image's signature was rejected (the kernel enforces signed kexec images)"
        }
        Errno::EBUSY => "another kexec load is in progress",
        Errno::ENOSYS => "the running kernel has no kexec_file_load (CONFIG_KEXEC_FILE is off)",
        Errno::ENOMEM => "not enough memory to stage the image",
        Errno::EINVAL => "the kernel refused the arguments (command line too long, or a bad initrd)",
        Errno::EFBIG | Errno::E2BIG => "the image or initrd is too large",
        _ => "",
    };
    if why.is_empty() {
        format!("{errno} ({})", errno.desc())
    } else {
        format!("{why} ({errno})")
    }
}

/// Loads the kernel image (and initrd) `load` names for the next
/// `reboot(KEXEC)`, with `kexec_file_load(2)` on the descriptors.
pub fn load(load: &KernelLoad<'_>) -> Result<(), KernelError> {
    let err = |reason: String| KernelError::Load {
        path: load.kernel_name.to_string(),
        reason,
    };
    let cmdline = CString::new(load.cmdline).map_err(|_| err("the command line contains a NUL byte".into()))?;
    let cmdline_len = cmdline.as_bytes_with_nul().len();
    let (initrd_fd, flags) = match load.initrd {
        Some(f) => (f.as_raw_fd(), 0),
        None => (-1, KEXEC_FILE_NO_INITRAMFS),
    };
    // SAFETY: the fds are borrowed from `load` for the duration of the call,
    // so they stay open; `cmdline` is a NUL-terminated buffer of
    // `cmdline_len` bytes that outlives the call; the kernel only reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            load.kernel.as_raw_fd(),
            initrd_fd,
            cmdline_len,
            cmdline.as_ptr(),
            flags,
        )
    };
    if rc != 0 {
        let errno = Errno::last();
        let policy = super::sigpolicy::SignaturePolicy::current(std::path::Path::new("/sys"));
        if let Some(reason) = policy.explain_refusal(errno) {
            return Err(KernelError::SignatureRejected {
                path: load.kernel_name.to_string(),
                reason,
            });
        }
        return Err(err(explain_load_errno(errno)));
    }
    Ok(())
}

/// Reads `buf.len()` bytes at `offset` with `pread` (the file offset does
/// not matter); fewer at the end of the file.
fn pread_full(image: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> Result<usize, Errno> {
    let mut got = 0;
    while got < buf.len() {
        match nix::sys::uio::pread(image, &mut buf[got..], (offset + got as u64) as libc::off_t) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// The kernel version string of an x86 bzImage, from its setup header: the
/// `kernel_version` field (offset 0x20E, boot protocol 2.00+) points, less
/// 0x200, to a NUL-terminated string such as `6.1.0-18-amd64
/// (debian-kernel@lists.debian.org) #1 SMP PREEMPT_DYNAMIC Debian 6.1.76-1
/// (2024-02-01)`: the release (`uname -r`), who built it, then the build's
/// version (`uname -v`). `None` when the image has no such string.
pub fn image_version(image: BorrowedFd<'_>) -> Result<Option<String>, Errno> {
    let mut header = [0u8; 0x210];
    if pread_full(image, &mut header, 0)? < header.len() || &header[0x202..0x206] != b"HdrS" {
        return Ok(None);
    }
    let pointer = u16::from_le_bytes([header[0x20e], header[0x20f]]);
    if pointer == 0 {
        return Ok(None);
    }
    let mut text = [0u8; 512];
    let n = pread_full(image, &mut text, u64::from(pointer) + 0x200)?;
    let Some(end) = text[..n].iter().position(|&b| b == 0) else {
        return Ok(None);
    };
    let s = &text[..end];
    if s.is_empty() || !s.iter().all(|&b| (0x20..0x7f).contains(&b)) {
        return Ok(None);
    }
    Ok(Some(String::from_utf8_lossy(s).into_owned()))
}

/// Whether the version string of an image header (see [`image_version`])
/// names the running kernel, given `uname -r` and `uname -v`: its first word
/// is the release and it ends with the build's version.
pub fn version_is_running(header: &str, release: &str, version: &str) -> bool {
    header.split(' ').next() == Some(release) && !version.is_empty() && header.ends_with(version)
}

/// Checks that `image` is an x86 bzImage (boot protocol 2.06 or later), the
/// check `kexec_file_load` would make first. Reads its first 0x210 bytes
/// with `pread`, so the file offset does not matter; `name` is what the
/// client calls it.
pub fn check_image(name: &str, image: BorrowedFd<'_>) -> Result<(), KernelError> {
    let load_err = |reason: String| KernelError::Load {
        path: name.to_string(),
        reason,
    };
    let mut header = [0u8; 0x210];
    let mut got = 0;
    while got < header.len() {
        match nix::sys::uio::pread(image, &mut header[got..], got as libc::off_t) {
            Ok(0) => return Err(load_err("the file is too short to be a kernel image".into())),
            Ok(n) => got += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(load_err(format!("cannot read it: {e} ({})", e.desc()))),
        }
    }
    if &header[0x202..0x206] != b"HdrS" {
        return Err(load_err(
            "not a bzImage (no \"HdrS\" boot header at offset 0x202)".into(),
        ));
    }
    let version = u16::from_le_bytes([header[0x206], header[0x207]]);
    if version < 0x0206 {
        return Err(load_err(format!(
            "boot protocol {}.{:02} is too old for kexec_file_load (need 2.06)",
            version >> 8,
            version & 0xff
        )));
    }
    Ok(())
}

/// Unloads a loaded kexec image (`KEXEC_FILE_UNLOAD`).
pub fn unload() -> Result<(), KernelError> {
    // SAFETY: with KEXEC_FILE_UNLOAD the kernel ignores the fds and the
    // command line; no memory is passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            -1,
            -1,
            0,
            std::ptr::null::<u8>(),
            KEXEC_FILE_UNLOAD,
        )
    };
    if rc != 0 {
        return Err(KernelError::Sys {
            op: "kexec_file_load(KEXEC_FILE_UNLOAD)".into(),
            errno: Errno::last(),
        });
    }
    Ok(())
}

/// True when a kexec image is loaded (`/sys/kernel/kexec_loaded`).
pub fn loaded() -> bool {
    std::fs::read_to_string("/sys/kernel/kexec_loaded").is_ok_and(|s| s.trim() == "1")
}

/// Syncs filesystems and kexecs into the loaded image. Returns only on failure.
pub fn reboot_into_loaded() -> KernelError {
    nix::unistd::sync();
    match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_KEXEC) {
        Ok(never) => match never {},
        Err(Errno::EINVAL) => KernelError::Reboot("no kexec image is loaded (EINVAL)".into()),
        Err(Errno::EPERM) => KernelError::Reboot("reboot(LINUX_REBOOT_CMD_KEXEC) needs CAP_SYS_BOOT (EPERM)".into()),
        Err(e) => KernelError::Reboot(format!("reboot(LINUX_REBOOT_CMD_KEXEC): {e} ({})", e.desc())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// A bzImage header whose version string is `v` (empty: no pointer).
    pub(crate) fn bzimage_with_version(v: &str) -> Vec<u8> {
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        if !v.is_empty() {
            bz[0x20e..0x210].copy_from_slice(&0x0100u16.to_le_bytes());
            bz.resize(0x300 + v.len() + 1 + 0x100, 0);
            bz[0x300..0x300 + v.len()].copy_from_slice(v.as_bytes());
        }
        bz
    }

    #[test]
    fn the_version_string_comes_from_the_setup_header() {
        let v = "7.3.0-luo (root@build) #1 SMP PREEMPT_DYNAMIC Sat Nov 28 10:00:00 UTC 2026";
        let f = tempfile::tempfile().unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &bzimage_with_version(v), 0).unwrap();
        assert_eq!(image_version(f.as_fd()).unwrap().as_deref(), Some(v));
        assert!(version_is_running(
            v,
            "7.3.0-luo",
            "#1 SMP PREEMPT_DYNAMIC Sat Nov 28 10:00:00 UTC 2026"
        ));
        assert!(!version_is_running(
            v,
            "7.3.0-luo",
            "#2 SMP PREEMPT_DYNAMIC Sat Nov 28 11:00:00 UTC 2026"
        ));
        assert!(!version_is_running(
            v,
            "7.3.1-luo",
            "#1 SMP PREEMPT_DYNAMIC Sat Nov 28 10:00:00 UTC 2026"
        ));
        let none = tempfile::tempfile().unwrap();
        std::os::unix::fs::FileExt::write_all_at(&none, &bzimage_with_version(""), 0).unwrap();
        assert_eq!(image_version(none.as_fd()).unwrap(), None);
        let short = tempfile::tempfile().unwrap();
        assert_eq!(image_version(short.as_fd()).unwrap(), None);
    }
}
