//! The socket server: accepts clients, checks who they are, and hands their
//! requests to the engine one at a time.

use crate::args::{Args, Backend};
use crate::backend::{self, StartError};
use crate::peer;
use liveupdate::engine::{Caller, Engine, EngineError, Rebooted, SIMULATED_KEXEC_EXIT, Snapshot};
use liveupdate::protocol::frame::{self, FrameError};
use liveupdate::protocol::{ErrorKind, ErrorReply, PROTOCOL_VERSION, Request, Response, SessionInfo};
use liveupdate::region::Region;
use nix::sys::signal::{SigSet, Signal};
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// The engine, which runs changes one at a time, and the snapshot of its
/// committed state that read requests are answered from without waiting
/// for it.
struct Shared<R: Region> {
    engine: Mutex<Engine<R>>,
    snapshot: RwLock<Arc<Snapshot>>,
    /// systemd's notification socket: `STATUS=` follows every change.
    notifier: Option<liveupdate::systemd::Notifier>,
}

impl<R: Region> Shared<R> {
    fn new(engine: Engine<R>) -> Self {
        let snapshot = RwLock::new(Arc::new(engine.snapshot()));
        Shared {
            engine: Mutex::new(engine),
            snapshot,
            notifier: None,
        }
    }

    /// Tells systemd (`STATUS=`, shown by `systemctl status luod`).
    fn show(&self, status: &str) {
        if let Some(n) = &self.notifier
            && let Err(e) = n.notify(&format!("STATUS={status}"), &[])
        {
            tracing::warn!("cannot notify systemd: {e}");
        }
    }

    /// The state as of the last change.
    fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Runs one change on the engine, showing it as in progress meanwhile,
    /// then publishes the engine's new state for readers.
    fn change<T>(&self, kind: &str, run: impl FnOnce(&mut Engine<R>) -> T) -> T {
        let mut engine = self.engine.lock().unwrap_or_else(|p| p.into_inner());
        self.show(&format!("state {}; {kind} in progress", engine.state()));
        let out = {
            let _running = engine.progress().clone().begin(kind);
            run(&mut engine)
        };
        let next = Arc::new(engine.snapshot());
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = next;
        self.show(&status_line(&engine));
        out
    }
}

/// What `STATUS=` says between changes.
fn status_line<R: Region>(engine: &Engine<R>) -> String {
    if engine.handed_over() {
        format!(
            "state {}; handover written, kexec under way: luod refuses changes",
            engine.state()
        )
    } else {
        format!("state {}", engine.state())
    }
}

/// Changes taken by the engine thread and not answered yet: on SIGTERM luod
/// waits for them, so that the answer to a `reboot` on the systemd path
/// (after which systemd stops luod at once) reaches its client.
static ANSWERING: AtomicUsize = AtomicUsize::new(0);

/// How long luod, stopping, waits for the answer to a change in progress.
const ANSWER_GRACE: Duration = Duration::from_secs(10);

/// Exit status requested by a thread (-1: keep running).
static EXIT: AtomicI32 = AtomicI32::new(-1);

/// Runs luod until SIGTERM/SIGINT or a simulated kexec; returns the exit status.
pub fn run(args: &Args) -> Result<u8, StartError> {
    // Block the stop signals in every thread; one thread waits for them.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGTERM);
    stop.add(Signal::SIGINT);
    stop.thread_block().map_err(|e| StartError::Io {
        what: "cannot block signals for",
        path: "luod".into(),
        source: e.into(),
    })?;

    let backend = backend::choose(args)?;
    let listener = bind(&args.socket, args.socket_group.as_deref())?;
    tracing::debug!("socket bound; opening the {backend:?} backend");
    match backend {
        Backend::Luo => serve_engine(args, listener, stop, backend::luo(args)?),
        Backend::ReservedMemory => serve_engine(args, listener, stop, backend::reserved_memory(args)?),
        Backend::File | Backend::Auto => serve_engine(args, listener, stop, backend::file(args)?),
    }
}

