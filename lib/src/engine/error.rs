//! Engine errors, and how each reaches a client.

use super::Quota;
use crate::kernel::KernelError;
use crate::names::NameError;
use crate::protocol::{ErrorKind, ErrorReply};
use crate::record::RecordError;
use crate::state::{Event, IllegalTransition, State};
use crate::subsystem::StepError;

/// Why the engine refused a request. Whatever the variant, the engine's state
/// and record are as they were before the request.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The command is not allowed in this state.
    #[error(transparent)]
    Illegal(#[from] IllegalTransition),
    /// A session operation that this state does not allow.
    #[error("{what} is not allowed in state {state}")]
    SessionsLocked {
        /// What was attempted.
        what: &'static str,
        /// The state.
        state: State,
    },
    /// The caller is not root and lacks `CAP_SYS_BOOT`.
    #[error("{0} needs root or CAP_SYS_BOOT")]
    NotPrivileged(&'static str),
    /// The session name is invalid.
    #[error(transparent)]
    Name(#[from] NameError),
    /// An argument is invalid.
    #[error("{0}")]
    InvalidArgument(String),
    /// No VM of that name that the caller may see.
    #[error("no VM named {0}")]
    NoSuchVm(String),
    /// `finish` with VMs no VMM claimed.
    #[error("{} VM(s) of the update were not restored: {}", .0.len(), .0.join(", "))]
    VmsNotRestored(Vec<String>),
    /// `finish` with files nobody took back.
    #[error("{0} preserved file(s) were not retrieved: {1}")]
    NotRetrieved(usize, String),
    /// A request that needs exactly one file descriptor came without one.
    #[error("{0}")]
    MissingFd(&'static str),
    /// A subsystem vetoed or failed; earlier steps were undone.
    #[error(transparent)]
    Step(#[from] StepError),
    /// The kernel (or the backend emulating it) refused.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The record could not be read or written.
    #[error("handover record: {0}")]
    Record(#[from] RecordError),
    /// The reboot failed; the engine unfroze and is back in `prepared`.
    #[error("reboot failed, unfroze back to prepared: {0}")]
    RebootFailed(String),
    /// The kexec is under way: the handover record is final.
    #[error("luod has handed over to the next kernel and is exiting; nothing can change now")]
    HandedOver,
    /// The region holds a record of a newer format than this luod reads.
    #[error(
        "the region holds a handover record of format version {0}, newer than this luod reads (version {v}); \
         run the luod that wrote it, or a newer one: starting would overwrite it",
        v = crate::record::FORMAT_VERSION
    )]
    NewerRecord(u32),
    /// The region holds no readable record but is not blank: nothing
    /// changes until it is restored or the record discarded.
    #[error(
        "the handover record cannot be read ({0}); luod changes nothing until the region is restored or the record discarded"
    )]
    RecordUnreadable(String),
    /// `discard-record` while the record is readable.
    #[error("the handover record is readable (generation {0}): there is nothing to discard")]
    RecordReadable(u64),
    /// The region could not be made usable.
    #[error(transparent)]
    Region(crate::region::RegionError),
    /// An I/O error while reading a file the request named.
    #[error("{0}")]
    Io(String),
    /// Adding a session or a file would pass one of the owner's quotas.
    #[error(
        "quota exceeded: uid {uid} holds {used} {unit}, and {adding} more would pass its quota of {limit} (luod {flag})",
        unit = quota.unit(),
        flag = quota.flag()
    )]
    QuotaExceeded {
        /// Which quota.
        quota: Quota,
        /// The owner.
        uid: u32,
        /// What the owner holds now.
        used: u64,
        /// What the request adds.
        adding: u64,
        /// The quota.
        limit: u64,
    },
    /// A uid holds more bytes than its quota now (a file grew after it was
    /// preserved, or luod restarted with a lower quota): the cycle does not go on.
    #[error(
        "uid {uid} holds {bytes} bytes of preserved files, over its quota of {limit} (luod --max-bytes-per-uid): \
         a file grew after it was preserved, or the quota was lowered (session(s) {})",
        sessions.join(", ")
    )]
    QuotaOverrun {
        /// The owner.
        uid: u32,
        /// What it holds now.
        bytes: u64,
        /// The quota.
        limit: u64,
        /// Its sessions.
        sessions: Vec<String>,
    },
    /// A kernel image or initrd sent with `prepare`/`check` that luod does
    /// not read: not a regular file, not open for reading, too large, or
    /// changed while luod read it.
    #[error("{0}")]
    BadImage(String),
    /// A `pre-*` hook failed (or was refused): the step is vetoed.
    #[error("{phase} hook {hook} vetoed: {reason}")]
    HookVeto {
        /// The phase.
        phase: &'static str,
        /// The hook's file name.
        hook: String,
        /// Its last line of output, or how it ended.
        reason: String,
    },
    /// The update failed its validation (a `post-update` hook) and nobody
    /// accepted it.
    #[error("the update failed validation: post-update hook {hook}: {reason}")]
    ValidationFailed {
        /// The hook.
        hook: String,
        /// Its reason.
        reason: String,
    },
    /// `rollback` cannot go back (no previous kernel, changed or gone, wrong state).
    #[error("rollback refused: {0}")]
    RollbackRefused(String),
    /// A kernel image or initrd is not the one its pinned SHA-256 names:
    /// refused before anything loads.
    #[error(
        "{what} {name} has sha256 {actual}, not the pinned {expected}: it is not the image the pin names, so \
         nothing was loaded",
        actual = super::hex(actual),
        expected = super::hex(expected)
    )]
    DigestMismatch {
        /// `kernel image` or `initrd`.
        what: &'static str,
        /// What the client calls it.
        name: String,
        /// The pinned digest.
        expected: [u8; 32],
        /// The digest of the file luod got.
        actual: [u8; 32],
    },
}

