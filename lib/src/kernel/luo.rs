//! The real Live Update Orchestrator: `/dev/liveupdate` (Linux 6.19+).
//!
//! Client sessions are real kernel sessions; luod keeps their fds open until
//! the reboot (closing one unpreserves its files) and parks duplicates in the
//! fd holder so a crash of luod loses nothing. `/dev/liveupdate` is exclusive,
//! so luod opens it only for the two calls that need it (create and retrieve
//! a session), retries `EBUSY` for a while, and then says who to look for.
//!
//! luod's own record lives in a memfd preserved in a session of its own,
//! named [`RECORD_SESSION`], so a LUO host needs nothing else: see
//! [`Luo::start`].

use super::{Handoff, Kernel, KernelError, KernelLoad, RebootOutcome, kexec, memfd, uapi};
use crate::holder::FdPark;
use crate::names::SessionName;
use crate::region::Region;
use crate::systemd::{RebootPath, RebootPathCell};
use nix::errno::Errno;
use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Name of luod's own session (clients cannot use it).
pub const RECORD_SESSION: &str = "luod";
/// systemd's own session (clients cannot use it either: systemd refuses a
/// session of that name in a fd store).
pub use crate::systemd::SYSTEMD_SESSION;
/// Token of the record memfd in luod's session.
const RECORD_TOKEN: u64 = 0;
/// Park keys of luod's own session and record.
const PARK_RECORD_SESSION: &str = "luod-session";
const PARK_RECORD: &str = "luod-record";
/// Park keys of luod's record as the previous kernel handed it over, until
/// `prepare` preserves it in a new outgoing session ([`Luo::before_cycle`]):
/// the retrieved record memfd itself, and luod's incoming session.
const PARK_INCOMING_RECORD: &str = "luod-record-in";
const PARK_INCOMING_RECORD_SESSION: &str = "luod-session-in";
/// How long luod retries `EBUSY` on `/dev/liveupdate`.
const BUSY_RETRY: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Outgoing {
    fd: OwnedFd,
    files: BTreeMap<u64, (OwnedFd, (u64, u64))>,
}

/// How [`Luo::start`] found the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LuoStart {
    /// No luod session anywhere: a fresh record memfd was created.
    Cold,
    /// luod restarted in the same kernel: its session came back from the holder.
    Restarted,
    /// The previous kernel handed over luod's session: a live update happened.
    Incoming,
    /// A LUO-aware systemd carried luod's fd store through the kexec: PID 1
    /// retrieved luod's sessions and passed them back (`LISTEN_FDS`); luod
    /// retrieved none itself.
    IncomingFromSystemd,
}

/// The LUO kernel interface.
#[derive(Debug)]
pub struct Luo {
    dev: PathBuf,
    outgoing: BTreeMap<SessionName, Outgoing>,
    incoming: BTreeMap<SessionName, OwnedFd>,
    park: Box<dyn FdPark>,
    recovered: Vec<(SessionName, u64)>,
    record_session: Option<OwnedFd>,
    /// Sessions of the previous kernel that systemd retrieved and handed
    /// back: `retrieve_session` takes them from here, never from the kernel
    /// (a second `RETRIEVE_SESSION` fails).
    delivered: BTreeMap<SessionName, OwnedFd>,
    reboot_path: RebootPathCell,
    /// After a live update, until `prepare`: luod's record memfd as the
    /// kernel handed it back (luod reads and writes it in place), and luod's
    /// incoming session when luod still has it. Preserving the record in a
    /// new outgoing session is left to [`Luo::before_cycle`]: the blackout
    /// does not need it.
    incoming_record: Option<(OwnedFd, Option<OwnedFd>)>,
}

fn park_session_key(name: &SessionName) -> String {
    format!("S\0{name}")
}

fn park_file_key(name: &SessionName, token: u64) -> String {
    format!("F\0{token}\0{name}")
}

/// Park key of a session of the previous kernel (retrieved, by systemd or
/// by luod), so that a restart of luod in `updated` finds it again.
fn park_incoming_key(name: &SessionName) -> String {
    format!("I\0{name}")
}

/// What the parked entries say about how luod starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkedStart {
    /// luod's session and its record memfd: a restart in the same kernel.
    Restarted,
    /// The record memfd of the previous kernel, retrieved and not preserved
    /// in a new session yet (luod came up after a live update and no
    /// `prepare` ran since): a restart in the same kernel.
    RestartedIncoming,
    /// luod's session without the record memfd: systemd carried the fd
    /// store through a kexec (the record memfd is preserved in luod's own
    /// session, so systemd cannot preserve it a second time, and drops it),
    /// and the session is one of the previous kernel's.
    FromSystemd,
    /// Neither: the kernel decides (an incoming session, or a cold start).
    Kernel,
}