fn serve_engine<R: Region + 'static>(
    args: &Args,
    listener: UnixListener,
    stop: SigSet,
    started: backend::Started<R>,
) -> Result<u8, StartError> {
    let backend::Started {
        engine,
        _lock,
        after_ready,
    } = started;
    let bound = std::fs::symlink_metadata(&args.socket)
        .map(|m| (m.dev(), m.ino()))
        .unwrap_or_default();
    for note in engine.notes() {
        tracing::warn!("{note}");
    }
    tracing::info!(
        "luod {} serving {} (backend {}, state {}, record generation {})",
        env!("CARGO_PKG_VERSION"),
        args.socket.display(),
        // Not `status`: it would wait for a reboot path still being detected.
        engine.snapshot().backend(),
        engine.state(),
        engine.generation()
    );
    // READY=1 only now: the record is loaded and the engine open (an
    // incoming handover taken), and the socket is bound, so a unit ordered
    // After=luod.service finds luod answering.
    let mut shared = Shared::new(engine);
    shared.notifier = match liveupdate::systemd::Notifier::from_env() {
        Some(Ok(n)) => Some(n),
        Some(Err(e)) => {
            tracing::warn!("cannot use systemd's notification socket: {e}");
            None
        }
        None => None,
    };
    if let Some(n) = &shared.notifier {
        let status = status_line(&shared.engine.lock().unwrap_or_else(|p| p.into_inner()));
        if let Err(e) = n.notify(&format!("READY=1\nSTATUS={status}"), &[]) {
            tracing::warn!("cannot notify systemd: {e}");
        }
    }
    let engine = Arc::new(shared);

    let socket = args.socket.clone();
    std::thread::spawn(move || {
        if let Ok(sig) = stop.wait() {
            tracing::info!("{sig} received, shutting down");
            EXIT.store(0, Ordering::SeqCst);
            // Wake the accept loop.
            let _ = UnixStream::connect(&socket);
        }
    });

    let timeout = Duration::from_secs(args.client_timeout.max(1));
    let limits = Arc::new(Limits::new(
        args.max_connections as usize,
        args.max_connections_per_uid as usize,
    ));
    let events = Arc::new(Events::new(timeout).map_err(|e| StartError::Io {
        what: "cannot create the epoll instance for",
        path: args.socket.display().to_string(),
        source: e.into(),
    })?);
    let (jobs, changes) = start_threads(&engine, &events, args.socket.clone()).map_err(|e| StartError::Io {
        what: "cannot start the threads that serve",
        path: args.socket.display().to_string(),
        source: e,
    })?;
    tracing::debug!("threads started; accepting connections");
    // What the start left for later (the reboot path's detection): readers
    // that need it wait for it, nobody else does.
    if let Some(work) = after_ready
        && let Err(e) = std::thread::Builder::new().name("luod-after-ready".into()).spawn(work)
    {
        tracing::error!("cannot start the thread that detects the reboot path: {e}");
    }
    run_loop(&listener, &events, &limits, &jobs, timeout);
    drop((jobs, changes));
    // The change in progress answers first (bounded: a freeze waiting for
    // VMs ends within --vm-timeout).
    let deadline = Instant::now() + ANSWER_GRACE;
    while ANSWERING.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let code = EXIT.load(Ordering::SeqCst).max(0);
    // Only the socket this luod bound: never a file put there since.
    if std::fs::symlink_metadata(&args.socket).is_ok_and(|m| (m.dev(), m.ino()) == bound) {
        let _ = std::fs::remove_file(&args.socket);
    }
    // Hold the engine lock while exiting so no request is half-served.
    let _guard = engine.engine.lock().unwrap_or_else(|p| p.into_inner());
    tracing::info!("luod exits with status {code}");
    Ok(code as u8)
}

/// How long a refusal may take to reach a client luod turns away.
const REFUSAL_SEND_TIMEOUT: Duration = Duration::from_millis(100);

/// Connections root may open beyond `--max-connections`.
const ROOT_RESERVE: usize = 8;

/// At most one log line per this interval about refused connections or
/// failing accepts.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A log line that is written at most once per [`LOG_INTERVAL`], with the
/// number of times it happened since the last one.
#[derive(Debug)]
struct Throttle(Mutex<(u64, Option<Instant>)>);

impl Throttle {
    const fn new() -> Self {
        Throttle(Mutex::new((0, None)))
    }

    /// Counts one event; calls `log` with the count when a line is due.
    fn event(&self, log: impl FnOnce(u64)) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        t.0 += 1;
        if t.1.is_none_or(|at| at.elapsed() >= LOG_INTERVAL) {
            log(t.0);
            *t = (0, Some(Instant::now()));
        }
    }
}

/// Connections refused because luod could not read who is connecting.
static CREDENTIAL_FAILURES: Throttle = Throttle::new();

/// Counts the connections being served and turns away those beyond the
/// caps: `--max-connections` in all, `--max-connections-per-uid` for each
/// uid but root.
#[derive(Debug)]
struct Limits {
    max: usize,
    per_uid: usize,
    /// Connections served, in all and per uid.
    active: Mutex<Active>,
    refused: Throttle,
}

#[derive(Debug, Default)]
struct Active {
    total: usize,
    by_uid: HashMap<u32, usize>,
}

/// One served connection; frees its place when dropped.
#[derive(Debug)]
struct Slot {
    limits: Arc<Limits>,
    uid: Option<u32>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut a = self.limits.active.lock().unwrap_or_else(|p| p.into_inner());
        a.total -= 1;
        if let Some(uid) = self.uid
            && let Some(n) = a.by_uid.get_mut(&uid)
        {
            *n -= 1;
            if *n == 0 {
                a.by_uid.remove(&uid);
            }
        }
    }
}

impl Limits {
    fn new(max: usize, per_uid: usize) -> Self {
        Limits {
            max,
            per_uid,
            active: Mutex::new(Active::default()),
            refused: Throttle::new(),
        }
    }

    /// A place for `conn`, or `None` after telling the client why not.
    /// Root (uid 0 in luod's namespace, from `SO_PEERCRED`) has no per-uid
    /// cap and may use [`ROOT_RESERVE`] places beyond the overall one.
    fn admit(self: &Arc<Self>, conn: &UnixStream) -> Option<Slot> {
        let uid = nix::sys::socket::getsockopt(conn, nix::sys::socket::sockopt::PeerCredentials)
            .ok()
            .map(|c| c.uid());
        let root = uid == Some(0);
        let cap = if root { self.max + ROOT_RESERVE } else { self.max };
        let refusal = {
            let mut a = self.active.lock().unwrap_or_else(|p| p.into_inner());
            let of_uid = uid.map_or(0, |u| a.by_uid.get(&u).copied().unwrap_or(0));
            if a.total >= cap {
                format!(
                    "luod serves at most {} connections at once (--max-connections) and all are in use; try again later",
                    self.max
                )
            } else if !root && of_uid >= self.per_uid {
                format!(
                    "uid {} has {of_uid} connections to luod open, the most one user may have \
                     (--max-connections-per-uid); close one and try again",
                    uid.unwrap_or(u32::MAX)
                )
            } else {
                a.total += 1;
                if let Some(u) = uid.filter(|_| !root) {
                    *a.by_uid.entry(u).or_insert(0) += 1;
                }
                return Some(Slot {
                    limits: self.clone(),
                    uid: uid.filter(|_| !root),
                });
            }
        };
        // The client has sent nothing yet, so the socket's buffer is empty
        // and this small frame goes out at once; never wait long for it.
        let _ = conn.set_write_timeout(Some(REFUSAL_SEND_TIMEOUT));
        let _ = frame::send(conn, &protocol_error(refusal), &[]);
        self.refused.event(|n| {
            let a = self.active.lock().unwrap_or_else(|p| p.into_inner());
            tracing::warn!(
                "refused {n} connection(s): {} are being served (--max-connections {}, --max-connections-per-uid {}); \
                 next report in {} s at the earliest",
                a.total,
                self.max,
                self.per_uid,
                LOG_INTERVAL.as_secs()
            )
        });
        None
    }
}

