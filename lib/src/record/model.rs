//! The handover record's content, format version 3.
//!
//! Postcard is not self-describing: any change to these types (a field added,
//! removed, reordered or retyped) is a new format version. The types an
//! older version wrote differently live frozen in `v{N}.rs`, and the decoder
//! converts such a record into this model (see `docs/state-format.md`,
//! "Compatibility"). Format 2 added [`Handover::nonce`], [`Update::nonce`]
//! and [`HandoverRecord::events`]. Format 3 added the previous kernel, the
//! rollback links, the validation state and the hook summaries of a cycle
//! ([`Update::previous`], [`Update::rollback_of`], [`Update::validation`],
//! [`Update::hooks`], the same in [`Cycle`]), [`Outcome::RolledBack`] and
//! [`HandoverRecord::booted`].

use crate::names::SessionName;
use crate::state::State;
use serde::{Deserialize, Serialize};

/// Nanoseconds since the Unix epoch (CLOCK_REALTIME).
pub type UnixNanos = u64;

/// Everything luod must not lose: its state, the update in flight, the
/// sessions and their tokens, subsystem sections and the history of cycles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverRecord {
    /// Where the host is in the cycle.
    pub state: State,
    /// Name of the backend that wrote the record (`file`, `luo`, `reserved-memory`).
    pub backend: String,
    /// Set when the record was written as the outgoing image at `reboot`.
    pub handover: Option<Handover>,
    /// The cycle in flight, if any.
    pub update: Option<Update>,
    /// Client sessions, in creation order.
    pub sessions: Vec<SessionRecord>,
    /// Subsystem sections, keyed by subsystem name, each with its own version.
    pub subsystems: Vec<Section>,
    /// Data extents copied into the region (indexed by [`FdRecord::data`]).
    pub extents: Vec<Extent>,
    /// Completed and cancelled cycles, oldest first, at most [`HISTORY_LIMIT`].
    pub history: Vec<Cycle>,
    /// Number of live updates this host went through (finished cycles).
    pub live_updates: u64,
    /// Identifier the next cycle gets.
    pub next_cycle_id: u64,
    /// Decisions and findings outside the cycles (an operator evicting a
    /// session, discarding an unreadable record, a stale handover set
    /// aside), oldest first, at most [`EVENTS_LIMIT`]. Format 2 on.
    pub events: Vec<Event>,
    /// The kernel this boot came to by a luod kexec (set when luod comes up
    /// `updated`), so that a later cycle knows what it rolls back to.
    /// Format 3 on.
    pub booted: Option<Booted>,
}

/// The boot a luod kexec led to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Booted {
    /// `/proc/sys/kernel/random/boot_id` of that boot.
    pub boot_id: String,
    /// The cycle whose kexec it was.
    pub cycle: u64,
    /// The kernel it loaded (`None` when the target was loaded outside luod).
    pub image: Option<KernelImage>,
}

/// A hook luod ran, as the history keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookRun {
    /// Phase (`pre-prepare`, `pre-freeze`, `post-update`, `post-finish`, `on-failure`).
    pub phase: String,
    /// File name of the hook in the phase's directory.
    pub hook: String,
    /// True when it exited 0.
    pub ok: bool,
    /// How it ended (`exit 0`, `exit 3`, `timed out after 5 s`, `killed by signal 9`, `refused: ...`).
    pub status: String,
    /// How long it ran, in nanoseconds.
    pub duration_ns: u64,
    /// Its last line of output (stderr, or stdout when stderr was empty).
    pub last_line: String,
}

/// A failed validation (a `post-update` hook failed) and its acceptance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Validation {
    /// The hook that failed.
    pub hook: String,
    /// Its reason (its last line of output, or how it ended).
    pub reason: String,
    /// Uid of the operator who accepted the update regardless, if one did.
    pub accepted_by: Option<u32>,
    /// When they accepted it.
    pub accepted_at: Option<UnixNanos>,
}

/// How many hook summaries a cycle keeps (the oldest go first).
pub const HOOKS_LIMIT: usize = 64;

/// Appends a hook summary, dropping the oldest beyond [`HOOKS_LIMIT`].
pub fn push_hook(hooks: &mut Vec<HookRun>, run: HookRun) {
    hooks.push(run);
    let excess = hooks.len().saturating_sub(HOOKS_LIMIT);
    hooks.drain(..excess);
}

/// How many events the record keeps (the oldest go first).
pub const EVENTS_LIMIT: usize = 128;

/// Something that happened outside a cycle and must stay on record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When it happened.
    pub at: UnixNanos,
    /// Uid of the caller who decided it (0 for luod itself).
    pub uid: u32,
    /// What happened, a short fixed word (`session-evicted`,
    /// `record-discarded`, `stale-handover`, ...).
    pub action: String,
    /// What it happened to (a session name, a region path, ...).
    pub subject: String,
    /// One sentence with the details.
    pub detail: String,
}

impl HandoverRecord {
    /// Appends an event, dropping the oldest beyond [`EVENTS_LIMIT`].
    pub fn push_event(&mut self, event: Event) {
        self.events.push(event);
        if self.events.len() > EVENTS_LIMIT {
            let excess = self.events.len() - EVENTS_LIMIT;
            self.events.drain(..excess);
        }
    }
}

/// How many cycles the history keeps.
pub const HISTORY_LIMIT: usize = 64;

impl HandoverRecord {
    /// An empty record of a host in `normal` with nothing preserved.
    pub fn new(backend: &str) -> Self {
        HandoverRecord {
            state: State::Normal,
            backend: backend.to_string(),
            handover: None,
            update: None,
            sessions: Vec::new(),
            subsystems: Vec::new(),
            extents: Vec::new(),
            history: Vec::new(),
            live_updates: 0,
            next_cycle_id: 1,
            events: Vec::new(),
            booted: None,
        }
    }
}

