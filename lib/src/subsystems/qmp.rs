//! QEMU VMs that are not luod-aware, paused and resumed over QMP.
//!
//! [`Qmp`] is a small blocking client of the QEMU Machine Protocol: JSON
//! objects, one per line, over the Unix socket QEMU opens with
//! `-qmp unix:PATH,server=on,wait=off`. QEMU greets, the client enters command
//! mode with `qmp_capabilities`, then each command gets exactly one reply
//! (`return` or `error`) carrying the command's `id`. Asynchronous events
//! (`STOP`, `RESUME`, ...) may arrive at any time, also between a command and
//! its reply: they are collected ([`Qmp::take_events`]), never taken for a
//! reply. Every read and write has a deadline, so a QEMU that hangs gives a
//! [`QmpError::Timeout`] instead of a hung luod; the late reply to a command
//! that timed out is skipped when it arrives.
//!
//! [`QemuVm`] is the subsystem: it pauses the VM at `freeze` (inside the
//! blackout) and resumes it when the cycle is undone or completed.
//!
//! # What the subsystem does at each step
//!
//! | step | action |
//! | --- | --- |
//! | `prepare` | connects and runs `query-status`; vetoes when QEMU does not answer or is migrating |
//! | `freeze` | `stop` if the VM runs; the blob records whether it ran |
//! | `unfreeze`, `cancel` | `cont` if `freeze` paused it (never resumes a VM the operator paused) |
//! | `restore` | per [`Resume`]: `cont` if the VM ran before the update and QEMU answers and is paused |
//! | `finish` | `cont` if that is still pending; fails (so `finish` can be retried) when QEMU does not answer |
//!
//! A QEMU process does not survive a real kexec: the QEMU that answers in the
//! new kernel is a new process, started by the host's VM manager (for example
//! with `-incoming` from state saved while the VM was paused, or on guest RAM
//! kept by other means). This subsystem quiesces and resumes; it carries no VM
//! state. With a simulated kexec (the file backend) the same QEMU is still
//! there, paused, and `restore` resumes it.
//!
//! The subsystem connects for each step and disconnects after it: QEMU serves
//! one QMP client per monitor, and holding it for the whole cycle would lock
//! out the VM's own manager.

use crate::subsystem::{Blob, PrepareContext, Subsystem, SubsystemError};
use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, send};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The longest QMP message accepted (`query-qmp-schema` is a few hundred KiB).
pub const MAX_MESSAGE: usize = 16 << 20;

/// Why a QMP exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be connected.
    #[error("cannot connect to the QMP socket {}: {errno}; {}", path.display(), connect_hint(path, *errno))]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Why, as the kernel said it.
        errno: Errno,
    },
    /// QEMU did not answer in time.
    #[error(
        "QEMU at {} did not send {waiting_for} within {timeout:?}: its main loop is stuck, the process is stopped, \
         or another client holds the monitor (QEMU serves one QMP client at a time)",
        path.display()
    )]
    Timeout {
        /// Socket path.
        path: PathBuf,
        /// What was awaited (`the QMP greeting`, `the reply to stop`).
        waiting_for: String,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// The peer is not a QMP monitor.
    #[error(
        "{} is not a QMP monitor: it sent {got:?} instead of the QMP greeting; give luod the socket of QEMU's \
         -qmp option (not -monitor, which speaks the human monitor protocol, nor a serial console)",
        path.display()
    )]
    NotQmp {
        /// Socket path.
        path: PathBuf,
        /// The start of what it sent.
        got: String,
    },
    /// QEMU closed the connection.
    #[error(
        "QEMU closed the QMP connection at {} while luod waited for {waiting_for}: the VM exited or crashed",
        path.display()
    )]
    Closed {
        /// Socket path.
        path: PathBuf,
        /// What was awaited.
        waiting_for: String,
    },
    /// A message broke the protocol after the greeting.
    #[error("QEMU at {} broke the QMP protocol: {detail}", path.display())]
    Protocol {
        /// Socket path.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// QEMU answered a command with an error.
    #[error("QEMU refused {command}: {desc} (QMP error class {class})")]
    Command {
        /// The command.
        command: String,
        /// The QMP error class (`CommandNotFound`, `GenericError`, ...).
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// Reading or writing the socket failed.
    #[error("{doing} the QMP socket {} failed: {errno}", path.display())]
    Io {
        /// Socket path.
        path: PathBuf,
        /// `reading` or `writing`.
        doing: &'static str,
        /// Why.
        errno: Errno,
    },
}

fn connect_hint(path: &Path, errno: Errno) -> String {
    let p = path.display();
    match errno {
        Errno::ENOENT => format!("no such socket; is QEMU running with -qmp unix:{p},server=on,wait=off?"),
        Errno::ECONNREFUSED => "nothing listens on it: QEMU exited and left the socket behind".to_string(),
        Errno::EACCES | Errno::EPERM => "run luod as root or give it access to the socket".to_string(),
        Errno::ENOTSOCK => format!("{p} is not a socket; give luod the path of QEMU's -qmp unix: option"),
        _ => "check the path given to QEMU's -qmp option".to_string(),
    }
}

fn errno_of(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// The start of a message, for error texts.
fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    match text.char_indices().nth(120) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

/// QEMU's version, from the greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuVersion {
    /// Major.
    pub major: u64,
    /// Minor.
    pub minor: u64,
    /// Micro.
    pub micro: u64,
    /// The distribution's package string (e.g. `Debian 1:7.2+dfsg-7`).
    pub package: String,
}

/// The VM's run state, from `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// True when the vCPUs run.
    pub running: bool,
    /// QEMU's run state: `running`, `paused`, `prelaunch`, `inmigrate`,
    /// `postmigrate`, `shutdown`, `internal-error`, ...
    pub status: String,
}

