//! Telling a kexec from a warm reset: the handover nonce.
//!
//! A copying backend with a real kexec (reserved memory) writes its handover
//! record into the reserved range at `freeze`. Memory that survives a reboot
//! through the firmware (a crash, a watchdog, `sysrq-b`: servers often keep
//! DRAM across a warm reset, QEMU always keeps guest RAM) shows that record
//! to the next boot too, and the boot id alone cannot tell that boot from
//! the kexec's. So `prepare` chooses a one-time nonce, records it in the
//! cycle and puts it on the target kernel's command line
//! (`luod.handover=NONCE`); a luod starting after another boot takes the
//! record as incoming only when `/proc/cmdline` carries that nonce. A record
//! that fails the test is stale: luod starts in `normal`, hands nothing out,
//! keeps the record's bytes in a file of its state directory and says so.
//!
//! A simulated kexec (file backend) has no command line and is taken as
//! before. A record without a nonce (format 1, or a LUO cycle whose target
//! luod did not load) is judged by boot id alone; the LUO backend also has
//! the kernel's own evidence: its record only comes back after a kexec.

use super::{Engine, EngineError, HostInfo, now};
use crate::record::{Event, Handover};
use crate::region::Region;
use crate::state::State;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The kernel command-line parameter that carries the cycle's nonce. The
/// dot makes the kernel take it for a module parameter of a module that
/// does not exist: it ignores it and does not pass it to init.
pub const HANDOVER_PARAM: &str = "luod.handover";

/// Action of the [`Event`] recorded when a stale handover is set aside.
pub const STALE_EVENT: &str = "stale-handover";

/// A new one-time nonce: 16 lowercase hex digits from `getrandom(2)`.
pub(super) fn new_nonce() -> Result<String, EngineError> {
    let mut bytes = [0u8; 8];
    // SAFETY: the pointer and length describe `bytes`, which is valid for
    // writes of 8 bytes for the whole call; flags 0 is the blocking default.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        let e = std::io::Error::last_os_error();
        return Err(EngineError::Io(format!(
            "cannot choose the handover nonce: getrandom failed ({e}); try prepare again"
        )));
    }
    Ok(super::hex(&bytes))
}

/// `cmdline` with `luod.handover=NONCE` as its last word, and without any
/// other `luod.handover=` (a `--reuse-cmdline` after an update carries the
/// previous cycle's).
pub fn stamp_cmdline(cmdline: &str, nonce: &str) -> String {
    let prefix = format!("{HANDOVER_PARAM}=");
    let base = if cmdline.split_whitespace().any(|w| w.starts_with(&prefix)) {
        cmdline
            .split_whitespace()
            .filter(|w| !w.starts_with(&prefix))
            .collect::<Vec<_>>()
            .join(" ")
    } else {
        cmdline.trim().to_string()
    };
    if base.is_empty() {
        format!("{prefix}{nonce}")
    } else {
        format!("{base} {prefix}{nonce}")
    }
}

/// The `luod.handover=` values on a command line.
fn nonces_in(cmdline: &str) -> Vec<&str> {
    let prefix = format!("{HANDOVER_PARAM}=");
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix(prefix.as_str()))
        .collect()
}

/// What a starting luod makes of the record's handover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Judgement {
    /// No handover, or one this same boot wrote (the kexec did not happen):
    /// luod restarted in the same kernel.
    SameBoot,
    /// This boot came from the handover's kexec (or its simulation).
    Incoming,
    /// Another boot wrote it, but this boot did not come from its kexec; the
    /// reason says what the command line showed.
    Stale(String),
}

