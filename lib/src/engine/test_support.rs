//! Helpers the engine's test modules share.

use super::{HostInfo, now};

/// The host every engine test runs on unless it plays another boot.
pub(super) fn host() -> HostInfo {
    HostInfo {
        boot_id: "boot-1".into(),
        kernel_release: "6.19.0-test".into(),
        cmdline: "console=ttyS0".into(),
        started: now(),
    }
}

/// A file the image check takes for a bzImage (boot protocol 2.15).
pub(super) fn bzimage() -> tempfile::NamedTempFile {
    let image = tempfile::NamedTempFile::new().unwrap();
    let mut bz = vec![0u8; 0x400];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    std::fs::write(image.path(), &bz).unwrap();
    image
}