/// An asynchronous event QEMU sent.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Event name (`STOP`, `RESUME`, `SHUTDOWN`, ...).
    pub event: String,
    /// The event's `data`, `null` when it had none.
    pub data: Value,
    /// Seconds and microseconds since the epoch, as QEMU stamped it.
    pub timestamp: Option<(i64, i64)>,
}

/// A connection to a QEMU monitor in command mode.
#[derive(Debug)]
pub struct Qmp {
    stream: UnixStream,
    path: PathBuf,
    timeout: Duration,
    buf: Vec<u8>,
    greeted: bool,
    version: QemuVersion,
    capabilities: Vec<String>,
    events: Vec<QmpEvent>,
    next_id: u64,
}

impl Qmp {
    /// Connects to the QMP socket at `path`, reads the greeting and enters
    /// command mode (`qmp_capabilities`). `timeout` bounds the greeting and,
    /// afterwards, each command.
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Qmp, QmpError> {
        let path = path.as_ref().to_path_buf();
        let stream = UnixStream::connect(&path).map_err(|e| QmpError::Connect {
            path: path.clone(),
            errno: errno_of(&e),
        })?;
        let mut qmp = Qmp {
            stream,
            path,
            timeout,
            buf: Vec::new(),
            greeted: false,
            version: QemuVersion {
                major: 0,
                minor: 0,
                micro: 0,
                package: String::new(),
            },
            capabilities: Vec::new(),
            events: Vec::new(),
            next_id: 1,
        };
        let deadline = Instant::now() + timeout;
        let greeting = qmp.read_message(deadline, "the QMP greeting")?;
        qmp.parse_greeting(&greeting)?;
        qmp.greeted = true;
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// QEMU's version, as its greeting gave it.
    pub fn version(&self) -> &QemuVersion {
        &self.version
    }

    /// The capabilities QEMU offered in its greeting (e.g. `oob`); none is
    /// enabled.
    pub fn capabilities(&self) -> &[String] {
        &self.capabilities
    }

    /// The events received so far, oldest first; empties the list.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        std::mem::take(&mut self.events)
    }

    /// The VM's run state (`query-status`).
    pub fn query_status(&mut self) -> Result<VmStatus, QmpError> {
        let ret = self.execute("query-status", None)?;
        let running = ret.get("running").and_then(Value::as_bool);
        let status = ret.get("status").and_then(Value::as_str);
        match (running, status) {
            (Some(running), Some(status)) => Ok(VmStatus {
                running,
                status: status.to_string(),
            }),
            _ => Err(self.protocol(format!(
                "query-status returned {} without a boolean `running` and a string `status`",
                excerpt(ret.to_string().as_bytes())
            ))),
        }
    }

    /// Pauses the vCPUs (`stop`). QEMU replies once they are stopped.
    pub fn stop(&mut self) -> Result<(), QmpError> {
        self.execute("stop", None).map(drop)
    }