/// What the accept loop does when `accept` fails: out of descriptors or
/// memory, it waits before trying again (the pending connection stays in the
/// backlog) instead of spinning, and logs at most once per [`LOG_INTERVAL`].
#[derive(Debug, Default)]
struct AcceptBackoff {
    /// Failures since the last log line.
    failures: u64,
    /// Failures in a row (sets the pause).
    streak: u32,
    logged: Option<Instant>,
}

impl AcceptBackoff {
    fn failed(&mut self, e: &std::io::Error) {
        use nix::errno::Errno;
        let errno = e.raw_os_error().map(Errno::from_raw);
        // A signal, or a client that gave up while waiting: nothing is wrong.
        if matches!(errno, Some(Errno::EINTR | Errno::ECONNABORTED)) {
            return;
        }
        self.failures += 1;
        self.streak = self.streak.saturating_add(1);
        let scarce = matches!(
            errno,
            Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
        );
        if self.logged.is_none_or(|at| at.elapsed() >= LOG_INTERVAL) {
            let why = if scarce {
                "luod is out of file descriptors or memory; it waits for connections to close"
            } else {
                "retrying"
            };
            tracing::warn!(
                "accept failed {} time(s): {e}; {why} (next report in {} s at the earliest)",
                self.failures,
                LOG_INTERVAL.as_secs()
            );
            self.failures = 0;
            self.logged = Some(Instant::now());
        }
        self.pause();
    }

    /// Waits before the next accept: 10 ms, doubling with every failure in
    /// a row, at most 320 ms.
    fn pause(&self) {
        let ms = 10u64 << (self.streak.clamp(1, 6) - 1);
        std::thread::sleep(Duration::from_millis(ms));
    }

    fn recovered(&mut self) {
        if self.logged.is_some() && self.streak > 0 {
            tracing::info!("accepting connections again");
            self.logged = None;
            self.failures = 0;
        }
        self.streak = 0;
    }
}

