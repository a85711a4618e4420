//! The socket server: accepts clients, checks who they are, and hands their
//! requests to the engine one at a time.

use crate::args::{Args, Backend};
use crate::backend::{self, StartError};
use crate::peer;
use liveupdate::engine::{Caller, Engine, EngineError, Rebooted, SIMULATED_KEXEC_EXIT};
use liveupdate::protocol::frame::{self, FrameError};
use liveupdate::protocol::{ErrorKind, ErrorReply, PROTOCOL_VERSION, Request, Response};
use liveupdate::region::Region;
use nix::sys::signal::{SigSet, Signal};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Shared<R> = Arc<Mutex<Engine<R>>>;

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
    let backend::Started { engine, _lock } = started;
    for note in engine.notes() {
        tracing::warn!("{note}");
    }
    tracing::info!(
        "luod {} serving {} (backend {}, state {}, record generation {})",
        env!("CARGO_PKG_VERSION"),
        args.socket.display(),
        engine
            .status(&Caller {
                uid: 0,
                pid: 0,
                privileged: true
            })
            .backend,
        engine.state(),
        engine.generation()
    );
    let engine: Shared<R> = Arc::new(Mutex::new(engine));
    if let Some(Ok(n)) = liveupdate::systemd::Notifier::from_env()
        && let Err(e) = n.notify("READY=1", &[])
    {
        tracing::warn!("cannot notify systemd: {e}");
    }

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
    for conn in listener.incoming() {
        if EXIT.load(Ordering::SeqCst) >= 0 {
            break;
        }
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                continue;
            }
        };
        let engine = engine.clone();
        let socket = args.socket.clone();
        std::thread::spawn(move || {
            serve(conn, &engine, timeout);
            if EXIT.load(Ordering::SeqCst) >= 0 {
                let _ = UnixStream::connect(&socket);
            }
        });
    }
    let code = EXIT.load(Ordering::SeqCst).max(0);
    let _ = std::fs::remove_file(&args.socket);
    // Hold the engine lock while exiting so no request is half-served.
    let _guard = engine.lock().unwrap_or_else(|p| p.into_inner());
    tracing::info!("luod exits with status {code}");
    Ok(code as u8)
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
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io("cannot create the directory of socket"))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(StartError::SocketInUse(path.display().to_string()));
        }
        std::fs::remove_file(path).map_err(io("cannot remove stale socket"))?;
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