    /// Resumes the vCPUs (`cont`).
    pub fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont", None).map(drop)
    }

    /// Runs `command` with optional `arguments` (a JSON object) and returns
    /// its `return` value. Events that arrive before the reply are collected.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.execute_with_fd(command, arguments, None)
    }

    /// Hands `fd` to QEMU under `name` (`getfd`, the descriptor sent with
    /// `SCM_RIGHTS` on the command's bytes), for a later command that names
    /// it (`migrate` with `fd:NAME`).
    pub fn send_fd(&mut self, name: &str, fd: std::os::fd::BorrowedFd<'_>) -> Result<(), QmpError> {
        self.execute_with_fd("getfd", Some(json!({ "fdname": name })), Some(fd))
            .map(drop)
    }

    /// Changes the deadline of each later command.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let (Some(args), Some(obj)) = (arguments, msg.as_object_mut()) {
            obj.insert("arguments".to_string(), args);
        }
        let mut line = msg.to_string();
        line.push('\n');
        let deadline = Instant::now() + self.timeout;
        let waiting_for = format!("the reply to {command}");
        let mut rest = line.as_bytes();
        if let Some(fd) = fd {
            // The descriptor rides on the first byte; the rest follows as usual.
            let raw = [fd.as_raw_fd()];
            let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&raw)];
            let iov = [std::io::IoSlice::new(&rest[..1])];
            nix::sys::socket::sendmsg::<()>(self.stream.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)
                .map_err(|errno| match errno {
                    Errno::EPIPE | Errno::ECONNRESET => QmpError::Closed {
                        path: self.path.clone(),
                        waiting_for: waiting_for.clone(),
                    },
                    errno => QmpError::Io {
                        path: self.path.clone(),
                        doing: "writing",
                        errno,
                    },
                })?;
            rest = &rest[1..];
        }
        self.write_all(rest, deadline, &waiting_for)?;
        loop {
            let msg = self.read_message(deadline, &waiting_for)?;
            let Value::Object(obj) = msg else {
                return Err(self.protocol(format!(
                    "it sent {} where a JSON object was due",
                    excerpt(msg.to_string().as_bytes())
                )));
            };
            if let Some(event) = obj.get("event") {
                self.events.push(parse_event(event, &obj));
                continue;
            }
            let reply_id = obj.get("id").and_then(Value::as_u64);
            if reply_id.is_some_and(|r| r < id) {
                // The late reply to a command that timed out earlier.
                continue;
            }
            if reply_id != Some(id) {
                return Err(self.protocol(format!(
                    "it answered {command} (id {id}) with a message carrying id {}",
                    obj.get("id").map_or("none".to_string(), Value::to_string)
                )));
            }
            if let Some(ret) = obj.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = obj.get("error") {
                let field = |k| err.get(k).and_then(Value::as_str).unwrap_or("(missing)").to_string();
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(self.protocol(format!(
                "its reply to {command} has neither `return` nor `error`: {}",
                excerpt(Value::Object(obj).to_string().as_bytes())
            )));
        }
    }

    fn protocol(&self, detail: String) -> QmpError {
        QmpError::Protocol {
            path: self.path.clone(),
            detail,
        }
    }

    fn parse_greeting(&mut self, greeting: &Value) -> Result<(), QmpError> {
        let Some(qmp) = greeting.get("QMP") else {
            return Err(QmpError::NotQmp {
                path: self.path.clone(),
                got: excerpt(greeting.to_string().as_bytes()),
            });
        };
        let v = &qmp["version"];
        let num = |k: &str| v["qemu"][k].as_u64().unwrap_or(0);
        self.version = QemuVersion {
            major: num("major"),
            minor: num("minor"),
            micro: num("micro"),
            package: v["package"].as_str().unwrap_or("").trim().to_string(),
        };
        self.capabilities = qmp["capabilities"]
            .as_array()
            .map(|caps| caps.iter().filter_map(Value::as_str).map(str::to_string).collect())
            .unwrap_or_default();
        Ok(())
    }

    fn timeout_error(&self, waiting_for: &str) -> QmpError {
        QmpError::Timeout {
            path: self.path.clone(),
            waiting_for: waiting_for.to_string(),
            timeout: self.timeout,
        }
    }

    fn write_all(&mut self, mut bytes: &[u8], deadline: Instant, waiting_for: &str) -> Result<(), QmpError> {
        while !bytes.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timeout_error(waiting_for));
            }
            self.stream.set_write_timeout(Some(left)).map_err(|e| QmpError::Io {
                path: self.path.clone(),
                doing: "writing",
                errno: errno_of(&e),
            })?;
            // MSG_NOSIGNAL: a QEMU that went away gives EPIPE, not a SIGPIPE
            // that kills luod.
            match send(self.stream.as_raw_fd(), bytes, MsgFlags::MSG_NOSIGNAL) {
                Ok(n) => bytes = &bytes[n..],
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return Err(self.timeout_error(waiting_for)),
                Err(Errno::EPIPE | Errno::ECONNRESET) => {
                    return Err(QmpError::Closed {
                        path: self.path.clone(),
                        waiting_for: waiting_for.to_string(),
                    });
                }
                Err(errno) => {
                    return Err(QmpError::Io {
                        path: self.path.clone(),
                        doing: "writing",
                        errno,
                    });
                }
            }
        }
        Ok(())
    }

    /// Reads one message (one line of JSON).
    fn read_message(&mut self, deadline: Instant, waiting_for: &str) -> Result<Value, QmpError> {
        let mut chunk = [0u8; 8192];
        loop {
            while let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return serde_json::from_slice(&line).map_err(|e| self.not_json(&line, &e.to_string()));
            }
            // QMP messages are JSON objects: anything else is refused as soon
            // as it shows, without waiting for a newline that may never come.
            if let Some(&first) = self.buf.iter().find(|b| !b.is_ascii_whitespace())
                && first != b'{'
            {
                let buf = std::mem::take(&mut self.buf);
                return Err(self.not_json(&buf, "a message must start with '{'"));
            }
            if self.buf.len() > MAX_MESSAGE {
                return Err(self.protocol(format!("it sent a message longer than {MAX_MESSAGE} bytes")));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timeout_error(waiting_for));
            }
            self.stream.set_read_timeout(Some(left)).map_err(|e| QmpError::Io {
                path: self.path.clone(),
                doing: "reading",
                errno: errno_of(&e),
            })?;
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(QmpError::Closed {
                        path: self.path.clone(),
                        waiting_for: waiting_for.to_string(),
                    });
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                    return Err(QmpError::Closed {
                        path: self.path.clone(),
                        waiting_for: waiting_for.to_string(),
                    });
                }
                Err(e) => {
                    return Err(QmpError::Io {
                        path: self.path.clone(),
                        doing: "reading",
                        errno: errno_of(&e),
                    });
                }
            }
        }
    }

    fn not_json(&self, bytes: &[u8], why: &str) -> QmpError {
        if self.greeted {
            self.protocol(format!("it sent {:?}, which is not JSON ({why})", excerpt(bytes)))
        } else {
            QmpError::NotQmp {
                path: self.path.clone(),
                got: excerpt(bytes),
            }
        }
    }
}