/// Binds the socket (mode 0660), replacing a stale one but never a live one.
fn bind(path: &std::path::Path, group: Option<&str>) -> Result<UnixListener, StartError> {
    let io = |what: &'static str| {
        move |source| StartError::Io {
            what,
            path: path.display().to_string(),
            source,
        }
    };
    if let Some(dir) = path.parent() {
        // Searchable by all: the socket's own mode and group decide who connects.
        liveupdate::fsutil::create_dirs("directory of socket", dir, 0o755)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(StartError::SocketInUse(path.display().to_string()));
            }
            // A socket nobody listens on: left by a luod that died.
            std::fs::remove_file(path).map_err(io("cannot remove stale socket"))?;
        }
        Ok(m) => {
            return Err(StartError::NotASocket {
                path: path.display().to_string(),
                kind: liveupdate::fsutil::kind_of(m.file_type()),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("cannot inspect socket path")(e)),
    }
    let listener = UnixListener::bind(path).map_err(io("cannot bind socket"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(io("cannot set mode 0660 on socket"))?;
    if let Some(group) = group {
        let gid = match group.parse::<u32>() {
            Ok(gid) => nix::unistd::Gid::from_raw(gid),
            Err(_) => match nix::unistd::Group::from_name(group) {
                Ok(Some(g)) => g.gid,
                _ => {
                    let source = std::io::Error::new(std::io::ErrorKind::NotFound, format!("no group named {group}"));
                    return Err(io("cannot give the socket to --socket-group")(source));
                }
            },
        };
        nix::unistd::chown(path, None, Some(gid)).map_err(|e| io("cannot chown socket")(e.into()))?;
    }
    Ok(listener)
}

fn protocol_error(message: String) -> Response {
    Response::Error(ErrorReply {
        kind: ErrorKind::Protocol,
        message,
        hint: String::new(),
        step: None,
    })
}

/// Sends `resp` on `conn`; a failure is logged (the client learns nothing
/// more, so luod's log is where it shows).
fn send_logged(
    conn: &UnixStream,
    caller: &Caller,
    kind: &str,
    resp: &Response,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> bool {
    match frame::send(conn, resp, fds) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(
                "cannot send the answer to {kind} to client pid {} uid {}: {e}",
                caller.pid,
                caller.uid
            );
            false
        }
    }
}

/// Makes `resp` fit in one frame. A `status` too large is summarised: the
/// sessions that fit are kept, in order, and a note says how many were
/// left out. Any other answer too large becomes an error saying so.
fn fit(kind: &str, resp: Response) -> Response {
    let limit = frame::MAX_FRAME_LEN as usize;
    let len = match frame::encoded_len(&resp) {
        Ok(len) if len <= limit => return resp,
        Ok(len) => len,
        Err(e) => {
            return Response::Error(ErrorReply {
                kind: ErrorKind::Internal,
                message: format!("cannot encode the answer to {kind}: {e}"),
                hint: String::new(),
                step: None,
            });
        }
    };
    if let Response::Status(mut report) = resp {
        let total = report.sessions.len();
        let sessions = std::mem::take(&mut report.sessions);
        // Room for the note, with digits to spare.
        let note = |shown: usize| {
            format!(
                "showing {shown} of {total} sessions: the whole list does not fit in one answer ({} bytes at most); \
                 each owner sees its own with `luoctl session list`",
                frame::MAX_FRAME_LEN
            )
        };
        report.notes.push(note(total));
        let base = frame::encoded_len(&Response::Status(report.clone())).unwrap_or(limit);
        report.sessions = fitting(sessions.into_iter(), limit.saturating_sub(base));
        let keep = report.sessions.len();
        *report.notes.last_mut().expect("the note just pushed") = note(keep);
        tracing::warn!("status for a client lists {keep} of {total} sessions: the whole answer would be {len} bytes");
        return Response::Status(report);
    }
    tracing::warn!("the answer to {kind} would be {len} bytes, more than a frame holds ({limit})");
    Response::Error(ErrorReply {
        kind: ErrorKind::Internal,
        message: format!("the answer to {kind} would be {len} bytes, more than one frame holds ({limit} bytes)"),
        hint: if kind == "session-list" {
            "ask page by page with session-list-from, as `luoctl session list` does".into()
        } else {
            "see luod's log".into()
        },
        step: None,
    })
}

/// Room for the sessions of one `session-list-from` page: a frame, less
/// room for the response's own bytes.
const SESSION_PAGE_BUDGET: usize = frame::MAX_FRAME_LEN as usize - 64;

/// The first `sessions` whose encoding fits in `budget` bytes, in order.
fn fitting(sessions: impl Iterator<Item = SessionInfo>, budget: usize) -> Vec<SessionInfo> {
    let mut used = 0;
    let mut out = Vec::new();
    for s in sessions {
        // The session, and up to 8 more bytes for the list's length prefix.
        let one = frame::encoded_len(&s).unwrap_or(budget);
        if used + one + 8 > budget {
            break;
        }
        used += one;
        out.push(s);
    }
    out
}

/// Threads that serve connections between the event loop and the engine:
/// they learn who connected, read what arrived, answer hellos and reads
/// from the snapshot, and send answers. A fixed number, whatever the
/// number of connections.
const WORKERS: usize = 4;

/// The epoll key of the listening socket (a connection's key is its fd).
const LISTENER: u64 = u64::MAX;

/// A connection between its requests: parked in the event loop, or being
/// served by one thread.
struct Conn {
    stream: UnixStream,
    caller: Caller,
    greeted: bool,
    /// The frame arriving, kept between reads.
    reader: frame::FrameReader,
    /// When the frame that began must be whole, or (before the hello) when
    /// the first byte must have come; `None` while idle after the hello.
    deadline: Option<Instant>,
    /// When the frame being read began to arrive.
    frame_started: Option<Instant>,
    /// Registered with epoll already (re-armed with `modify`).
    registered: bool,
    _slot: Slot,
}

/// Work for the threads of the pool.
enum Job {
    /// A connection just accepted (when it was).
    New(UnixStream, Slot, Instant),
    /// Something arrived on a parked connection, or it closed.
    Readable(Box<Conn>),
    /// A parked connection's deadline passed.
    Late(Box<Conn>),
}

/// A request that may change state, for the engine's thread.
struct Change {
    conn: Box<Conn>,
    req: Request,
    fds: Vec<OwnedFd>,
}

/// The event loop's epoll instance and its parked connections.
struct Events {
    epoll: nix::sys::epoll::Epoll,
    parked: Mutex<Parked>,
    timeout: Duration,
}

#[derive(Default)]
struct Parked {
    conns: HashMap<std::os::fd::RawFd, Box<Conn>>,
    /// Deadlines of parked connections, soonest first (stale ones skipped).
    deadlines: std::collections::BinaryHeap<std::cmp::Reverse<(Instant, std::os::fd::RawFd)>>,
}

impl Events {
    fn new(timeout: Duration) -> nix::Result<Self> {
        use nix::sys::epoll::{Epoll, EpollCreateFlags};
        Ok(Events {
            epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?,
            parked: Mutex::new(Parked::default()),
            timeout,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Parked> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands `conn` back to the event loop until something arrives on it
    /// or its deadline passes. A connection epoll refuses is closed.
    fn park(&self, mut conn: Box<Conn>) {
        use nix::sys::epoll::{EpollEvent, EpollFlags};
        let fd = conn.stream.as_raw_fd();
        let registered = std::mem::replace(&mut conn.registered, true);
        let mut event = EpollEvent::new(
            EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLONESHOT,
            fd as u64,
        );
        // Parked before it is armed, and armed under the lock: the event
        // loop cannot take it out (and close it) in between.
        let mut p = self.lock();
        if let Some(at) = conn.deadline {
            p.deadlines.push(std::cmp::Reverse((at, fd)));
        }
        p.conns.insert(fd, conn);
        // SAFETY: `fd` is the descriptor of the stream just put in the map,
        // which keeps it open while `p` (the map's lock) is held, and the
        // borrow ends with the epoll_ctl call below, under that lock.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let armed = if registered {
            self.epoll.modify(borrowed, &mut event)
        } else {
            self.epoll.add(borrowed, event)
        };
        if let Err(e) = armed {
            tracing::warn!("cannot watch a client's connection: {e}; it is closed");
            p.conns.remove(&fd);
        }
    }

    /// Takes out the parked connection `fd`, if it is parked.
    fn take(&self, fd: std::os::fd::RawFd) -> Option<Box<Conn>> {
        self.lock().conns.remove(&fd)
    }

    /// Takes out the connections whose deadline passed, each to `late`;
    /// returns how long until the next one (at most a second).
    fn expired(&self, now: Instant, mut late: impl FnMut(Box<Conn>)) -> Duration {
        let mut p = self.lock();
        while let Some(std::cmp::Reverse((at, fd))) = p.deadlines.peek().copied() {
            if at > now {
                return (at - now).min(Duration::from_secs(1));
            }
            p.deadlines.pop();
            if p.conns.get(&fd).is_some_and(|c| c.deadline == Some(at))
                && let Some(c) = p.conns.remove(&fd)
            {
                late(c);
            }
        }
        Duration::from_secs(1)
    }
}

type Jobs = std::sync::mpsc::Sender<Job>;
type Changes = std::sync::mpsc::Sender<Change>;

/// Starts the pool's threads and the engine's thread.
fn start_threads<R: Region + 'static>(
    shared: &Arc<Shared<R>>,
    events: &Arc<Events>,
    socket: std::path::PathBuf,
) -> std::io::Result<(Jobs, Changes)> {
    let (jobs, job_rx) = std::sync::mpsc::channel::<Job>();
    let (changes, change_rx) = std::sync::mpsc::channel::<Change>();
    let job_rx = Arc::new(Mutex::new(job_rx));
    for _ in 0..WORKERS {
        let (job_rx, shared, events, changes) = (job_rx.clone(), shared.clone(), events.clone(), changes.clone());
        std::thread::Builder::new().name("luod-worker".into()).spawn(move || {
            loop {
                let job = match job_rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                    Ok(job) => job,
                    Err(_) => return,
                };
                work(job, &shared, &events, &changes);
            }
        })?;
    }
    let (shared, events) = (shared.clone(), events.clone());
    std::thread::Builder::new().name("luod-engine".into()).spawn(move || {
        // In the new kernel, the post-update hooks come first: every
        // client's retrieve or claim waits behind them (reads do not).
        if post_update(&shared) {
            let _ = UnixStream::connect(&socket);
            return;
        }
        while let Ok(Change { conn, req, fds }) = change_rx.recv() {
            ANSWERING.fetch_add(1, Ordering::SeqCst);
            let kind = req.kind();
            let outcome = shared.change(kind, |engine| dispatch(engine, &conn.caller, req, fds, &conn.stream));
            if outcome.keep_conn {
                // The kvm subsystem has its own duplicate: the loop lets go.
                let _ = events.epoll.delete(&conn.stream);
            }
            let exit = answer(conn, kind, outcome, &events);
            ANSWERING.fetch_sub(1, Ordering::SeqCst);
            if exit {
                // Wake the event loop, which sees EXIT.
                let _ = UnixStream::connect(&socket);
                return;
            }
        }
    })?;
    Ok((jobs, changes))
}

/// The post-update hooks and, when they fail with `--rollback auto`, the
/// rollback's prepare, freeze and reboot. True when luod must exit (a
/// simulated kexec).
fn post_update<R: Region>(shared: &Shared<R>) -> bool {
    use liveupdate::engine::AfterValidation;
    // Only a luod that came up `updated` validates; anything else would
    // show a post-update step in STATUS= for nothing.
    if shared.engine.lock().unwrap_or_else(|p| p.into_inner()).state() != liveupdate::state::State::Updated {
        return false;
    }
    if shared.change("post-update", |engine| engine.post_update()) != AfterValidation::RollBack {
        return false;
    }
    let root = Caller {
        uid: 0,
        pid: 0,
        privileged: true,
    };
    let step = |kind: &'static str, r: Result<(), EngineError>, engine: &mut Engine<R>| match r {
        Ok(()) => true,
        Err(e) => {
            tracing::error!("automatic rollback: {kind} failed: {e}");
            engine.add_note(format!("the automatic rollback failed at {kind}: {e}"));
            engine.failure_hooks(kind, e.kind(), &e.to_string());
            false
        }
    };
    tracing::warn!("rolling back to the previous kernel (--rollback auto)");
    if !shared.change("rollback", |e| {
        let r = e.rollback(&root).map(|_| ());
        step("rollback", r, e)
    }) {
        return false;
    }
    if !shared.change("freeze", |e| {
        let r = e.freeze(&root).map(|_| ());
        step("freeze", r, e)
    }) {
        return false;
    }
    shared.change("reboot", |e| match e.reboot(&root) {
        Ok(Rebooted::Simulated(_)) => {
            tracing::info!("automatic rollback: simulated kexec done; luod exits");
            EXIT.store(SIMULATED_KEXEC_EXIT, Ordering::SeqCst);
            true
        }
        // systemd stops luod when the orderly shutdown reaches it.
        Ok(Rebooted::Orderly(_)) => {
            tracing::info!("automatic rollback: orderly kexec under way through systemd");
            true
        }
        Err(err) => {
            let r = Err(err);
            step("reboot", r, e)
        }
    })
}