impl EngineError {
    /// The class of failure.
    pub fn kind(&self) -> ErrorKind {
        use EngineError as E;
        match self {
            E::Illegal(_) | E::SessionsLocked { .. } | E::HandedOver => ErrorKind::WrongState,
            E::NotPrivileged(_) => ErrorKind::PermissionDenied,
            E::Name(_) | E::InvalidArgument(_) | E::MissingFd(_) | E::Io(_) | E::BadImage(_) => {
                ErrorKind::InvalidArgument
            }
            E::NotRetrieved(..) | E::VmsNotRestored(_) | E::Kernel(KernelError::AlreadyRetrieved { .. }) => {
                ErrorKind::WrongState
            }
            E::Step(s) if s.is_veto() => ErrorKind::Vetoed,
            E::Step(_) => ErrorKind::SubsystemFailed,
            E::Kernel(KernelError::NoSuchSession(_) | KernelError::NoSuchToken { .. }) | E::NoSuchVm(_) => {
                ErrorKind::NotFound
            }
            E::Kernel(
                KernelError::SessionExists(_) | KernelError::TokenExists { .. } | KernelError::AlreadyPreserved { .. },
            ) => ErrorKind::AlreadyExists,
            E::Kernel(
                KernelError::Unsupported { .. } | KernelError::NotReadWrite { .. } | KernelError::Load { .. },
            ) => ErrorKind::InvalidArgument,
            E::Kernel(KernelError::Park { .. }) => ErrorKind::Internal,
            E::Kernel(_) | E::RebootFailed(_) => ErrorKind::Kernel,
            E::Record(_) | E::NewerRecord(_) | E::RecordUnreadable(_) | E::Region(_) => ErrorKind::Record,
            E::RecordReadable(_) => ErrorKind::WrongState,
            E::QuotaExceeded { .. } | E::QuotaOverrun { .. } => ErrorKind::QuotaExceeded,
            E::HookVeto { .. } | E::ValidationFailed { .. } => ErrorKind::Vetoed,
            E::RollbackRefused(_) => ErrorKind::WrongState,
            E::DigestMismatch { .. } => ErrorKind::DigestMismatch,
        }
    }