fn parse_event(event: &Value, obj: &Map<String, Value>) -> QmpEvent {
    let ts = obj.get("timestamp");
    let field = |k| ts.and_then(|t| t.get(k)).and_then(Value::as_i64);
    QmpEvent {
        event: event.as_str().unwrap_or("").to_string(),
        data: obj.get("data").cloned().unwrap_or(Value::Null),
        timestamp: field("seconds").zip(field("microseconds")),
    }
}

/// Run states in which pausing or resuming would interfere with a migration
/// or a snapshot in progress: `prepare` vetoes them.
const BUSY_STATES: &[&str] = &["inmigrate", "finish-migrate", "save-vm", "restore-vm", "colo"];

/// When the subsystem resumes, in the new kernel, a VM that ran before the
/// update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resume {
    /// At `restore` if QEMU answers then and the VM is paused (the shortest
    /// blackout); otherwise at `finish`.
    #[default]
    AtRestore,
    /// At `finish`, once the operator closes the cycle.
    AtFinish,
    /// Never: the VM manager resumes it.
    Never,
}

/// The blob [`QemuVm`] keeps in the record at `freeze`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrozenVm {
    /// The VM's name.
    pub vm: String,
    /// Its run state just before `freeze`.
    pub status: VmStatus,
}

/// Version of the [`FrozenVm`] blob (postcard).
pub const FROZEN_VM_VERSION: u32 = 1;