/// The event loop: accepts connections and watches the parked ones; hands
/// each that has something to read, or whose deadline passed, to the pool.
/// Returns when luod must exit.
fn run_loop(listener: &UnixListener, events: &Events, limits: &Arc<Limits>, jobs: &Jobs, timeout: Duration) {
    use nix::sys::epoll::{EpollEvent, EpollFlags};
    if let Err(e) = listener.set_nonblocking(true) {
        tracing::warn!("cannot make the listening socket non-blocking: {e}");
    }
    if let Err(e) = events
        .epoll
        .add(listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER))
    {
        tracing::error!("cannot watch the listening socket: {e}; luod stops");
        EXIT.store(1, Ordering::SeqCst);
        return;
    }
    let mut backoff = AcceptBackoff::default();
    let mut ready = vec![EpollEvent::empty(); 256];
    let mut wait = Duration::from_secs(1);
    loop {
        if EXIT.load(Ordering::SeqCst) >= 0 {
            return;
        }
        let ms = u16::try_from(wait.as_millis().max(1)).unwrap_or(u16::MAX);
        let n = match events.epoll.wait(&mut ready, ms) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => {
                tracing::error!("epoll_wait failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                0
            }
        };
        // Connections first: one a client closed frees its place here, at
        // once, before the connections that wait to be accepted are counted.
        let mut accept = false;
        for event in &ready[..n] {
            if event.data() == LISTENER {
                accept = true;
            } else if let Some(conn) = events.take(event.data() as std::os::fd::RawFd) {
                // Half a frame then the end: the pool logs it as before.
                if conn.reader.started() || !closed(&conn.stream) {
                    let _ = jobs.send(Job::Readable(conn));
                }
            }
        }
        if accept {
            accept_all(listener, limits, jobs, &mut backoff);
            if EXIT.load(Ordering::SeqCst) >= 0 {
                return;
            }
        }
        let next = events.expired(Instant::now(), |conn| {
            let _ = jobs.send(Job::Late(conn));
        });
        wait = next.min(timeout);
    }
}

