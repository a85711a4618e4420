//! The protocol between luod and its clients (luoctl, VMMs, services).
//!
//! One definition for both sides: request and response types here, framing
//! and file-descriptor passing in [`frame`], a blocking client in [`client`].
//!
//! A connection starts with [`Request::Hello`] carrying [`PROTOCOL_VERSION`];
//! luod answers [`Response::Hello`] or refuses a version it does not speak.
//! Each request then gets exactly one response. A request that carries file
//! descriptors (`SessionPreserve`, `VmRegister`, and `Prepare`/`Check` with a
//! target kernel) sends them with `SCM_RIGHTS` on the frame's first byte; a
//! response that returns one (`Fd`) does the same. luod never opens a path a
//! client names: files come as descriptors the client opened with its own
//! rights.

pub mod client;
pub mod frame;

use crate::record::{Cycle, Event, Timestamps};
use crate::state::State;
use crate::subsystem::StepError;
use serde::{Deserialize, Serialize};

/// Version of this protocol; luod refuses a client that speaks another one.
///
/// 1: the first release.
/// 3 (2 was never released on its own): `Prepare`/`Check` send the kernel
/// image and initrd as descriptors ([`ImageFile`]) instead of paths;
/// `StatusReport` ends with `in_progress`; `History` answers a
/// [`HistoryReport`] (cycles and events); new requests `SessionListFrom`,
/// `SessionEvict`, `DiscardRecord`; new error kind `QuotaExceeded`.
/// 4: [`PrepareArgs`] ends with the pinned digests `kernel_sha256` and
/// `initrd_sha256`; [`CheckReport`] ends with `already_on_target`; new error
/// kind `DigestMismatch`; the history's cycles carry the record format 3
/// fields (previous kernel, rollback links, validation, hook summaries;
/// outcome `rolled-back`); new requests `Rollback` and `FinishAccepting`.
/// 5: [`StatusReport`] ends with `reboot_path` ([`RebootPathInfo`]).
/// 6: [`VmInfo`] ends with `detail` and `blackout_ms`, which a VMM sets
/// with the new request `VmReport`.
pub const PROTOCOL_VERSION: u32 = 6;

/// Longest [`Request::VmReport`] detail luod keeps, in bytes.
pub const MAX_VM_DETAIL: usize = 1024;

/// Default path of luod's socket.
pub const DEFAULT_SOCKET: &str = "/run/luod/luod.sock";

/// A file sent with a request as a descriptor (`SCM_RIGHTS`), opened by the
/// client with its own rights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageFile {
    /// Position of its descriptor among those sent with the frame (0-based).
    pub fd: u32,
    /// What the client calls it (its path on the client's side): shown in
    /// answers and kept in the record, never opened by luod.
    pub name: String,
}

/// What `prepare` (and `check`) is asked to do about the target kernel.
///
/// The kernel image and the initrd travel as descriptors with the frame;
/// luod accepts only regular files open for reading.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareArgs {
    /// Kernel image to load for kexec.
    pub kernel: Option<ImageFile>,
    /// Initrd to load with it.
    pub initrd: Option<ImageFile>,
    /// Command line for the target kernel.
    pub cmdline: Option<String>,
    /// Use the running kernel's command line, plus what the backend needs.
    pub reuse_cmdline: bool,
    /// The kernel image's expected SHA-256 (a pinned target): luod digests
    /// the descriptor it got and refuses a mismatch before anything loads.
    pub kernel_sha256: Option<[u8; 32]>,
    /// The initrd's expected SHA-256.
    pub initrd_sha256: Option<[u8; 32]>,
}

