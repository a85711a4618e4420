//! systemd integration: readiness notification and the service manager's
//! file descriptor store as an [`FdPark`].
//!
//! Under systemd (`Type=notify`, `FileDescriptorStoreMax=` non-zero) luod
//! parks preserved files and sessions in the fd store with `FDSTORE=1`
//! instead of forking a holder; systemd hands them back on the next start
//! through `LISTEN_FDS`/`LISTEN_FDNAMES`, and with
//! `FileDescriptorStorePreserve=yes` keeps them even while the unit is
//! stopped. See `luod/luod.service`.

use crate::holder::FdPark;
use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;

/// First fd systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// An fd-store name for a park key: systemd allows at most 255 printable
/// ASCII characters without ':'; keys hold NULs, so they are hex-encoded.
pub fn fd_name(key: &str) -> String {
    let mut s = String::from("luod-");
    for b in key.bytes() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn key_of(name: &str) -> Option<String> {
    let hex = name.strip_prefix("luod-")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// The connection to systemd's notification socket.
#[derive(Debug)]
pub struct Notifier {
    sock: UnixDatagram,
    addr: UnixAddr,
}

impl Notifier {
    /// The notifier for `NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
    pub fn new(notify_socket: &str) -> io::Result<Self> {
        let addr = match notify_socket.strip_prefix('@') {
            Some(abs) => UnixAddr::new_abstract(abs.as_bytes())?,
            None => UnixAddr::new(notify_socket)?,
        };
        Ok(Notifier {
            sock: UnixDatagram::unbound()?,
            addr,
        })
    }

    /// From the environment, when luod runs under systemd.
    pub fn from_env() -> Option<io::Result<Self>> {
        std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|s| !s.is_empty())
            .map(|s| Notifier::new(&s))
    }

    /// Sends `state` (e.g. `READY=1`) with `fds` attached.
    pub fn notify(&self, state: &str, fds: &[RawFd]) -> io::Result<()> {
        let iov = [io::IoSlice::new(state.as_bytes())];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
        sendmsg(
            self.sock.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            Some(&self.addr),
        )?;
        Ok(())
    }
}

/// systemd's fd store. luod keeps a duplicate of everything it parks so
/// `fetch_all` needs no round trip.
#[derive(Debug)]
pub struct SystemdFdStore {
    notifier: Notifier,
    parked: BTreeMap<String, OwnedFd>,
}

impl SystemdFdStore {
    /// The store behind `notifier`, holding the fds systemd passed at start
    /// (`listen_names[i]` names fd `3 + i`; see [`take_listen_fds`]).
    pub fn new(notifier: Notifier, passed: Vec<(String, OwnedFd)>) -> Self {
        let parked = passed
            .into_iter()
            .filter_map(|(name, fd)| key_of(&name).map(|k| (k, fd)))
            .collect();
        SystemdFdStore { notifier, parked }
    }
}

/// Takes the fds systemd passed (`LISTEN_PID`, `LISTEN_FDS`,
/// `LISTEN_FDNAMES`), once, and unsets the variables.
pub fn take_listen_fds() -> Vec<(String, OwnedFd)> {
    let pid_ok = std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let n: usize = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // SAFETY: called once at startup, before luod starts threads, so no
        // other thread reads the environment concurrently.
        unsafe { std::env::remove_var(var) };
    }
    if !pid_ok {
        return Vec::new();
    }
    let names: Vec<&str> = names.split(':').collect();
    (0..n)
        .map(|i| {
            let raw = LISTEN_FDS_START + i as RawFd;
            // SAFETY: systemd passed fds 3..3+LISTEN_FDS to this process
            // (LISTEN_PID is ours); nothing else in luod has claimed them
            // yet, so each gets exactly one owner here.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            (names.get(i).copied().unwrap_or_default().to_string(), fd)
        })
        .collect()
}

impl FdPark for SystemdFdStore {
    fn put(&mut self, key: &str, fd: OwnedFd) -> io::Result<()> {
        let name = fd_name(key);
        if self.parked.contains_key(key) {
            self.notifier.notify(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), &[])?;
        }
        self.notifier
            .notify(&format!("FDSTORE=1\nFDNAME={name}"), &[fd.as_raw_fd()])?;
        self.parked.insert(key.to_string(), fd);
        Ok(())
    }

    fn remove(&mut self, key: &str) -> io::Result<()> {
        if self.parked.remove(key).is_some() {
            self.notifier
                .notify(&format!("FDSTOREREMOVE=1\nFDNAME={}", fd_name(key)), &[])?;
        }
        Ok(())
    }

    fn fetch_all(&mut self) -> io::Result<Vec<(String, OwnedFd)>> {
        self.parked
            .iter()
            .map(|(k, fd)| Ok((k.clone(), fd.try_clone()?)))
            .collect()
    }

    fn clear(&mut self) -> io::Result<()> {
        for key in self.parked.keys().cloned().collect::<Vec<_>>() {
            self.remove(&key)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{ControlMessageOwned, recvmsg};

    fn recv(sock: &UnixDatagram) -> (String, usize) {
        let mut buf = [0u8; 512];
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([RawFd; 4]);
        let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty()).unwrap();
        let mut fds = 0;
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(v) = c {
                fds += v.len();
                for raw in v {
                    // SAFETY: received just now; closing our copy.
                    drop(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
        }
        let n = msg.bytes;
        (String::from_utf8_lossy(&buf[..n]).into_owned(), fds)
    }

    #[test]
    fn names_round_trip_and_are_valid_fd_names() {
        let key = "F\u{0}7\u{0}vm-0";
        let name = fd_name(key);
        assert!(name.len() <= 255 && name.chars().all(|c| c.is_ascii_graphic() && c != ':'));
        assert_eq!(key_of(&name).as_deref(), Some(key));
        assert_eq!(key_of("other"), None);
    }

    #[test]
    fn parking_speaks_the_sd_notify_fdstore_protocol() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let systemd = UnixDatagram::bind(&path).unwrap();
        let mut store = SystemdFdStore::new(Notifier::new(path.to_str().unwrap()).unwrap(), Vec::new());
        let fd = crate::kernel::memfd::from_bytes("x", b"x").unwrap();
        store.put("k", fd.try_clone().unwrap()).unwrap();
        assert_eq!(recv(&systemd), (format!("FDSTORE=1\nFDNAME={}", fd_name("k")), 1));
        store.put("k", fd).unwrap();
        assert_eq!(recv(&systemd), (format!("FDSTOREREMOVE=1\nFDNAME={}", fd_name("k")), 0));
        assert_eq!(recv(&systemd).1, 1);
        assert_eq!(store.fetch_all().unwrap().len(), 1);
        store.clear().unwrap();
        assert_eq!(recv(&systemd), (format!("FDSTOREREMOVE=1\nFDNAME={}", fd_name("k")), 0));
        assert!(store.fetch_all().unwrap().is_empty());
    }

    #[test]
    fn fds_passed_at_start_come_back_under_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let _systemd = UnixDatagram::bind(&path).unwrap();
        let fd = crate::kernel::memfd::from_bytes("x", b"x").unwrap();
        let passed = vec![
            (fd_name("S\u{0}vm0"), fd),
            (
                String::from("unrelated"),
                crate::kernel::memfd::from_bytes("y", b"").unwrap(),
            ),
        ];
        let mut store = SystemdFdStore::new(Notifier::new(path.to_str().unwrap()).unwrap(), passed);
        let all = store.fetch_all().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].0, "S\u{0}vm0");
    }
}
