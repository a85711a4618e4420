//! Harness of the end-to-end tests in `tests/tests/`: a real `luod` on a
//! file-backed region in a temporary directory, clients that talk to it
//! through the library's protocol client, `luoctl` runs, and memfd helpers.
//!
//! The binaries are taken from the cargo target directory the tests were
//! built in (`target/debug/luod`, `target/debug/luoctl`); [`binary`] builds
//! them first (`cargo build --bins`, a no-op when up to date), so `cargo test
//! --workspace` and `cargo test -p liveupdate-tests` work on a fresh clone.
//!
//! Every [`Luod`] has its own directory (socket, state directory, region,
//! log), so the tests of a file run in parallel threads without sharing
//! anything. Dropping a [`Luod`] kills it and removes the directory; its fd
//! holder process (`luod --holder`) sees its socket gone and exits within a
//! second. When a test fails while a [`Luod`] is alive, luod's log is printed.

// A refusal is returned whole (an `ErrorReply`) so that tests compare its
// kind and message directly; its size does not matter in tests.
#![allow(clippy::result_large_err)]

use liveupdate::engine::SIMULATED_KEXEC_EXIT;
use liveupdate::protocol::client::{Client, ClientError};
use liveupdate::protocol::{
    ErrorKind, ErrorReply, HistoryReport, PrepareArgs, Request, Response, SessionInfo, StatusReport, TransitionReport,
};
use liveupdate::record::Cycle;
use std::ffi::OsString;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub use liveupdate;

pub mod attack;

/// How long luod may take to start serving, or to exit when it should.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(10);

/// Exit status of luod after a simulated kexec.
pub const KEXEC_EXIT: i32 = SIMULATED_KEXEC_EXIT;

/// A binary of the workspace, from the target directory this test runs in.
///
/// `current_exe()` is `target/PROFILE/deps/NAME-HASH`; the workspace's
/// binaries are in `target/PROFILE/`. `cargo test` builds only the binaries
/// of the package under test, so the first call in a test process runs
/// `cargo build --bins` for the workspace's default members into the same
/// target directory (a no-op when they are up to date): `cargo test
/// --workspace` on a fresh clone then tests freshly built luod and luoctl.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("the test executable has a directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    if let Err(e) = build_binaries(&dir) {
        panic!("cannot build the workspace's binaries for the tests: {e}");
    }
    let path = dir.join(name);
    if !path.is_file() {
        panic!(
            "{} not found after building the workspace's binaries: is {name} a binary of a default member?",
            path.display()
        );
    }
    path
}

