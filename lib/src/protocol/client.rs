//! A blocking client of luod, used by luoctl and by VMMs written in Rust.

use super::frame::{self, FrameError};
use super::{ErrorReply, PROTOCOL_VERSION, Request, Response};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

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
            _ => None,
        }
    }
}

/// A connection to luod that has completed the version handshake.
#[derive(Debug)]
pub struct Client {
    sock: UnixStream,
    server: String,
}

impl Client {
    /// Connects to the socket at `path` and says hello.
    pub fn connect(path: &Path, name: &str) -> Result<Client, ClientError> {
        let sock = UnixStream::connect(path).map_err(|source| ClientError::Connect { path: path.to_path_buf(), source })?;
        let mut c = Client { sock, server: String::new() };
        let hello = Request::Hello { version: PROTOCOL_VERSION, client: name.to_string() };
        match c.call(&hello)? {
            Response::Hello { server, .. } => c.server = server,
            other => return Err(unexpected(&hello, &other)),
        }
        Ok(c)
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
        frame::send(&self.sock, req, fds)?;
        let (resp, fds): (Response, Vec<OwnedFd>) = frame::recv(&self.sock)?;
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
    ClientError::Unexpected { request: req.kind(), got }
}
