//! systemd integration: readiness notification and the service manager's
//! file descriptor store as an [`FdPark`].
//!
//! Under systemd (`Type=notify`, `FileDescriptorStoreMax=` non-zero) luod
//! parks preserved files and sessions in the fd store with `FDSTORE=1`
//! instead of forking a holder; systemd hands them back on the next start
//! through `LISTEN_FDS`/`LISTEN_FDNAMES`, and with
//! `FileDescriptorStorePreserve=yes` keeps them even while the unit is
//! stopped. See `luod/luod.service`.

use crate::holder::{FdPark, SharedFd};
use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// systemd's fd store. luod keeps a descriptor of everything it parks so
/// `fetch_all` needs no round trip (shared with the backend's own, see
/// [`FdPark::put_shared`]).
#[derive(Debug)]
pub struct SystemdFdStore {
    notifier: Notifier,
    parked: BTreeMap<String, SharedFd>,
}

impl SystemdFdStore {
    /// The store behind `notifier`, holding the fds systemd passed at start
    /// (`listen_names[i]` names fd `3 + i`; see [`take_listen_fds`]).
    pub fn new(notifier: Notifier, passed: Vec<(String, OwnedFd)>) -> Self {
        let parked = passed
            .into_iter()
            .filter_map(|(name, fd)| key_of(&name).map(|k| (k, Arc::new(fd))))
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
    fn put_shared(&mut self, key: &str, fd: &SharedFd) -> io::Result<()> {
        let name = fd_name(key);
        if self.parked.contains_key(key) {
            self.notifier.notify(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), &[])?;
        }
        self.notifier
            .notify(&format!("FDSTORE=1\nFDNAME={name}"), &[fd.as_raw_fd()])?;
        self.parked.insert(key.to_string(), Arc::clone(fd));
        Ok(())
    }

    fn fetch_all_shared(&mut self) -> io::Result<Vec<(String, SharedFd)>> {
        Ok(self.parked.iter().map(|(k, fd)| (k.clone(), Arc::clone(fd))).collect())
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

/// The first systemd release whose PID 1 carries fd stores through a kexec
/// with LUO (`src/core/luo.c`): it serialises the fd store of every service
/// with `FileDescriptorStorePreserve=`, and systemd-shutdown preserves it in
/// the LUO session `systemd` right before the kexec.
pub const LUO_AWARE_SYSTEMD: u32 = 261;

/// The LUO session name systemd reserves for itself: it refuses a service's
/// session of that name in its fd store.
pub const SYSTEMD_SESSION: &str = "systemd";

/// How long luod waits for one `systemctl` call.
const SYSTEMCTL_TIMEOUT: Duration = Duration::from_secs(30);

/// How `luoctl reboot` reaches the new kernel, chosen when luod starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebootPath {
    /// A LUO-aware systemd (≥ [`LUO_AWARE_SYSTEMD`]) carries luod's fd store
    /// (its sessions and record) through the kexec: `reboot` ends in an
    /// orderly `systemctl kexec` of the image luod loaded at `prepare`.
    Systemd {
        /// The running PID 1's version.
        version: u32,
        /// The `systemctl` luod runs.
        systemctl: PathBuf,
        /// luod's unit.
        unit: String,
    },
    /// luod holds the sessions itself and calls `reboot(LINUX_REBOOT_CMD_KEXEC)`
    /// after `sync()`, skipping the orderly shutdown.
    Direct {
        /// Why not the systemd path.
        why: String,
    },
}

impl RebootPath {
    /// `systemd` or `direct`.
    pub fn name(&self) -> &'static str {
        match self {
            RebootPath::Systemd { .. } => "systemd",
            RebootPath::Direct { .. } => "direct",
        }
    }

    /// One sentence for `check`, `status` and the log.
    pub fn describe(&self) -> String {
        match self {
            RebootPath::Systemd { version, unit, .. } => format!(
                "orderly shutdown: reboot runs `systemctl kexec`; systemd {version} carries {unit}'s fd store \
                 (luod's sessions and record) through the kexec and hands it back to luod in the new kernel"
            ),
            RebootPath::Direct { why } => format!(
                "direct kexec: luod holds the sessions and calls reboot(LINUX_REBOOT_CMD_KEXEC) itself after sync, \
                 skipping the orderly shutdown ({why})"
            ),
        }
    }
}

