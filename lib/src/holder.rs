//! Keeping preserved files alive across a crash of luod.
//!
//! Before the reboot, the only thing keeping a preserved file (or, on LUO, a
//! session) alive is an open file descriptor. If luod dies, they would die
//! with it. So luod parks a duplicate of each in an [`FdPark`]: a small holder
//! process it spawns ([`HolderClient`], serving [`run_holder`]) that outlives
//! it, and from which a luod started again takes them back.
//!
//! The holder speaks the frame protocol of [`crate::protocol::frame`] over its
//! own Unix socket, which is mode 0600 from the moment it has a name, and it
//! serves only its own uid (luod's): a connection from any other uid
//! (`SO_PEERCRED`) is closed unanswered, with a line in the log. It serves one
//! luod at a time, and exits:
//!
//! - on SIGTERM or SIGINT (dropping what it holds: the operator asked);
//! - when its socket path is removed or replaced;
//! - when luod disconnects and it holds nothing (see [`run_holder`] for why
//!   this is not racy against a luod that is connecting at that moment).
//!
//! luod keeps a duplicate of everything it parked, and a thread of its
//! [`HolderClient`] watches the connection: when the holder dies while luod
//! runs, luod starts a new one at once, parks everything again, and says so
//! in `status` ([`FdPark::notes`]).

use crate::protocol::frame::{self, FrameError};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// Somewhere to park file descriptors that must outlive luod.
pub trait FdPark: Send + std::fmt::Debug {
    /// Parks a file under `key` (replacing any file under it): as
    /// [`put_shared`](Self::put_shared) with the caller's descriptor.
    fn put(&mut self, key: &str, fd: OwnedFd) -> io::Result<()> {
        self.put_shared(key, &Arc::new(fd))
    }
    /// Drops the file under `key`.
    fn remove(&mut self, key: &str) -> io::Result<()>;
    /// Duplicates of every parked file; the park keeps its own.
    fn fetch_all(&mut self) -> io::Result<Vec<(String, OwnedFd)>>;
    /// Parks `fd` under `key` (replacing any file under it), sharing the
    /// caller's descriptor where the park keeps one in luod (the fd
    /// holder's client, systemd's fd store, [`MemPark`]): luod then holds
    /// each file open once, not twice.
    fn put_shared(&mut self, key: &str, fd: &SharedFd) -> io::Result<()>;
    /// Every parked file, as [`fetch_all`](Self::fetch_all), shared with
    /// the park where it keeps them in luod instead of duplicated.
    fn fetch_all_shared(&mut self) -> io::Result<Vec<(String, SharedFd)>> {
        Ok(self.fetch_all()?.into_iter().map(|(k, fd)| (k, Arc::new(fd))).collect())
    }
    /// Drops every file (what a kexec does to them). A holder process then
    /// ends once luod disconnects, as it holds nothing.
    fn clear(&mut self) -> io::Result<()>;
    /// What the operator should know about the park since luod started (the
    /// holder died and was replaced, ...), for `status`.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
    /// The cell its notes are kept in, when they can change without a
    /// request (the holder's watcher writes there), so `status` reads them
    /// live; `None` when [`notes`](Self::notes) only changes with requests.
    fn notes_cell(&self) -> Option<ParkNotes> {
        None
    }
}

/// A descriptor luod and its park both keep: one open file, however many
/// holders of it in luod (see [`FdPark::put_shared`]).
pub type SharedFd = Arc<OwnedFd>;

/// Notes about the park, written by the thread that watches the holder.
pub type ParkNotes = Arc<Mutex<VecDeque<String>>>;

/// Files sent in one reply of `FetchAll`.
const BATCH: usize = frame::MAX_FDS_PER_FRAME;

/// How long a luod waits for a holder's first answer. A holder serves one
/// luod at a time, so a second luod on the same state directory waits here.
const FIRST_ANSWER: Duration = Duration::from_secs(10);

/// How long a spawned holder may take to listen.
const SPAWN_DEADLINE: Duration = Duration::from_secs(5);

/// How many times luod connects again when a holder closes the connection
/// before its first answer (see [`run_holder`]: it was exiting).
const ATTEMPTS: usize = 5;

/// Notes kept for `status` (the oldest are dropped).
const MAX_NOTES: usize = 10;

/// Same-uid connections a holder queues while it serves another.
const MAX_QUEUED: usize = 16;

/// A request to the holder. The holder outlives the luod that started it (a
/// luod upgraded and restarted talks to the holder of the old one), so
/// variants are only ever appended.
#[derive(Debug, Serialize, Deserialize)]
pub enum HolderRequest {
    /// Park the one file sent with the frame under `key`.
    Put {
        /// The key.
        key: String,
    },
    /// Drop the file under `key`.
    Remove {
        /// The key.
        key: String,
    },
    /// Send duplicates of every parked file, in [`HolderReply::Batch`]es.
    FetchAll,
    /// Drop every file.
    Clear,
}