/// Written at `reboot`: who handed over, so the next luod knows a kexec happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    /// `/proc/sys/kernel/random/boot_id` of the kernel that wrote the record.
    pub boot_id: String,
    /// True when the kexec was simulated (file backend): the next luod treats
    /// the record as incoming even though the boot id did not change.
    pub simulated: bool,
    /// Release (`uname -r`) of the kernel that wrote the record.
    pub kernel_release: String,
    /// The cycle's one-time nonce ([`Update::nonce`]), which the target
    /// kernel's command line carries: the record is a handover only for a
    /// boot whose `/proc/cmdline` shows it. `None` in format 1 records.
    pub nonce: Option<String>,
}

/// The cycle in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    /// Cycle identifier, increasing per host.
    pub id: u64,
    /// Release (`uname -r`) of the kernel the cycle started in.
    pub from_release: String,
    /// The target kernel, when `prepare` loaded one.
    pub target: Option<KernelImage>,
    /// When each transition happened.
    pub timestamps: Timestamps,
    /// One-time value chosen at `prepare` and put on the target kernel's
    /// command line, so the next boot can prove it came from this cycle's
    /// kexec. `None` in format 1 records.
    pub nonce: Option<String>,
    /// The kernel running when the cycle was prepared, with its digests:
    /// what `rollback` goes back to. `None` when luod could not find it
    /// (and before format 3).
    pub previous: Option<KernelImage>,
    /// Set when this cycle is the rollback of cycle N.
    pub rollback_of: Option<u64>,
    /// Set when a `post-update` hook failed in the new kernel.
    pub validation: Option<Validation>,
    /// The hooks run for this cycle, in order.
    pub hooks: Vec<HookRun>,
}

/// A kernel image loaded for kexec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelImage {
    /// Path of the kernel image.
    pub kernel: String,
    /// SHA-256 of the kernel image as loaded.
    pub kernel_sha256: [u8; 32],
    /// Path of the initrd, if any.
    pub initrd: Option<String>,
    /// SHA-256 of the initrd, if any.
    pub initrd_sha256: Option<[u8; 32]>,
    /// Command line of the target kernel.
    pub cmdline: String,
}

/// When each step of a cycle happened (nanoseconds since the Unix epoch).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamps {
    /// `prepare` completed.
    pub prepared: Option<UnixNanos>,
    /// `freeze` started: the blackout begins.
    pub freeze_started: Option<UnixNanos>,
    /// `freeze` completed.
    pub frozen: Option<UnixNanos>,
    /// `reboot` called the kernel (or, simulated, finished writing the image).
    pub reboot: Option<UnixNanos>,
    /// luod started in the new kernel.
    pub luod_started: Option<UnixNanos>,
    /// luod reached `updated`: the blackout ends.
    pub updated: Option<UnixNanos>,
    /// `finish` completed.
    pub finished: Option<UnixNanos>,
    /// `cancel` completed.
    pub cancelled: Option<UnixNanos>,
}

/// A client session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Session name, unique on the host.
    pub name: SessionName,
    /// Uid of the client that created it; only that uid sees it.
    pub owner_uid: u32,
    /// Preserved files, in preservation order.
    pub fds: Vec<FdRecord>,
    /// True once the session came through a live update and awaits retrieval.
    pub incoming: bool,
}

/// A file preserved under a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdRecord {
    /// The client's token, unique within the session.
    pub token: u64,
    /// Size of the file in bytes when it was last recorded.
    pub size: u64,
    /// Index into [`HandoverRecord::extents`] when the contents were copied
    /// into the region (copying backends, from `reboot`/`freeze` on).
    pub data: Option<u32>,
    /// True once the client took the file back in the new kernel.
    pub retrieved: bool,
}

/// A run of bytes in the region's data area.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// Offset from the start of the region.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// CRC-32C of the bytes.
    pub crc32c: u32,
}

/// A subsystem's opaque state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    /// Subsystem name (the key).
    pub name: String,
    /// The subsystem's own version of the blob format.
    pub version: u32,
    /// The blob.
    pub blob: Vec<u8>,
}

/// How a cycle ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The host went through the update and `finish` closed it.
    Finished,
    /// `cancel` abandoned it before the reboot.
    Cancelled,
    /// The host went through the update, then `rollback` took it back to
    /// the previous kernel (by the cycle [`Cycle::rolled_back_by`]).
    #[serde(rename = "rolled-back")]
    RolledBack,
}

/// A cycle in the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cycle {
    /// Cycle identifier.
    pub id: u64,
    /// How it ended.
    pub outcome: Outcome,
    /// The target kernel, if one was loaded.
    pub target: Option<KernelImage>,
    /// Kernel release before the update.
    pub from_release: String,
    /// Kernel release after the update (empty when cancelled).
    pub to_release: String,
    /// When each step happened.
    pub timestamps: Timestamps,
    /// Sessions carried.
    pub sessions: u32,
    /// Files carried.
    pub files: u32,
    /// Bytes carried.
    pub bytes: u64,
    /// The kernel running when the cycle was prepared (format 3 on).
    pub previous: Option<KernelImage>,
    /// Set when this cycle was the rollback of cycle N.
    pub rollback_of: Option<u64>,
    /// Set when this cycle was rolled back by cycle N.
    pub rolled_back_by: Option<u64>,
    /// A failed validation, and whether an operator accepted it.
    pub validation: Option<Validation>,
    /// The hooks run for this cycle, in order.
    pub hooks: Vec<HookRun>,
}
