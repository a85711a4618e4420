//! Kernel interfaces: what luod asks of the kernel.
//!
//! [`Kernel`] is the live-update uAPI as luod uses it (sessions, preserved
//! files, the target kernel, the reboot). Implementations:
//!
//! - [`emulated::Emulated`]: LUO emulated in userspace. luod holds the
//!   preserved files itself and copies their contents into a region at the
//!   handover; the file backend (simulated kexec) uses it.
//! - [`fake::FakeKernel`]: the emulation plus injected failures, for tests of
//!   the logic above it. It never stands in for a real-kernel test.
//!
//! The real `/dev/liveupdate` implementation plugs in behind the same trait.

pub mod emulated;
pub mod fake;
pub mod kexec;
pub mod luo;
pub mod memfd;
pub mod reserved;
pub mod sigpolicy;
pub mod uapi;

use crate::names::SessionName;
use std::os::fd::{BorrowedFd, OwnedFd};

/// What `prepare` loads for kexec: the files a client sent as descriptors
/// (luod never opens a path a client names).
#[derive(Debug, Clone, Copy)]
pub struct KernelLoad<'a> {
    /// The kernel image, a regular file open for reading.
    pub kernel: BorrowedFd<'a>,
    /// What the client calls it, for messages.
    pub kernel_name: &'a str,
    /// The initrd, a regular file open for reading.
    pub initrd: Option<BorrowedFd<'a>>,
    /// Command line.
    pub cmdline: &'a str,
}

/// How the contents of preserved files reach the next kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handoff {
    /// The kernel carries preserved files itself (LUO).
    Kernel,
    /// luod copies the contents into its region and recreates memfds after
    /// the kexec (file and reserved-memory backends).
    Copy,
}

/// What `reboot` did when it returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebootOutcome {
    /// The kexec was simulated: luod must exit now, and a luod started again
    /// on the same region plays the new kernel's.
    Simulated,
    /// systemd accepted an orderly `systemctl kexec`: the units stop (luod
    /// among them) and systemd kexecs; the note says so.
    Orderly(String),
}