/// True when the client closed `stream` with nothing left to read (or it
/// broke); looks without waiting and takes nothing from it.
fn closed(stream: &UnixStream) -> bool {
    use nix::sys::socket::{MsgFlags, recv};
    let mut byte = [0u8; 1];
    match recv(
        stream.as_raw_fd(),
        &mut byte,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(0) => true,
        Ok(_) => false,
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => false,
        Err(_) => true,
    }
}

/// Accepts every pending connection; admitted ones go to the pool.
fn accept_all(listener: &UnixListener, limits: &Arc<Limits>, jobs: &Jobs, backoff: &mut AcceptBackoff) {
    loop {
        let conn = match listener.accept() {
            Ok((c, _)) => {
                backoff.recovered();
                c
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) => {
                backoff.failed(&e);
                return;
            }
        };
        if EXIT.load(Ordering::SeqCst) >= 0 {
            return;
        }
        if let Err(e) = conn.set_nonblocking(false) {
            tracing::warn!("cannot make a client's connection blocking: {e}; it is closed");
            continue;
        }
        if let Some(slot) = limits.admit(&conn) {
            let _ = jobs.send(Job::New(conn, slot, Instant::now()));
        }
    }
}

/// One job of the pool.
fn work<R: Region>(job: Job, shared: &Shared<R>, events: &Events, changes: &Changes) {
    let timeout = events.timeout;
    match job {
        Job::New(stream, slot, accepted) => {
            // A client that does not read its answers cannot pin a thread.
            let _ = stream.set_write_timeout(Some(timeout));
            let caller = match peer::caller(&stream) {
                Ok(c) => c,
                Err(e) => {
                    CREDENTIAL_FAILURES.event(|n| {
                        tracing::warn!(
                            "cannot tell who is connecting: {e}; refused {n} connection(s) for this (next report in {} s at the earliest)",
                            LOG_INTERVAL.as_secs()
                        )
                    });
                    let _ = stream.set_write_timeout(Some(REFUSAL_SEND_TIMEOUT));
                    let msg = format!("luod cannot tell who is connecting: {e}; try again");
                    let _ = frame::send(&stream, &protocol_error(msg), &[]);
                    return;
                }
            };
            // Before its hello, a connection is not idle but silent: it gets
            // `timeout` to start, so silent connections cannot hold the places.
            events.park(Box::new(Conn {
                stream,
                caller,
                greeted: false,
                reader: frame::FrameReader::default(),
                deadline: Some(accepted + timeout),
                frame_started: None,
                registered: false,
                _slot: slot,
            }));
        }
        Job::Late(conn) => {
            let caller = conn.caller;
            let _ = conn.stream.set_write_timeout(Some(REFUSAL_SEND_TIMEOUT));
            if conn.reader.started() {
                // Once a frame starts, the whole of it must come within
                // `timeout`, so a client that trickles bytes is cut off.
                let e = conn.reader.late(timeout);
                tracing::info!(
                    "client pid {} uid {}: {e}; closing the connection",
                    caller.pid,
                    caller.uid
                );
                let resp = protocol_error(format!("{e}; closing the connection"));
                send_logged(&conn.stream, &caller, "a broken frame", &resp, &[]);
            } else {
                let msg = format!(
                    "nothing received within {} s of connecting; a client says hello first",
                    timeout.as_secs()
                );
                tracing::info!(
                    "client pid {} uid {}: {msg}; closing the connection",
                    caller.pid,
                    caller.uid
                );
                send_logged(&conn.stream, &caller, "a silent connection", &protocol_error(msg), &[]);
            }
        }
        Job::Readable(mut conn) => {
            let caller = conn.caller;
            let (req, fds) = match conn.reader.read::<Request>(&conn.stream) {
                Ok(Some(m)) => m,
                Ok(None) => {
                    if conn.reader.started() && conn.frame_started.is_none() {
                        // The frame's deadline runs from its first bytes.
                        let now = Instant::now();
                        conn.frame_started = Some(now);
                        conn.deadline = Some(now + timeout);
                    }
                    events.park(conn);
                    return;
                }
                Err(FrameError::Closed) => return,
                Err(e) => {
                    tracing::info!(
                        "client pid {} uid {}: {e}; closing the connection",
                        caller.pid,
                        caller.uid
                    );
                    let _ = conn.stream.set_write_timeout(Some(REFUSAL_SEND_TIMEOUT));
                    let resp = protocol_error(format!("{e}; closing the connection"));
                    send_logged(&conn.stream, &caller, "a broken frame", &resp, &[]);
                    return;
                }
            };
            // An idle client may wait as long as it likes (a VMM keeps its
            // connection) once it said hello.
            conn.deadline = None;
            conn.frame_started = None;
            request(conn, req, fds, shared, events, changes);
        }
    }
}