/// Judges `handover` for the boot `host` describes.
pub(super) fn judge(handover: Option<&Handover>, host: &HostInfo) -> Judgement {
    let Some(h) = handover else {
        return Judgement::SameBoot;
    };
    if h.simulated {
        return Judgement::Incoming;
    }
    if h.boot_id == host.boot_id {
        return Judgement::SameBoot;
    }
    // No nonce: a format 1 record, or a target luod did not load (LUO
    // only): the boot id rule.
    let Some(nonce) = &h.nonce else {
        return Judgement::Incoming;
    };
    let found = nonces_in(&host.cmdline);
    if found.contains(&nonce.as_str()) {
        Judgement::Incoming
    } else if found.is_empty() {
        Judgement::Stale(format!("this boot's command line has no {HANDOVER_PARAM}={nonce}"))
    } else {
        let shown: Vec<String> = found.iter().map(|n| n.chars().take(64).collect()).collect();
        Judgement::Stale(format!(
            "this boot's command line carries {HANDOVER_PARAM}={}, not the record's {nonce}",
            shown.join(",")
        ))
    }
}

/// `nanos` since the epoch as `2026-11-30T01:02:03Z` (RFC 3339, UTC).
pub(super) fn utc(nanos: u64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(nanos);
    humantime::format_rfc3339_seconds(at).to_string()
}