/// Copies the workspace binary `name` to `to`, mode 0755, for a test that
/// runs it as another user from a directory that user can reach.
///
/// The copy is made by `cp`, never by this process: a file open for writing
/// here would be inherited by every child a parallel test forks until that
/// child's `exec`, and running the copy meanwhile fails with `ETXTBSY`.
pub fn copy_binary(name: &str, to: &Path) {
    let status = Command::new("cp")
        .arg(binary(name))
        .arg(to)
        .stdin(Stdio::null())
        .status()
        .expect("run cp");
    assert!(status.success(), "cp {name} to {} failed: {status}", to.display());
    std::fs::set_permissions(to, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod 0755 {}: {e}", to.display()));
}

/// Runs `cargo build --bins` once per test process for the profile directory
/// `profile_dir` (`target/debug` or `target/release`).
fn build_binaries(profile_dir: &Path) -> Result<(), String> {
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let target_dir = profile_dir
                .parent()
                .ok_or("the test executable is not in a target directory")?;
            let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.arg("build")
                .arg("--bins")
                .arg("--quiet")
                .arg("--manifest-path")
                .arg(&manifest)
                .arg("--target-dir")
                .arg(target_dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null());
            if profile_dir.ends_with("release") {
                cmd.arg("--release");
            }
            let out = cmd.output().map_err(|e| format!("cannot run cargo: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "cargo build --bins failed ({}):\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        })
        .clone()
}

/// A luod of the test's own, in a temporary directory:
/// `DIR/luod.sock`, `DIR/state/`, `DIR/region`, `DIR/luod.log`.
#[derive(Debug)]
pub struct Luod {
    dir: tempfile::TempDir,
    region_size: String,
    extra: Vec<OsString>,
    child: Option<Child>,
}

impl Luod {
    /// A luod that is not started yet, whose region is created with
    /// `region_size` bytes (`8M`, `128M`, ...).
    pub fn new(region_size: &str) -> Luod {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the end-to-end tests run as root, as CI does: transitions need root or CAP_SYS_BOOT, \
             and the tests check that sessions belong to uid 0"
        );
        let dir = tempfile::Builder::new()
            .prefix("luod-test-")
            .tempdir()
            .expect("temporary directory");
        Luod {
            dir,
            region_size: region_size.to_string(),
            extra: Vec::new(),
            child: None,
        }
    }

    /// A started luod with a region of `region_size`.
    pub fn started(region_size: &str) -> Luod {
        let mut luod = Luod::new(region_size);
        luod.start();
        luod
    }

    /// Starts this luod (after [`arg`](Self::arg)) and returns it.
    pub fn launched(mut self) -> Luod {
        self.start();
        self
    }

    /// Adds arguments to luod's command line (for every later start).
    pub fn arg(mut self, arg: impl Into<OsString>) -> Luod {
        self.extra.push(arg.into());
        self
    }

    /// The temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// luod's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir().join("luod.sock")
    }

    /// luod's state directory (the fd holder's socket lives there).
    pub fn state_dir(&self) -> PathBuf {
        self.dir().join("state")
    }

    /// The region file.
    pub fn region(&self) -> PathBuf {
        self.dir().join("region")
    }

    /// The file luod's stderr goes to (every start appends to it).
    pub fn log_path(&self) -> PathBuf {
        self.dir().join("luod.log")
    }

    /// luod's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Spawns luod and waits until it accepts a client and answers hello.
    /// Panics with luod's log if it exits or does not serve in time.
    pub fn start(&mut self) {
        self.spawn();
        let deadline = Instant::now() + STARTUP_DEADLINE;
        loop {
            if let Some(status) = self.child.as_mut().expect("spawned").try_wait().expect("try_wait") {
                self.child = None;
                panic!(
                    "luod exited with {status} before serving its socket; its log:\n{}",
                    self.log()
                );
            }
            if Client::connect(&self.socket(), "liveupdate-tests").is_ok() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "luod did not serve {} within {STARTUP_DEADLINE:?}; its log:\n{}",
                    self.socket().display(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Spawns luod without waiting for it to serve (for a luod expected to
    /// exit on its own, such as an automatic rollback's simulated kexec).
    pub fn launch_no_wait(&mut self) {
        self.spawn();
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "luod is running already");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let child = Command::new(binary("luod"))
            .args(["--backend", "file"])
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--region")
            .arg(self.region())
            .arg("--region-size")
            .arg(&self.region_size)
            .args(&self.extra)
            .env("LUOD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn luod");
        self.child = Some(child);
    }

    /// True while luod runs.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// The pid of the running luod.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("luod is not running").id() as i32
    }

    /// SIGKILL: luod dies without any cleanup.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for luod to exit; returns its status.
    pub fn stop(&mut self) -> ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.pid());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM luod");
        self.wait_exit()
    }

    /// Waits (at most [`STARTUP_DEADLINE`]) for luod to exit on its own and
    /// returns its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + STARTUP_DEADLINE;
        let child = self.child.as_mut().expect("luod is not running");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "luod did not exit within {STARTUP_DEADLINE:?}; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the exit that follows a simulated kexec and checks its status.
    pub fn expect_kexec_exit(&mut self) {
        let status = self.wait_exit();
        assert_eq!(
            status.code(),
            Some(KEXEC_EXIT),
            "luod exit after a simulated kexec: {status}; log:\n{}",
            self.log()
        );
    }

    /// Kills luod if it runs, then starts it again on the same region.
    pub fn restart(&mut self) {
        self.kill();
        self.start();
    }

    /// A client connection that has said hello.
    pub fn client(&self) -> Conn {
        match Client::connect(&self.socket(), "liveupdate-tests") {
            Ok(client) => Conn { client },
            Err(e) => panic!("cannot connect to luod: {e}; its log:\n{}", self.log()),
        }
    }

    /// `status` as root sees it.
    pub fn status(&self) -> StatusReport {
        self.client().status()
    }

    /// Runs `luoctl --socket SOCKET ARGS...`.
    pub fn luoctl(&self, args: &[&str]) -> Output {
        luoctl_command(&self.socket()).args(args).output().expect("run luoctl")
    }

    /// `luoctl ARGS`: its exit code, stdout and stderr.
    pub fn luoctl_parts(&self, args: &[&str]) -> (i32, String, String) {
        output_parts(self.luoctl(args))
    }

    /// `luoctl ARGS`, which must succeed: its stdout.
    #[track_caller]
    pub fn luoctl_ok(&self, args: &[&str]) -> String {
        let (code, stdout, stderr) = self.luoctl_parts(args);
        assert_eq!(code, 0, "luoctl {args:?} failed: {stderr}");
        stdout
    }

    /// `luoctl --json ARGS`: the exit code and the one JSON object on stdout.
    #[track_caller]
    pub fn luoctl_json(&self, args: &[&str]) -> (i32, serde_json::Value) {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let (code, stdout, stderr) = self.luoctl_parts(&all);
        let value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!("luoctl {all:?}: stdout is not one JSON object ({e}): {stdout:?}; stderr: {stderr}")
        });
        (code, value)
    }
}

