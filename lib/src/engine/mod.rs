//! The engine: luod's logic without the socket.
//!
//! It owns the kernel interface, the subsystem registry, the record store and
//! the current record. Every request goes through one method that either
//! succeeds and persists a new record generation, or fails and leaves the
//! record and the kernel as they were.

mod capacity;
mod error;
mod handover;
mod images;
mod quotas;
mod reclaim;
mod rollback;
mod sessions;
mod snapshot;
mod startup;
mod transitions;
mod unreadable;
mod vms;

pub use capacity::RegionCapacity;
pub use error::EngineError;
pub use handover::{HANDOVER_PARAM, STALE_EVENT, stamp_cmdline};
pub use images::MAX_IMAGE_SIZE;
pub use quotas::{Quota, Quotas, SESSION_EVICTED, SESSION_FINISHED_BY_ROOT};
pub use rollback::{AfterValidation, HOOK_EVENT, RollbackConfig};
pub use snapshot::Snapshot;
pub use startup::{HostInfo, StartOptions};
pub use transitions::Rebooted;
pub use vms::{Claimed, KVM, Kvm, SharedVms, VmSaved, VmTable, vm_session};

/// Exit status of luod after a simulated kexec (documented in the README).
pub const SIMULATED_KEXEC_EXIT: i32 = 75;

use crate::kernel::Kernel;
use crate::protocol::{CheckItem, CheckReport, CycleSummary, PrepareArgs, StatusReport};
use crate::record::{Cycle, HandoverRecord, RecordStore, UnixNanos};
use crate::region::Region;
use crate::state::{Event, State};
use crate::subsystem::Registry;
use std::os::fd::OwnedFd;

/// Who is asking, from the socket's peer credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// Peer uid.
    pub uid: u32,
    /// Peer pid.
    pub pid: i32,
    /// Root or `CAP_SYS_BOOT`: may drive transitions and see every session.
    pub privileged: bool,
}

impl Caller {
    /// The engine itself (tests, startup).
    pub const ROOT: Caller = Caller {
        uid: 0,
        pid: 0,
        privileged: true,
    };
}