/// Writes `bytes` to a new file `stale-handover-BOOT.record` in `dir`
/// (created 0700 if missing): mode 0600, `O_CREAT | O_EXCL | O_NOFOLLOW`,
/// so an existing file or link is never followed or overwritten (the next
/// free `stale-handover-BOOT.N.record` is taken instead).
fn keep_aside(dir: &Path, boot_id: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    // The boot id comes from the region: only its safe characters name the file.
    let safe: String = boot_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(64)
        .collect();
    let safe = if safe.is_empty() { "unknown".to_string() } else { safe };
    for i in 0..100 {
        let name = match i {
            0 => format!("stale-handover-{safe}.record"),
            _ => format!("stale-handover-{safe}.{i}.record"),
        };
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path);
        match file {
            Ok(mut f) => {
                if let Err(e) = f.write_all(bytes).and_then(|()| f.sync_all()) {
                    let _ = std::fs::remove_file(&path);
                    return Err(e);
                }
                return Ok(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        format!("stale-handover-{safe}.record and 99 numbered files beside it exist already"),
    ))
}

impl<R: Region> Engine<R> {
    /// A stale handover record: keep its bytes aside, say what was found,
    /// record the finding and go to `normal` with nothing preserved. No
    /// file is handed out and no subsystem restores anything.
    pub(super) fn set_aside_stale(&mut self, why: String) -> Result<(), EngineError> {
        let stale = self.record.clone();
        let Some(handover) = stale.handover.clone() else {
            return Ok(());
        };
        let kept = match (&self.state_dir, self.store.newest_record_bytes()) {
            (Some(dir), Some(bytes)) => keep_aside(dir, &handover.boot_id, bytes)
                .map_err(|e| format!("cannot write it to {}: {e}", dir.display())),
            (None, _) => Err("luod was given no state directory".to_string()),
            (_, None) => Err("the region returned no record bytes".to_string()),
        };
        let update = stale.update.as_ref();
        let cycle = update.map_or_else(|| "?".to_string(), |u| u.id.to_string());
        let when = update
            .and_then(|u| u.timestamps.reboot.or(u.timestamps.frozen))
            .map_or_else(|| "an unknown time".to_string(), utc);
        let files: usize = stale.sessions.iter().map(|s| s.fds.len()).sum();
        let kept_text = match &kept {
            Ok(path) => format!("the stale record is kept in {}", path.display()),
            Err(e) => format!(
                "the stale record could not be kept aside ({e}); it stays in the region until luod writes its next record"
            ),
        };
        let note = format!(
            "stale handover record not taken: it was written by boot {} (kernel {}) for update cycle {cycle}, handed over \
             at {when}, but this boot did not come from that kexec ({why}): a warm reset, crash or firmware reboot after \
             freeze. Nothing was handed out: the {files} preserved file(s) of its {} session(s) and its subsystem state \
             were not restored, and luod starts in normal; {kept_text}",
            handover.boot_id,
            handover.kernel_release,
            stale.sessions.len(),
        );
        tracing::error!("{note}");
        let mut next = stale;
        next.state = State::Normal;
        next.handover = None;
        next.update = None;
        next.sessions.clear();
        next.subsystems.clear();
        next.extents.clear();
        next.push_event(Event {
            at: now(),
            uid: 0,
            action: STALE_EVENT.into(),
            subject: format!("boot {}", handover.boot_id),
            detail: note.clone(),
        });
        self.commit(next)?;
        self.notes.push(note);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(boot_id: &str, cmdline: &str) -> HostInfo {
        HostInfo {
            boot_id: boot_id.into(),
            kernel_release: "r".into(),
            cmdline: cmdline.into(),
            started: 0,
        }
    }

    fn handover(nonce: Option<&str>, simulated: bool) -> Handover {
        Handover {
            boot_id: "old".into(),
            simulated,
            kernel_release: "r".into(),
            nonce: nonce.map(Into::into),
        }
    }

    #[test]
    fn stamping_replaces_an_earlier_nonce_and_keeps_the_rest() {
        assert_eq!(
            stamp_cmdline("console=ttyS0 quiet", "ab"),
            "console=ttyS0 quiet luod.handover=ab"
        );
        assert_eq!(
            stamp_cmdline("luod.handover=00 console=ttyS0  luod.handover=11 x", "ab"),
            "console=ttyS0 x luod.handover=ab"
        );
        assert_eq!(stamp_cmdline("  ", "ab"), "luod.handover=ab");
        // A parameter that merely starts alike is not ours.
        assert_eq!(
            stamp_cmdline("luod.handoverx=1", "ab"),
            "luod.handoverx=1 luod.handover=ab"
        );
    }

    #[test]
    fn nonces_are_16_hex_digits_and_differ() {
        let a = new_nonce().unwrap();
        let b = new_nonce().unwrap();
        assert_eq!(a.len(), 16);
        assert!(
            a.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
            "{a}"
        );
        assert_ne!(a, b);
    }

    #[test]
    fn the_judgement_follows_the_boot_id_simulation_and_nonce() {
        let h = handover(Some("n1"), false);
        assert_eq!(judge(None, &host("b", "")), Judgement::SameBoot);
        assert_eq!(judge(Some(&h), &host("b", "x luod.handover=n1")), Judgement::Incoming);
        assert_eq!(judge(Some(&h), &host("old", "")), Judgement::SameBoot);
        assert_eq!(
            judge(Some(&h), &host("b", "console=ttyS0")),
            Judgement::Stale("this boot's command line has no luod.handover=n1".into())
        );
        assert_eq!(
            judge(Some(&h), &host("b", "luod.handover=n0")),
            Judgement::Stale("this boot's command line carries luod.handover=n0, not the record's n1".into())
        );
        assert_eq!(judge(Some(&handover(None, false)), &host("b", "")), Judgement::Incoming);
        assert_eq!(
            judge(Some(&handover(Some("n1"), true)), &host("old", "")),
            Judgement::Incoming
        );
    }

    #[test]
    fn utc_formats_the_civil_date() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_768_471_200_000_000_000), "2026-01-15T10:00:00Z");
        assert_eq!(utc(951_782_400_000_000_000 + 3_661_000_000_000), "2000-02-29T01:01:01Z");
    }

    #[test]
    fn keeping_aside_never_overwrites_or_follows_a_link() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = keep_aside(&state, "1b2c-3d", b"one").unwrap();
        assert_eq!(first, state.join("stale-handover-1b2c-3d.record"));
        assert_eq!(std::fs::read(&first).unwrap(), b"one");
        assert_eq!(std::fs::metadata(&first).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
        let second = keep_aside(&state, "1b2c-3d", b"two").unwrap();
        assert_eq!(second, state.join("stale-handover-1b2c-3d.1.record"));
        assert_eq!(std::fs::read(&first).unwrap(), b"one");
        // A link planted under the next name is not followed.
        let target = dir.path().join("target");
        std::fs::write(&target, b"untouched").unwrap();
        std::os::unix::fs::symlink(&target, state.join("stale-handover-x.record")).unwrap();
        let third = keep_aside(&state, "../x", b"three").unwrap();
        assert_eq!(third, state.join("stale-handover-x.1.record"));
        assert_eq!(std::fs::read(&target).unwrap(), b"untouched");
    }
}