/// A finished command's exit code (a signal is a test failure), stdout and
/// stderr as text.
pub fn output_parts(out: Output) -> (i32, String, String) {
    (
        out.status.code().expect("exited, not killed by a signal"),
        String::from_utf8(out.stdout).expect("UTF-8 stdout"),
        String::from_utf8(out.stderr).expect("UTF-8 stderr"),
    )
}

impl Drop for Luod {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- luod log ({}) ----\n{}---- end of luod log ----",
                self.log_path().display(),
                self.log()
            );
        }
        self.kill();
        // Removing the directory (TempDir's drop) removes the holder's socket:
        // the holder notices and exits.
    }
}

/// `luoctl --socket SOCKET`, ready for more arguments.
pub fn luoctl_command(socket: &Path) -> Command {
    let mut cmd = Command::new(binary("luoctl"));
    cmd.arg("--socket").arg(socket).stdin(Stdio::null());
    cmd
}

/// The answer to a request: what it returned, or luod's refusal.
pub type Reply<T> = Result<T, ErrorReply>;

/// A connection to luod, with one method per request.
#[derive(Debug)]
pub struct Conn {
    client: Client,
}

impl Conn {
    /// Wraps a connected client.
    pub fn new(client: Client) -> Conn {
        Conn { client }
    }