/// Nanoseconds since the Unix epoch, now.
pub fn now() -> UnixNanos {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// luod's logic.
pub struct Engine<R: Region> {
    kernel: Box<dyn Kernel>,
    registry: Registry,
    store: RecordStore<R>,
    record: HandoverRecord,
    generation: u64,
    host: HostInfo,
    notes: Vec<String>,
    cmdline_needs: Vec<String>,
    handed_over: bool,
    vms: Option<SharedVms>,
    /// Where a stale handover record is kept aside (see `handover.rs`).
    state_dir: Option<std::path::PathBuf>,
    /// Set while the region holds no readable record but is not blank.
    unreadable: Option<unreadable::Unreadable>,
    quotas: Quotas,
    /// Operator hooks (none in tests that do not set them).
    hooks: Option<crate::hooks::Hooks>,
    /// Rollback settings.
    rollback: RollbackConfig,
    /// VMs a rollback from `updated` carries (never claimed in this kernel).
    carried_vms: Vec<VmSaved>,
    /// What VMMs reported about their VMs (memory only).
    vm_notes: vms::VmNotes,
    /// Where sysfs is (the kexec signature policy is read there).
    sysfs_root: std::path::PathBuf,
    /// The record as snapshots share it (see `snapshot.rs`).
    snap: std::sync::Mutex<Option<snapshot::SnapBase>>,
    /// (session position, token) of every file in the record, as of a
    /// generation, so `session preserve` finds a taken token without a scan.
    tokens: Option<(u64, std::collections::HashSet<(u32, u64)>)>,
}

impl<R: Region> std::fmt::Debug for Engine<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("state", &self.record.state)
            .field("backend", &self.kernel.name())
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl<R: Region> Engine<R> {
    /// The current state.
    pub fn state(&self) -> State {
        self.record.state
    }

    /// The current record (read-only).
    pub fn record(&self) -> &HandoverRecord {
        &self.record
    }

    /// Generation of the newest record written or read.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Notes from startup.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Parameters the target kernel's command line must carry for this
    /// backend (`liveupdate=on`, the same `memmap=`): `prepare` refuses a
    /// command line without them, `--reuse-cmdline` adds them, `check`
    /// reports them.
    pub fn set_cmdline_needs(&mut self, needs: Vec<String>) {
        self.cmdline_needs = needs;
    }

    /// Parameters of `cmdline` luod needs but does not find there. A
    /// `memmap=` need is met by any spelling of the same range.
    pub fn missing_in_cmdline(&self, cmdline: &str) -> Vec<String> {
        use crate::kernel::reserved::{parse_memmap, ranges_in_cmdline};
        let words: Vec<&str> = cmdline.split_whitespace().collect();
        let ranges = ranges_in_cmdline(cmdline).unwrap_or_default();
        self.cmdline_needs
            .iter()
            .filter(|need| match need.strip_prefix("memmap=").map(parse_memmap) {
                Some(Ok(range)) => !ranges.contains(&range),
                _ => !words.contains(&need.as_str()),
            })
            .cloned()
            .collect()
    }

    /// Adds a note for `status` (something the operator should know about
    /// how luod started).
    pub fn add_note(&mut self, note: String) {
        self.notes.push(note);
    }

    /// Stops the engine and returns its record store (the region outlives
    /// luod, as it outlives a kexec).
    pub fn into_store(self) -> RecordStore<R> {
        self.store
    }

    /// Writes `next` as the new record generation (no data) and adopts it.
    fn commit(&mut self, mut next: HandoverRecord) -> Result<u64, EngineError> {
        next.extents.clear();
        for s in &mut next.sessions {
            for f in &mut s.fds {
                f.data = None;
            }
        }
        let report = self.store.write(&mut next, &[])?;
        self.record = next;
        self.generation = report.generation;
        Ok(report.generation)
    }

    /// True once `reboot` handed over (a simulated kexec): luod is exiting.
    pub fn handed_over(&self) -> bool {
        self.handed_over
    }

    /// Refuses every change once the handover is written and the kexec
    /// (real or simulated) is under way: the record in the region is final.
    /// Refuses every change, too, while the record is unreadable.
    fn require_live(&self) -> Result<(), EngineError> {
        if self.handed_over {
            Err(EngineError::HandedOver)
        } else {
            self.require_readable()
        }
    }

    fn require_privileged(caller: &Caller, what: &'static str) -> Result<(), EngineError> {
        if caller.privileged {
            Ok(())
        } else {
            Err(EngineError::NotPrivileged(what))
        }
    }

    /// `status`: everything a caller may see.
    pub fn status(&self, caller: &Caller) -> StatusReport {
        self.snapshot().status(caller)
    }

    /// `history`: past cycles, oldest first.
    pub fn history(&self) -> Vec<Cycle> {
        self.record.history.clone()
    }

    /// `check`: what `prepare` with `args` (and the images `fds` carries)
    /// would find. Changes nothing. The images are read whole (for their
    /// digest) only for a caller that may prepare: anyone else learns whether
    /// they would load, without keeping luod busy reading gigabytes.
    pub fn check(&self, caller: &Caller, args: &PrepareArgs, fds: Vec<OwnedFd>) -> CheckReport {
        // Before anything touches them (or drops them): a file of a FUSE
        // filesystem could block luod.
        let fds = images::screen(fds, caller.pid, |i| images::describe(args, i));
        let mut items = Vec::new();
        let mut item = |name: &str, ok: bool, detail: String| {
            items.push(CheckItem {
                name: name.into(),
                ok,
                detail,
            })
        };
        let state_ok = Event::Prepare.allowed_from().contains(&self.record.state);
        item(
            "state",
            state_ok,
            if state_ok {
                "normal: prepare is allowed".into()
            } else {
                format!("state is {}: prepare needs normal", self.record.state)
            },
        );
        item(
            "privilege",
            caller.privileged,
            if caller.privileged {
                "caller may drive transitions".into()
            } else {
                "transitions need root or CAP_SYS_BOOT".into()
            },
        );
        if let Some(path) = self.kernel.reboot_path() {
            item("reboot path", true, format!("{}: {}", path.name(), path.describe()));
        }
        let images = fds.and_then(|fds| images::take("check", args, fds));
        let on_target = match &images {
            Ok(Some(images)) if caller.privileged => Some(self.on_target(images)),
            Ok(Some(_)) => Some((
                false,
                "not compared: the image is digested only for a caller that may prepare".to_string(),
            )),
            _ => None,
        };
        let target = images
            .and_then(|images| self.target_from(args, images))
            .and_then(|t| self.require_target(t));
        let digest = |t: &transitions::Target| -> Result<String, EngineError> {
            if !caller.privileged {
                return Ok(format!(
                    "{} is a kernel image luod can load ({} bytes; digested only for a caller that may prepare), cmdline {:?}",
                    t.images.kernel.name,
                    t.images.kernel.size(),
                    stamp_cmdline(&t.cmdline, "<nonce>")
                ));
            }
            t.verify_pins(args)?;
            let img = t.record()?;
            let pinned = match (args.kernel_sha256.is_some(), args.initrd_sha256.is_some()) {
                (true, true) => "; kernel and initrd match their pinned sha256",
                (true, false) => "; matches the pinned sha256",
                (false, true) => "; the initrd matches its pinned sha256",
                (false, false) => "",
            };
            Ok(format!(
                "{} loads (sha256 {}{pinned}), cmdline {:?} (prepare chooses the nonce: a boot whose command line \
                 lacks it never takes the update's handover)",
                img.kernel,
                hex(&img.kernel_sha256),
                stamp_cmdline(&img.cmdline, "<nonce>")
            ))
        };
        match target {
            Ok(None) => item(
                "target kernel",
                true,
                if self.kernel.simulates_kexec() {
                    "none given: the simulated kexec needs none".into()
                } else {
                    "none given: a kexec image is loaded already".into()
                },
            ),
            Ok(Some(t)) => match digest(&t) {
                Ok(detail) => item("target kernel", true, detail),
                Err(e) => item("target kernel", false, e.to_string()),
            },
            Err(e) => item("target kernel", false, e.to_string()),
        }
        let already_on_target = on_target.as_ref().is_some_and(|(yes, _)| *yes);
        if let Some((_, detail)) = on_target {
            item("running kernel", true, detail);
        }
        let policy = crate::kernel::sigpolicy::SignaturePolicy::current(&self.sysfs_root);
        let disabled = policy.kexec_load_disabled == Some(true) && !self.kernel.simulates_kexec();
        item(
            "kexec signatures",
            !disabled,
            if disabled {
                format!(
                    "kernel.kexec_load_disabled is 1: no kernel can be loaded until the next boot; {}",
                    policy.describe()
                )
            } else {
                policy.describe()
            },
        );
        let target_cmdline = match (&args.cmdline, args.reuse_cmdline) {
            (Some(c), _) => c.clone(),
            (None, _) => self.host.cmdline.clone(),
        };
        let missing = self.missing_in_cmdline(&target_cmdline);
        item(
            "command line",
            missing.is_empty() || (args.cmdline.is_none() && args.reuse_cmdline),
            match (missing.is_empty(), args.cmdline.is_some()) {
                (true, _) if self.cmdline_needs.is_empty() => "the backend needs nothing on it".into(),
                (true, _) => format!("carries what the backend needs: {}", self.cmdline_needs.join(" ")),
                (false, true) => format!("--cmdline lacks {}, which the backend needs", missing.join(" ")),
                (false, false) => format!(
                    "the running command line lacks {}: --reuse-cmdline adds it; both kernels need it",
                    missing.join(" ")
                ),
            },
        );
        if let Some(u) = &self.unreadable {
            item(
                "record",
                false,
                format!(
                    "cannot be read ({}): restore the region, or `luoctl discard-record --yes`",
                    u.finding
                ),
            );
        }
        let (files, bytes) = self.preserved_totals();
        if self.kernel.handoff() == crate::kernel::Handoff::Copy {
            let capacity = self.store.data_capacity();
            item(
                "region capacity",
                bytes <= capacity,
                format!("{files} preserved file(s), {bytes} bytes; the region holds {capacity} bytes of data"),
            );
        } else {
            item(
                "preserved files",
                true,
                format!("{files} preserved file(s), {bytes} bytes, carried by the kernel"),
            );
        }
        let (ok, detail) = self.record_room(files);
        item("record room", ok, detail);
        let ok = items.iter().all(|i| i.ok);
        CheckReport {
            ok,
            items,
            already_on_target,
        }
    }

    /// Where sysfs is mounted (default `/sys`): the kexec signature policy
    /// `check` shows is read there.
    pub fn set_sysfs_root(&mut self, root: std::path::PathBuf) {
        self.sysfs_root = root;
    }

    /// The kernel the running one came from by the last update: the target
    /// of the cycle in `updated`, else of the last finished cycle (`None`
    /// inside: that update loaded no image). `None`: no update yet.
    fn last_loaded(&self) -> Option<(u64, Option<&crate::record::KernelImage>)> {
        if self.record.state == State::Updated
            && let Some(u) = &self.record.update
        {
            return Some((u.id, u.target.as_ref()));
        }
        self.record
            .history
            .iter()
            .rev()
            .find(|c| c.outcome == crate::record::Outcome::Finished)
            .map(|c| (c.id, c.target.as_ref()))
    }

    /// Whether the kernel image of `images` is the running kernel: the
    /// version string of its header is the running kernel's (`uname -r`,
    /// `uname -v`), and its SHA-256 is that of the kernel the last update
    /// loaded. Reads the image whole. The detail says why.
    fn on_target(&self, images: &images::Images) -> (bool, String) {
        let k = &images.kernel;
        let (release, build) = nix::sys::utsname::uname()
            .map(|u| {
                (
                    u.release().to_string_lossy().into_owned(),
                    u.version().to_string_lossy().into_owned(),
                )
            })
            .unwrap_or_default();
        let running = format!("{release} {build}");
        let header = match crate::kernel::kexec::image_version(k.fd()) {
            Ok(Some(v)) => v,
            Ok(None) => {
                return (
                    false,
                    format!(
                        "{} has no version string in its header: not known to be the running kernel",
                        k.name
                    ),
                );
            }
            Err(e) => {
                return (
                    false,
                    format!("cannot read the header of {}: {e} ({})", k.name, e.desc()),
                );
            }
        };
        if !crate::kernel::kexec::version_is_running(&header, &release, &build) {
            return (
                false,
                format!(
                    "{} is not the running kernel: it is {header:?}, the running one {running:?}",
                    k.name
                ),
            );
        }
        let digest = match k.sha256() {
            Ok(d) => d,
            Err(e) => return (false, e.to_string()),
        };
        match self.last_loaded() {
            Some((id, Some(img))) if img.kernel_sha256 == digest => (
                true,
                format!(
                    "{} is the running kernel: its version {header:?} is the running one's, and its sha256 {} is \
                     that of the kernel cycle {id} loaded ({}): already on target",
                    k.name,
                    hex(&digest),
                    img.kernel
                ),
            ),
            Some((id, Some(img))) => (
                false,
                format!(
                    "{} has the running kernel's version {release}, but its sha256 {} is not {} of the kernel cycle \
                     {id} loaded ({}): not known to be the running image",
                    k.name,
                    hex(&digest),
                    hex(&img.kernel_sha256),
                    img.kernel
                ),
            ),
            Some((id, None)) => (
                false,
                format!(
                    "{} has the running kernel's version {release}, but cycle {id}, the last update, loaded no \
                     image to compare its sha256 with: not known to be the running image",
                    k.name
                ),
            ),
            None => (
                false,
                format!(
                    "{} has the running kernel's version {release}, but no update has loaded a kernel on this host \
                     yet, so there is no sha256 to compare it with: not known to be the running image",
                    k.name
                ),
            ),
        }
    }

    /// The `check` item on what caps the number of preserved files: the
    /// record's slot (and the payload limit), and the open files luod may
    /// hold (it keeps every preserved file open). Not ok past 90 % of
    /// either, so the cap shows before it is hit.
    fn record_room(&self, files: u64) -> (bool, String) {
        let flag = if self.kernel.handoff() == crate::kernel::Handoff::Copy {
            "--region-size (for a new region)"
        } else {
            "--record-size (for a new record memfd)"
        };
        let mut ok = true;
        let mut detail = match self.store.slot_use() {
            Some(u) => {
                let payload = u.record.saturating_sub(crate::record::HEADER_LEN as u64);
                let cap = u.slot.min(crate::record::MAX_RECORD_LEN);
                let per_file = payload.checked_div(files).map_or(8, |b| b + 1);
                let more = cap.saturating_sub(payload) / per_file.max(1);
                ok &= payload.saturating_mul(10) <= cap.saturating_mul(9);
                format!(
                    "the record takes {payload} bytes of payload (at most {cap}: the {}-byte slot, the {} MiB \
                     payload limit) and {} bytes of journal ({} entr(ies)); at {per_file} bytes per file about \
                     {more} more file(s) fit ({flag})",
                    u.slot,
                    crate::record::MAX_RECORD_LEN >> 20,
                    u.journal,
                    u.journal_entries,
                )
            }
            None => format!(
                "no record written yet; its slot is {} bytes ({flag})",
                self.store.slot_len()
            ),
        };
        if let Ok((soft, _)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
            // Its own descriptor and, on backends that do not share it with
            // the park, the duplicate it keeps of what it parked (the park's
            // holder keeps one more, in its own process).
            let per_file = self.kernel.descriptors_per_file();
            let held = files.saturating_mul(per_file);
            ok &= held.saturating_mul(10) <= soft.saturating_mul(9);
            let times = if per_file == 1 { "once" } else { "twice" };
            detail.push_str(&format!(
                "; luod holds each of the {files} preserved file(s) open {times} ({held} descriptor(s)), of its \
                 limit of {soft} open files (RLIMIT_NOFILE, LimitNOFILE= in its unit)"
            ));
        }
        (ok, detail)
    }

    /// Number and total size of the files preserved now.
    fn preserved_totals(&self) -> (u64, u64) {
        let mut files = 0;
        let mut bytes = 0;
        for (_, _, fd) in self.kernel.preserved() {
            files += 1;
            bytes += crate::kernel::memfd::size(fd).unwrap_or(0);
        }
        (files, bytes)
    }
}

/// Closes a client's descriptors on a thread of their own, off the engine
/// lock: closing a file of a FUSE filesystem waits for its server (`FLUSH`),
/// which may never answer. A thread stays as long as such a close waits.
pub fn close_elsewhere(fds: Vec<OwnedFd>) {
    let spawned = std::thread::Builder::new()
        .name("luod-close".into())
        .spawn(move || drop(fds));
    if let Err(e) = spawned {
        tracing::error!("cannot start a thread to close a client's descriptors, which stay open: {e}");
    }
}

/// Blackout: freeze start to `updated`.
pub fn blackout(t: &crate::record::Timestamps) -> Option<u64> {
    Some(t.updated?.saturating_sub(t.freeze_started?))
}

pub(super) fn summary(c: &Cycle) -> CycleSummary {
    CycleSummary {
        id: c.id,
        outcome: match c.outcome {
            crate::record::Outcome::Finished => "finished".into(),
            crate::record::Outcome::Cancelled => "cancelled".into(),
            crate::record::Outcome::RolledBack => "rolled-back".into(),
        },
        target_kernel: c.target.as_ref().map(|t| t.kernel.clone()),
        timestamps: c.timestamps.clone(),
        blackout_ns: blackout(&c.timestamps),
    }
}

/// Lowercase hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod handover_tests;
#[cfg(test)]
mod image_tests;
#[cfg(test)]
mod journal_tests;
#[cfg(test)]
mod pin_tests;
#[cfg(test)]
mod quota_tests;
#[cfg(test)]
mod reboot_path_tests;
#[cfg(test)]
mod reclaim_tests;
#[cfg(test)]
mod rollback_tests;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod vm_tests;