/// The holder's answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum HolderReply {
    /// Done.
    Ok,
    /// Some of the parked files (sent with the frame, in the order of `keys`).
    Batch {
        /// Keys of the files of this frame.
        keys: Vec<String>,
        /// True on the last batch.
        last: bool,
    },
    /// The request was refused.
    Error(String),
}

/// luod's side of the holder: a connection, a duplicate of every parked
/// file, and a thread that replaces the holder when it dies.
#[derive(Debug)]
pub struct HolderClient {
    link: Arc<Mutex<Link>>,
    notes: Arc<Mutex<VecDeque<String>>>,
    /// Write end of a pipe the watcher thread polls; dropping it stops the
    /// watcher.
    _stop: Option<OwnedFd>,
}

/// Starts a holder process (luod forks or re-executes itself).
pub type Spawner = Box<dyn Fn() -> io::Result<()> + Send + Sync>;

struct Link {
    path: PathBuf,
    spawn: Option<Spawner>,
    sock: UnixStream,
    /// The holder's pid, from `SO_PEERCRED`.
    pid: i32,
    /// Bumped each time the connection is replaced.
    generation: u64,
    /// What the holder holds, as luod's own descriptors (shared with the
    /// backend's, see [`FdPark::put_shared`]): re-parked in a new holder
    /// when this one dies.
    mirror: BTreeMap<String, SharedFd>,
    /// Notes for `status`, behind their own lock: `status` must not wait
    /// while a holder is being replaced.
    notes: Arc<Mutex<VecDeque<String>>>,
    /// An outage was reported already (no note per retry).
    outage_noted: bool,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("path", &self.path)
            .field("pid", &self.pid)
            .field("generation", &self.generation)
            .field("parked", &self.mirror.len())
            .finish_non_exhaustive()
    }
}

/// True when `e` means the holder's end of the connection is gone.
fn is_disconnect(e: &FrameError) -> bool {
    match e {
        FrameError::Closed | FrameError::Truncated { .. } => true,
        FrameError::Io(e) => matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::NotConnected
                | io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

fn to_io(e: FrameError) -> io::Error {
    match e {
        FrameError::Io(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

fn lock(link: &Mutex<Link>) -> MutexGuard<'_, Link> {
    link.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends `req` and reads one reply.
fn exchange(
    sock: &UnixStream,
    req: &HolderRequest,
    fds: &[BorrowedFd<'_>],
) -> Result<(HolderReply, Vec<OwnedFd>), FrameError> {
    frame::send(sock, req, fds)?;
    frame::recv(sock)
}

/// `FetchAll`: every parked file.
fn fetch(sock: &UnixStream) -> Result<Vec<(String, OwnedFd)>, FrameError> {
    frame::send(sock, &HolderRequest::FetchAll, &[])?;
    let mut out = Vec::new();
    loop {
        let (reply, fds): (HolderReply, Vec<OwnedFd>) = frame::recv(sock)?;
        match reply {
            HolderReply::Batch { keys, last } => {
                if keys.len() != fds.len() {
                    return Err(FrameError::Io(io::Error::other(
                        "fd holder sent a batch whose keys and files do not match",
                    )));
                }
                out.extend(keys.into_iter().zip(fds));
                if last {
                    return Ok(out);
                }
            }
            HolderReply::Error(e) => return Err(FrameError::Io(io::Error::other(e))),
            HolderReply::Ok => return Err(FrameError::Io(io::Error::other("fd holder answered Ok to FetchAll"))),
        }
    }
}

/// A connection to the holder at `path` that has received its first answer
/// (the parked files), the holder's pid, and those files.
///
/// When nothing listens at `path` (no socket, or a stale one) and `spawn` is
/// given, starts a holder. When a holder closes the connection before its
/// first answer, connects again: a holder with nothing parked that is exiting
/// closes connections that reached it only after it removed its socket, so
/// the next attempt finds no socket and starts a new holder (see
/// [`run_holder`]). A holder that refuses this uid closes every attempt.
fn open(path: &Path, spawn: Option<&Spawner>) -> io::Result<Opened> {
    for _ in 0..ATTEMPTS {
        let sock = match UnixStream::connect(path) {
            Ok(sock) => sock,
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
                let Some(spawn) = spawn else {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("no fd holder serves {}: {e}", path.display()),
                    ));
                };
                spawn()?;
                wait_for(path)?
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot connect to the fd holder at {}: {e}", path.display()),
                ));
            }
        };
        sock.set_read_timeout(Some(FIRST_ANSWER))?;
        match fetch(&sock) {
            Ok(files) => {
                sock.set_read_timeout(None)?;
                let pid = getsockopt(&sock, PeerCredentials).map(|c| c.pid()).unwrap_or(0);
                return Ok(Opened { sock, pid, files });
            }
            Err(e) if is_disconnect(&e) => continue,
            Err(FrameError::Io(e)) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the fd holder at {} did not answer within {} s: it serves one luod at a time, and another \
                         one is probably connected to it",
                        path.display(),
                        FIRST_ANSWER.as_secs()
                    ),
                ));
            }
            Err(e) => return Err(to_io(e)),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "the fd holder at {} closed the connection {ATTEMPTS} times before answering: it serves only its own \
             uid (this is uid {}); its log line says why",
            path.display(),
            nix::unistd::geteuid()
        ),
    ))
}