/// A client's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// First message of a connection.
    Hello {
        /// The client's [`PROTOCOL_VERSION`].
        version: u32,
        /// Free-form client name for logs (`luoctl 0.1.0`).
        client: String,
    },
    /// State, sessions, subsystems, last cycle.
    Status,
    /// Preflight: what `prepare` with these arguments would find; changes
    /// nothing. The images' descriptors travel with the frame.
    Check(PrepareArgs),
    /// `normal -> prepared`. The images' descriptors travel with the frame.
    Prepare(PrepareArgs),
    /// `prepared -> frozen`.
    Freeze,
    /// `frozen -> (kexec)`; freezes first when `prepared`.
    Reboot,
    /// `updated -> normal`.
    Finish,
    /// `prepared | frozen -> normal`.
    Cancel,
    /// Past cycles.
    History,
    /// Create a session owned by the caller's uid.
    SessionCreate {
        /// Session name (1 to 63 bytes, no NUL, no '/').
        name: String,
    },
    /// The caller's sessions.
    SessionList,
    /// Preserve the file descriptor sent with this frame under `token`.
    SessionPreserve {
        /// Session name.
        name: String,
        /// Token, unique within the session.
        token: u64,
    },
    /// Take back a preserved file after an update; the response carries it.
    SessionRetrieve {
        /// Session name.
        name: String,
        /// Token it was preserved under.
        token: u64,
    },
    /// Close a session: in `updated`, once its files are retrieved; in
    /// `normal`, unpreserves its files.
    SessionFinish {
        /// Session name.
        name: String,
    },
    /// A VMM registers a VM: its guest-RAM memfds travel with the frame,
    /// one per token, in order. luod preserves them in the VM's session
    /// (`vm-NAME`) and from then on sends [`Response::VmCall`] on this
    /// connection; the VMM answers each with [`Request::VmAnswer`]. A VMM
    /// that reconnects (after a restart of luod) registers again with the
    /// same name and tokens and no fds, and is attached again.
    VmRegister {
        /// VM name (1 to 60 bytes, same rules as session names).
        name: String,
        /// Tokens of the memfds sent with the frame.
        tokens: Vec<u64>,
    },
    /// The VMM's answer to a [`Response::VmCall`].
    VmAnswer(VmAnswer),
    /// In the new kernel: a VMM takes a VM over. The response
    /// ([`Response::VmClaimed`]) carries its memfds and the state saved at
    /// `freeze`.
    VmClaim {
        /// VM name.
        name: String,
    },
    /// Give up on a VM: its preserved memory is released, and `finish` no
    /// longer waits for it.
    VmAbandon {
        /// VM name.
        name: String,
    },
    /// The VMs luod knows.
    VmList,
    /// A page of the caller's sessions: those from position `start` (0 is
    /// the first, in creation order), as many as fit in one answer
    /// ([`Response::Sessions`]). An empty page means there are no more.
    /// [`Request::SessionList`] answers all at once, or refuses when they do
    /// not fit in a frame.
    SessionListFrom {
        /// Position of the first session of the page.
        start: u64,
    },
    /// Give up a handover record luod cannot read (privileged): the parked
    /// files are dropped and a fresh record starts, with the decision in its
    /// events. Refused while the record is readable.
    DiscardRecord,
    /// Root releases another uid's session and its files (recorded as an
    /// event); not while frozen.
    SessionEvict {
        /// Session name.
        name: String,
    },
    /// `rollback` (privileged): prepare a cycle back to the kernel the last
    /// update came from (checked against its recorded digests); freeze and
    /// reboot follow as for any cycle.
    Rollback,
    /// `finish`, accepting an update whose validation (a `post-update`
    /// hook) failed; the acceptance is recorded.
    FinishAccepting,
    /// A VMM reports on its VM what `vm list` shows beside luod's own view:
    /// a free-text `detail` (its version, the VM's run state, why a
    /// relaunch failed) and the VM's blackout in the last live update, as
    /// the VMM measured it. Allowed to the uid that registered the VM (or,
    /// after an update, whose VM it was) and to root; for anyone else the VM
    /// does not exist. Works for a registered VM and, in `updated`, for a VM
    /// awaiting its claim or claimed (a launcher whose restore failed). Sent
    /// on a connection of its own: a registered connection carries only
    /// luod's calls and their answers. luod keeps the report in memory
    /// (until the VM is abandoned or luod exits); `None` leaves a value as
    /// it was. Answered with [`Response::Done`].
    VmReport {
        /// VM name.
        name: String,
        /// One line of text, at most [`MAX_VM_DETAIL`] bytes, no control
        /// characters.
        detail: Option<String>,
        /// The VM's blackout in the last live update, in milliseconds.
        blackout_ms: Option<u64>,
    },
}

impl Request {
    /// Short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Status => "status",
            Request::Check(_) => "check",
            Request::Prepare(_) => "prepare",
            Request::Freeze => "freeze",
            Request::Reboot => "reboot",
            Request::Finish => "finish",
            Request::Cancel => "cancel",
            Request::History => "history",
            Request::SessionCreate { .. } => "session-create",
            Request::SessionList => "session-list",
            Request::SessionPreserve { .. } => "session-preserve",
            Request::SessionRetrieve { .. } => "session-retrieve",
            Request::SessionFinish { .. } => "session-finish",
            Request::VmRegister { .. } => "vm-register",
            Request::VmAnswer(_) => "vm-answer",
            Request::VmClaim { .. } => "vm-claim",
            Request::VmAbandon { .. } => "vm-abandon",
            Request::VmList => "vm-list",
            Request::SessionListFrom { .. } => "session-list-from",
            Request::DiscardRecord => "discard-record",
            Request::SessionEvict { .. } => "session-evict",
            Request::Rollback => "rollback",
            Request::FinishAccepting => "finish",
            Request::VmReport { .. } => "vm-report",
        }
    }
}

