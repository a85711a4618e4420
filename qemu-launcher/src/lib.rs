//! `luo-qemu`: runs an unmodified QEMU VM that keeps running across the
//! host's kexec. Guest RAM lives in a memfd that luod preserves; at `freeze`
//! QEMU checkpoints its device state (`cpr-reboot` with `x-ignore-shared`)
//! into a second preserved memfd; in the new kernel the launcher claims both
//! and starts QEMU again with `-incoming defer` on the same memory.

pub mod config;
pub mod launcher;
pub mod qemu;