/// Reads the park keys luod finds at start.
///
/// The keys luod parks are ordered so that a crash between two of them is
/// read right: after a live update the incoming record memfd is parked
/// first (`luod-record-in`), then luod's incoming session
/// (`luod-session-in`), then the session's old key (`luod-session`, from
/// systemd's fd store) is dropped; [`Luo::before_cycle`] parks the new
/// outgoing pair (`luod-record`, then `luod-session`) before it drops the
/// incoming one (whose session it finished first).
pub fn parked_start<'a>(keys: impl IntoIterator<Item = &'a str>) -> ParkedStart {
    let (mut session, mut record, mut record_in) = (false, false, false);
    for k in keys {
        session |= k == PARK_RECORD_SESSION;
        record |= k == PARK_RECORD;
        record_in |= k == PARK_INCOMING_RECORD;
    }
    match (session, record, record_in) {
        (true, true, _) => ParkedStart::Restarted,
        (_, _, true) => ParkedStart::RestartedIncoming,
        (true, false, false) => ParkedStart::FromSystemd,
        _ => ParkedStart::Kernel,
    }
}

/// What an errno from a LUO call means, in a sentence a person can act on
/// (errnos as `kernel/liveupdate/` and `mm/memfd_luo.c` return them, checked
/// on 7.2 and 7.3). Per-call meanings (`EEXIST` on a name or token, `ENOENT`
/// on a session, token or file type) are mapped at the call site first.
fn sys(op: &str, errno: Errno) -> KernelError {
    let why = match errno {
        // Kernel and luod disagree on the uAPI itself.
        Errno::ENOTTY | Errno::E2BIG => {
            return KernelError::Uapi {
                op: op.to_string(),
                errno,
            };
        }
        Errno::EINVAL => match op {
            "RETRIEVE_SESSION" => "the session was already retrieved in this kernel",
            "PRESERVE_FD" => "the session is not an outgoing one (it came from the previous kernel)",
            "RETRIEVE_FD" | "FINISH" => "the session is not one of the previous kernel's",
            _ => "the kernel refused an argument (an unknown ioctl number also gives EINVAL)",
        },
        Errno::EBUSY => match op {
            "PRESERVE_FD" => "this file is already preserved (by luod or another agent)",
            "FINISH" => "a preserved file cannot finish yet; retry, or see dmesg",
            _ => "the device is busy",
        },
        Errno::EOPNOTSUPP => {
            "the kernel does not support a value luod sent (e.g. memfd seals this kernel cannot carry)"
        }
        Errno::ENOSPC => "the kernel's table of sessions or files is full; preserve fewer",
        Errno::EFBIG => "the file is too large to preserve",
        Errno::EBADF => "the file descriptor is not open",
        Errno::ENOMEM => "the kernel is out of memory",
        Errno::EIO => "the previous kernel's live-update data could not be read; see dmesg (the handover is lost)",
        Errno::ENOENT => "no such session, token or handler",
        Errno::EMFILE | Errno::ENFILE => "too many open files (raise luod's RLIMIT_NOFILE)",
        _ => "",
    };
    KernelError::Luo {
        op: op.to_string(),
        errno,
        why: why.to_string(),
    }
}

/// Parking `what` (a session, a file, luod's record) failed.
fn park_err(what: String) -> impl FnOnce(std::io::Error) -> KernelError {
    move |e| KernelError::Park {
        what: format!("cannot park {what}"),
        reason: e.to_string(),
    }
}