/// A connection [`open`] made.
struct Opened {
    sock: UnixStream,
    /// The holder's pid, from `SO_PEERCRED`.
    pid: i32,
    /// What it holds.
    files: Vec<(String, OwnedFd)>,
}

/// Waits until something listens at `path` (a holder just spawned).
fn wait_for(path: &Path) -> io::Result<UnixStream> {
    let deadline = Instant::now() + SPAWN_DEADLINE;
    loop {
        match UnixStream::connect(path) {
            Ok(sock) => return Ok(sock),
            Err(e) if Instant::now() > deadline => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("fd holder did not start at {}: {e}", path.display()),
                ));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

impl Link {
    fn note(&mut self, note: String) {
        let mut notes = self.notes.lock().unwrap_or_else(|p| p.into_inner());
        if notes.len() == MAX_NOTES {
            notes.pop_front();
        }
        notes.push_back(note);
    }

    /// Connects to a holder again (starting one) and parks every file of the
    /// mirror in it. Called when the connection broke: the holder died.
    fn replace_holder(&mut self) -> io::Result<()> {
        let old = self.pid;
        let result = self.reconnect_and_repark();
        match &result {
            Ok(()) => {
                let note = format!(
                    "the fd holder (pid {old}) ended while luod ran; luod parked its {} file descriptor(s) again in a \
                     new holder (pid {})",
                    self.mirror.len(),
                    self.pid
                );
                tracing::warn!("{note}");
                self.note(note);
                self.outage_noted = false;
            }
            Err(e) => {
                tracing::error!("the fd holder (pid {old}) ended and luod cannot replace it: {e}");
                if !self.outage_noted {
                    self.outage_noted = true;
                    self.note(format!(
                        "the fd holder (pid {old}) ended while luod ran and luod cannot start a new one ({e}): \
                         preserved files survive only as long as luod runs; luod keeps trying"
                    ));
                }
            }
        }
        result
    }

    fn reconnect_and_repark(&mut self) -> io::Result<()> {
        let Opened {
            sock,
            pid,
            files: found,
        } = open(&self.path, self.spawn.as_ref())?;
        self.sock = sock;
        self.pid = pid;
        self.generation += 1;
        // Normally a new, empty holder; a live one that had closed the
        // connection keeps what it has, made equal to the mirror.
        let mut extra: BTreeMap<String, OwnedFd> = found.into_iter().collect();
        for (key, fd) in &self.mirror {
            put_on(&self.sock, key, fd.as_fd())?;
            extra.remove(key);
        }
        for key in extra.keys() {
            expect_ok(exchange(&self.sock, &HolderRequest::Remove { key: key.clone() }, &[]))?;
        }
        Ok(())
    }

    /// One request; when the holder is gone, replaces it and asks again.
    fn request(&mut self, req: &HolderRequest, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let answer = match exchange(&self.sock, req, fds) {
            Err(e) if is_disconnect(&e) => {
                self.replace_holder()?;
                exchange(&self.sock, req, fds)
            }
            other => other,
        };
        expect_ok(answer).map_err(|e| io::Error::new(e.kind(), format!("fd holder at {}: {e}", self.path.display())))
    }
}

fn put_on(sock: &UnixStream, key: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
    expect_ok(exchange(sock, &HolderRequest::Put { key: key.to_string() }, &[fd]))
}

fn expect_ok(r: Result<(HolderReply, Vec<OwnedFd>), FrameError>) -> io::Result<()> {
    match r.map_err(to_io)?.0 {
        HolderReply::Ok => Ok(()),
        HolderReply::Error(e) => Err(io::Error::other(e)),
        HolderReply::Batch { .. } => Err(io::Error::other("the fd holder answered a batch to a request")),
    }
}

impl HolderClient {
    /// Connects to the holder at `path`, or runs `spawn` to start one and
    /// waits up to 5 s for it to listen; takes what it holds (see
    /// [`FdPark::fetch_all`]). A thread then watches the holder: when it
    /// dies, `spawn` starts a new one and every parked file goes to it.
    pub fn connect_or_spawn(path: &Path, spawn: Spawner) -> io::Result<Self> {
        let Opened { sock, pid, files } = open(path, Some(&spawn))?;
        let notes = Arc::default();
        let link = Arc::new(Mutex::new(Link {
            path: path.to_path_buf(),
            spawn: Some(spawn),
            sock,
            pid,
            generation: 0,
            mirror: files.into_iter().map(|(k, fd)| (k, Arc::new(fd))).collect(),
            notes: Arc::clone(&notes),
            outage_noted: false,
        }));
        let (stop_rx, stop_tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let weak = Arc::downgrade(&link);
        std::thread::Builder::new()
            .name("fd-holder-watch".into())
            .spawn(move || watch(weak, stop_rx))?;
        Ok(HolderClient {
            link,
            notes,
            _stop: Some(stop_tx),
        })
    }

    /// Connects to the holder at `path` and takes what it holds, without
    /// starting one and without a watcher (for tools and tests).
    pub fn connect(path: &Path) -> io::Result<Self> {
        let Opened { sock, pid, files } = open(path, None)?;
        let notes = Arc::default();
        Ok(HolderClient {
            link: Arc::new(Mutex::new(Link {
                path: path.to_path_buf(),
                spawn: None,
                sock,
                pid,
                generation: 0,
                mirror: files.into_iter().map(|(k, fd)| (k, Arc::new(fd))).collect(),
                notes: Arc::clone(&notes),
                outage_noted: false,
            })),
            notes,
            _stop: None,
        })
    }

    /// The pid of the holder luod is connected to.
    pub fn holder_pid(&self) -> i32 {
        lock(&self.link).pid
    }
}

/// The watcher: blocks until the holder's end of the connection closes, then
/// replaces the holder (unless a request did already). Ends when the
/// [`HolderClient`] is dropped.
fn watch(link: Weak<Mutex<Link>>, stop: OwnedFd) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(strong) = link.upgrade() else { return };
        let (generation, sock) = {
            let l = lock(&strong);
            (l.generation, l.sock.try_clone())
        };
        drop(strong);
        let sock = match sock {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("fd holder watcher: cannot duplicate the holder's connection: {e}");
                if stopped(&stop, Duration::from_secs(1)) {
                    return;
                }
                continue;
            }
        };
        let mut fds = [
            // No event asked: poll reports POLLHUP when the holder's end
            // closes (a Unix stream socket's peer closing shuts down both
            // directions), and never the replies this connection carries.
            PollFd::new(sock.as_fd(), PollFlags::empty()),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::warn!("fd holder watcher: poll failed: {e}");
                if stopped(&stop, Duration::from_secs(1)) {
                    return;
                }
                continue;
            }
        }
        if fds[1].revents().is_none_or(|r| !r.is_empty()) {
            return;
        }
        let hangup = PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL;
        if !fds[0].revents().is_none_or(|r| r.intersects(hangup)) {
            continue;
        }
        drop(sock);
        let Some(strong) = link.upgrade() else { return };
        let mut l = lock(&strong);
        if l.generation != generation {
            // A request found the holder gone and replaced it already.
            continue;
        }
        match l.replace_holder() {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(_) => {
                drop(l);
                drop(strong);
                if stopped(&stop, backoff) {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Waits up to `timeout` for the stop pipe; true when the client is gone.
fn stopped(stop: &OwnedFd, timeout: Duration) -> bool {
    let mut fds = [PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(n) if n > 0)
}

impl FdPark for HolderClient {
    fn put_shared(&mut self, key: &str, fd: &SharedFd) -> io::Result<()> {
        let mut l = lock(&self.link);
        l.request(&HolderRequest::Put { key: key.to_string() }, &[fd.as_fd()])?;
        l.mirror.insert(key.to_string(), Arc::clone(fd));
        Ok(())
    }

    fn fetch_all_shared(&mut self) -> io::Result<Vec<(String, SharedFd)>> {
        Ok(lock(&self.link)
            .mirror
            .iter()
            .map(|(k, fd)| (k.clone(), Arc::clone(fd)))
            .collect())
    }

    fn remove(&mut self, key: &str) -> io::Result<()> {
        let mut l = lock(&self.link);
        l.request(&HolderRequest::Remove { key: key.to_string() }, &[])?;
        l.mirror.remove(key);
        Ok(())
    }

    fn fetch_all(&mut self) -> io::Result<Vec<(String, OwnedFd)>> {
        lock(&self.link)
            .mirror
            .iter()
            .map(|(k, fd)| Ok((k.clone(), fd.try_clone()?)))
            .collect()
    }

    fn clear(&mut self) -> io::Result<()> {
        let mut l = lock(&self.link);
        l.request(&HolderRequest::Clear, &[])?;
        l.mirror.clear();
        Ok(())
    }

    fn notes(&self) -> Vec<String> {
        let notes = self.notes.lock().unwrap_or_else(|p| p.into_inner());
        notes.iter().cloned().collect()
    }

    fn notes_cell(&self) -> Option<ParkNotes> {
        Some(Arc::clone(&self.notes))
    }
}

/// An in-process park, for tests and for hosts where crash survival is not
/// wanted. Files die with the process.
#[derive(Debug, Default)]
pub struct MemPark(BTreeMap<String, SharedFd>);

impl FdPark for MemPark {
    fn put_shared(&mut self, key: &str, fd: &SharedFd) -> io::Result<()> {
        self.0.insert(key.to_string(), Arc::clone(fd));
        Ok(())
    }
    fn fetch_all_shared(&mut self) -> io::Result<Vec<(String, SharedFd)>> {
        Ok(self.0.iter().map(|(k, fd)| (k.clone(), Arc::clone(fd))).collect())
    }
    fn remove(&mut self, key: &str) -> io::Result<()> {
        self.0.remove(key);
        Ok(())
    }
    fn fetch_all(&mut self) -> io::Result<Vec<(String, OwnedFd)>> {
        self.0.iter().map(|(k, fd)| Ok((k.clone(), fd.try_clone()?))).collect()
    }
    fn clear(&mut self) -> io::Result<()> {
        self.0.clear();
        Ok(())
    }
}

/// Creates the listening socket at `path`, mode 0600 before it has that
/// name: it is bound in a fresh 0700 directory beside `path` (no other uid
/// can reach it there, whatever the umask), set to 0600, and renamed into
/// place, which also replaces a stale socket atomically.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let private = nix::unistd::mkdtemp(&dir.join(".hXXXXXX")).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("cannot create a directory in {}: {e}", dir.display()),
        )
    })?;
    let tmp = private.join("s");
    let bound = (|| {
        let listener = UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        Ok(listener)
    })();
    if bound.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let _ = std::fs::remove_dir(&private);
    bound
}