/// A QEMU VM that is not luod-aware, driven over QMP. See the module docs for
/// what each step does.
#[derive(Debug)]
pub struct QemuVm {
    subsystem: String,
    vm: String,
    socket: PathBuf,
    timeout: Duration,
    resume: Resume,
    paused_by_freeze: bool,
    resume_pending: bool,
}

impl QemuVm {
    /// The VM `vm` (a name for messages and the record: the subsystem is
    /// `qemu:<vm>`) whose QMP socket is `socket`. `timeout` bounds each QMP
    /// exchange, including the connection.
    pub fn new(vm: impl Into<String>, socket: impl Into<PathBuf>, timeout: Duration) -> QemuVm {
        let vm = vm.into();
        QemuVm {
            subsystem: format!("qemu:{vm}"),
            vm,
            socket: socket.into(),
            timeout,
            resume: Resume::default(),
            paused_by_freeze: false,
            resume_pending: false,
        }
    }

    /// Sets when the VM resumes in the new kernel (default [`Resume::AtRestore`]).
    pub fn resume(mut self, resume: Resume) -> QemuVm {
        self.resume = resume;
        self
    }

    /// True when the VM ran before the update and has not been resumed in
    /// the new kernel yet.
    pub fn resume_pending(&self) -> bool {
        self.resume_pending
    }

    fn connect(&self) -> Result<Qmp, QmpError> {
        Qmp::connect(&self.socket, self.timeout)
    }

    /// `cont` if the VM is paused; Ok(false) when it cannot be resumed yet
    /// (still receiving its state).
    fn resume_now(&self) -> Result<bool, QmpError> {
        let mut qmp = self.connect()?;
        let status = qmp.query_status()?;
        if status.running {
            return Ok(true);
        }
        if status.status == "inmigrate" {
            return Ok(false);
        }
        qmp.cont()?;
        Ok(true)
    }

    fn undo_freeze(&mut self) -> Result<(), SubsystemError> {
        if !self.paused_by_freeze {
            return Ok(());
        }
        self.connect().and_then(|mut q| q.cont()).map_err(|e| {
            SubsystemError::Failed(format!(
                "QEMU VM {} stays paused: {e}; resume it with the QMP command cont once QEMU answers",
                self.vm
            ))
        })?;
        self.paused_by_freeze = false;
        Ok(())
    }
}

impl Subsystem for QemuVm {
    fn name(&self) -> &str {
        &self.subsystem
    }

    fn prepare(&mut self, _: &PrepareContext) -> Result<Option<Blob>, SubsystemError> {
        let status = self
            .connect()
            .and_then(|mut q| q.query_status())
            .map_err(|e| SubsystemError::Veto(format!("QEMU VM {} cannot be paused for the update: {e}", self.vm)))?;
        if BUSY_STATES.contains(&status.status.as_str()) {
            return Err(SubsystemError::Veto(format!(
                "QEMU VM {} is in state {}: let the migration or snapshot complete (or cancel it) first",
                self.vm, status.status
            )));
        }
        Ok(None)
    }

    fn freeze(&mut self) -> Result<Option<Blob>, SubsystemError> {
        let fail = |e: QmpError| SubsystemError::Failed(format!("could not pause QEMU VM {}: {e}", self.vm));
        let mut qmp = self.connect().map_err(fail)?;
        let status = qmp.query_status().map_err(fail)?;
        if status.running {
            qmp.stop().map_err(fail)?;
            self.paused_by_freeze = true;
        }
        let frozen = FrozenVm {
            vm: self.vm.clone(),
            status,
        };
        let data = postcard::to_stdvec(&frozen)
            .map_err(|e| SubsystemError::Failed(format!("could not encode the state of QEMU VM {}: {e}", self.vm)))?;
        Ok(Some(Blob {
            version: FROZEN_VM_VERSION,
            data,
        }))
    }

    fn cancel(&mut self) -> Result<(), SubsystemError> {
        self.undo_freeze()
    }

    fn unfreeze(&mut self) -> Result<(), SubsystemError> {
        self.undo_freeze()
    }