/// Serves one connection until it closes or breaks the protocol.
fn serve<R: Region>(conn: UnixStream, engine: &Shared<R>, timeout: Duration) {
    let caller = match peer::caller(&conn) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("cannot read peer credentials: {e}");
            return;
        }
    };
    let mut greeted = false;
    loop {
        // An idle client may wait as long as it likes (a VMM keeps its
        // connection); once a frame starts, the rest must come within
        // `timeout`, so a client stalled mid-frame cannot pin a thread.
        let _ = conn.set_read_timeout(None);
        let mut first = [0u8; 1];
        match nix::sys::socket::recv(conn.as_raw_fd(), &mut first, nix::sys::socket::MsgFlags::MSG_PEEK) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let _ = conn.set_read_timeout(Some(timeout));
        let (req, fds): (Request, Vec<OwnedFd>) = match frame::recv(&conn) {
            Ok(m) => m,
            Err(FrameError::Closed) => return,
            Err(e) => {
                tracing::info!(
                    "client pid {} uid {}: {e}; closing the connection",
                    caller.pid,
                    caller.uid
                );
                let _ = frame::send(&conn, &protocol_error(format!("{e}; closing the connection")), &[]);
                return;
            }
        };
        if !greeted {
            match req {
                Request::Hello { version, client } if version == PROTOCOL_VERSION => {
                    tracing::debug!("client {client} pid {} uid {} connected", caller.pid, caller.uid);
                    greeted = true;
                    let hello = Response::Hello {
                        version: PROTOCOL_VERSION,
                        server: format!("luod {}", env!("CARGO_PKG_VERSION")),
                    };
                    if frame::send(&conn, &hello, &[]).is_err() {
                        return;
                    }
                    continue;
                }
                Request::Hello { version, .. } => {
                    let msg = format!(
                        "luod speaks protocol version {PROTOCOL_VERSION}, the client {version}; use matching luod and client versions"
                    );
                    let _ = frame::send(&conn, &protocol_error(msg), &[]);
                    return;
                }
                other => {
                    let msg = format!("the first request must be hello, not {}", other.kind());
                    let _ = frame::send(&conn, &protocol_error(msg), &[]);
                    return;
                }
            }
        }
        let kind = req.kind();
        let Outcome {
            resp,
            fds: out_fds,
            exit,
            keep_conn,
        } = {
            let mut engine = engine.lock().unwrap_or_else(|p| p.into_inner());
            dispatch(&mut engine, &caller, req, fds, &conn)
        };
        match &resp {
            Response::Error(e) => tracing::info!("{kind} from uid {} refused: {}", caller.uid, e.message),
            _ if !matches!(kind, "status" | "history" | "session-list" | "check") => {
                tracing::info!("{kind} from uid {} done", caller.uid)
            }
            _ => {}
        }
        let fds: Vec<_> = out_fds.iter().map(|f| f.as_fd()).collect();
        let sent = frame::send(&conn, &resp, &fds);
        if let Some(code) = exit {
            EXIT.store(code, Ordering::SeqCst);
            return;
        }
        if sent.is_err() || keep_conn {
            // A registered VMM's connection now belongs to the kvm
            // subsystem, which sends it calls; this thread stops reading.
            return;
        }
    }
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

/// Runs one request.
fn dispatch<R: Region>(
    engine: &mut Engine<R>,
    caller: &Caller,
    req: Request,
    mut fds: Vec<OwnedFd>,
    conn: &UnixStream,
) -> Outcome {
    let err = |e: EngineError| Outcome::from(Response::Error(e.to_reply()));
    let wants_fd = matches!(
        req,
        Request::SessionPreserve { .. } | Request::VmRegister { .. } | Request::Prepare(_) | Request::Check(_)
    );
    if !wants_fd && !fds.is_empty() {
        return err(EngineError::InvalidArgument(format!(
            "{} takes no file descriptor but {} came with it",
            req.kind(),
            fds.len()
        )));
    }
    let r = match req {
        Request::Hello { .. } => Err(EngineError::InvalidArgument("hello was already exchanged".into())),
        Request::Status => Ok(Response::Status(engine.status(caller))),
        // The target kernel's images come as descriptors the client opened.
        Request::Check(args) => Ok(Response::Check(engine.check(caller, &args, std::mem::take(&mut fds)))),
        Request::History => Ok(Response::History(engine.history())),
        Request::Prepare(args) => engine
            .prepare(caller, &args, std::mem::take(&mut fds))
            .map(Response::Transition),
        Request::Freeze => engine.freeze(caller).map(Response::Transition),
        Request::Finish => engine.finish(caller).map(Response::Transition),
        Request::Cancel => engine.cancel(caller).map(Response::Transition),
        Request::Reboot => {
            return match engine.reboot(caller) {
                Ok(Rebooted::Simulated(report)) => Outcome {
                    exit: Some(SIMULATED_KEXEC_EXIT),
                    ..Outcome::from(Response::Transition(report))
                },
                Err(e) => err(e),
            };
        }
        Request::SessionCreate { name } => engine.session_create(caller, &name).map(|()| Response::Done),
        Request::SessionList => Ok(Response::Sessions(engine.session_list(caller))),
        Request::SessionPreserve { name, token } => {
            if fds.len() != 1 {
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
        Request::VmList => Ok(Response::Vms(engine.vm_list(caller))),
    };
    match r {
        Ok(resp) => Outcome::from(resp),
        Err(e) => err(e),
    }
}
