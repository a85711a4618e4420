//! One QEMU process: started on guest RAM the launcher owns, driven over QMP.
//!
//! Guest RAM is a memfd handed to QEMU as an inherited descriptor and named
//! by path: `memory-backend-file,share=on,mem-path=/proc/self/fd/N`. QEMU
//! opens that path, which for a memfd reopens the same shared memory (a new
//! open file description of the same inode), and maps it `MAP_SHARED`.
//! `-add-fd` with `/dev/fdset/N` does not work for RAM backends
//! (`memory-backend-file` opens its path with `open(2)`, not `qemu_open`;
//! the series that would change it is not merged), and
//! `memory-backend-memfd` creates its own memfd. Being a named file matters:
//! `x-ignore-shared` skips only RAM blocks that are shared *and* backed by
//! a named file, so this guest RAM is never copied into the state.
//!
//! The checkpoint is QEMU's `cpr-reboot` migration mode with `x-ignore-shared`
//! into a pipe given with `getfd` and migrated to with `fd:NAME`; a launcher
//! thread copies the stream into the state memfd. Not `fd:` on the memfd
//! itself: QEMU 10 warns that `fd:` to a file is deprecated, QEMU 11 refuses
//! it ("Use file: instead"), and `file:` truncates its file to the offset
//! (`ftruncate`), which a memfd preserved by LUO must not undergo (its size
//! is fixed). The new QEMU, started with `-incoming defer`, reads the state
//! back through a pipe the same way (`migrate-incoming fd:NAME`). Only the
//! device state (hundreds of KB) goes through the pipe; guest RAM is never
//! copied.

use liveupdate::subsystems::qmp::{Qmp, QmpError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The id of the RAM backend the launcher adds.
pub const RAM_BACKEND: &str = "luo-ram";
/// The name the state memfd is given to QEMU under at the checkpoint.
const STATE_FD_NAME: &str = "luo-state";
/// Lines of QEMU's stderr kept for error messages.
const STDERR_LINES: usize = 8;

/// What an operator should know when QEMU could not give a VM its TSC rate
/// (QEMU's warning `TSC frequency mismatch between VM (A kHz) and host
/// (B kHz), and TSC scaling unavailable`), or None for any other line. On
/// a restore it means the checkpoint's kernel ran the VM at a rate this
/// kernel cannot give it; in the project's test hosts every restored guest
/// that then stood still had made that move (README, "For QEMU hosts").
fn tsc_rate_advice(line: &str) -> Option<String> {
    if !line.contains("TSC frequency mismatch") {
        return None;
    }
    Some(
        "QEMU could not give the guest its TSC rate and this host cannot scale the TSC; a restored guest \
         may stand still for minutes. Boot every kernel of this host with tsc_early_khz=<the TSC rate in kHz> \
         (or use a host whose TSC rate the kernel knows: tsc_known_freq in /proc/cpuinfo), then check the \
         guest's clock"
            .to_string(),
    )
}

/// What a QEMU operation failed on.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// QEMU could not be started.
    #[error("cannot start {}: {source}", qemu.display())]
    Spawn {
        /// The binary.
        qemu: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited.
    #[error("QEMU exited ({status}){}", said(stderr))]
    Exited {
        /// How.
        status: ExitStatus,
        /// Its last lines on stderr.
        stderr: String,
    },
    /// QEMU never opened its QMP socket.
    #[error("QEMU did not open its QMP socket {} within {secs} s", path.display())]
    NoMonitor {
        /// The socket.
        path: PathBuf,
        /// The deadline.
        secs: u64,
    },
    /// A QMP command failed.
    #[error("{source}{}", said(stderr))]
    Qmp {
        /// The QMP error (QEMU's own message for a failed command).
        #[source]
        source: QmpError,
        /// QEMU's last lines on stderr, if it said something.
        stderr: String,
    },
    /// The migration (checkpoint or restore) failed.
    #[error("{0}")]
    Migration(String),
    /// A local system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn said(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!("; QEMU said: {stderr}")
    }
}