/// The stop signals, as bytes on a socket pair each: signal-hook's handler
/// writes one when the signal comes, so the loop sees it between requests.
/// (Not a signalfd: a kernel built without `CONFIG_SIGNALFD` has none.)
/// Every signal is unblocked once the handlers are in place: a holder forked
/// or started by luod inherits luod's blocked set. SIGHUP is ignored: the
/// holder outlives luod, and when luod dies while the holder is stopped
/// (SIGSTOP, a debugger) the kernel sends the holder's orphaned process
/// group SIGHUP, which would otherwise end it with every file.
struct StopSignals {
    /// Read ends, with the signal each stands for.
    pipes: Vec<(UnixStream, &'static str)>,
}

impl StopSignals {
    /// The name of a signal that came, if one did (reads its byte).
    fn received(&self, ready: &[bool]) -> Option<&'static str> {
        self.pipes.iter().zip(ready).find_map(|((pipe, name), ready)| {
            let mut byte = [0u8; 1];
            (*ready && matches!(std::io::Read::read(&mut &*pipe, &mut byte), Ok(1))).then_some(*name)
        })
    }
}

fn stop_signals() -> io::Result<StopSignals> {
    // SAFETY: SIG_IGN installs no handler, so no code of ours runs in a
    // signal context; nothing in this process relies on SIGHUP.
    unsafe { nix::sys::signal::signal(Signal::SIGHUP, nix::sys::signal::SigHandler::SigIgn) }?;
    let mut pipes = Vec::new();
    for (signal, name) in [
        (signal_hook::consts::SIGTERM, "SIGTERM"),
        (signal_hook::consts::SIGINT, "SIGINT"),
    ] {
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        signal_hook::low_level::pipe::register(signal, write)?;
        pipes.push((read, name));
    }
    SigSet::empty().thread_set_mask()?;
    Ok(StopSignals { pipes })
}