/// luod's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to `Hello`.
    Hello {
        /// luod's [`PROTOCOL_VERSION`].
        version: u32,
        /// luod's version string.
        server: String,
    },
    /// Answer to `Status`.
    Status(Box<StatusReport>),
    /// Answer to `Check`.
    Check(CheckReport),
    /// Answer to a transition.
    Transition(TransitionReport),
    /// Answer to `History`.
    History(HistoryReport),
    /// Answer to `SessionList`.
    Sessions(Vec<SessionInfo>),
    /// The request succeeded and has nothing to report.
    Done,
    /// Answer to `SessionRetrieve`: the file descriptor travels with the frame.
    Fd {
        /// Size of the file in bytes.
        size: u64,
    },
    /// The request failed; nothing was changed.
    Error(ErrorReply),
    /// luod asks a registered VMM to act (sent on its connection).
    VmCall(VmCall),
    /// Answer to `VmClaim`: the memfds travel with the frame, one per token.
    VmClaimed {
        /// Tokens, in the order of the fds.
        tokens: Vec<u64>,
        /// The VM state the VMM returned at `freeze`.
        state: Vec<u8>,
    },
    /// Answer to `VmList`.
    Vms(Vec<VmInfo>),
    /// Answer to `DiscardRecord`.
    RecordDiscarded(DiscardReport),
}

/// What `discard-record` gave up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscardReport {
    /// What luod had found instead of a readable record.
    pub finding: String,
    /// Parked files dropped.
    pub files: u64,
    /// Generation of the fresh record.
    pub generation: u64,
}

/// What luod asks of a VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmCall {
    /// A live update is being prepared: veto now if the VM cannot go through it.
    Prepare,
    /// Pause the vCPUs and return the VM state (registers, devices).
    Freeze,
    /// The update did not happen after `freeze`: resume.
    Unfreeze,
    /// The cycle was abandoned after `prepare`: nothing to keep.
    Cancel,
}

impl VmCall {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            VmCall::Prepare => "prepare",
            VmCall::Freeze => "freeze",
            VmCall::Unfreeze => "unfreeze",
            VmCall::Cancel => "cancel",
        }
    }
}

/// A VMM's answer to a [`VmCall`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmAnswer {
    /// Done; `freeze` returns the VM state here.
    Ok {
        /// VM state (from `freeze`).
        state: Option<Vec<u8>>,
    },
    /// `prepare` refused, with the reason for the operator.
    Veto(String),
    /// The call failed.
    Failed(String),
}

/// A VM as `luoctl vm list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// VM name.
    pub name: String,
    /// Uid of the VMM that registered it.
    pub owner_uid: u32,
    /// Tokens of its guest-RAM memfds.
    pub tokens: Vec<u64>,
    /// `registered`, `disconnected`, `awaiting-claim`, `claimed`, `abandoned`.
    pub phase: String,
    /// What its VMM last reported ([`Request::VmReport`]), e.g. `QEMU
    /// 11.1.3, running`; `None` until it reports.
    pub detail: Option<String>,
    /// The VM's blackout in the last live update, in milliseconds, as its
    /// VMM measured and reported it; `None` when unknown.
    pub blackout_ms: Option<u64>,
}

/// Classes of failure; luoctl maps each to an exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The request is malformed or an argument is invalid.
    InvalidArgument,
    /// The command is not allowed in the current state.
    WrongState,
    /// The caller lacks the privilege (root or `CAP_SYS_BOOT`) or the ownership.
    PermissionDenied,
    /// A subsystem vetoed `prepare`.
    Vetoed,
    /// A subsystem failed a step; the transition was undone.
    SubsystemFailed,
    /// No such session or token.
    NotFound,
    /// The session or token exists already.
    AlreadyExists,
    /// The kernel (or the backend) refused.
    Kernel,
    /// The handover record or the region could not be read or written.
    Record,
    /// The frame or protocol version is wrong.
    Protocol,
    /// Something luod did not expect; see its log.
    Internal,
    /// The request would pass one of the caller's per-uid quotas (sessions,
    /// files, bytes), or a uid is over its bytes quota and the cycle cannot go on.
    QuotaExceeded,
    /// A kernel image or initrd is not the one its pinned SHA-256 names.
    DigestMismatch,
}