/// What the checkpoint records for the restore (the VM's state blob in luod).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Version of this blob.
    pub format: u32,
    /// QEMU's version that wrote the state (`10.0.2`).
    pub qemu: String,
    /// Bytes of device state in the state memfd, from offset 0.
    pub state_bytes: u64,
    /// Whether the guest ran at the checkpoint (QEMU resumes it then).
    pub was_running: bool,
    /// Guest RAM, in MiB.
    pub memory_mib: u64,
    /// When QEMU paused the guest for the checkpoint: the host's wall clock
    /// (`CLOCK_REALTIME`), in nanoseconds since the Unix epoch, read just
    /// before the `migrate` command (cpr-reboot stops the VM at its start).
    /// The restore subtracts it from the time the guest runs again in the
    /// new kernel: the VM's blackout. Absent in checkpoints of launchers
    /// that did not record it (the same format: they still load).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_at_ns: Option<u64>,
}

/// The host's wall clock (`CLOCK_REALTIME`) in nanoseconds since the Unix
/// epoch: the one clock both kernels of a kexec share (the new kernel sets
/// it from the RTC, or kvmclock in a KVM guest, at boot).
pub fn wall_clock_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The VM's blackout in milliseconds (rounded to the nearest): from
/// `paused_at_ns` to `resumed_at_ns` on the wall clock. `None` when the
/// clock went backwards in between (the new kernel's clock was set behind
/// the old one's): no number is better than a wrong one.
pub fn blackout_ms(paused_at_ns: u64, resumed_at_ns: u64) -> Option<u64> {
    let ns = resumed_at_ns.checked_sub(paused_at_ns)?;
    Some((ns + 500_000) / 1_000_000)
}

/// Version of [`Checkpoint`].
pub const CHECKPOINT_FORMAT: u32 = 1;

/// How to start QEMU.
#[derive(Debug, Clone)]
pub struct Launch<'a> {
    /// Binary.
    pub qemu: &'a Path,
    /// VM name (QEMU's `-name`).
    pub name: &'a str,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The rest of the configuration.
    pub args: &'a [String],
    /// QMP socket path.
    pub qmp: &'a Path,
    /// Deadline of each QMP command.
    pub timeout: Duration,
}

/// A running QEMU and its monitor.
#[derive(Debug)]
pub struct Qemu {
    child: Child,
    qmp: Qmp,
    stderr: Arc<Mutex<Vec<String>>>,
    exited: Option<ExitStatus>,
    timeout: Duration,
}

/// A pipe for QEMU's migration stream: (read end, write end), close-on-exec.
fn pipe() -> Result<(OwnedFd, OwnedFd), QemuError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| QemuError::Io {
        what: "creating the pipe for QEMU's device state".into(),
        source: e.into(),
    })
}

/// Copies the pipe `rx` into `desc` until EOF; more than `cap` bytes is an
/// error (the state memfd is full). Returns the bytes copied.
fn copy_into(rx: OwnedFd, desc: OwnedFd, cap: u64) -> std::io::Result<u64> {
    use std::io::{Read, Write};
    let mut rx = std::fs::File::from(rx);
    let mut out = std::fs::File::from(desc);
    let mut buf = vec![0u8; 1 << 16];
    let mut total: u64 = 0;
    loop {
        let n = rx.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
        if total > cap {
            // Drain so that QEMU is not blocked, then report the size.
            while rx.read(&mut buf)? > 0 {}
            return Ok(total);
        }
        out.write_all(&buf[..n])?;
    }
}

/// Writes the first `len` bytes of `desc` into the pipe `tx`, then closes it.
fn copy_out(desc: OwnedFd, tx: OwnedFd, len: u64) -> std::io::Result<()> {
    use std::io::Read;
    let mut src = std::fs::File::from(desc).take(len);
    let mut tx = std::fs::File::from(tx);
    std::io::copy(&mut src, &mut tx).map(drop)
}