/// Why the kernel (or the backend emulating it) refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// No session of that name.
    #[error("no session named {0}")]
    NoSuchSession(String),
    /// A session of that name exists.
    #[error("a session named {0} exists already")]
    SessionExists(String),
    /// No file under that token in the session.
    #[error("session {session} has no file under token {token}")]
    NoSuchToken {
        /// Session.
        session: String,
        /// Token.
        token: u64,
    },
    /// The token is in use in the session.
    #[error("session {session} already has a file under token {token}")]
    TokenExists {
        /// Session.
        session: String,
        /// Token.
        token: u64,
    },
    /// The same open file is preserved already.
    #[error("this file is already preserved (session {session}, token {token})")]
    AlreadyPreserved {
        /// Session holding it.
        session: String,
        /// Token it is under.
        token: u64,
    },
    /// The file type cannot be preserved by this kernel.
    #[error("cannot preserve {what}: only memfds can be preserved")]
    Unsupported {
        /// What the file is (its /proc/self/fd link).
        what: String,
    },
    /// A memfd that is not open read-write: luod could not read it at the
    /// handover (`O_PATH`, write-only), or would hand back a writable file
    /// for a read-only one (every backend restores memfds read-write).
    #[error("cannot preserve {what}: it is open {mode}; only a memfd open read-write (O_RDWR) can be preserved")]
    NotReadWrite {
        /// What the file is (its /proc/self/fd link).
        what: String,
        /// How it is open (`with O_PATH`, `write-only`, `read-only`).
        mode: &'static str,
    },
    /// The file was already taken back.
    #[error("session {session} token {token} was already retrieved")]
    AlreadyRetrieved {
        /// Session.
        session: String,
        /// Token.
        token: u64,
    },
    /// The device is held by another process.
    #[error("{what} is busy: another agent holds it")]
    Busy {
        /// Which device.
        what: String,
    },
    /// A system call failed.
    #[error("{op} failed: {errno} ({})", .errno.desc())]
    Sys {
        /// What was being done.
        op: String,
        /// The errno.
        errno: nix::errno::Errno,
    },
    /// Loading the target kernel failed.
    #[error("cannot load kernel {path}: {reason}")]
    Load {
        /// The image.
        path: String,
        /// Why.
        reason: String,
    },
    /// The kernel refused the target image's signature: it requires signed
    /// kexec images (lockdown, `CONFIG_KEXEC_SIG_FORCE`) and this one has no
    /// signature it trusts. The reason says which policy and what to do.
    #[error("cannot load kernel {path}: {reason}")]
    SignatureRejected {
        /// The image.
        path: String,
        /// The errno, the policy and what to do.
        reason: String,
    },
    /// The reboot did not happen (or a step luod needs for it failed).
    #[error("reboot failed: {0}")]
    Reboot(String),
    /// The fd park (the holder process, or systemd's fd store), which keeps
    /// a duplicate of each preserved file so that a crash of luod loses
    /// nothing, failed.
    #[error("{what}: {reason}")]
    Park {
        /// What luod was doing (`cannot park session vm0 token 3`).
        what: String,
        /// Why.
        reason: String,
    },
    /// The kernel has no live update, or it is off.
    #[error(
        "live update is not available: no /dev/liveupdate (the kernel needs CONFIG_LIVEUPDATE and `liveupdate=on` on its command line)"
    )]
    NotEnabled,
    /// A LUO call failed; `why` says what the errno means for this call.
    #[error("{op} failed with {errno}: {}", if .why.is_empty() { .errno.desc() } else { .why.as_str() })]
    Luo {
        /// The call.
        op: String,
        /// The errno.
        errno: nix::errno::Errno,
        /// What it means here.
        why: String,
    },
    /// The kernel does not speak the LUO uAPI luod was built for.
    #[error(
        "{op} failed with {errno}: the kernel's live-update uAPI differs from the one luod speaks; use a luod built for this kernel"
    )]
    Uapi {
        /// The call.
        op: String,
        /// `ENOTTY` or `E2BIG`.
        errno: nix::errno::Errno,
    },
}

