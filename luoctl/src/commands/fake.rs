//! A fake luod for tests: answers hello, then hands each request to a closure.

use super::Ctx;
use crate::output::Mode;
use liveupdate::protocol::frame;
use liveupdate::protocol::{PROTOCOL_VERSION, Request, Response};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::thread::JoinHandle;

/// A running fake luod serving one connection.
pub struct FakeLuod {
    /// Holds the socket.
    pub dir: tempfile::TempDir,
    /// The serving thread; yields the requests it saw.
    pub thread: JoinHandle<Vec<Request>>,
}

impl FakeLuod {
    /// Serves one connection: hello, then `handler` for each request.
    pub fn start(
        mut handler: impl FnMut(&Request, Vec<OwnedFd>) -> (Response, Vec<OwnedFd>) + Send + 'static,
    ) -> FakeLuod {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("s")).unwrap();
        let thread = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut seen = Vec::new();
            let (hello, _): (Request, Vec<OwnedFd>) = frame::recv(&conn).unwrap();
            assert!(matches!(
                hello,
                Request::Hello {
                    version: PROTOCOL_VERSION,
                    ..
                }
            ));
            let reply = Response::Hello {
                version: PROTOCOL_VERSION,
                server: "fake".into(),
            };
            frame::send(&conn, &reply, &[]).unwrap();
            while let Ok((req, fds)) = frame::recv::<Request>(&conn) {
                let (resp, out) = handler(&req, fds);
                let out: Vec<_> = out.iter().map(|f| f.as_fd()).collect();
                frame::send(&conn, &resp, &out).unwrap();
                seen.push(req);
            }
            seen
        });
        FakeLuod { dir, thread }
    }

    /// A context that talks to this fake.
    pub fn ctx(&self) -> Ctx {
        Ctx {
            socket: self.dir.path().join("s"),
            mode: Mode::Human,
            timeout: None,
        }
    }
}