    /// What the person at the keyboard can do about it.
    pub fn hint(&self) -> String {
        use EngineError as E;
        match self {
            E::Illegal(t) => match (t.state, t.event) {
                (State::Normal, Event::Finish | Event::Unfreeze) => {
                    "no update is in flight: there is nothing to close".into()
                }
                (State::Normal, Event::Cancel) => "no update is in flight: there is nothing to cancel".into(),
                (State::Normal, _) => "run `luoctl prepare` first".into(),
                (State::Prepared | State::Frozen, Event::Prepare) => {
                    "an update is in flight already: continue it, or `luoctl cancel` it".into()
                }
                (State::Prepared, _) => "continue with `luoctl freeze`/`reboot`, or `luoctl cancel`".into(),
                (State::Frozen, _) => "continue with `luoctl reboot`, or `luoctl cancel`".into(),
                (State::Updated, _) => "retrieve your sessions, then `luoctl finish`".into(),
            },
            E::SessionsLocked {
                what: "evicting a session",
                state: State::Frozen,
            } => "the host is frozen and its record is final: `luoctl cancel` first (the state goes back to normal), then evict"
                .into(),
            E::SessionsLocked {
                state: State::Prepared | State::Frozen,
                ..
            } => "a cycle is in flight: `luoctl cancel` it first, or wait until it finishes".into(),
            E::SessionsLocked { .. } => "`luoctl finish` the cycle first".into(),
            E::NotPrivileged(_) => "run as root (or with CAP_SYS_BOOT) in the host's user namespace; root inside a user namespace of your own does not count".into(),
            E::Kernel(KernelError::NoSuchSession(_)) => "`luoctl session list` shows your sessions".into(),
            E::NoSuchVm(_) => "`luoctl vm list` shows the VMs you may see (yours; every VM for root)".into(),
            E::Kernel(KernelError::NoSuchToken { session, .. }) => {
                format!("`luoctl session list` shows the tokens of {session}")
            }
            E::Kernel(KernelError::TokenExists { .. }) => "choose another token".into(),
            E::Kernel(KernelError::SessionExists(_)) => "choose another name, or finish the existing session".into(),
            E::NotRetrieved(..) => "retrieve them, or discard a session with `luoctl session finish NAME`".into(),
            E::VmsNotRestored(_) => {
                "start their VMMs to claim them, or give one up with `luoctl vm abandon NAME`".into()
            }
            E::Step(s) if s.is_veto() => format!("resolve what subsystem {} reports, then prepare again", s.subsystem),
            E::Step(s) => format!(
                "see luod's log for subsystem {}; the transition was undone",
                s.subsystem
            ),
            E::Kernel(KernelError::Unsupported { .. }) => "hand over a memfd (memfd_create(2))".into(),
            E::Kernel(KernelError::AlreadyPreserved { .. }) => "each open file can be preserved once".into(),
            E::Kernel(KernelError::NotReadWrite { .. }) => {
                "hand over the memfd from memfd_create(2) itself, or a reopen with O_RDWR".into()
            }
            E::Kernel(KernelError::Load { .. }) => "check the --kernel/--initrd images".into(),
            E::Kernel(KernelError::SignatureRejected { .. }) => {
                "`luoctl check --kernel K` shows the kernel's signature policy".into()
            }
            E::DigestMismatch { .. } => "check that the image is the one you meant (sha256sum FILE), or correct the \
                                         pinned digest"
                .into(),
            E::BadImage(_) => "give --kernel/--initrd as regular files you can read: luoctl opens them with your \
                               rights and sends them to luod"
                .into(),
            E::Kernel(KernelError::Park { .. }) => {
                "nothing was changed; see luod's log (the fd holder's pid is in STATE_DIR/holder.pid), then retry"
                    .into()
            }
            E::RebootFailed(_) => "fix the cause, then `luoctl reboot` again, or `luoctl cancel`".into(),
            E::Record(_) => "see luod's log; the previous record generation is intact".into(),
            E::RecordUnreadable(_) => "restore the region and start luod again (everything comes back), or give the \
                                       record and the parked files up with `luoctl discard-record --yes`"
                .into(),
            E::QuotaExceeded { quota, .. } => format!(
                "finish a session you no longer need, or ask the operator to raise luod {}",
                quota.flag()
            ),
            E::QuotaOverrun { sessions, .. } => format!(
                "the owner shrinks or finishes {}, or root releases it with `luoctl session evict NAME` \
                 (`luoctl cancel` first when frozen); or restart luod with a larger --max-bytes-per-uid",
                sessions.join(", ")
            ),
            E::HookVeto { phase, hook, .. } => format!(
                "fix what hook {hook} reports (its output is in luod's log), then try again; the hook is in the {phase}.d directory of luod's --hooks-dir"
            ),
            E::ValidationFailed { .. } => "`luoctl rollback` goes back to the previous kernel; `luoctl finish --accept-failed-validation` keeps this one".into(),
            E::RollbackRefused(_) => "`luoctl history` shows the cycles and the kernels they came from".into(),
            _ => String::new(),
        }
    }

    /// The reply a client gets.
    pub fn to_reply(&self) -> ErrorReply {
        ErrorReply {
            kind: self.kind(),
            message: self.to_string(),
            hint: self.hint(),
            step: match self {
                EngineError::Step(s) => Some(s.clone()),
                _ => None,
            },
        }
    }
}