/// A system call on a memfd failed.
fn io_sys(op: &'static str) -> impl Fn(std::io::Error) -> KernelError + Copy {
    move |e| KernelError::Sys {
        op: op.to_string(),
        errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

impl Luo {
    /// Opens `/dev/liveupdate` (exclusive), retrying `EBUSY` for a while.
    fn open_device(&self) -> Result<OwnedFd, KernelError> {
        let deadline = Instant::now() + BUSY_RETRY;
        loop {
            match nix::fcntl::open(
                &self.dev,
                nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            ) {
                Ok(fd) => return Ok(fd),
                Err(Errno::EBUSY) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Err(Errno::EBUSY) => {
                    return Err(KernelError::Busy {
                        what: format!(
                            "{} (held by another process for over {} s; systemd opens it before a kexec — find the holder with `fuser {}`)",
                            self.dev.display(),
                            BUSY_RETRY.as_secs(),
                            self.dev.display()
                        ),
                    });
                }
                Err(Errno::ENOENT) => return Err(KernelError::NotEnabled),
                Err(e) => return Err(sys("open /dev/liveupdate", e)),
            }
        }
    }

    /// Starts on the device at `dev`, parking in `park`, and returns luod's
    /// record memfd (`record_len` bytes when created here) and how the host
    /// was found.
    ///
    /// - luod's session is in the holder: luod restarted; every parked
    ///   session and file comes back.
    /// - The previous kernel handed luod's session over: its record memfd is
    ///   copied into a new one preserved in a new outgoing session (the
    ///   incoming one is finished), so the next cycle has its own.
    /// - Neither: a new session with a new, zeroed record memfd.
    pub fn start(
        dev: &Path,
        mut park: Box<dyn FdPark>,
        record_len: u64,
    ) -> Result<(Luo, OwnedFd, LuoStart), KernelError> {
        let parked = park.fetch_all().map_err(|e| KernelError::Park {
            what: "cannot take back the parked sessions".into(),
            reason: e.to_string(),
        })?;
        let mut luo = Luo {
            dev: dev.to_path_buf(),
            outgoing: BTreeMap::new(),
            incoming: BTreeMap::new(),
            park,
            recovered: Vec::new(),
            record_session: None,
            delivered: BTreeMap::new(),
            reboot_path: RebootPathCell::known(RebootPath::Direct {
                why: "luod does not park its sessions in systemd's fd store".into(),
            }),
            incoming_record: None,
        };
        let mut parked: BTreeMap<String, OwnedFd> = parked.into_iter().collect();
        match parked_start(parked.keys().map(String::as_str)) {
            ParkedStart::Restarted => {
                let session = parked.remove(PARK_RECORD_SESSION).expect("parked_start saw it");
                let record = parked.remove(PARK_RECORD).expect("parked_start saw it");
                luo.record_session = Some(session);
                // A crash inside before_cycle, after the new pair was
                // parked: the incoming pair is done with.
                if let Some(old) = parked.remove(PARK_INCOMING_RECORD_SESSION) {
                    let _ = uapi::finish(old.as_fd());
                    luo.unpark(PARK_INCOMING_RECORD_SESSION);
                }
                if parked.remove(PARK_INCOMING_RECORD).is_some() {
                    luo.unpark(PARK_INCOMING_RECORD);
                }
                luo.adopt_parked(parked);
                return Ok((luo, record, LuoStart::Restarted));
            }
            ParkedStart::RestartedIncoming => {
                let record = parked.remove(PARK_INCOMING_RECORD).expect("parked_start saw it");
                let session = match (
                    parked.remove(PARK_INCOMING_RECORD_SESSION),
                    parked.remove(PARK_RECORD_SESSION),
                ) {
                    (Some(session), stale) => {
                        // systemd's key of the same session, not dropped yet.
                        if stale.is_some() {
                            luo.unpark(PARK_RECORD_SESSION);
                        }
                        Some(session)
                    }
                    (None, Some(session)) => {
                        luo.put_parked(PARK_INCOMING_RECORD_SESSION, session.as_fd(), "luod's incoming session")?;
                        luo.unpark(PARK_RECORD_SESSION);
                        Some(session)
                    }
                    (None, None) => None,
                };
                let dup = record.try_clone().map_err(io_sys("dup (luod's record)"))?;
                luo.incoming_record = Some((dup, session));
                luo.adopt_parked(parked);
                return Ok((luo, record, LuoStart::Restarted));
            }
            ParkedStart::FromSystemd => {
                let session = parked.remove(PARK_RECORD_SESSION).expect("parked_start saw it");
                let record = luo.start_from_systemd(session, parked)?;
                return Ok((luo, record, LuoStart::IncomingFromSystemd));
            }
            ParkedStart::Kernel => {}
        }
        let t = std::time::Instant::now();
        let lap = |what: &str| tracing::debug!("LUO start: {what} at {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
        let dev_fd = luo.open_device()?;
        lap("device open");
        match uapi::retrieve_session(dev_fd.as_fd(), RECORD_SESSION) {
            Ok(old_session) => {
                drop(dev_fd);
                let record = uapi::retrieve_fd(old_session.as_fd(), RECORD_TOKEN)
                    .map_err(|e| sys("RETRIEVE_FD (luod record)", e))?;
                lap("incoming record retrieved");
                // Read and written in place; preserved again in a new
                // session at the next prepare (before_cycle), not here.
                luo.keep_incoming_record(&record, old_session)?;
                lap("incoming record and session parked");
                Ok((luo, record, LuoStart::Incoming))
            }
            Err(Errno::ENOENT) => {
                let record = memfd::create("luod-record").map_err(io_sys("memfd_create (luod's record)"))?;
                std::fs::File::from(record.try_clone().map_err(io_sys("dup (luod's record)"))?)
                    .set_len(record_len)
                    .map_err(io_sys("ftruncate (luod's record)"))?;
                luo.new_record_session(dev_fd.as_fd(), record.as_fd())?;
                Ok((luo, record, LuoStart::Cold))
            }
            Err(e) => Err(sys("RETRIEVE_SESSION luod", e)),
        }
    }

    /// systemd handed back luod's fd store after a kexec: `old_session` is
    /// luod's session of the previous kernel (retrieved by PID 1). Its record
    /// is copied into a new memfd preserved in a new session (as for an
    /// incoming session luod retrieves itself), and every other parked
    /// session is one of the previous kernel's, kept for `retrieve_session`.
    fn start_from_systemd(
        &mut self,
        old_session: OwnedFd,
        parked: BTreeMap<String, OwnedFd>,
    ) -> Result<OwnedFd, KernelError> {
        let old = uapi::retrieve_fd(old_session.as_fd(), RECORD_TOKEN).map_err(|e| match e {
            Errno::EINVAL => KernelError::Park {
                what: format!(
                    "luod's session {RECORD_SESSION} came back from systemd's fd store without its record memfd, \
                     and it is not a session of the previous kernel"
                ),
                reason: "the fd store lost luod's record: stop luod, then `systemctl clean --what=fdstore luod` \
                         and start it again (what luod had preserved is lost)"
                    .into(),
            },
            e => sys("RETRIEVE_FD (luod record from systemd)", e),
        })?;
        // Kept as it is, under the incoming keys (then systemd's key of
        // the session is dropped); preserved again in a new session at the
        // next prepare (before_cycle).
        self.keep_incoming_record(&old, old_session)?;
        self.unpark(PARK_RECORD_SESSION);
        let record = old;
        for (key, fd) in parked {
            let mut parts = key.split('\0');
            let name = match (parts.next(), parts.next(), parts.next()) {
                (Some("S" | "I"), Some(name), None) => SessionName::new(name).ok(),
                _ => None,
            };
            let Some(name) = name else {
                // A file luod preserved in one of its sessions: systemd
                // could not preserve it a second time (the session carries
                // it), so none should come back; drop any that did.
                tracing::warn!("dropping {key:?} from the fd store: not a session");
                self.unpark(&key);
                continue;
            };
            let dup = fd.try_clone().map_err(io_sys("dup (incoming session)"))?;
            self.park
                .put(&park_incoming_key(&name), dup)
                .map_err(park_err(format!("incoming session {name}")))?;
            if key != park_incoming_key(&name) {
                self.unpark(&key);
            }
            self.delivered.insert(name, fd);
        }
        Ok(record)
    }

    /// Sets how `reboot` reaches the new kernel.
    pub fn set_reboot_path(&mut self, path: RebootPath) {
        self.reboot_path = RebootPathCell::known(path);
    }

    /// Sets how `reboot` reaches the new kernel as a cell a detection fills
    /// later (`reboot` and `check` wait for it; see [`RebootPathCell`]).
    pub fn set_reboot_path_cell(&mut self, cell: RebootPathCell) {
        self.reboot_path = cell;
    }

    fn put_parked(&mut self, key: &str, fd: BorrowedFd<'_>, what: &str) -> Result<(), KernelError> {
        let dup = fd.try_clone_to_owned().map_err(io_sys("dup (luod's record)"))?;
        self.park.put(key, dup).map_err(park_err(what.to_string()))
    }

    /// After a live update: parks the incoming record memfd, then luod's
    /// incoming session, and keeps both for [`before_cycle`](Kernel::before_cycle).
    fn keep_incoming_record(&mut self, record: &OwnedFd, session: OwnedFd) -> Result<(), KernelError> {
        self.put_parked(PARK_INCOMING_RECORD, record.as_fd(), "luod's incoming record")?;
        self.put_parked(PARK_INCOMING_RECORD_SESSION, session.as_fd(), "luod's incoming session")?;
        let dup = record.try_clone().map_err(io_sys("dup (luod's record)"))?;
        self.incoming_record = Some((dup, Some(session)));
        Ok(())
    }

    /// luod's record in a new outgoing session: the record memfd is parked
    /// first (`luod-record`), then the session (`luod-session`), so a crash
    /// in between is read as a restart with the incoming record still to
    /// renew (see [`parked_start`]).
    fn new_record_session(&mut self, dev: BorrowedFd<'_>, record: BorrowedFd<'_>) -> Result<(), KernelError> {
        let session = uapi::create_session(dev, RECORD_SESSION).map_err(|e| sys("CREATE_SESSION luod", e))?;
        uapi::preserve_fd(session.as_fd(), record, RECORD_TOKEN).map_err(|e| sys("PRESERVE_FD (luod record)", e))?;
        self.put_parked(PARK_RECORD, record, "luod's record")?;
        self.put_parked(
            PARK_RECORD_SESSION,
            session.as_fd(),
            &format!("luod's own session {RECORD_SESSION}"),
        )?;
        self.record_session = Some(session);
        Ok(())
    }

    fn adopt_parked(&mut self, parked: BTreeMap<String, OwnedFd>) {
        let mut files = Vec::new();
        for (key, fd) in parked {
            let mut parts = key.split('\0');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("S"), Some(name), None) => {
                    if let Ok(name) = SessionName::new(name) {
                        self.outgoing.insert(
                            name,
                            Outgoing {
                                fd,
                                files: BTreeMap::new(),
                            },
                        );
                    }
                }
                (Some("I"), Some(name), None) => {
                    if let Ok(name) = SessionName::new(name) {
                        self.delivered.insert(name, fd);
                    }
                }
                (Some("F"), Some(token), Some(name)) => {
                    if let (Ok(token), Ok(name)) = (token.parse::<u64>(), SessionName::new(name)) {
                        files.push((name, token, fd));
                    }
                }
                _ => {}
            }
        }
        for (name, token, fd) in files {
            if let Some(s) = self.outgoing.get_mut(&name) {
                let identity = memfd::identity(fd.as_fd()).unwrap_or_default();
                s.files.insert(token, (fd, identity));
                self.recovered.push((name, token));
            }
        }
    }

    fn unpark(&mut self, key: &str) {
        if let Err(e) = self.park.remove(key) {
            tracing::warn!("fd holder did not drop {key:?}: {e}");
        }
    }
}

impl Kernel for Luo {
    fn name(&self) -> &'static str {
        "luo"
    }

    fn handoff(&self) -> Handoff {
        Handoff::Kernel
    }

    fn simulates_kexec(&self) -> bool {
        false
    }

    fn create_session(&mut self, name: &SessionName) -> Result<(), KernelError> {
        if name.as_str() == RECORD_SESSION || name.as_str() == SYSTEMD_SESSION || self.outgoing.contains_key(name) {
            return Err(KernelError::SessionExists(name.to_string()));
        }
        let dev = self.open_device()?;
        let fd = uapi::create_session(dev.as_fd(), name.as_str()).map_err(|e| match e {
            Errno::EEXIST => KernelError::SessionExists(name.to_string()),
            e => sys("CREATE_SESSION", e),
        })?;
        drop(dev);
        self.park
            .put(
                &park_session_key(name),
                fd.try_clone().map_err(io_sys("dup (session)"))?,
            )
            .map_err(park_err(format!("session {name}")))?;
        self.outgoing.insert(
            name.clone(),
            Outgoing {
                fd,
                files: BTreeMap::new(),
            },
        );
        Ok(())
    }

    fn retrieve_session(&mut self, name: &SessionName) -> Result<(), KernelError> {
        if let Some(fd) = self.delivered.remove(name) {
            // PID 1 retrieved it already: a second RETRIEVE_SESSION fails.
            self.incoming.insert(name.clone(), fd);
            return Ok(());
        }
        let dev = self.open_device()?;
        let fd = uapi::retrieve_session(dev.as_fd(), name.as_str()).map_err(|e| match e {
            Errno::ENOENT => KernelError::NoSuchSession(name.to_string()),
            e => sys("RETRIEVE_SESSION", e),
        })?;
        drop(dev);
        // Parked, so that a restart of luod before `finish` finds it again.
        self.park
            .put(
                &park_incoming_key(name),
                fd.try_clone().map_err(io_sys("dup (incoming session)"))?,
            )
            .map_err(park_err(format!("incoming session {name}")))?;
        self.incoming.insert(name.clone(), fd);
        Ok(())
    }

    fn preserve_fd(&mut self, session: &SessionName, token: u64, fd: OwnedFd) -> Result<(), KernelError> {
        let identity = memfd::identity(fd.as_fd()).map_err(io_sys("fstat"))?;
        for (name, s) in &self.outgoing {
            if let Some((t, _)) = s.files.iter().find(|(_, (_, id))| *id == identity) {
                return Err(KernelError::AlreadyPreserved {
                    session: name.to_string(),
                    token: *t,
                });
            }
        }
        let s = self
            .outgoing
            .get(session)
            .ok_or_else(|| KernelError::NoSuchSession(session.to_string()))?;
        uapi::preserve_fd(s.fd.as_fd(), fd.as_fd(), token).map_err(|e| match e {
            Errno::EEXIST => KernelError::TokenExists {
                session: session.to_string(),
                token,
            },
            Errno::ENOENT => KernelError::Unsupported {
                what: memfd::describe(fd.as_fd()),
            },
            Errno::EOPNOTSUPP => KernelError::Unsupported {
                what: format!("{} (its seals)", memfd::describe(fd.as_fd())),
            },
            e => sys("PRESERVE_FD", e),
        })?;
        self.park
            .put(&park_file_key(session, token), fd.try_clone().map_err(io_sys("dup"))?)
            .map_err(park_err(format!("session {session} token {token}")))?;
        self.outgoing
            .get_mut(session)
            .expect("checked above")
            .files
            .insert(token, (fd, identity));
        Ok(())
    }

    fn retrieve_fd(&mut self, session: &SessionName, token: u64) -> Result<OwnedFd, KernelError> {
        if let Some(s) = self.outgoing.get_mut(session) {
            // Same-kernel retrieval (dropping a file luod preserved but never
            // recorded): hand back luod's copy; the kernel keeps its own
            // until the session closes.
            let (fd, _) = s.files.remove(&token).ok_or_else(|| KernelError::NoSuchToken {
                session: session.to_string(),
                token,
            })?;
            self.unpark(&park_file_key(session, token));
            return Ok(fd);
        }
        // A restart of luod in `updated` finds the incoming sessions parked.
        if let Some(fd) = self.delivered.remove(session) {
            self.incoming.insert(session.clone(), fd);
        }
        let s = self
            .incoming
            .get(session)
            .ok_or_else(|| KernelError::NoSuchSession(session.to_string()))?;
        uapi::retrieve_fd(s.as_fd(), token).map_err(|e| match e {
            Errno::ENOENT => KernelError::NoSuchToken {
                session: session.to_string(),
                token,
            },
            e => sys("RETRIEVE_FD", e),
        })
    }

    fn finish_session(&mut self, session: &SessionName) -> Result<(), KernelError> {
        if let Some(fd) = self.delivered.remove(session) {
            self.incoming.insert(session.clone(), fd);
        }
        if let Some(fd) = self.incoming.remove(session) {
            uapi::finish(fd.as_fd()).map_err(|e| sys("FINISH", e))?;
            self.unpark(&park_incoming_key(session));
            return Ok(());
        }
        let s = self
            .outgoing
            .remove(session)
            .ok_or_else(|| KernelError::NoSuchSession(session.to_string()))?;
        for token in s.files.keys() {
            self.unpark(&park_file_key(session, *token));
        }
        self.unpark(&park_session_key(session));
        Ok(())
    }

    fn preserved(&self) -> Vec<(&SessionName, u64, BorrowedFd<'_>)> {
        let mut out = Vec::new();
        for (name, s) in &self.outgoing {
            for (token, (fd, _)) in &s.files {
                out.push((name, *token, fd.as_fd()));
            }
        }
        out
    }

    fn adopt_incoming(&mut self, session: &SessionName, _token: u64, _fd: OwnedFd) -> Result<(), KernelError> {
        Err(KernelError::Reboot(format!(
            "session {session}: the LUO backend does not adopt copied files"
        )))
    }

    fn recover(&mut self) -> Result<Vec<(SessionName, u64)>, KernelError> {
        Ok(std::mem::take(&mut self.recovered))
    }

    fn discard_all(&mut self) -> Result<(), KernelError> {
        for name in self.outgoing.keys().cloned().collect::<Vec<_>>() {
            self.finish_session(&name)?;
        }
        self.incoming.clear();
        Ok(())
    }

    fn check_image(&self, name: &str, image: BorrowedFd<'_>) -> Result<(), KernelError> {
        kexec::check_image(name, image)
    }

    fn kexec_loaded(&self) -> bool {
        kexec::loaded()
    }

    fn load_kernel(&mut self, load: &KernelLoad<'_>) -> Result<(), KernelError> {
        kexec::load(load)
    }

    fn unload_kernel(&mut self) -> Result<(), KernelError> {
        kexec::unload()
    }

    fn park_notes(&self) -> Vec<String> {
        self.park.notes()
    }

    fn park_notes_cell(&self) -> Option<crate::holder::ParkNotes> {
        self.park.notes_cell()
    }

    fn reboot(&mut self) -> Result<RebootOutcome, KernelError> {
        if self.record_session.is_none() {
            return Err(KernelError::Reboot(
                "luod's own session is not open; its record would be lost".into(),
            ));
        }
        reboot_along(&self.reboot_path.get(), kexec::loaded(), kexec::reboot_into_loaded)
    }

    fn reboot_path(&self) -> Option<RebootPath> {
        Some(self.reboot_path.get())
    }

    fn reboot_path_cell(&self) -> Option<RebootPathCell> {
        Some(self.reboot_path.clone())
    }

    /// After a live update luod reads and writes the record memfd the
    /// kernel handed back, and preserves it in a new outgoing session only
    /// here, at the next `prepare`: outside the blackout. The retrieved
    /// memfd itself is preserved again (no copy). The kernel refuses that
    /// (`EBUSY`) while the memfd's incoming session is not finished, so the
    /// incoming session is finished first; the memfd stays parked under
    /// `luod-record-in` throughout, so a crash in between is read as a
    /// restart with the record still to renew (see [`parked_start`]).
    fn before_cycle(&mut self) -> Result<(), KernelError> {
        let Some((record, old)) = self.incoming_record.take() else {
            return Ok(());
        };
        if let Some(old) = old
            && let Err(e) = uapi::finish(old.as_fd())
        {
            // Finished already (a restart after a crash right here).
            tracing::warn!("finishing luod's incoming session failed: {e}");
        }
        let renewed = self
            .open_device()
            .and_then(|dev| self.new_record_session(dev.as_fd(), record.as_fd()));
        if let Err(e) = renewed {
            self.incoming_record = Some((record, None));
            return Err(e);
        }
        tracing::info!("luod's record preserved in a new session {RECORD_SESSION} for the next kexec");
        self.unpark(PARK_INCOMING_RECORD_SESSION);
        self.unpark(PARK_INCOMING_RECORD);
        Ok(())
    }
}