/// Serves one whole request: the hello, a read from the snapshot, or a
/// change handed to the engine's thread.
fn request<R: Region>(
    mut conn: Box<Conn>,
    req: Request,
    fds: Vec<OwnedFd>,
    shared: &Shared<R>,
    events: &Events,
    changes: &Changes,
) {
    let caller = conn.caller;
    if !conn.greeted {
        match req {
            Request::Hello { version, client } if version == PROTOCOL_VERSION => {
                tracing::debug!("client {client} pid {} uid {} connected", caller.pid, caller.uid);
                conn.greeted = true;
                let hello = Response::Hello {
                    version: PROTOCOL_VERSION,
                    server: format!("luod {}", env!("CARGO_PKG_VERSION")),
                };
                if send_logged(&conn.stream, &caller, "hello", &hello, &[]) {
                    events.park(conn);
                }
            }
            Request::Hello { version, .. } => {
                let msg = format!(
                    "luod speaks protocol version {PROTOCOL_VERSION}, the client {version}; use matching luod and client versions"
                );
                send_logged(&conn.stream, &caller, "hello", &protocol_error(msg), &[]);
            }
            other => {
                let msg = format!("the first request must be hello, not {}", other.kind());
                send_logged(&conn.stream, &caller, other.kind(), &protocol_error(msg), &[]);
            }
        }
        return;
    }
    match read(&shared.snapshot(), &caller, &req, &fds) {
        Some(outcome) => {
            answer(conn, req.kind(), outcome, events);
        }
        None => {
            if let Err(e) = changes.send(Change { conn, req, fds }) {
                tracing::error!("the engine's thread is gone; a request is dropped");
                drop(e);
            }
        }
    }
}

/// Sends the answer to one request and parks the connection again, unless
/// it was handed to the engine or luod must exit. True when luod must exit.
fn answer(conn: Box<Conn>, kind: &'static str, outcome: Outcome, events: &Events) -> bool {
    let caller = conn.caller;
    let Outcome {
        resp,
        fds: mut out_fds,
        exit,
        keep_conn,
    } = outcome;
    let resp = fit(kind, resp);
    if matches!(resp, Response::Error(_)) {
        // An answer too large to send goes with none of its files.
        out_fds.clear();
    }
    match &resp {
        Response::Error(e) => tracing::info!("{kind} from uid {} refused: {}", caller.uid, e.message),
        _ if !matches!(kind, "status" | "history" | "session-list" | "check" | "vm-list") => {
            tracing::info!("{kind} from uid {} done", caller.uid)
        }
        _ => {}
    }
    let fds: Vec<_> = out_fds.iter().map(|f| f.as_fd()).collect();
    let sent = send_logged(&conn.stream, &caller, kind, &resp, &fds);
    if let Some(code) = exit {
        EXIT.store(code, Ordering::SeqCst);
        return true;
    }
    if sent && !keep_conn {
        events.park(conn);
    }
    // A registered VMM's connection now belongs to the kvm subsystem,
    // which sends it calls; the loop no longer watches it.
    false
}

/// What one request produced.
struct Outcome {
    resp: Response,
    /// Files to send with the response.
    fds: Vec<OwnedFd>,
    /// Exit status when luod must stop after answering.
    exit: Option<i32>,
    /// The connection was handed to the engine (a registered VMM).
    keep_conn: bool,
}

impl From<Response> for Outcome {
    fn from(resp: Response) -> Self {
        Outcome {
            resp,
            fds: Vec::new(),
            exit: None,
            keep_conn: false,
        }
    }
}

/// Answers a read request (`status`, `history`, `session-list`,
/// `session-list-from`, `vm-list`) from the snapshot, without waiting for
/// a change in progress, and `vm-report`, which changes only luod's memory
/// of what VMMs reported (a VMM may report while luod waits for its call);
/// `None` for any other request (and for one that came with descriptors,
/// which the engine refuses).
fn read(snapshot: &Snapshot, caller: &Caller, req: &Request, fds: &[OwnedFd]) -> Option<Outcome> {
    if !fds.is_empty() {
        return None;
    }
    let resp = match req {
        Request::Status => Response::Status(Box::new(snapshot.status(caller))),
        Request::History => Response::History(snapshot.history_report(caller)),
        Request::SessionList => Response::Sessions(snapshot.session_list(caller)),
        Request::SessionListFrom { start } => {
            let all = snapshot.session_list(caller);
            let skip = usize::try_from(*start).unwrap_or(usize::MAX);
            let left = all.len().saturating_sub(skip);
            let page = fitting(all.into_iter().skip(skip), SESSION_PAGE_BUDGET);
            if page.is_empty() && left > 0 {
                // An empty page means "no more": never send one when there are.
                return Some(Outcome::from(Response::Error(
                    EngineError::Io(format!(
                        "session {start} of the list alone does not fit in one answer ({} bytes)",
                        frame::MAX_FRAME_LEN
                    ))
                    .to_reply(),
                )));
            }
            Response::Sessions(page)
        }
        Request::VmList => Response::Vms(snapshot.vm_list(caller)),
        Request::VmReport {
            name,
            detail,
            blackout_ms,
        } => match snapshot.vm_report(caller, name, detail.clone(), *blackout_ms) {
            Ok(()) => Response::Done,
            Err(e) => Response::Error(e.to_reply()),
        },
        _ => return None,
    };
    Some(Outcome::from(resp))
}