    /// Sends `req` with `fds`; luod's refusals are `Err`, anything else
    /// (a broken connection) panics.
    pub fn call_fds(&mut self, req: &Request, fds: &[BorrowedFd<'_>]) -> Reply<(Response, Vec<OwnedFd>)> {
        match self.client.call_fds(req, fds) {
            Ok(r) => Ok(r),
            Err(ClientError::Server(e)) => Err(*e),
            Err(e) => panic!("{} request failed: {e}", req.kind()),
        }
    }

    /// Sends `req`.
    pub fn call(&mut self, req: &Request) -> Reply<Response> {
        self.call_fds(req, &[]).map(|(r, _)| r)
    }

    /// `status`.
    pub fn status(&mut self) -> StatusReport {
        match self.call(&Request::Status) {
            Ok(Response::Status(s)) => *s,
            other => panic!("status answered {other:?}"),
        }
    }

    /// `history`: the cycles.
    pub fn history(&mut self) -> Vec<Cycle> {
        self.history_report().cycles
    }

    /// `history`: the cycles and the events.
    pub fn history_report(&mut self) -> HistoryReport {
        match self.call(&Request::History) {
            Ok(Response::History(h)) => h,
            other => panic!("history answered {other:?}"),
        }
    }

    /// `session list`.
    pub fn list(&mut self) -> Vec<SessionInfo> {
        match self.call(&Request::SessionList) {
            Ok(Response::Sessions(s)) => s,
            other => panic!("session-list answered {other:?}"),
        }
    }

    /// `session create NAME`.
    pub fn create(&mut self, name: &str) -> Reply<()> {
        self.done(&Request::SessionCreate { name: name.into() }, &[])
    }

    /// `session preserve NAME TOKEN` with `fd`.
    pub fn preserve(&mut self, name: &str, token: u64, fd: BorrowedFd<'_>) -> Reply<()> {
        self.done(
            &Request::SessionPreserve {
                name: name.into(),
                token,
            },
            &[fd],
        )
    }

    /// `session retrieve NAME TOKEN`: the file and its size.
    pub fn retrieve(&mut self, name: &str, token: u64) -> Reply<(OwnedFd, u64)> {
        let req = Request::SessionRetrieve {
            name: name.into(),
            token,
        };
        let (resp, mut fds) = self.call_fds(&req, &[])?;
        match resp {
            Response::Fd { size } if fds.len() == 1 => Ok((fds.pop().expect("one fd"), size)),
            other => panic!("session-retrieve answered {other:?} with {} fds", fds.len()),
        }
    }

    /// `session finish NAME`.
    pub fn session_finish(&mut self, name: &str) -> Reply<()> {
        self.done(&Request::SessionFinish { name: name.into() }, &[])
    }

    fn done(&mut self, req: &Request, fds: &[BorrowedFd<'_>]) -> Reply<()> {
        match self.call_fds(req, fds)?.0 {
            Response::Done => Ok(()),
            other => panic!("{} answered {other:?}", req.kind()),
        }
    }

    fn transition(&mut self, req: &Request) -> Reply<TransitionReport> {
        match self.call(req)? {
            Response::Transition(t) => Ok(t),
            other => panic!("{} answered {other:?}", req.kind()),
        }
    }

    /// `prepare` without a target kernel.
    pub fn prepare(&mut self) -> Reply<TransitionReport> {
        self.transition(&Request::Prepare(PrepareArgs::default()))
    }

    /// `freeze`.
    pub fn freeze(&mut self) -> Reply<TransitionReport> {
        self.transition(&Request::Freeze)
    }

    /// `reboot`: with the file backend luod answers, then exits with
    /// [`KEXEC_EXIT`].
    pub fn reboot(&mut self) -> Reply<TransitionReport> {
        self.transition(&Request::Reboot)
    }

    /// `finish`.
    pub fn finish(&mut self) -> Reply<TransitionReport> {
        self.transition(&Request::Finish)
    }

    /// `cancel`.
    pub fn cancel(&mut self) -> Reply<TransitionReport> {
        self.transition(&Request::Cancel)
    }
}

/// Asserts that `reply` is luod's refusal of kind `kind` with exactly `message`.
#[track_caller]
pub fn assert_refused<T: std::fmt::Debug>(reply: Reply<T>, kind: ErrorKind, message: &str) -> ErrorReply {
    match reply {
        Ok(v) => panic!("expected a {kind:?} refusal {message:?}, got success: {v:?}"),
        Err(e) => {
            assert_eq!(
                (e.kind, e.message.as_str()),
                (kind, message),
                "refusal (hint: {:?})",
                e.hint
            );
            e
        }
    }
}

/// Asserts that nothing visible changed between two `status` reports: same
/// state, generation, sessions, files, last cycle and notes.
#[track_caller]
pub fn assert_unchanged(before: &StatusReport, after: &StatusReport) {
    assert_eq!(before, after, "status changed");
}

/// Deterministic bytes for a file: a xorshift stream seeded by `seed`, so
/// that every file of a test has different contents.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A memfd holding `bytes`.
pub fn memfd_with(name: &str, bytes: &[u8]) -> OwnedFd {
    liveupdate::kernel::memfd::from_bytes(name, bytes).expect("memfd")
}

/// Everything in the file, from offset 0.
pub fn read_all(fd: BorrowedFd<'_>) -> Vec<u8> {
    let file = File::from(fd.try_clone_to_owned().expect("dup"));
    let len = file.metadata().expect("fstat").len() as usize;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, 0).expect("read the file");
    buf
}

/// Sets the size of the file behind `fd` (grows with zeros, or shrinks).
pub fn set_len(fd: BorrowedFd<'_>, len: u64) {
    File::from(fd.try_clone_to_owned().expect("dup"))
        .set_len(len)
        .expect("ftruncate");
}

/// Asserts that `got` is `want`, byte for byte, naming the first difference
/// (without printing megabytes).
#[track_caller]
pub fn assert_same_bytes(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if got == want {
        return;
    }
    if let Some(at) = got.iter().zip(want).position(|(g, w)| g != w) {
        panic!(
            "{what}: first difference at byte {at}: got {:#04x}, want {:#04x}",
            got[at], want[at]
        );
    }
}

/// Asserts that the file behind `fd` holds exactly `want`.
#[track_caller]
pub fn assert_file_holds(what: &str, fd: impl AsFd, want: &[u8]) {
    assert_same_bytes(what, &read_all(fd.as_fd()), want);
}

/// Polls `f` every 10 ms until it returns `Some`, for at most `limit`.
pub fn poll<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A file a test preserved, and what it must hold after the update.
#[derive(Debug, Clone)]
pub struct Preserved {
    /// Session name.
    pub session: String,
    /// Token.
    pub token: u64,
    /// Contents.
    pub bytes: Vec<u8>,
}

/// Creates each of `sessions` and preserves in it one memfd per size in
/// `sizes`, under tokens 1, 2, ...; every file gets its own pattern. The
/// test's copies of the memfds are closed: luod holds the only ones.
pub fn preserve_set(conn: &mut Conn, sessions: &[&str], sizes: &[usize]) -> Vec<Preserved> {
    let mut out = Vec::new();
    for (i, session) in sessions.iter().enumerate() {
        conn.create(session).unwrap_or_else(|e| panic!("create {session}: {e}"));
        for (j, &size) in sizes.iter().enumerate() {
            let token = j as u64 + 1;
            let bytes = pattern((i * sizes.len() + j + 1) as u64, size);
            let fd = memfd_with(&format!("{session}-{token}"), &bytes);
            conn.preserve(session, token, fd.as_fd())
                .unwrap_or_else(|e| panic!("preserve {session}/{token}: {e}"));
            out.push(Preserved {
                session: session.to_string(),
                token,
                bytes,
            });
        }
    }
    out
}

/// Retrieves every file of `set` and checks its size and contents.
#[track_caller]
pub fn retrieve_and_compare(conn: &mut Conn, set: &[Preserved]) {
    for p in set {
        let what = format!("{}/{}", p.session, p.token);
        let (fd, size) = conn
            .retrieve(&p.session, p.token)
            .unwrap_or_else(|e| panic!("retrieve {what}: {e}"));
        assert_eq!(size, p.bytes.len() as u64, "{what}: size luod reports");
        assert!(
            liveupdate::kernel::memfd::is_memfd(fd.as_fd()),
            "{what}: a memfd comes back"
        );
        assert_file_holds(&what, &fd, &p.bytes);
    }
}

/// The sessions `status` should show for `set`: per session, its tokens and
/// sizes in preservation order.
pub fn sessions_of(set: &[Preserved]) -> Vec<(String, Vec<(u64, u64)>)> {
    let mut out: Vec<(String, Vec<(u64, u64)>)> = Vec::new();
    for p in set {
        match out.iter_mut().find(|(name, _)| *name == p.session) {
            Some((_, files)) => files.push((p.token, p.bytes.len() as u64)),
            None => out.push((p.session.clone(), vec![(p.token, p.bytes.len() as u64)])),
        }
    }
    out
}

/// Sessions of a `status` or `session list` answer in the shape of [`sessions_of`].
pub fn sessions_seen(sessions: &[SessionInfo]) -> Vec<(String, Vec<(u64, u64)>)> {
    sessions
        .iter()
        .map(|s| (s.name.clone(), s.files.iter().map(|f| (f.token, f.size)).collect()))
        .collect()
}