/// `reboot` along `path`. Direct: `direct()` is the kexec itself (it does not
/// return on success; its error is returned). Systemd: `systemctl kexec`,
/// after checking that an image is still loaded (`kexec_loaded`), since with
/// none loaded `systemctl kexec` would load one of its own (the boot
/// loader's default entry) instead of the target luod loaded at `prepare`.
pub(crate) fn reboot_along(
    path: &RebootPath,
    kexec_loaded: bool,
    direct: impl FnOnce() -> KernelError,
) -> Result<RebootOutcome, KernelError> {
    match path {
        RebootPath::Direct { why } => {
            tracing::info!("reboot: direct kexec, skipping the orderly shutdown ({why})");
            Err(direct())
        }
        RebootPath::Systemd { systemctl, .. } => {
            if !kexec_loaded {
                return Err(KernelError::Reboot(
                    "no kernel is loaded for kexec any more (/sys/kernel/kexec_loaded is 0: it was unloaded since \
                     prepare); prepare again"
                        .into(),
                ));
            }
            tracing::info!("reboot: orderly shutdown, running `{} kexec`", systemctl.display());
            crate::systemd::systemctl_kexec(systemctl)
                .map_err(|e| KernelError::Reboot(format!("systemd refused the orderly kexec: {e}")))?;
            Ok(RebootOutcome::Orderly(
                "orderly shutdown under way (`systemctl kexec` queued kexec.target): systemd stops the units, \
                 carries luod's fd store (its sessions and record) through the kexec, and starts luod again in \
                 the new kernel"
                    .into(),
            ))
        }
    }
}