/// Opens a new file description of the memfd `fd` (offset 0, independent
/// of the launcher's own), through `/proc/self/fd`.
fn reopen(fd: BorrowedFd<'_>, write: bool) -> Result<OwnedFd, QemuError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(OwnedFd::from)
        .map_err(|source| QemuError::Io {
            what: "reopening the state memfd".into(),
            source,
        })
}

impl Launch<'_> {
    /// QEMU's command line: the configuration's arguments plus guest RAM on
    /// `ram` (a descriptor number QEMU inherits), the QMP socket and, with
    /// `incoming`, `-incoming defer`.
    pub fn command_line(&self, ram: i32, incoming: bool) -> Vec<String> {
        let mut v = vec![
            "-name".to_string(),
            self.name.to_string(),
            "-object".into(),
            format!(
                "memory-backend-file,id={RAM_BACKEND},size={}M,mem-path=/proc/self/fd/{ram},share=on",
                self.memory_mib
            ),
            "-machine".into(),
            format!("memory-backend={RAM_BACKEND}"),
            "-m".into(),
            format!("{}M", self.memory_mib),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", self.qmp.display()),
        ];
        if incoming {
            v.extend(["-incoming".to_string(), "defer".to_string()]);
        }
        v.extend(self.args.iter().cloned());
        v
    }

    /// Starts QEMU on `ram` (and `inherit`: more descriptors it keeps, by
    /// number) and connects to its monitor.
    pub fn start(&self, ram: BorrowedFd<'_>, inherit: &[BorrowedFd<'_>], incoming: bool) -> Result<Qemu, QemuError> {
        let _ = std::fs::remove_file(self.qmp);
        let mut keep: Vec<i32> = vec![ram.as_raw_fd()];
        keep.extend(inherit.iter().map(|f| f.as_raw_fd()));
        let mut cmd = Command::new(self.qemu);
        cmd.args(self.command_line(ram.as_raw_fd(), incoming))
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls `child_setup`, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || child_setup(&keep));
        }
        let mut child = cmd.spawn().map_err(|source| QemuError::Spawn {
            qemu: self.qemu.to_path_buf(),
            source,
        })?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        if let Some(err) = child.stderr.take() {
            let lines = stderr.clone();
            let name = self.name.to_string();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    eprintln!("qemu[{name}]: {line}");
                    if let Some(advice) = tsc_rate_advice(&line) {
                        eprintln!("luo-qemu: VM {name}: {advice}");
                    }
                    let mut l = lines.lock().unwrap_or_else(|p| p.into_inner());
                    l.push(line);
                    if l.len() > STDERR_LINES {
                        l.remove(0);
                    }
                }
            });
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(status) = child.try_wait().map_err(|source| QemuError::Io {
                what: "waiting for QEMU".into(),
                source,
            })? {
                // Let the stderr thread catch QEMU's last words.
                std::thread::sleep(Duration::from_millis(50));
                let text = stderr.lock().unwrap_or_else(|p| p.into_inner()).join(" / ");
                return Err(QemuError::Exited { status, stderr: text });
            }
            if self.qmp.exists() {
                match Qmp::connect(self.qmp, self.timeout) {
                    Ok(qmp) => {
                        return Ok(Qemu {
                            child,
                            qmp,
                            stderr,
                            exited: None,
                            timeout: self.timeout,
                        });
                    }
                    Err(QmpError::Connect { .. }) => {}
                    Err(source) => {
                        // QEMU opens its monitor before it checks the rest of
                        // its command line: a QEMU that closes the monitor
                        // while starting is exiting; say why it did.
                        let grace = Instant::now() + Duration::from_secs(5);
                        while Instant::now() < grace {
                            if let Ok(Some(status)) = child.try_wait() {
                                std::thread::sleep(Duration::from_millis(50));
                                let text = stderr.lock().unwrap_or_else(|p| p.into_inner()).join(" / ");
                                return Err(QemuError::Exited { status, stderr: text });
                            }
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(QemuError::Qmp {
                            source,
                            stderr: String::new(),
                        });
                    }
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(QemuError::NoMonitor {
                    path: self.qmp.to_path_buf(),
                    secs: self.timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// In the child before exec: `keep` survives the exec, and QEMU dies with
/// its launcher (no VM runs unmanaged). Only async-signal-safe calls.
fn child_setup(keep: &[i32]) -> std::io::Result<()> {
    for fd in keep {
        // SAFETY: fcntl on a descriptor number open in the parent, hence in
        // this child; F_SETFD with 0 only clears close-on-exec.
        if unsafe { libc::fcntl(*fd, libc::F_SETFD, 0) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and touches no memory.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn mode_and_capability(qmp: &mut Qmp) -> Result<(), QmpError> {
    qmp.execute("migrate-set-parameters", Some(json!({ "mode": "cpr-reboot" })))?;
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] })),
    )?;
    Ok(())
}

/// How long a failed QMP exchange on a closed connection waits for QEMU's
/// exit status, so that the error names QEMU's exit rather than the socket.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// `child`'s exit status if it exits within `within` (polled every 10 ms).
fn wait_exit(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Migration states in which a migration is running.
const RUNNING: &[&str] = &[
    "setup",
    "active",
    "pre-switchover",
    "device",
    "wait-unplug",
    "postcopy-active",
    "postcopy-paused",
    "postcopy-recover-setup",
    "postcopy-recover",
    "cancelling",
    "colo",
];

impl Qemu {
    /// QEMU's version (`10.0.2`).
    pub fn version(&self) -> String {
        let v = self.qmp.version();
        format!("{}.{}.{}", v.major, v.minor, v.micro)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How QEMU exited, if it did.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap_or_else(|p| p.into_inner()).join(" / ")
    }

    fn qmp_error(&mut self, source: QmpError) -> QemuError {
        // A QEMU that died explains itself better than a closed socket. Its
        // monitor closes while it exits, before its exit status is there:
        // on a busy host that takes more than a few milliseconds.
        let grace = match source {
            QmpError::Closed { .. } | QmpError::Io { .. } | QmpError::Protocol { .. } => EXIT_GRACE,
            _ => Duration::from_millis(20),
        };
        if let Some(status) = wait_exit(&mut self.child, grace) {
            self.exited = Some(status);
            return QemuError::Exited {
                status,
                stderr: self.stderr_text(),
            };
        }
        QemuError::Qmp {
            source,
            stderr: String::new(),
        }
    }

    fn exec(&mut self, command: &str, args: Option<Value>) -> Result<Value, QemuError> {
        self.qmp.execute(command, args).map_err(|e| self.qmp_error(e))
    }

    /// Why this VM cannot be checkpointed with `cpr-reboot`, if it cannot:
    /// QEMU older than 8.2, guest memory that is not shared, a migration
    /// running, or a migration blocker QEMU names. Leaves the migration
    /// mode at `cpr-reboot` when it answers `None`.
    pub fn veto(&mut self) -> Result<Option<String>, QemuError> {
        let v = self.qmp.version().clone();
        if (v.major, v.minor) < (8, 2) {
            return Ok(Some(format!(
                "QEMU {} ({}) is older than 8.2 and has no cpr-reboot migration mode; run QEMU 8.2 or newer \
                 (Debian 12: qemu-system-x86 from bookworm-backports)",
                self.version(),
                if v.package.is_empty() {
                    "no package string"
                } else {
                    v.package.as_str()
                }
            )));
        }
        let memdevs = self.exec("query-memdev", None)?;
        for m in memdevs.as_array().into_iter().flatten() {
            if m.get("share").and_then(Value::as_bool) != Some(true) {
                let id = m.get("id").and_then(Value::as_str).unwrap_or("(no id)");
                return Ok(Some(format!(
                    "memory backend {id} is not shared (share=off): cpr-reboot cannot keep it in place and its \
                     content would not survive the kexec; give it share=on on a memfd the launcher preserves, or \
                     remove it"
                )));
            }
        }
        let status = self.exec("query-status", None)?;
        let run = status.get("status").and_then(Value::as_str).unwrap_or("");
        if matches!(
            run,
            "inmigrate" | "postmigrate" | "finish-migrate" | "shutdown" | "internal-error" | "guest-panicked"
        ) {
            return Ok(Some(format!("the VM is in state {run}, which cannot be checkpointed")));
        }
        let mig = self.exec("query-migrate", None)?;
        let mstatus = mig.get("status").and_then(Value::as_str).unwrap_or("none");
        if RUNNING.contains(&mstatus) {
            return Ok(Some(format!(
                "a migration is running (QEMU's migration status: {mstatus}); let it finish or cancel it \
                 (QMP migrate_cancel), then prepare again"
            )));
        }
        mode_and_capability(&mut self.qmp).map_err(|e| self.qmp_error(e))?;
        let mig = self.exec("query-migrate", None)?;
        let blocked: Vec<String> = mig
            .get("blocked-reasons")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect();
        if !blocked.is_empty() {
            let _ = self.exec("migrate-set-parameters", Some(json!({ "mode": "normal" })));
            return Ok(Some(format!("QEMU cannot checkpoint it: {}", blocked.join("; "))));
        }
        Ok(None)
    }

    /// Checkpoints the VM into `state` (the VM stops; QEMU ends in
    /// `postmigrate`). Returns what the restore needs.
    pub fn checkpoint(&mut self, state: BorrowedFd<'_>, memory_mib: u64) -> Result<Checkpoint, QemuError> {
        let status = self.exec("query-status", None)?;
        let was_running = status.get("running").and_then(Value::as_bool).unwrap_or(false);
        mode_and_capability(&mut self.qmp).map_err(|e| self.qmp_error(e))?;
        let size = liveupdate::kernel::memfd::size(state).map_err(|source| QemuError::Io {
            what: "sizing the state memfd".into(),
            source,
        })?;
        let desc = reopen(state, true)?;
        let (rx, tx) = pipe()?;
        let sent = self.qmp.send_fd(STATE_FD_NAME, tx.as_fd());
        drop(tx);
        sent.map_err(|e| self.qmp_error(e))?;
        // Copies QEMU's stream into the memfd, up to its size; the pipe ends
        // when QEMU closes its end (the migration finished or failed).
        let copier = std::thread::spawn(move || copy_into(rx, desc, size));
        let paused_at_ns = wall_clock_ns();
        if let Err(e) = self.exec("migrate", Some(json!({ "uri": format!("fd:{STATE_FD_NAME}") }))) {
            let _ = self.exec("closefd", Some(json!({ "fdname": STATE_FD_NAME })));
            let _ = copier.join();
            return Err(e);
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            let mig = self.exec("query-migrate", None)?;
            match mig.get("status").and_then(Value::as_str).unwrap_or("none") {
                "completed" => break,
                "failed" | "cancelled" => {
                    let why = mig
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no reason given");
                    return Err(QemuError::Migration(format!("QEMU's checkpoint failed: {why}")));
                }
                _ if Instant::now() > deadline => {
                    let _ = self.exec("migrate_cancel", None);
                    return Err(QemuError::Migration(format!(
                        "QEMU's checkpoint did not complete within {} s",
                        self.timeout.as_secs()
                    )));
                }
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        // QEMU closes its end of the pipe when the migration's cleanup runs.
        let written = copier
            .join()
            .map_err(|_| QemuError::Migration("the thread copying QEMU's state panicked".into()))?
            .map_err(|source| QemuError::Io {
                what: "copying QEMU's device state into the state memfd".into(),
                source,
            })?;
        let now = liveupdate::kernel::memfd::size(state).unwrap_or(size);
        if written > size || now != size {
            return Err(QemuError::Migration(format!(
                "QEMU's device state ({written} bytes) does not fit in the state memfd ({size} bytes); raise \
                 state_mib in the VM's configuration"
            )));
        }
        Ok(Checkpoint {
            format: CHECKPOINT_FORMAT,
            qemu: self.version(),
            state_bytes: written,
            was_running,
            memory_mib,
            paused_at_ns: Some(paused_at_ns),
        })
    }

    /// The VM's run state as QEMU names it (`running`, `paused`, ...).
    pub fn run_state(&mut self) -> Result<String, QemuError> {
        let status = self.exec("query-status", None)?;
        Ok(status
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string())
    }

    /// Resumes a VM the checkpoint stopped (or that `prepare` left in
    /// `cpr-reboot` mode) and sets the migration mode back to normal.
    pub fn resume(&mut self) -> Result<(), QemuError> {
        let status = self.exec("query-status", None)?;
        let run = status.get("status").and_then(Value::as_str).unwrap_or("");
        if run == "postmigrate" || run == "finish-migrate" {
            self.exec("cont", None)?;
        }
        self.exec("migrate-set-parameters", Some(json!({ "mode": "normal" })))?;
        Ok(())
    }

    /// Loads the checkpoint from `state_fd` (a descriptor number this QEMU
    /// inherited, at offset 0) into a QEMU started with `-incoming defer`,
    /// and waits until the VM runs again (or is loaded, if it was paused).
    pub fn restore(&mut self, state: BorrowedFd<'_>, cp: &Checkpoint) -> Result<(), QemuError> {
        mode_and_capability(&mut self.qmp).map_err(|e| self.qmp_error(e))?;
        let desc = reopen(state, false)?;
        let (rx, tx) = pipe()?;
        let sent = self.qmp.send_fd(STATE_FD_NAME, rx.as_fd());
        drop(rx);
        sent.map_err(|e| self.qmp_error(e))?;
        // Feeds the stream to QEMU; a QEMU that stops reading makes the
        // write fail (EPIPE) once it closes its end.
        let len = cp.state_bytes;
        let feeder = std::thread::spawn(move || copy_out(desc, tx, len));
        let r = self.exec(
            "migrate-incoming",
            Some(json!({ "uri": format!("fd:{STATE_FD_NAME}") })),
        );
        if r.is_err() {
            let _ = self.exec("closefd", Some(json!({ "fdname": STATE_FD_NAME })));
        }
        r?;
        let _feeder = feeder;
        let deadline = Instant::now() + self.timeout;
        loop {
            let mig = self.exec("query-migrate", None)?;
            let mstatus = mig.get("status").and_then(Value::as_str).unwrap_or("none").to_string();
            if mstatus == "failed" {
                let why = mig
                    .get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given");
                return Err(QemuError::Migration(format!(
                    "QEMU could not load the checkpoint: {why}"
                )));
            }
            let st = self.exec("query-status", None)?;
            let run = st.get("status").and_then(Value::as_str).unwrap_or("");
            if mstatus == "completed" && (!cp.was_running || run == "running") {
                break;
            }
            if Instant::now() > deadline {
                return Err(QemuError::Migration(format!(
                    "QEMU did not load the checkpoint within {} s (migration {mstatus}, VM {run})",
                    self.timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = self.exec("migrate-set-parameters", Some(json!({ "mode": "normal" })));
        Ok(())
    }

    /// Asks QEMU to quit and waits for it (kills it after the deadline).
    pub fn quit(mut self) -> Option<ExitStatus> {
        let _ = self.qmp.execute("quit", None);
        let deadline = Instant::now() + self.timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }

    /// Kills QEMU (SIGKILL) and reaps it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The deadline of each command.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_rate_advice_only_for_qemus_tsc_warning() {
        let warn = "qemu-system-x86_64: warning: TSC frequency mismatch between VM (2594939 kHz) and host \
                    (2596134 kHz), and TSC scaling unavailable";
        let advice = tsc_rate_advice(warn).expect("advice for the TSC warning");
        assert!(advice.contains("tsc_early_khz="), "{advice}");
        assert_eq!(
            tsc_rate_advice("qemu-system-x86_64: warning: host doesn't support requested feature"),
            None
        );
    }

    #[test]
    fn guest_ram_is_the_inherited_memfd_reopened_by_path_and_shared() {
        let args = vec!["-accel".to_string(), "kvm".to_string()];
        let l = Launch {
            qemu: Path::new("/usr/bin/qemu-system-x86_64"),
            name: "web",
            memory_mib: 512,
            args: &args,
            qmp: Path::new("/run/luo-qemu/web.qmp"),
            timeout: Duration::from_secs(1),
        };
        assert_eq!(
            l.command_line(7, false),
            [
                "-name",
                "web",
                "-object",
                "memory-backend-file,id=luo-ram,size=512M,mem-path=/proc/self/fd/7,share=on",
                "-machine",
                "memory-backend=luo-ram",
                "-m",
                "512M",
                "-qmp",
                "unix:/run/luo-qemu/web.qmp,server=on,wait=off",
                "-accel",
                "kvm"
            ]
        );
        let incoming = l.command_line(7, true);
        assert_eq!(incoming[10..12], ["-incoming", "defer"]);
        assert_eq!(incoming.len(), 14);
    }

    #[test]
    fn an_exit_a_little_after_the_monitor_closed_is_still_seen() {
        // A QEMU killed on a busy host: its exit status comes some time
        // after its socket closed. 300 ms late is within the grace.
        let mut child = Command::new("sleep").arg("0.3").spawn().expect("spawn sleep");
        let t = Instant::now();
        let status = wait_exit(&mut child, EXIT_GRACE).expect("the exit within the grace");
        assert!(status.success());
        assert!(t.elapsed() >= Duration::from_millis(250), "{:?}", t.elapsed());
        let mut child = Command::new("sleep").arg("5").spawn().expect("spawn sleep");
        assert_eq!(wait_exit(&mut child, Duration::from_millis(50)), None);
        child.kill().expect("kill");
        child.wait().expect("reap");
    }

    #[test]
    fn a_checkpoint_is_a_small_json_record() {
        let cp = Checkpoint {
            format: CHECKPOINT_FORMAT,
            qemu: "10.0.2".into(),
            state_bytes: 292_966,
            was_running: true,
            memory_mib: 128,
            paused_at_ns: Some(1_795_000_000_123_456_789),
        };
        let text = serde_json::to_string(&cp).expect("encode");
        assert_eq!(
            text,
            r#"{"format":1,"qemu":"10.0.2","state_bytes":292966,"was_running":true,"memory_mib":128,"paused_at_ns":1795000000123456789}"#
        );
        assert_eq!(serde_json::from_str::<Checkpoint>(&text).expect("decode"), cp);
    }

    #[test]
    fn a_checkpoint_of_a_launcher_without_the_pause_time_still_loads() {
        let old = r#"{"format":1,"qemu":"10.0.2","state_bytes":292966,"was_running":true,"memory_mib":128}"#;
        let cp: Checkpoint = serde_json::from_str(old).expect("decode");
        assert_eq!(cp.paused_at_ns, None);
        assert_eq!(
            serde_json::to_string(&cp).expect("encode"),
            old,
            "and is written back the same"
        );
    }

    #[test]
    fn the_blackout_is_the_wall_clock_from_pause_to_resume_rounded_to_the_millisecond() {
        let paused = 1_795_000_000_000_000_000;
        assert_eq!(blackout_ms(paused, paused), Some(0));
        assert_eq!(blackout_ms(paused, paused + 21_649_499_999), Some(21_649));
        assert_eq!(blackout_ms(paused, paused + 21_649_500_000), Some(21_650));
        // The new kernel's clock set behind the old one's: unknown, not negative or huge.
        assert_eq!(blackout_ms(paused, paused - 1), None);
    }
}
