//! A blocking client of luod, used by luoctl and by VMMs written in Rust.

use super::frame::{self, FrameError};
use super::{ErrorReply, PROTOCOL_VERSION, Request, Response, VmAnswer, VmCall};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a call to luod did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot connect to luod at {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The frame layer failed.
    #[error("talking to luod: {0}")]
    Frame(#[from] FrameError),
    /// luod refused the request.
    #[error("{0}")]
    Server(Box<ErrorReply>),
    /// luod answered hello with another protocol version than the client's.
    #[error("luod ({server}) speaks protocol version {version}, this client {PROTOCOL_VERSION}")]
    Version {
        /// luod's protocol version.
        version: u32,
        /// luod's version string.
        server: String,
    },
    /// luod did not answer within the client's timeout for the request.
    #[error("luod did not answer {request} within {secs} s")]
    Timeout {
        /// The request kind.
        request: &'static str,
        /// The timeout, in seconds.
        secs: u64,
    },
    /// luod answered something that does not fit the request.
    #[error("luod answered {got} to a {request} request")]
    Unexpected {
        /// The request kind.
        request: &'static str,
        /// What came back.
        got: String,
    },
}

impl ClientError {
    /// A hint for the person at the keyboard, when there is one.
    pub fn hint(&self) -> Option<String> {
        match self {
            ClientError::Connect { source, .. } => Some(match source.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    "is luod running? start it, or pass --socket with its path".to_string()
                }
                std::io::ErrorKind::PermissionDenied => {
                    "the socket is mode 0660: run as root or as a member of its group".to_string()
                }
                _ => return None,
            }),
            ClientError::Server(e) if !e.hint.is_empty() => Some(e.hint.clone()),
            ClientError::Version { .. } => Some("use a client built with the same version as luod".to_string()),
            ClientError::Timeout { .. } => Some(
                "luod may be stuck or overloaded: see its log and `luoctl status`; --timeout SECS waits longer"
                    .to_string(),
            ),
            _ => None,
        }
    }
}

/// A connection to luod that has completed the version handshake.
#[derive(Debug)]
pub struct Client {
    sock: UnixStream,
    server: String,
    /// How long a request may wait for its answer (`None`: for ever).
    timeout: Option<Duration>,
}

impl Client {
    /// Connects to the socket at `path` and says hello.
    pub fn connect(path: &Path, name: &str) -> Result<Client, ClientError> {
        Client::connect_within(path, name, None)
    }

    /// Like [`Client::connect`], luod's hello awaited at most `timeout`
    /// ([`ClientError::Timeout`]), which then applies to every request
    /// until [`Client::set_timeout`] changes it.
    pub fn connect_within(path: &Path, name: &str, timeout: Option<Duration>) -> Result<Client, ClientError> {
        let sock = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let mut c = Client {
            sock,
            server: String::new(),
            timeout: None,
        };
        c.set_timeout(timeout)?;
        let hello = Request::Hello {
            version: PROTOCOL_VERSION,
            client: name.to_string(),
        };
        match c.call(&hello)? {
            Response::Hello { version, server } if version == PROTOCOL_VERSION => c.server = server,
            Response::Hello { version, server } => return Err(ClientError::Version { version, server }),
            other => return Err(unexpected(&hello, &other)),
        }
        Ok(c)
    }

    /// How long each later request may wait for its answer (and to be
    /// sent); `None` waits for ever.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.sock.set_read_timeout(timeout).map_err(FrameError::Io)?;
        self.sock.set_write_timeout(timeout).map_err(FrameError::Io)?;
        self.timeout = timeout;
        Ok(())
    }

    /// luod's version string.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Sends a request and returns the response; an `Error` response is `Err`.
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        self.call_fds(req, &[]).map(|(r, _)| r)
    }

    /// Sends a request with file descriptors attached; returns the response
    /// and the descriptors that came back with it.
    pub fn call_fds(&mut self, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<(Response, Vec<OwnedFd>), ClientError> {
        let late = |e: &FrameError| match (e, self.timeout) {
            (FrameError::Io(io), Some(t))
                if matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                Some(ClientError::Timeout {
                    request: req.kind(),
                    secs: t.as_secs(),
                })
            }
            _ => None,
        };
        if let Err(e) = frame::send(&self.sock, req, fds) {
            if let Some(t) = late(&e) {
                return Err(t);
            }
            // luod may have refused the connection and closed it before
            // reading (too many connections): its reason is still waiting.
            if let FrameError::Io(io) = &e
                && matches!(
                    io.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                )
                && let Ok((Response::Error(reply), _)) = frame::recv::<Response>(&self.sock)
            {
                return Err(ClientError::Server(Box::new(reply)));
            }
            return Err(e.into());
        }
        let (resp, fds): (Response, Vec<OwnedFd>) = match frame::recv(&self.sock) {
            Ok(m) => m,
            Err(e) => return Err(late(&e).unwrap_or(e.into())),
        };
        match resp {
            Response::Error(e) => Err(ClientError::Server(Box::new(e))),
            other => Ok((other, fds)),
        }
    }
}