/// Runs one request that may change state (or came with descriptors).
fn dispatch<R: Region>(
    engine: &mut Engine<R>,
    caller: &Caller,
    req: Request,
    fds: Vec<OwnedFd>,
    conn: &UnixStream,
) -> Outcome {
    let err = |e: EngineError| Outcome::from(Response::Error(e.to_reply()));
    let wants_fd = matches!(
        req,
        Request::SessionPreserve { .. } | Request::VmRegister { .. } | Request::Prepare(_) | Request::Check(_)
    );
    if !wants_fd && !fds.is_empty() {
        let count = fds.len();
        // Not dropped here, under the engine lock: a FUSE file's close waits on its server.
        liveupdate::engine::close_elsewhere(fds);
        return err(EngineError::InvalidArgument(format!(
            "{} takes no file descriptor but {count} came with it",
            req.kind(),
        )));
    }
    let step = req.kind();
    let transition = matches!(
        req,
        Request::Prepare(_)
            | Request::Freeze
            | Request::Reboot
            | Request::Finish
            | Request::FinishAccepting
            | Request::Cancel
            | Request::Rollback
    );
    let outcome = dispatch_request(engine, caller, req, fds, conn);
    if transition && let Response::Error(e) = &outcome.resp {
        // The on-failure hooks, once the failure is known (on luod's engine
        // thread: reads are still answered meanwhile).
        engine.failure_hooks(step, e.kind, &e.message);
    }
    outcome
}

fn dispatch_request<R: Region>(
    engine: &mut Engine<R>,
    caller: &Caller,
    req: Request,
    mut fds: Vec<OwnedFd>,
    conn: &UnixStream,
) -> Outcome {
    let err = |e: EngineError| Outcome::from(Response::Error(e.to_reply()));
    let r = match req {
        Request::Hello { .. } => Err(EngineError::InvalidArgument("hello was already exchanged".into())),
        Request::Status
        | Request::History
        | Request::SessionList
        | Request::SessionListFrom { .. }
        | Request::VmList
        | Request::VmReport { .. } => {
            return read(&engine.snapshot(), caller, &req, &[]).expect("a read request");
        }
        // The target kernel's images come as descriptors the client opened.
        Request::Check(args) => Ok(Response::Check(engine.check(caller, &args, std::mem::take(&mut fds)))),
        Request::Prepare(args) => engine
            .prepare(caller, &args, std::mem::take(&mut fds))
            .map(Response::Transition),
        Request::Freeze => engine.freeze(caller).map(Response::Transition),
        Request::Finish => engine.finish(caller).map(Response::Transition),
        Request::FinishAccepting => engine.finish_accepting(caller, true).map(Response::Transition),
        Request::Rollback => engine.rollback(caller).map(Response::Transition),
        Request::Cancel => engine.cancel(caller).map(Response::Transition),
        Request::Reboot => {
            return match engine.reboot(caller) {
                Ok(Rebooted::Simulated(report)) => Outcome {
                    exit: Some(SIMULATED_KEXEC_EXIT),
                    ..Outcome::from(Response::Transition(report))
                },
                // systemd stops luod when the shutdown reaches it.
                Ok(Rebooted::Orderly(report)) => Outcome::from(Response::Transition(report)),
                Err(e) => err(e),
            };
        }
        Request::SessionCreate { name } => engine.session_create(caller, &name).map(|()| Response::Done),
        Request::SessionPreserve { name, token } => {
            if fds.len() != 1 {
                liveupdate::engine::close_elsewhere(std::mem::take(&mut fds));
                return err(EngineError::MissingFd(
                    "session-preserve needs exactly one file descriptor (sent with SCM_RIGHTS)",
                ));
            }
            let fd = fds.pop().expect("one fd");
            engine
                .session_preserve(caller, &name, token, fd)
                .map(|_| Response::Done)
        }
        Request::SessionRetrieve { name, token } => {
            return match engine.session_retrieve(caller, &name, token) {
                Ok((fd, size)) => Outcome {
                    fds: vec![fd],
                    ..Outcome::from(Response::Fd { size })
                },
                Err(e) => err(e),
            };
        }
        Request::SessionFinish { name } => engine.session_finish(caller, &name).map(|()| Response::Done),
        Request::VmRegister { name, tokens } => {
            let conn = match conn.try_clone() {
                Ok(c) => c,
                Err(e) => return err(EngineError::Io(format!("cannot keep the VMM's connection: {e}"))),
            };
            return match engine.vm_register(caller, &name, &tokens, fds, conn) {
                Ok(()) => Outcome {
                    keep_conn: true,
                    ..Outcome::from(Response::Done)
                },
                Err(e) => err(e),
            };
        }
        Request::VmAnswer(_) => Err(EngineError::InvalidArgument(
            "vm-answer is only sent in reply to a vm call".into(),
        )),
        Request::VmClaim { name } => {
            return match engine.vm_claim(caller, &name) {
                Ok(c) => Outcome {
                    fds: c.fds,
                    ..Outcome::from(Response::VmClaimed {
                        tokens: c.tokens,
                        state: c.state,
                    })
                },
                Err(e) => err(e),
            };
        }
        Request::VmAbandon { name } => engine.vm_abandon(caller, &name).map(|()| Response::Done),
        Request::DiscardRecord => engine.discard_record(caller).map(Response::RecordDiscarded),
        Request::SessionEvict { name } => engine.session_evict(caller, &name).map(|()| Response::Done),
    };
    match r {
        Ok(resp) => Outcome::from(resp),
        Err(e) => err(e),
    }
}