/// The holder process: serves the socket at `path` (see the module
/// documentation for when it exits). Only luod's uid, which is this
/// process's effective uid, is served.
///
/// # Exiting with nothing parked, without a race
///
/// luod connects and then waits for the answer to its first request. A
/// holder that exits with nothing parked when luod disconnects could exit
/// just as the next luod connects (a fast restart): that luod's `connect`
/// succeeded into the backlog, then its connection breaks. So the holder
/// first removes its socket path, which no `connect` can reach afterwards,
/// and only then closes the listener, which breaks the connections that came
/// before. Such a luod has had no answer, so it knows nothing was served: it
/// connects again, finds no socket, and starts a new holder. A holder with
/// files parked never does this, so no file can be lost this way; and a luod
/// waiting in the backlog when the holder decides is served instead.
pub fn run_holder(path: &Path) -> io::Result<()> {
    serve(path, nix::unistd::geteuid().as_raw())
}

/// True when a peer of uid `peer` may use a holder of luod's uid `owner`.
fn peer_allowed(peer: u32, owner: u32) -> bool {
    peer == owner
}

struct Holder<'a> {
    path: &'a Path,
    ino: u64,
    owner: u32,
    listener: UnixListener,
    parked: BTreeMap<String, OwnedFd>,
    active: Option<UnixStream>,
    queue: VecDeque<UnixStream>,
}