/// The reboot path as luod knows it: known at once, or being detected by a
/// thread luod starts once it serves (the detection runs `systemctl show`
/// twice, about 160 ms under TCG, which must not delay luod's start). Readers
/// ([`get`](Self::get)) wait for the detection; clones share one value.
#[derive(Debug, Clone)]
pub struct RebootPathCell(std::sync::Arc<(std::sync::Mutex<Option<RebootPath>>, std::sync::Condvar)>);

impl RebootPathCell {
    /// A path known already.
    pub fn known(path: RebootPath) -> Self {
        RebootPathCell(std::sync::Arc::new((
            std::sync::Mutex::new(Some(path)),
            std::sync::Condvar::new(),
        )))
    }

    /// A path to be [`set`](Self::set) by a detection still to run.
    pub fn pending() -> Self {
        RebootPathCell(std::sync::Arc::default())
    }

    /// Sets the detected path and wakes the readers.
    pub fn set(&self, path: RebootPath) {
        let (value, ready) = &*self.0;
        *value.lock().unwrap_or_else(|p| p.into_inner()) = Some(path);
        ready.notify_all();
    }

    /// The path, once known without waiting; `None` while it is detected.
    pub fn peek(&self) -> Option<RebootPath> {
        self.0.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The path, waiting for the detection: at most as long as its two
    /// `systemctl` calls may take, after which the direct path is taken,
    /// with the reason.
    pub fn get(&self) -> RebootPath {
        let (value, ready) = &*self.0;
        let deadline = Instant::now() + 2 * SYSTEMCTL_TIMEOUT + Duration::from_secs(5);
        let mut guard = value.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(path) = guard.as_ref() {
                return path.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                return RebootPath::Direct {
                    why: "the detection of systemd's reboot path did not finish".into(),
                };
            }
            guard = ready
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// The unit a process belongs to, from its `/proc/PID/cgroup` (cgroup v2:
/// `0::/system.slice/luod.service`).
pub fn unit_of_cgroup(cgroup: &str) -> Option<String> {
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let last = path.trim().rsplit('/').next()?;
    last.ends_with(".service").then(|| last.to_string())
}

/// The leading number of a systemd version (`262.1-1` → 262).
fn major(version: &str) -> Option<u32> {
    let digits: String = version.trim().chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// Runs `systemctl ARGS` with a deadline; its standard output on success,
/// else a sentence with its exit status and standard error.
fn systemctl(systemctl: &Path, args: &[&str]) -> Result<String, String> {
    let shown = format!("`{} {}`", systemctl.display(), args.join(" "));
    let spawn = || {
        Command::new(systemctl)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    };
    // ETXTBSY: a file just written is still open in a child another thread
    // forked and has not exec'd yet; it goes away at once.
    let mut child = match spawn() {
        Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
            std::thread::sleep(Duration::from_millis(20));
            spawn()
        }
        other => other,
    }
    .map_err(|e| format!("cannot run {shown}: {e}"))?;
    let deadline = Instant::now() + SYSTEMCTL_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{shown} did not finish within {} s (killed)",
                    SYSTEMCTL_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Err(format!("cannot wait for {shown}: {e}")),
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr = stderr.trim();
    Err(format!(
        "{shown} failed ({}){}",
        out.status,
        if stderr.is_empty() {
            String::new()
        } else {
            format!(": {stderr}")
        }
    ))
}

/// Chooses the reboot path of a luod that parks its sessions in systemd's
/// fd store: the systemd path when the running PID 1 is LUO-aware and `unit`
/// (luod's) keeps its fd store with `FileDescriptorStorePreserve=`; else the
/// direct path, with the reason.
pub fn detect_reboot_path(systemctl_path: &Path, unit: Option<&str>) -> RebootPath {
    let direct = |why: String| RebootPath::Direct { why };
    let version = match systemctl(systemctl_path, &["show", "--property=Version", "--value"]) {
        Ok(v) => v,
        Err(e) => return direct(format!("cannot ask systemd for its version: {e}")),
    };
    let Some(version) = major(&version) else {
        return direct(format!("systemd reported an unreadable version {:?}", version.trim()));
    };
    if version < LUO_AWARE_SYSTEMD {
        return direct(format!(
            "systemd {version} does not carry fd stores across a kexec; {LUO_AWARE_SYSTEMD} and later do"
        ));
    }
    let Some(unit) = unit else {
        return direct("luod's unit cannot be told from /proc/self/cgroup".into());
    };
    let preserve = match systemctl(
        systemctl_path,
        &["show", "--property=FileDescriptorStorePreserve", "--value", unit],
    ) {
        Ok(v) => v.trim().to_string(),
        Err(e) => return direct(format!("cannot read {unit}'s FileDescriptorStorePreserve=: {e}")),
    };
    if !matches!(preserve.as_str(), "yes" | "on-success") {
        return direct(format!(
            "{unit} has FileDescriptorStorePreserve={preserve}: systemd would not carry luod's fd store; set it to yes"
        ));
    }
    RebootPath::Systemd {
        version,
        systemctl: systemctl_path.to_path_buf(),
        unit: unit.to_string(),
    }
}

/// Starts the orderly kexec: `systemctl --no-block --no-ask-password kexec`
/// queues `kexec.target` (units stop, luod among them; PID 1 serialises the
/// fd stores; systemd-shutdown preserves them and kexecs into the loaded
/// image). `Ok` means systemd accepted the job; the error says why not.
pub fn systemctl_kexec(systemctl_path: &Path) -> Result<(), String> {
    systemctl(systemctl_path, &["--no-block", "--no-ask-password", "kexec"]).map(|_| ())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_pending_reboot_path_is_waited_for_and_shared_by_clones() {
        let cell = RebootPathCell::pending();
        assert_eq!(cell.peek(), None);
        let reader = {
            let cell = cell.clone();
            std::thread::spawn(move || cell.get())
        };
        std::thread::sleep(Duration::from_millis(50));
        let path = RebootPath::Direct { why: "detected".into() };
        cell.clone().set(path.clone());
        assert_eq!(reader.join().unwrap(), path);
        assert_eq!(cell.peek(), Some(path.clone()));
        assert_eq!(RebootPathCell::known(path.clone()).get(), path);
    }

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

    /// A fake `systemctl`: answers `show -P Version` with `version`, `show
    /// -P FileDescriptorStorePreserve` with `preserve`, and `kexec` with
    /// `kexec_exit` (and a message on stderr when non-zero); logs every call.
    fn fake_systemctl(dir: &Path, version: &str, preserve: &str, kexec_exit: i32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("systemctl");
        let log = dir.join("calls");
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\necho \"$*\" >> {log}\ncase \"$*\" in\n\
                 *Version*) echo '{version}' ;;\n\
                 *FileDescriptorStorePreserve*) echo '{preserve}' ;;\n\
                 *kexec*) [ {kexec_exit} = 0 ] || echo 'Failed to start kexec.target: Transaction is destructive.' >&2; exit {kexec_exit} ;;\n\
                 esac\n",
                log = log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn calls(dir: &Path) -> String {
        std::fs::read_to_string(dir.join("calls")).unwrap_or_default()
    }

    #[test]
    fn a_luo_aware_systemd_that_keeps_the_fd_store_gives_the_systemd_path() {
        let dir = tempfile::tempdir().unwrap();
        let ctl = fake_systemctl(dir.path(), "262.1-1", "yes", 0);
        let path = detect_reboot_path(&ctl, Some("luod.service"));
        assert_eq!(
            path,
            RebootPath::Systemd {
                version: 262,
                systemctl: ctl.clone(),
                unit: "luod.service".into()
            }
        );
        assert_eq!(path.name(), "systemd");
        assert!(path.describe().starts_with(
            "orderly shutdown: reboot runs `systemctl kexec`; systemd 262 carries luod.service's fd store"
        ));
        assert_eq!(
            calls(dir.path()),
            "show --property=Version --value\nshow --property=FileDescriptorStorePreserve --value luod.service\n"
        );
        // 261 is the first LUO-aware release; on-success keeps the store too.
        let dir = tempfile::tempdir().unwrap();
        let ctl = fake_systemctl(dir.path(), "261", "on-success", 0);
        assert_eq!(detect_reboot_path(&ctl, Some("luod.service")).name(), "systemd");
    }

    #[test]
    fn an_older_systemd_gives_the_direct_path_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let ctl = fake_systemctl(dir.path(), "257.9-1~deb13u1", "yes", 0);
        let path = detect_reboot_path(&ctl, Some("luod.service"));
        assert_eq!(
            path,
            RebootPath::Direct {
                why: "systemd 257 does not carry fd stores across a kexec; 261 and later do".into()
            }
        );
        assert_eq!(
            path.describe(),
            "direct kexec: luod holds the sessions and calls reboot(LINUX_REBOOT_CMD_KEXEC) itself after sync, \
             skipping the orderly shutdown (systemd 257 does not carry fd stores across a kexec; 261 and later do)"
        );
        // Only the version was asked.
        assert_eq!(calls(dir.path()), "show --property=Version --value\n");
    }

    #[test]
    fn a_unit_without_fd_store_preserve_gives_the_direct_path() {
        let dir = tempfile::tempdir().unwrap();
        let ctl = fake_systemctl(dir.path(), "262", "no", 0);
        assert_eq!(
            detect_reboot_path(&ctl, Some("luod.service")),
            RebootPath::Direct {
                why: "luod.service has FileDescriptorStorePreserve=no: systemd would not carry luod's fd store; set it to yes"
                    .into()
            }
        );
        assert_eq!(
            detect_reboot_path(&ctl, None),
            RebootPath::Direct {
                why: "luod's unit cannot be told from /proc/self/cgroup".into()
            }
        );
    }

    #[test]
    fn a_systemctl_that_fails_or_is_missing_gives_the_direct_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-systemctl");
        let RebootPath::Direct { why } = detect_reboot_path(&missing, Some("luod.service")) else {
            panic!("a missing systemctl must give the direct path");
        };
        assert_eq!(
            why,
            format!(
                "cannot ask systemd for its version: cannot run `{} show --property=Version --value`: No such file or directory (os error 2)",
                missing.display()
            )
        );
        let ctl = fake_systemctl(dir.path(), "not-a-version", "yes", 0);
        assert_eq!(
            detect_reboot_path(&ctl, Some("luod.service")),
            RebootPath::Direct {
                why: "systemd reported an unreadable version \"not-a-version\"".into()
            }
        );
    }

    #[test]
    fn systemctl_kexec_queues_the_job_without_waiting_and_reports_a_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let ctl = fake_systemctl(dir.path(), "262", "yes", 0);
        systemctl_kexec(&ctl).unwrap();
        assert_eq!(calls(dir.path()), "--no-block --no-ask-password kexec\n");
        let dir = tempfile::tempdir().unwrap();
        let ctl = fake_systemctl(dir.path(), "262", "yes", 1);
        assert_eq!(
            systemctl_kexec(&ctl).unwrap_err(),
            format!(
                "`{} --no-block --no-ask-password kexec` failed (exit status: 1): Failed to start kexec.target: Transaction is destructive.",
                ctl.display()
            )
        );
    }

    #[test]
    fn the_unit_comes_from_the_cgroup_v2_line() {
        assert_eq!(
            unit_of_cgroup("0::/system.slice/luod.service\n").as_deref(),
            Some("luod.service")
        );
        assert_eq!(unit_of_cgroup("0::/user.slice/user-0.slice/session-1.scope\n"), None);
        assert_eq!(unit_of_cgroup("1:name=systemd:/\n"), None);
    }
}