    /// Takes the old kernel's [`FrozenVm`]; resumes now or later per [`Resume`].
    /// Never fails because QEMU does not answer yet: VM managers start their
    /// QEMUs after luod, and `finish` checks again.
    fn restore(&mut self, blob: Option<&Blob>) -> Result<(), SubsystemError> {
        let Some(blob) = blob else {
            self.resume_pending = false;
            return Ok(());
        };
        if blob.version != FROZEN_VM_VERSION {
            return Err(SubsystemError::Failed(format!(
                "the record holds QEMU VM {}'s state in format version {}, this luod reads version {FROZEN_VM_VERSION}; \
                 resume the VM by hand (QMP cont) if it should run",
                self.vm, blob.version
            )));
        }
        let frozen: FrozenVm = postcard::from_bytes(&blob.data).map_err(|e| {
            SubsystemError::Failed(format!(
                "the record's state of QEMU VM {} is damaged ({e}); resume the VM by hand (QMP cont) if it should run",
                self.vm
            ))
        })?;
        self.resume_pending = frozen.status.running && self.resume != Resume::Never;
        if self.resume_pending && self.resume == Resume::AtRestore && matches!(self.resume_now(), Ok(true)) {
            self.resume_pending = false;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), SubsystemError> {
        if !self.resume_pending {
            return Ok(());
        }
        match self.resume_now() {
            Ok(true) => {
                self.resume_pending = false;
                Ok(())
            }
            Ok(false) => Err(SubsystemError::Failed(format!(
                "QEMU VM {} is still receiving its state (inmigrate); run finish again once the incoming migration completed",
                self.vm
            ))),
            Err(e) => Err(SubsystemError::Failed(format!(
                "QEMU VM {} ran before the update and must be resumed, but: {e}; start it and run finish again, \
                 or remove it from luod's VMs to leave it alone",
                self.vm
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;
    use std::thread;

    /// A fake QMP peer: sends `greeting`, then answers each line read with
    /// the next of `replies` (`{id}` is replaced by the request's id).
    fn peer(
        greeting: &'static str,
        replies: Vec<&'static str>,
    ) -> (tempfile::TempDir, PathBuf, thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let t = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(greeting.as_bytes()).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            for reply in replies {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    return;
                }
                let req: Value = serde_json::from_str(&line).unwrap();
                let _ = s.write_all(reply.replace("{id}", &req["id"].to_string()).as_bytes());
            }
            // Keep the connection open until the client is done.
            let _ = r.read_line(&mut String::new());
        });
        (dir, path, t)
    }

    const GREETING: &str = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 1, \"minor\": 2, \"major\": 8}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}\r\n";
    const CAPS_OK: &str = "{\"return\": {}, \"id\": {id}}\r\n";
    const T: Duration = Duration::from_secs(5);

    #[test]
    fn events_between_a_command_and_its_reply_are_collected_not_taken_for_the_reply() {
        let (_d, path, t) = peer(
            GREETING,
            vec![
                CAPS_OK,
                "{\"timestamp\": {\"seconds\": 5, \"microseconds\": 6}, \"event\": \"STOP\"}\r\n\
                 {\"event\": \"X\", \"data\": {\"a\": 1}}\r\n{\"return\": {}, \"id\": {id}}\r\n",
            ],
        );
        let mut q = Qmp::connect(&path, T).unwrap();
        assert_eq!(
            q.version(),
            &QemuVersion {
                major: 8,
                minor: 2,
                micro: 1,
                package: String::new()
            }
        );
        assert_eq!(q.capabilities(), ["oob"]);
        q.stop().unwrap();
        let events = q.take_events();
        assert_eq!(events.len(), 2);
        assert_eq!(
            events[0],
            QmpEvent {
                event: "STOP".into(),
                data: Value::Null,
                timestamp: Some((5, 6))
            }
        );
        assert_eq!(events[1].data, json!({"a": 1}));
        assert!(q.take_events().is_empty());
        drop(q);
        t.join().unwrap();
    }

    #[test]
    fn a_reply_with_another_id_is_a_protocol_violation() {
        let (_d, path, t) = peer(GREETING, vec![CAPS_OK, "{\"return\": {}, \"id\": 99}\n"]);
        let mut q = Qmp::connect(&path, T).unwrap();
        let err = q.cont().unwrap_err();
        assert_eq!(
            err,
            QmpError::Protocol {
                path: path.clone(),
                detail: "it answered cont (id 2) with a message carrying id 99".into()
            }
        );
        drop(q);
        t.join().unwrap();
    }

    #[test]
    fn query_status_without_the_fields_is_a_protocol_violation() {
        let (_d, path, t) = peer(GREETING, vec![CAPS_OK, "{\"return\": {\"status\": 3}, \"id\": {id}}\n"]);
        let mut q = Qmp::connect(&path, T).unwrap();
        let err = q.query_status().unwrap_err().to_string();
        assert!(
            err.ends_with("query-status returned {\"status\":3} without a boolean `running` and a string `status`"),
            "{err}"
        );
        drop(q);
        t.join().unwrap();
    }

    #[test]
    fn json_without_the_qmp_key_is_not_a_qmp_greeting() {
        let (_d, path, t) = peer("{\"hello\": 1}\n", vec![]);
        let err = Qmp::connect(&path, T).unwrap_err();
        assert_eq!(
            err,
            QmpError::NotQmp {
                path: path.clone(),
                got: "{\"hello\":1}".into()
            }
        );
        t.join().unwrap();
    }

    #[test]
    fn text_without_newline_is_refused_at_once_not_after_the_timeout() {
        let (_d, path, t) = peer("login: ", vec![]);
        let started = Instant::now();
        let err = Qmp::connect(&path, Duration::from_secs(30)).unwrap_err();
        assert_eq!(
            err,
            QmpError::NotQmp {
                path: path.clone(),
                got: "login:".into()
            }
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        t.join().unwrap();
    }

    #[test]
    fn a_peer_that_closes_gives_closed() {
        let (_d, path, t) = peer(GREETING, vec![]);
        let err = Qmp::connect(&path, T).unwrap_err();
        assert_eq!(
            err,
            QmpError::Closed {
                path: path.clone(),
                waiting_for: "the reply to qmp_capabilities".into()
            }
        );
        t.join().unwrap();
    }

    #[test]
    fn connect_errors_say_what_to_check() {
        let err = Qmp::connect("/nonexistent/qmp.sock", T).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot connect to the QMP socket /nonexistent/qmp.sock: ENOENT: No such file or directory; \
             no such socket; is QEMU running with -qmp unix:/nonexistent/qmp.sock,server=on,wait=off?"
        );
    }

    #[test]
    fn frozen_vm_blob_round_trips() {
        let f = FrozenVm {
            vm: "a".into(),
            status: VmStatus {
                running: true,
                status: "running".into(),
            },
        };
        let bytes = postcard::to_stdvec(&f).unwrap();
        assert_eq!(postcard::from_bytes::<FrozenVm>(&bytes).unwrap(), f);
    }

    #[test]
    fn restore_refuses_an_unknown_blob_version_and_resumes_nothing_without_a_blob() {
        let mut vm = QemuVm::new("a", "/nonexistent", T);
        vm.restore(None).unwrap();
        assert!(!vm.resume_pending());
        vm.finish().unwrap();
        let err = vm
            .restore(Some(&Blob {
                version: 2,
                data: vec![],
            }))
            .unwrap_err();
        assert_eq!(
            err,
            SubsystemError::Failed(
                "the record holds QEMU VM a's state in format version 2, this luod reads version 1; \
                 resume the VM by hand (QMP cont) if it should run"
                    .into()
            )
        );
    }

    #[test]
    fn finish_fails_while_a_vm_that_ran_does_not_answer() {
        let mut vm = QemuVm::new("a", "/nonexistent/qmp.sock", T);
        let f = FrozenVm {
            vm: "a".into(),
            status: VmStatus {
                running: true,
                status: "running".into(),
            },
        };
        vm.restore(Some(&Blob {
            version: 1,
            data: postcard::to_stdvec(&f).unwrap(),
        }))
        .unwrap();
        assert!(vm.resume_pending());
        let SubsystemError::Failed(msg) = vm.finish().unwrap_err() else {
            panic!("not Failed")
        };
        assert!(
            msg.starts_with("QEMU VM a ran before the update and must be resumed, but: cannot connect"),
            "{msg}"
        );
        assert!(
            msg.ends_with("start it and run finish again, or remove it from luod's VMs to leave it alone"),
            "{msg}"
        );
        let mut never = QemuVm::new("a", "/nonexistent/qmp.sock", T).resume(Resume::Never);
        never
            .restore(Some(&Blob {
                version: 1,
                data: postcard::to_stdvec(&f).unwrap(),
            }))
            .unwrap();
        never.finish().unwrap();
    }
}