/// A line in luod's log (the holder's stderr is luod's). Never panics, as
/// `eprintln!` would on a closed stderr: the holder must not die of a log
/// line.
fn log(msg: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(io::stderr(), "luod fd holder (pid {}): {msg}", std::process::id());
}

fn serve(path: &Path, owner: u32) -> io::Result<()> {
    let signals = stop_signals()?;
    let listener = bind_private(path)?;
    listener.set_nonblocking(true)?;
    let ino = std::fs::metadata(path)?.ino();
    let mut h = Holder {
        path,
        ino,
        owner,
        listener,
        parked: BTreeMap::new(),
        active: None,
        queue: VecDeque::new(),
    };
    loop {
        let (sig, new, conn) = {
            let mut fds: Vec<PollFd<'_>> = signals
                .pipes
                .iter()
                .map(|(pipe, _)| PollFd::new(pipe.as_fd(), PollFlags::POLLIN))
                .collect();
            fds.push(PollFd::new(h.listener.as_fd(), PollFlags::POLLIN));
            if let Some(c) = &h.active {
                fds.push(PollFd::new(c.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, PollTimeout::from(1000u16)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            let ready = |i: usize| fds.get(i).is_some_and(|f| f.revents().is_none_or(|r| !r.is_empty()));
            let n = signals.pipes.len();
            ((0..n).map(ready).collect::<Vec<_>>(), ready(n), ready(n + 1))
        };
        if let Some(name) = signals.received(&sig) {
            log(format_args!(
                "{name} received; exiting, {} parked file descriptor(s) are closed",
                h.parked.len()
            ));
            h.remove_path_if_ours();
            return Ok(());
        }
        if conn && !h.serve_one() && h.next_connection().is_none() {
            return Ok(());
        }
        if new {
            h.accept_all();
        }
        if !h.still_ours() {
            if !h.parked.is_empty() {
                log(format_args!(
                    "its socket {} was removed or replaced; exiting, {} parked file descriptor(s) are closed",
                    path.display(),
                    h.parked.len()
                ));
            }
            return Ok(());
        }
    }
}

impl Holder<'_> {
    fn still_ours(&self) -> bool {
        std::fs::symlink_metadata(self.path)
            .map(|m| m.ino() == self.ino)
            .unwrap_or(false)
    }

    fn remove_path_if_ours(&self) {
        if self.still_ours() {
            let _ = std::fs::remove_file(self.path);
        }
    }

    /// Accepts every pending connection: other uids are closed unanswered,
    /// luod's are served or queued.
    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((conn, _)) => self.admit(conn),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log(format_args!("accept failed: {e}"));
                    return;
                }
            }
        }
    }

    fn admit(&mut self, conn: UnixStream) {
        let cred = match getsockopt(&conn, PeerCredentials) {
            Ok(c) => c,
            Err(e) => {
                log(format_args!("refused a connection: cannot read its credentials: {e}"));
                return;
            }
        };
        if !peer_allowed(cred.uid(), self.owner) {
            log(format_args!(
                "refused a connection from uid {} (pid {}): only uid {} (luod's) may use the fd holder",
                cred.uid(),
                cred.pid(),
                self.owner
            ));
            return;
        }
        let ready = conn.set_nonblocking(false).is_ok()
            && conn.set_read_timeout(Some(Duration::from_secs(5))).is_ok()
            && conn.set_write_timeout(Some(Duration::from_secs(5))).is_ok();
        if !ready {
            return;
        }
        if self.active.is_none() {
            self.active = Some(conn);
        } else if self.queue.len() < MAX_QUEUED {
            self.queue.push_back(conn);
        } else {
            log(format_args!(
                "refused a connection from pid {}: {MAX_QUEUED} connections wait already",
                cred.pid()
            ));
        }
    }

    /// After the active connection ended: the next one, or (nothing parked,
    /// nobody waiting) `None`, having removed the socket path first.
    fn next_connection(&mut self) -> Option<()> {
        self.active = self.queue.pop_front();
        if self.active.is_some() || !self.parked.is_empty() {
            return Some(());
        }
        // A luod waiting in the backlog already is served, not turned away.
        self.accept_all();
        if self.active.is_some() {
            return Some(());
        }
        // See run_holder: the path goes first, then the listener (when this
        // returns), breaking only connections that have had no answer.
        self.remove_path_if_ours();
        None
    }

    /// Serves one request of the active connection; false when it ended.
    fn serve_one(&mut self) -> bool {
        let Some(conn) = self.active.as_ref() else {
            return false;
        };
        let (req, mut fds): (HolderRequest, Vec<OwnedFd>) = match frame::recv(conn) {
            Ok(m) => m,
            Err(_) => return false,
        };
        let reply = match req {
            HolderRequest::Put { key } => match fds.pop() {
                Some(fd) if fds.is_empty() => {
                    self.parked.insert(key, fd);
                    HolderReply::Ok
                }
                _ => HolderReply::Error("Put needs exactly one file descriptor".into()),
            },
            HolderRequest::Remove { key } => {
                self.parked.remove(&key);
                HolderReply::Ok
            }
            HolderRequest::Clear => {
                self.parked.clear();
                HolderReply::Ok
            }
            HolderRequest::FetchAll => {
                let entries: Vec<(&String, &OwnedFd)> = self.parked.iter().collect();
                let chunks: Vec<_> = entries.chunks(BATCH).collect();
                let n = chunks.len().max(1);
                for i in 0..n {
                    let chunk: &[(&String, &OwnedFd)] = chunks.get(i).copied().unwrap_or(&[]);
                    let keys = chunk.iter().map(|(k, _)| (*k).clone()).collect();
                    let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(|(_, f)| f.as_fd()).collect();
                    if frame::send(conn, &HolderReply::Batch { keys, last: i + 1 == n }, &fds).is_err() {
                        return false;
                    }
                }
                return true;
            }
        };
        frame::send(conn, &reply, &[]).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::memfd;

    /// Runs a holder serving uid `owner` on a thread and waits until it
    /// listens (without connecting: a holder with nothing parked ends when a
    /// client leaves).
    fn serve_as(path: &Path, owner: u32) -> std::thread::JoinHandle<io::Result<()>> {
        let inode = || std::fs::symlink_metadata(path).map(|m| m.ino()).ok();
        let before = inode();
        let p = path.to_path_buf();
        let server = std::thread::spawn(move || serve(&p, owner));
        while inode().is_none() || inode() == before {
            std::thread::sleep(Duration::from_millis(5));
        }
        server
    }

    fn serve_here(path: &Path) -> std::thread::JoinHandle<io::Result<()>> {
        serve_as(path, nix::unistd::geteuid().as_raw())
    }

    #[test]
    fn files_parked_by_one_client_are_fetched_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holder.sock");
        let server = serve_here(&path);
        let mut c = HolderClient::connect(&path).unwrap();
        for i in 0..10 {
            c.put(&format!("k{i}"), memfd::from_bytes("t", &[i as u8; 3]).unwrap())
                .unwrap();
        }
        c.remove("k3").unwrap();
        drop(c);
        let mut c = HolderClient::connect(&path).unwrap();
        let all = c.fetch_all().unwrap();
        assert_eq!(all.len(), 9);
        assert!(all.iter().all(|(k, _)| k != "k3"));
        c.clear().unwrap();
        assert!(c.fetch_all().unwrap().is_empty(), "cleared, and still serving");
        drop(c);
        server.join().unwrap().unwrap();
        assert!(!path.exists(), "ends once luod disconnects and nothing is parked");
    }

    #[test]
    fn holder_exits_when_its_socket_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holder.sock");
        let server = serve_here(&path);
        let mut c = HolderClient::connect(&path).unwrap();
        c.put("k", memfd::from_bytes("t", b"x").unwrap()).unwrap();
        std::fs::remove_file(&path).unwrap();
        server.join().unwrap().unwrap();
    }

    #[test]
    fn the_socket_is_0600_and_no_temporary_directory_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holder.sock");
        // A stale socket file of a dead holder is replaced.
        drop(UnixListener::bind(&path).unwrap());
        let server = serve_here(&path);
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()));
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["holder.sock"]);
        drop(HolderClient::connect(&path).unwrap());
        server.join().unwrap().unwrap();
    }

    #[test]
    fn only_the_owner_uid_is_allowed() {
        assert!(peer_allowed(0, 0));
        assert!(peer_allowed(1000, 1000));
        assert!(!peer_allowed(65534, 0));
        assert!(!peer_allowed(0, 1000));
    }

    #[test]
    fn a_connection_from_another_uid_is_closed_unanswered_and_parks_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holder.sock");
        // This process is not the holder's owner: every request is refused.
        let me = nix::unistd::geteuid().as_raw();
        let server = serve_as(&path, me.wrapping_add(4242));
        let sock = UnixStream::connect(&path).unwrap();
        let fd = memfd::from_bytes("t", b"x").unwrap();
        // The put may or may not be sent before the holder closes; either
        // way nothing answers.
        let _ = frame::send(&sock, &HolderRequest::Put { key: "evil".into() }, &[fd.as_fd()]);
        let got = frame::recv::<HolderReply>(&sock);
        assert!(matches!(&got, Err(e) if is_disconnect(e)), "{got:?}");
        let err = HolderClient::connect(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(
            err.to_string(),
            format!(
                "the fd holder at {} closed the connection 5 times before answering: it serves only its own uid \
                 (this is uid {me}); its log line says why",
                path.display()
            )
        );
        std::fs::remove_file(&path).unwrap();
        server.join().unwrap().unwrap();
    }

    #[test]
    fn a_connection_waiting_when_the_last_client_leaves_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holder.sock");
        let server = serve_here(&path);
        let first = HolderClient::connect(&path).unwrap();
        // Queued behind the first (a holder serves one luod at a time):
        // connect returns once the connection is in the holder's backlog.
        let second = UnixStream::connect(&path).unwrap();
        frame::send(&second, &HolderRequest::FetchAll, &[]).unwrap();
        // The first leaves with nothing parked: the holder serves the second
        // instead of exiting.
        drop(first);
        let (reply, fds) = frame::recv::<HolderReply>(&second).expect("the waiting client is served");
        assert!(
            matches!(&reply, HolderReply::Batch { keys, last: true } if keys.is_empty()) && fds.is_empty(),
            "{reply:?}"
        );
        drop(second);
        server.join().unwrap().unwrap();
        assert!(!path.exists(), "then it ends");
    }

    #[test]
    fn a_client_of_an_exiting_empty_holder_starts_a_new_one() {
        // The start-up race, made certain: the connection reaches a holder
        // that has already decided to exit (here: a listener that is closed
        // after its path is removed, as run_holder does).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holder.sock");
        let dying = UnixListener::bind(&path).unwrap();
        let spawned = Arc::new(Mutex::new(None));
        let spawn: Spawner = {
            let path = path.clone();
            let spawned = spawned.clone();
            Box::new(move || {
                *spawned.lock().unwrap() = Some(serve_here(&path));
                Ok(())
            })
        };
        let closer = std::thread::spawn({
            let path = path.clone();
            move || {
                // Once the client's connection waits in the backlog: the
                // path goes, then the listener, as run_holder does.
                let mut fds = [PollFd::new(dying.as_fd(), PollFlags::POLLIN)];
                poll(&mut fds, PollTimeout::NONE).unwrap();
                std::fs::remove_file(&path).unwrap();
                drop(dying);
            }
        });
        let mut c = HolderClient::connect_or_spawn(&path, spawn).unwrap();
        closer.join().unwrap();
        c.put("k", memfd::from_bytes("t", b"x").unwrap()).unwrap();
        assert_ne!(c.holder_pid(), 0);
        c.clear().unwrap();
        drop(c);
        let server = spawned.lock().unwrap().take().expect("a new holder was started");
        server.join().unwrap().unwrap();
    }

    #[test]
    fn a_holder_that_dies_is_replaced_and_gets_every_file_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holder.sock");
        let servers = Arc::new(Mutex::new(Vec::new()));
        let spawn: Spawner = {
            let path = path.clone();
            let servers = servers.clone();
            Box::new(move || {
                servers.lock().unwrap().push(serve_here(&path));
                Ok(())
            })
        };
        let mut c = HolderClient::connect_or_spawn(&path, spawn).unwrap();
        for i in 0..6u8 {
            c.put(&format!("k{i}"), memfd::from_bytes("t", &[i; 5]).unwrap())
                .unwrap();
        }
        // "Kill" the holder: removing its socket makes it exit within a
        // second, dropping its files and closing luod's connection.
        std::fs::remove_file(&path).unwrap();
        let first = servers.lock().unwrap().remove(0);
        first.join().unwrap().unwrap();
        // The watcher notices and parks everything in a new holder.
        let deadline = Instant::now() + Duration::from_secs(5);
        while c.notes().is_empty() {
            assert!(Instant::now() < deadline, "no note after the holder died");
            std::thread::sleep(Duration::from_millis(10));
        }
        let pid = std::process::id();
        assert_eq!(
            c.notes(),
            [format!(
                "the fd holder (pid {pid}) ended while luod ran; luod parked its 6 file descriptor(s) again in a new \
                 holder (pid {pid})"
            )]
        );
        drop(c);
        // What the new holder holds, seen by the next client.
        let mut next = HolderClient::connect(&path).unwrap();
        let all = next.fetch_all().unwrap();
        let keys: Vec<_> = all.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["k0", "k1", "k2", "k3", "k4", "k5"]);
        for (i, (_, fd)) in all.iter().enumerate() {
            let mut buf = [0u8; 5];
            std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::from(fd.try_clone().unwrap()), &mut buf, 0)
                .unwrap();
            assert_eq!(buf, [i as u8; 5]);
        }
        next.clear().unwrap();
        drop(next);
        let second = servers.lock().unwrap().remove(0);
        second.join().unwrap().unwrap();
    }
}