/// A failed request: what failed and why, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Class of failure.
    pub kind: ErrorKind,
    /// What failed and why, one sentence.
    pub message: String,
    /// What to do about it (may be empty).
    pub hint: String,
    /// The subsystem step that failed, when a subsystem failed.
    pub step: Option<StepError>,
}

impl std::fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)?;
        if !self.hint.is_empty() {
            write!(f, "; {}", self.hint)?;
        }
        Ok(())
    }
}

impl std::error::Error for ErrorReply {}

/// A session as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Name.
    pub name: String,
    /// Owner uid.
    pub owner_uid: u32,
    /// Preserved files.
    pub files: Vec<FileInfo>,
    /// True when the session came through an update and awaits retrieval.
    pub incoming: bool,
}

/// A preserved file as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// Token.
    pub token: u64,
    /// Size in bytes.
    pub size: u64,
    /// True once retrieved in the new kernel.
    pub retrieved: bool,
}

/// The last cycle, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CycleSummary {
    /// Cycle id.
    pub id: u64,
    /// `finished`, `cancelled`, or `in-progress`.
    pub outcome: String,
    /// Target kernel, by the name the client gave at `prepare`, if one was loaded.
    pub target_kernel: Option<String>,
    /// Transition timestamps.
    pub timestamps: Timestamps,
    /// Blackout (freeze start to `updated`) in nanoseconds, when known.
    pub blackout_ns: Option<u64>,
}

/// Answer to `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Current state.
    pub state: State,
    /// Backend name.
    pub backend: String,
    /// Description of where the record lives.
    pub region: String,
    /// Generation of the newest record written.
    pub generation: u64,
    /// Sessions visible to the caller.
    pub sessions: Vec<SessionInfo>,
    /// Registered subsystems, in order.
    pub subsystems: Vec<String>,
    /// The cycle in flight, or the last one.
    pub last_cycle: Option<CycleSummary>,
    /// Number of live updates this host went through.
    pub live_updates: u64,
    /// Notes from startup (e.g. why the region's content was not used).
    pub notes: Vec<String>,
    /// The change luod is making right now (a `freeze` waiting for a VM),
    /// if any: `status` answers from the last committed state meanwhile.
    pub in_progress: Option<crate::progress::Progress>,
    /// How `reboot` reaches the new kernel (a backend with a real kexec).
    pub reboot_path: Option<RebootPathInfo>,
}

/// The reboot path luod chose at start (see [`crate::systemd::RebootPath`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebootPathInfo {
    /// `systemd` (orderly `systemctl kexec`) or `direct` (luod kexecs itself).
    pub path: String,
    /// What it means, and why this path.
    pub detail: String,
}

/// Answer to `history`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryReport {
    /// Finished and cancelled cycles, oldest first.
    pub cycles: Vec<Cycle>,
    /// Decisions and findings outside the cycles (a session evicted, ...),
    /// oldest first: every one for root, for another caller those it caused
    /// and those about its own sessions.
    pub events: Vec<Event>,
}

/// One preflight item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckItem {
    /// What was checked.
    pub name: String,
    /// Whether it is fine.
    pub ok: bool,
    /// Details or what to do.
    pub detail: String,
}

/// Answer to `check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// Whether `prepare` would be allowed.
    pub ok: bool,
    /// Items, in the order they were checked.
    pub items: Vec<CheckItem>,
    /// The target kernel is the running one: same version string in its
    /// image header as the running kernel's, and the same SHA-256 as the
    /// kernel the last update loaded (item `running kernel` says which).
    pub already_on_target: bool,
}

/// Answer to a transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransitionReport {
    /// State before.
    pub from: State,
    /// State after.
    pub to: State,
    /// Generation of the record written.
    pub generation: u64,
    /// Sessions carried.
    pub sessions: u32,
    /// Files carried.
    pub files: u32,
    /// Bytes carried.
    pub bytes: u64,
    /// How long the transition took in luod, in nanoseconds.
    pub elapsed_ns: u64,
    /// Human notes (e.g. "simulated kexec: luod exits; start it again").
    pub notes: Vec<String>,
}