/// A region over luod's record memfd, mapped shared.
#[derive(Debug)]
pub struct MemfdRegion {
    map: memmap2::MmapMut,
    len: usize,
}

impl MemfdRegion {
    /// Maps the whole memfd.
    pub fn new(fd: OwnedFd) -> std::io::Result<Self> {
        let file = std::fs::File::from(fd);
        let len = file.metadata()?.len() as usize;
        // SAFETY: the memfd is private to luod (created here, or retrieved
        // from the kernel and copied into a new one); no other process maps
        // or truncates it, and its size is frozen by the kernel once
        // preserved, so the mapping stays valid for its lifetime.
        let map = unsafe { memmap2::MmapOptions::new().len(len).map_mut(&file)? };
        Ok(MemfdRegion { map, len })
    }
}

impl Region for MemfdRegion {
    fn len(&self) -> usize {
        self.len
    }
    fn bytes(&self) -> &[u8] {
        &self.map
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.map
    }
    fn describe(&self) -> String {
        format!("memfd in LUO session {RECORD_SESSION} ({} KiB)", self.len >> 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parked_entries_tell_a_restart_from_a_handover_by_systemd() {
        let restart = [PARK_RECORD_SESSION, PARK_RECORD, "S\0vm0", "F\u{0}1\u{0}vm0"];
        assert_eq!(parked_start(restart), ParkedStart::Restarted);
        // After a kexec systemd hands back sessions only: the record memfd
        // is preserved in luod's session, so systemd's second PRESERVE_FD of
        // it fails and the fd store entry is dropped.
        assert_eq!(parked_start([PARK_RECORD_SESSION, "S\0vm0"]), ParkedStart::FromSystemd);
        assert_eq!(parked_start([PARK_RECORD_SESSION]), ParkedStart::FromSystemd);
        assert_eq!(parked_start(["S\0vm0"]), ParkedStart::Kernel);
        assert_eq!(parked_start([PARK_RECORD]), ParkedStart::Kernel);
        assert_eq!(parked_start([]), ParkedStart::Kernel);
    }

    #[test]
    fn parked_entries_after_a_live_update_are_read_right_whenever_luod_stopped() {
        use ParkedStart::*;
        let (rec, ses, rec_in, ses_in) = (
            PARK_RECORD,
            PARK_RECORD_SESSION,
            PARK_INCOMING_RECORD,
            PARK_INCOMING_RECORD_SESSION,
        );
        // The start after a kexec parks the incoming record, then the
        // incoming session, then drops systemd's key of that session: a
        // crash after any of these steps restarts with the incoming record.
        for keys in [
            vec![rec_in],
            vec![rec_in, ses_in, "S\0vm0"],
            vec![ses, rec_in],
            vec![ses, rec_in, ses_in],
        ] {
            assert_eq!(parked_start(keys.iter().copied()), RestartedIncoming, "{keys:?}");
        }
        // before_cycle parks the new record, then the new session, then
        // drops the incoming pair: before the new session is parked the
        // incoming record is still the one to renew; after, it is a plain
        // restart (the leftovers are dropped).
        assert_eq!(parked_start([rec, rec_in, ses_in]), RestartedIncoming);
        assert_eq!(parked_start([rec, ses, rec_in, ses_in]), Restarted);
        assert_eq!(parked_start([rec, ses, rec_in]), Restarted);
        // A session parked before its record is never the incoming kind.
        assert_eq!(parked_start([ses_in]), Kernel);
    }

    #[test]
    fn every_luo_errno_gets_a_sentence() {
        let cases = [
            ("RETRIEVE_SESSION", Errno::EINVAL, "already retrieved"),
            ("PRESERVE_FD", Errno::EINVAL, "not an outgoing one"),
            ("PRESERVE_FD", Errno::EBUSY, "already preserved"),
            ("PRESERVE_FD", Errno::EOPNOTSUPP, "seals"),
            ("PRESERVE_FD", Errno::ENOSPC, "full"),
            ("PRESERVE_FD", Errno::EFBIG, "too large"),
            ("open /dev/liveupdate", Errno::EIO, "handover is lost"),
        ];
        for (op, errno, want) in cases {
            let msg = sys(op, errno).to_string();
            assert!(
                msg.starts_with(&format!("{op} failed with {errno}: ")) && msg.contains(want),
                "{msg}"
            );
        }
        for errno in [Errno::ENOTTY, Errno::E2BIG] {
            assert!(matches!(sys("CREATE_SESSION", errno), KernelError::Uapi { .. }));
            assert!(sys("CREATE_SESSION", errno).to_string().contains("uAPI differs"));
        }
    }
}