/// The live-update interface of a kernel, as luod uses it.
pub trait Kernel: Send + std::fmt::Debug {
    /// Backend name (`file`, `luo`, `reserved-memory`, `fake`).
    fn name(&self) -> &'static str;
    /// How preserved contents reach the next kernel.
    fn handoff(&self) -> Handoff;
    /// True when `reboot` only simulates the kexec (luod exits, the same
    /// kernel keeps running): the next luod must treat the record as incoming
    /// even though the boot id did not change.
    fn simulates_kexec(&self) -> bool;
    /// Creates a session (LUO `CREATE_SESSION`).
    fn create_session(&mut self, name: &SessionName) -> Result<(), KernelError>;
    /// Opens a session of the previous kernel (LUO `RETRIEVE_SESSION`).
    fn retrieve_session(&mut self, name: &SessionName) -> Result<(), KernelError>;
    /// Preserves `fd` under `token` (LUO `PRESERVE_FD`). Takes ownership: the
    /// kernel keeps the file until the reboot or until the session ends.
    fn preserve_fd(&mut self, session: &SessionName, token: u64, fd: OwnedFd) -> Result<(), KernelError>;
    /// Takes back a file of a session of the previous kernel (LUO `RETRIEVE_FD`).
    fn retrieve_fd(&mut self, session: &SessionName, token: u64) -> Result<OwnedFd, KernelError>;
    /// Ends a session (LUO `FINISH` after retrieval; before the reboot,
    /// closing the session unpreserves its files).
    fn finish_session(&mut self, session: &SessionName) -> Result<(), KernelError>;
    /// Preserved files, for copying backends: session, token, and the file.
    /// (Borrowed: `prepare`, `freeze` and `reboot` walk every file, and a
    /// copy of the session's name per file is work that grows with them.)
    fn preserved(&self) -> Vec<(&SessionName, u64, BorrowedFd<'_>)>;
    /// Descriptors luod holds per preserved file (for `check`): its own and,
    /// unless the backend shares it with the park, the duplicate it keeps of
    /// what it parked.
    fn descriptors_per_file(&self) -> u64 {
        2
    }
    /// [`preserved`](Self::preserved) as the sources a copying handoff
    /// reads: with the mapping a backend made of a file, if it made one.
    fn preserved_sources(&self) -> Vec<(&SessionName, u64, crate::record::PreservedSource<'_>)> {
        self.preserved()
            .into_iter()
            .map(|(name, token, fd)| (name, token, crate::record::PreservedSource { fd, map: None }))
            .collect()
    }
    /// After a copying handoff: a file recreated from the region, to be
    /// retrieved later under `session`/`token`.
    fn adopt_incoming(&mut self, session: &SessionName, token: u64, fd: OwnedFd) -> Result<(), KernelError>;
    /// Takes back the files a previous luod of this same kernel parked
    /// (after a crash of luod); returns them as (session, token) pairs.
    fn recover(&mut self) -> Result<Vec<(SessionName, u64)>, KernelError>;
    /// Drops every session and file: the state a freshly booted kernel is in.
    fn discard_all(&mut self) -> Result<(), KernelError>;
    /// Checks that `image` is a kernel this kernel can kexec, before anything
    /// is loaded (the check `kexec_file_load` makes first). `name` is what
    /// the client calls it, for the message.
    fn check_image(&self, name: &str, image: BorrowedFd<'_>) -> Result<(), KernelError>;
    /// True when a kexec image is loaded already (`/sys/kernel/kexec_loaded`),
    /// so that `prepare` needs no `--kernel`.
    fn kexec_loaded(&self) -> bool;
    /// Loads the target kernel for kexec (`kexec_file_load`, which takes the
    /// descriptors).
    fn load_kernel(&mut self, load: &KernelLoad<'_>) -> Result<(), KernelError>;
    /// Unloads it.
    fn unload_kernel(&mut self) -> Result<(), KernelError>;
    /// Reboots into the loaded kernel. A real kexec does not return on success.
    fn reboot(&mut self) -> Result<RebootOutcome, KernelError>;
    /// How `reboot` reaches the new kernel, for a backend with a real kexec
    /// (`None`: the kexec is simulated, or the backend always kexecs itself).
    fn reboot_path(&self) -> Option<crate::systemd::RebootPath> {
        None
    }

    /// The reboot path as a cell `status` reads when it answers, so that a
    /// snapshot taken while the path is still being detected does not wait
    /// for it (see [`RebootPathCell`](crate::systemd::RebootPathCell)).
    fn reboot_path_cell(&self) -> Option<crate::systemd::RebootPathCell> {
        self.reboot_path().map(crate::systemd::RebootPathCell::known)
    }

    /// Readies the kernel interface for a new cycle, at the start of
    /// `prepare` (and of `rollback`): work luod's start leaves for later
    /// because the blackout does not need it (LUO: preserving luod's record
    /// in a new outgoing session). Nothing by default.
    fn before_cycle(&mut self) -> Result<(), KernelError> {
        Ok(())
    }

    /// What the operator should know about where preserved files are parked
    /// (the fd holder died and was replaced, ...), for `status`.
    fn park_notes(&self) -> Vec<String> {
        Vec::new()
    }

    /// Where the park's notes live when they change without a request
    /// (see [`FdPark::notes_cell`](crate::holder::FdPark::notes_cell)).
    fn park_notes_cell(&self) -> Option<crate::holder::ParkNotes> {
        None
    }
}