/// The error for a response that does not match its request.
pub fn unexpected(req: &Request, got: &Response) -> ClientError {
    let got = format!("{got:?}");
    let got = got.split(['(', ' ', '{']).next().unwrap_or_default().to_string();
    ClientError::Unexpected {
        request: req.kind(),
        got,
    }
}

/// A VM taken over in the new kernel.
#[derive(Debug)]
pub struct ClaimedVm {
    /// Its guest-RAM memfds, with their tokens.
    pub ram: Vec<(u64, OwnedFd)>,
    /// The state its previous VMM saved at `freeze`.
    pub state: Vec<u8>,
}

/// A VMM's registered connection: luod sends it [`VmCall`]s, it answers.
#[derive(Debug)]
pub struct VmConnection {
    sock: UnixStream,
    name: String,
}

impl Client {
    /// Registers VM `name` with its guest-RAM memfds (token, fd), at most
    /// [`frame::MAX_FDS_PER_FRAME`]; the connection then carries luod's calls.
    pub fn register_vm(mut self, name: &str, ram: &[(u64, BorrowedFd<'_>)]) -> Result<VmConnection, ClientError> {
        let req = Request::VmRegister {
            name: name.to_string(),
            tokens: ram.iter().map(|(t, _)| *t).collect(),
        };
        let fds: Vec<BorrowedFd<'_>> = ram.iter().map(|(_, fd)| *fd).collect();
        match self.call_fds(&req, &fds)? {
            (Response::Done, _) => Ok(VmConnection {
                sock: self.sock,
                name: name.to_string(),
            }),
            (other, _) => Err(unexpected(&req, &other)),
        }
    }

    /// Attaches again to VM `name` after luod restarted (same tokens, no fds).
    pub fn reattach_vm(mut self, name: &str, tokens: &[u64]) -> Result<VmConnection, ClientError> {
        let req = Request::VmRegister {
            name: name.to_string(),
            tokens: tokens.to_vec(),
        };
        match self.call(&req)? {
            Response::Done => Ok(VmConnection {
                sock: self.sock,
                name: name.to_string(),
            }),
            other => Err(unexpected(&req, &other)),
        }
    }

    /// Reports on VM `name` what `vm list` shows beside luod's phase (see
    /// [`Request::VmReport`]): on a connection of its own, not a registered
    /// one. `None` leaves a value as it was.
    pub fn report_vm(&mut self, name: &str, detail: Option<&str>, blackout_ms: Option<u64>) -> Result<(), ClientError> {
        let req = Request::VmReport {
            name: name.to_string(),
            detail: detail.map(str::to_string),
            blackout_ms,
        };
        match self.call(&req)? {
            Response::Done => Ok(()),
            other => Err(unexpected(&req, &other)),
        }
    }

    /// In the new kernel: takes VM `name` over. Returns its memfds (token,
    /// fd) and the state its previous VMM saved at `freeze`.
    pub fn claim_vm(&mut self, name: &str) -> Result<ClaimedVm, ClientError> {
        let req = Request::VmClaim { name: name.to_string() };
        match self.call_fds(&req, &[])? {
            (Response::VmClaimed { tokens, state }, fds) if fds.len() == tokens.len() => Ok(ClaimedVm {
                ram: tokens.into_iter().zip(fds).collect(),
                state,
            }),
            (other, _) => Err(unexpected(&req, &other)),
        }
    }
}

impl VmConnection {
    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits for luod's next call (blocks; `None` when luod closed the connection).
    pub fn next_call(&mut self) -> Result<Option<VmCall>, ClientError> {
        match frame::recv::<Response>(&self.sock) {
            Ok((Response::VmCall(call), _)) => Ok(Some(call)),
            Ok((other, _)) => Err(ClientError::Unexpected {
                request: "vm-register",
                got: format!("{other:?}"),
            }),
            Err(FrameError::Closed) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Answers the call just received.
    pub fn answer(&mut self, answer: VmAnswer) -> Result<(), ClientError> {
        frame::send(&self.sock, &Request::VmAnswer(answer), &[]).map_err(Into::into)
    }

    /// The socket, e.g. to poll it alongside the VMM's own work.
    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }
}
