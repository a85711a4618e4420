//! Keeping preserved files alive across a crash of luod.
//!
//! Before the reboot, the only thing keeping a preserved file (or, on LUO, a
//! session) alive is an open file descriptor. If luod dies, they would die
//! with it. So luod parks a duplicate of each in an [`FdPark`]: a small holder
//! process it spawns ([`HolderClient`], serving [`run_holder`]) that outlives
//! it, and from which a luod started again takes them back.
//!
//! The holder speaks the frame protocol of [`crate::protocol::frame`] over its
//! own Unix socket. It exits when told to (the kexec), when its socket path is
//! removed or replaced, or when luod disconnects and it holds nothing.

use crate::protocol::frame::{self, FrameError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Somewhere to park file descriptors that must outlive luod.
pub trait FdPark: Send + std::fmt::Debug {
    /// Parks a duplicate of a file under `key` (replacing any file under it).
    fn put(&mut self, key: &str, fd: OwnedFd) -> io::Result<()>;
    /// Drops the file under `key`.
    fn remove(&mut self, key: &str) -> io::Result<()>;
    /// Duplicates of every parked file; the park keeps its own.
    fn fetch_all(&mut self) -> io::Result<Vec<(String, OwnedFd)>>;
    /// Drops every file (what a kexec does to them). A holder process then
    /// ends once luod disconnects, as it holds nothing.
    fn clear(&mut self) -> io::Result<()>;
}

/// Files sent in one reply of `FetchAll`.
const BATCH: usize = frame::MAX_FDS_PER_FRAME;

#[derive(Debug, Serialize, Deserialize)]
enum HolderRequest {
    Put { key: String },
    Remove { key: String },
    FetchAll,
    Clear,
}

#[derive(Debug, Serialize, Deserialize)]
enum HolderReply {
    Ok,
    Batch { keys: Vec<String>, last: bool },
    Error(String),
}

/// luod's side of the holder.
#[derive(Debug)]
pub struct HolderClient {
    sock: UnixStream,
    path: PathBuf,
}

impl HolderClient {
    /// Connects to the holder at `path`, or runs `spawn` to start one and
    /// waits up to 5 s for it to listen.
    pub fn connect_or_spawn(path: &Path, spawn: impl FnOnce() -> io::Result<()>) -> io::Result<Self> {
        if let Ok(sock) = UnixStream::connect(path) {
            return Ok(HolderClient {
                sock,
                path: path.to_path_buf(),
            });
        }
        let _ = std::fs::remove_file(path);
        spawn()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match UnixStream::connect(path) {
                Ok(sock) => {
                    return Ok(HolderClient {
                        sock,
                        path: path.to_path_buf(),
                    });
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("fd holder did not start at {}: {e}", path.display()),
                    ));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    fn call(&mut self, req: &HolderRequest, fds: &[BorrowedFd<'_>]) -> io::Result<(HolderReply, Vec<OwnedFd>)> {
        frame::send(&self.sock, req, fds).map_err(to_io)?;
        let (reply, fds) = frame::recv(&self.sock).map_err(to_io)?;
        if let HolderReply::Error(e) = reply {
            return Err(io::Error::other(format!("fd holder at {}: {e}", self.path.display())));
        }
        Ok((reply, fds))
    }
}

fn to_io(e: FrameError) -> io::Error {
    match e {
        FrameError::Io(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

impl FdPark for HolderClient {
    fn put(&mut self, key: &str, fd: OwnedFd) -> io::Result<()> {
        self.call(&HolderRequest::Put { key: key.to_string() }, &[fd.as_fd()])
            .map(drop)
    }

    fn remove(&mut self, key: &str) -> io::Result<()> {
        self.call(&HolderRequest::Remove { key: key.to_string() }, &[])
            .map(drop)
    }

    fn fetch_all(&mut self) -> io::Result<Vec<(String, OwnedFd)>> {
        frame::send(&self.sock, &HolderRequest::FetchAll, &[]).map_err(to_io)?;
        let mut out = Vec::new();
        loop {
            let (reply, fds): (HolderReply, Vec<OwnedFd>) = frame::recv(&self.sock).map_err(to_io)?;
            match reply {
                HolderReply::Batch { keys, last } => {
                    if keys.len() != fds.len() {
                        return Err(io::Error::other(
                            "fd holder sent a batch whose keys and files do not match",
                        ));
                    }
                    out.extend(keys.into_iter().zip(fds));
                    if last {
                        return Ok(out);
                    }
                }
                HolderReply::Error(e) => return Err(io::Error::other(e)),
                HolderReply::Ok => return Err(io::Error::other("fd holder answered Ok to FetchAll")),
            }
        }
    }

    fn clear(&mut self) -> io::Result<()> {
        self.call(&HolderRequest::Clear, &[]).map(drop)
    }
}

/// An in-process park, for tests and for hosts where crash survival is not
/// wanted. Files die with the process.
#[derive(Debug, Default)]
pub struct MemPark(BTreeMap<String, OwnedFd>);

impl FdPark for MemPark {
    fn put(&mut self, key: &str, fd: OwnedFd) -> io::Result<()> {
        self.0.insert(key.to_string(), fd);
        Ok(())
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

/// The holder process: serves the socket at `path` until told to stop, until
/// `path` is removed or replaced, or until luod disconnects and nothing is
/// parked.
pub fn run_holder(path: &Path) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    let ino = std::fs::metadata(path)?.ino();
    let still_ours = || std::fs::metadata(path).map(|m| m.ino() == ino).unwrap_or(false);
    let mut parked: BTreeMap<String, OwnedFd> = BTreeMap::new();
    listener.set_nonblocking(true)?;
    loop {
        let conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !still_ours() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Err(e) => return Err(e),
        };
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(Duration::from_secs(1)))?;
        loop {
            let (req, mut fds): (HolderRequest, Vec<OwnedFd>) = match frame::recv(&conn) {
                Ok(m) => m,
                Err(FrameError::Io(e)) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    if !still_ours() {
                        return Ok(());
                    }
                    continue;
                }
                Err(_) => break,
            };
            let reply = match req {
                HolderRequest::Put { key } => match fds.pop() {
                    Some(fd) if fds.is_empty() => {
                        parked.insert(key, fd);
                        HolderReply::Ok
                    }
                    _ => HolderReply::Error("Put needs exactly one file descriptor".into()),
                },
                HolderRequest::Remove { key } => {
                    parked.remove(&key);
                    HolderReply::Ok
                }
                HolderRequest::Clear => {
                    parked.clear();
                    HolderReply::Ok
                }
                HolderRequest::FetchAll => {
                    let entries: Vec<(&String, &OwnedFd)> = parked.iter().collect();
                    let chunks: Vec<_> = entries.chunks(BATCH).collect();
                    let n = chunks.len().max(1);
                    let mut ok = true;
                    for i in 0..n {
                        let chunk: &[(&String, &OwnedFd)] = chunks.get(i).copied().unwrap_or(&[]);
                        let keys = chunk.iter().map(|(k, _)| (*k).clone()).collect();
                        let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(|(_, f)| f.as_fd()).collect();
                        if frame::send(&conn, &HolderReply::Batch { keys, last: i + 1 == n }, &fds).is_err() {
                            ok = false;
                            break;
                        }
                    }
                    if !ok {
                        break;
                    }
                    continue;
                }
            };
            if frame::send(&conn, &reply, &[]).is_err() {
                break;
            }
        }
        if parked.is_empty() {
            if still_ours() {
                let _ = std::fs::remove_file(path);
            }
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::memfd;

    /// Runs a holder on a thread and waits until it listens (without
    /// connecting: a holder with nothing parked ends when a client leaves).
    fn serve(path: &Path) -> std::thread::JoinHandle<io::Result<()>> {
        let p = path.to_path_buf();
        let server = std::thread::spawn(move || run_holder(&p));
        while !path.exists() {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(20));
        server
    }

    #[test]
    fn files_parked_by_one_client_are_fetched_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holder.sock");
        let server = serve(&path);
        let mut c = HolderClient::connect_or_spawn(&path, || Ok(())).unwrap();
        for i in 0..10 {
            c.put(&format!("k{i}"), memfd::from_bytes("t", &[i as u8; 3]).unwrap())
                .unwrap();
        }
        c.remove("k3").unwrap();
        drop(c);
        let mut c = HolderClient::connect_or_spawn(&path, || Ok(())).unwrap();
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
        let server = serve(&path);
        let mut c = HolderClient::connect_or_spawn(&path, || Ok(())).unwrap();
        c.put("k", memfd::from_bytes("t", b"x").unwrap()).unwrap();
        std::fs::remove_file(&path).unwrap();
        server.join().unwrap().unwrap();
    }
}
