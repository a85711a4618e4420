//! The launcher: one VM, its QEMU, and its registration with luod.
//!
//! At start it asks luod whether this VM came through a kexec (`vm list`
//! shows it `awaiting-claim`). If so it first checks that QEMU starts with
//! this configuration (a dry run on an empty memfd of the same size, with
//! `-incoming defer`), so that a broken configuration leaves the VM's RAM
//! and state preserved by luod; then claims the VM and restores it.
//! Otherwise it starts the VM fresh on new memfds. Either way it then
//! registers the VM (RAM and state memfds, tokens [`RAM_TOKEN`] and
//! [`STATE_TOKEN`]) and answers luod's calls until QEMU ends or the VM is
//! handed over to the next kernel. A restored VM registers at once, while
//! luod is still `updated`, so that `luoctl rollback` can carry it back; a
//! fresh one waits for `normal`.

use crate::config::VmConfig;
use crate::qemu::{CHECKPOINT_FORMAT, Checkpoint, Launch, Qemu, QemuError};
use liveupdate::protocol::client::{Client, ClientError, VmConnection};
use liveupdate::protocol::{ErrorKind, Request, Response, VmAnswer, VmCall};
use liveupdate::state::State;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Token of the guest-RAM memfd in the VM's session.
pub const RAM_TOKEN: u64 = 1;
/// Token of the device-state memfd in the VM's session.
pub const STATE_TOKEN: u64 = 2;

/// How the launcher ended (its exit code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The VM was checkpointed and handed over to the next kernel, or the
    /// guest shut down: exit 0.
    Done = 0,
    /// An error (message printed): exit 1.
    Failed = 1,
    /// The restore failed; luod keeps the VM's RAM and state (exit 3).
    RelaunchFailed = 3,
    /// QEMU ended on its own with a failure, or was killed (exit 4).
    QemuDied = 4,
}

/// The launcher's settings, beyond the VM's configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// VM name.
    pub name: String,
    /// luod's socket.
    pub socket: PathBuf,
    /// QMP socket.
    pub qmp: PathBuf,
    /// How long to wait for luod at start.
    pub luod_wait: Duration,
}

fn say(line: String) {
    println!("luo-qemu: {line}");
}

fn memfd_sized(name: &str, bytes: u64) -> std::io::Result<OwnedFd> {
    let fd = liveupdate::kernel::memfd::create(name)?;
    let f = File::from(fd);
    f.set_len(bytes)?;
    Ok(f.into())
}

fn mib(n: u64) -> u64 {
    n << 20
}

fn connect(s: &Settings) -> Result<Client, ClientError> {
    Client::connect(&s.socket, &format!("luo-qemu {}", s.name))
}

fn connect_waiting(s: &Settings) -> Result<Client, ClientError> {
    let deadline = Instant::now() + s.luod_wait;
    loop {
        match connect(s) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn state_of(c: &mut Client) -> Result<State, ClientError> {
    match c.call(&Request::Status)? {
        Response::Status(r) => Ok(r.state),
        other => Err(liveupdate::protocol::client::unexpected(&Request::Status, &other)),
    }
}

/// The phase luod shows for VM `name`, if it knows it.
fn phase_of(c: &mut Client, name: &str) -> Result<Option<String>, ClientError> {
    match c.call(&Request::VmList)? {
        Response::Vms(vms) => Ok(vms.into_iter().find(|v| v.name == name).map(|v| v.phase)),
        other => Err(liveupdate::protocol::client::unexpected(&Request::VmList, &other)),
    }
}

/// Sizes of the preserved files of session `vm-NAME`, by token.
fn preserved_sizes(c: &mut Client, name: &str) -> Result<Vec<(u64, u64)>, ClientError> {
    let session = liveupdate::engine::vm_session(name);
    match c.call(&Request::SessionList)? {
        Response::Sessions(list) => Ok(list
            .into_iter()
            .filter(|s| s.name == session)
            .flat_map(|s| s.files.into_iter().map(|f| (f.token, f.size)))
            .collect()),
        other => Err(liveupdate::protocol::client::unexpected(&Request::SessionList, &other)),
    }
}

/// Signals the launcher acts on.
#[derive(Debug, Clone)]
pub struct Signals {
    /// SIGTERM or SIGINT.
    pub stop: Arc<AtomicBool>,
    /// SIGHUP: retry a failed restore.
    pub retry: Arc<AtomicBool>,
}

impl Signals {
    /// Installs the flags.
    pub fn install() -> std::io::Result<Signals> {
        let s = Signals {
            stop: Arc::new(AtomicBool::new(false)),
            retry: Arc::new(AtomicBool::new(false)),
        };
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(sig, s.stop.clone())?;
        }
        signal_hook::flag::register(signal_hook::consts::SIGHUP, s.retry.clone())?;
        Ok(s)
    }
}

/// The running VM.
#[derive(Debug)]
struct Vm<'a> {
    s: &'a Settings,
    cfg: &'a VmConfig,
    ram: OwnedFd,
    state: OwnedFd,
    qemu: Qemu,
    conn: Option<VmConnection>,
    registered: bool,
    in_cycle: bool,
    frozen: bool,
    /// Restored from a claim in this kernel and not registered yet: it
    /// registers again while luod is still `updated`, so that a rollback
    /// from `updated` carries it (lib/src/engine/reclaim.rs).
    restored: bool,
}

/// Runs VM `s.name` with configuration `cfg` until it ends; prints what
/// happens, one `luo-qemu: ` line per event.
pub fn run(s: &Settings, cfg: &VmConfig, signals: &Signals) -> Outcome {
    let mut client = match connect_waiting(s) {
        Ok(c) => c,
        Err(e) => {
            say(format!("VM {}: cannot reach luod: {e}", s.name));
            return Outcome::Failed;
        }
    };
    let phase = match phase_of(&mut client, &s.name) {
        Ok(p) => p,
        Err(e) => {
            say(format!("VM {}: asking luod for the VM: {e}", s.name));
            return Outcome::Failed;
        }
    };
    let launch = Launch {
        qemu: &cfg.qemu,
        name: &s.name,
        memory_mib: cfg.memory_mib,
        args: &cfg.args,
        qmp: &s.qmp,
        timeout: Duration::from_secs(cfg.timeout_secs),
    };
    if phase.as_deref() == Some("registered") {
        say(format!(
            "VM {}: luod shows it registered by a running VMM: another luo-qemu runs this VM; stop that one first",
            s.name
        ));
        return Outcome::Failed;
    }
    let vm = if phase.as_deref() == Some("awaiting-claim") {
        match restore(s, cfg, &launch, &mut client, signals) {
            Ok(vm) => vm,
            Err(outcome) => return outcome,
        }
    } else {
        drop(client);
        match start_fresh(s, cfg, &launch) {
            Ok(vm) => vm,
            Err(e) => {
                say(format!("VM {}: cannot start: {e}", s.name));
                return Outcome::Failed;
            }
        }
    };
    vm.serve(signals)
}

fn start_fresh<'a>(s: &'a Settings, cfg: &'a VmConfig, launch: &Launch<'_>) -> Result<Vm<'a>, String> {
    let ram =
        memfd_sized(&format!("{}-ram", s.name), mib(cfg.memory_mib)).map_err(|e| format!("guest RAM memfd: {e}"))?;
    let state =
        memfd_sized(&format!("{}-state", s.name), mib(cfg.state_mib)).map_err(|e| format!("state memfd: {e}"))?;
    let qemu = launch.start(ram.as_fd(), &[], false).map_err(|e| e.to_string())?;
    say(format!(
        "VM {} started fresh: QEMU {} pid {} memory_mib={} state_mib={}",
        s.name,
        qemu.version(),
        qemu.pid(),
        cfg.memory_mib,
        cfg.state_mib
    ));
    Ok(Vm {
        s,
        cfg,
        ram,
        state,
        qemu,
        conn: None,
        registered: false,
        in_cycle: false,
        frozen: false,
        restored: false,
    })
}

/// Checks, before claiming anything, that this configuration can take the
/// preserved VM: the preserved RAM has the configured size, and QEMU starts
/// with it (`-incoming defer` on an empty memfd of that size, then quit).
fn dry_run(s: &Settings, cfg: &VmConfig, launch: &Launch<'_>, client: &mut Client) -> Result<(), String> {
    let sizes = preserved_sizes(client, &s.name).map_err(|e| format!("asking luod for the VM's files: {e}"))?;
    let ram = sizes.iter().find(|(t, _)| *t == RAM_TOKEN).map(|(_, n)| *n);
    if ram != Some(mib(cfg.memory_mib)) {
        return Err(format!(
            "the preserved guest RAM is {} bytes but the configuration says memory_mib = {} ({} bytes)",
            ram.map_or("missing".into(), |n| n.to_string()),
            cfg.memory_mib,
            mib(cfg.memory_mib)
        ));
    }
    let empty = memfd_sized("dry-run", mib(cfg.memory_mib)).map_err(|e| format!("dry-run memfd: {e}"))?;
    let q = launch.start(empty.as_fd(), &[], true).map_err(|e| e.to_string())?;
    q.quit();
    Ok(())
}

fn restore<'a>(
    s: &'a Settings,
    cfg: &'a VmConfig,
    launch: &Launch<'_>,
    client: &mut Client,
    signals: &Signals,
) -> Result<Vm<'a>, Outcome> {
    let failed = |why: String| {
        say(format!(
            "VM {}: relaunch failed: {why}; its RAM and state stay preserved by luod (`luoctl vm list`: \
             awaiting-claim); fix the configuration and start luo-qemu again, or give the VM up with \
             `luoctl vm abandon {}`",
            s.name, s.name
        ));
        Outcome::RelaunchFailed
    };
    if let Err(why) = dry_run(s, cfg, launch, client) {
        return Err(failed(why));
    }
    let claimed = client
        .claim_vm(&s.name)
        .map_err(|e| failed(format!("claiming it from luod: {e}")))?;
    let mut ram = None;
    let mut state = None;
    for (token, fd) in claimed.ram {
        match token {
            RAM_TOKEN => ram = Some(fd),
            STATE_TOKEN => state = Some(fd),
            _ => {}
        }
    }
    let (Some(ram), Some(state)) = (ram, state) else {
        say(format!(
            "VM {}: luod handed over no RAM and state memfds under tokens {RAM_TOKEN} and {STATE_TOKEN}: not a \
             VM of luo-qemu",
            s.name
        ));
        return Err(Outcome::Failed);
    };
    let cp: Checkpoint = match serde_json::from_slice(&claimed.state) {
        Ok(
            cp @ Checkpoint {
                format: CHECKPOINT_FORMAT,
                ..
            },
        ) => cp,
        Ok(cp) => {
            say(format!(
                "VM {}: checkpoint format {} is not known to this launcher",
                s.name, cp.format
            ));
            return Err(Outcome::Failed);
        }
        Err(e) => {
            say(format!("VM {}: the saved checkpoint does not decode: {e}", s.name));
            return Err(Outcome::Failed);
        }
    };
    // From here the launcher holds the VM's only copy: a failure keeps the
    // memfds here and waits for SIGHUP (retry) or SIGTERM (give up).
    loop {
        match relaunch(s, launch, &ram, &state, &cp) {
            Ok(qemu) => {
                return Ok(Vm {
                    s,
                    cfg,
                    ram,
                    state,
                    qemu,
                    conn: None,
                    registered: false,
                    in_cycle: false,
                    frozen: false,
                    restored: true,
                });
            }
            Err(e) => say(format!(
                "VM {}: relaunch failed after the claim: {e}; this process keeps its RAM and state: send SIGHUP \
                 to retry, SIGTERM to give it up",
                s.name
            )),
        }
        while !signals.retry.swap(false, Ordering::SeqCst) {
            if signals.stop.load(Ordering::SeqCst) {
                return Err(Outcome::RelaunchFailed);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn relaunch(
    s: &Settings,
    launch: &Launch<'_>,
    ram: &OwnedFd,
    state: &OwnedFd,
    cp: &Checkpoint,
) -> Result<Qemu, QemuError> {
    let t0 = Instant::now();
    // A description of its own, at offset 0, for QEMU to read from.
    let desc: OwnedFd = std::fs::File::open(format!("/proc/self/fd/{}", state.as_raw_fd()))
        .map_err(|source| QemuError::Io {
            what: "reopening the state memfd".into(),
            source,
        })?
        .into();
    let mut qemu = launch.start(ram.as_fd(), &[], true)?;
    let started = t0.elapsed();
    let t1 = Instant::now();
    if let Err(e) = qemu.restore(desc.as_fd(), cp) {
        qemu.kill();
        return Err(e);
    }
    say(format!(
        "VM {} restored: QEMU {} pid {} (checkpoint by QEMU {}) state_bytes={} relaunch_ms={:.1} load_ms={:.1} \
         running={}",
        s.name,
        qemu.version(),
        qemu.pid(),
        cp.qemu,
        cp.state_bytes,
        started.as_secs_f64() * 1e3,
        t1.elapsed().as_secs_f64() * 1e3,
        cp.was_running
    ));
    Ok(qemu)
}

enum Attach {
    Attached(VmConnection),
    Later,
    HandedOver,
}

impl Vm<'_> {
    fn name(&self) -> &str {
        &self.s.name
    }

    /// Connects to luod and registers (or re-attaches) the VM when luod's
    /// state allows it.
    fn attach(&mut self) -> Result<Attach, ClientError> {
        let mut c = connect(self.s)?;
        let state = state_of(&mut c)?;
        match state {
            State::Updated if self.frozen => return Ok(Attach::HandedOver),
            State::Updated if self.restored && !self.registered => {
                let ram = [(RAM_TOKEN, self.ram.as_fd()), (STATE_TOKEN, self.state.as_fd())];
                return match c.register_vm(self.name(), &ram) {
                    Ok(conn) => Ok(Attach::Attached(conn)),
                    Err(ClientError::Server(e)) => {
                        // A luod that takes a VM back only after `finish`.
                        say(format!(
                            "VM {}: luod does not take the VM again before `finish` ({}): registering after it",
                            self.name(),
                            e.message
                        ));
                        self.restored = false;
                        Ok(Attach::Later)
                    }
                    Err(e) => Err(e),
                };
            }
            State::Updated => return Ok(Attach::Later),
            State::Prepared | State::Frozen if !self.registered => return Ok(Attach::Later),
            State::Prepared | State::Frozen => {
                return c
                    .reattach_vm(self.name(), &[RAM_TOKEN, STATE_TOKEN])
                    .map(Attach::Attached);
            }
            State::Normal if self.frozen => {
                // luod came back without the cycle this VM was frozen for.
                match self.qemu.resume() {
                    Ok(()) => say(format!(
                        "VM {} resumed: luod came back without the cycle it was checkpointed for",
                        self.name()
                    )),
                    Err(e) => say(format!("VM {}: resuming after luod came back: {e}", self.name())),
                }
                self.frozen = false;
                self.in_cycle = false;
            }
            _ => {}
        }
        self.in_cycle = false;
        if self.registered {
            // luod restarted, or dropped our connection: attach again to the
            // same registration (same tokens, no fds).
            if let Ok(conn) = c.reattach_vm(self.name(), &[RAM_TOKEN, STATE_TOKEN]) {
                return Ok(Attach::Attached(conn));
            }
        }
        let ram = [(RAM_TOKEN, self.ram.as_fd()), (STATE_TOKEN, self.state.as_fd())];
        match connect(self.s)?.register_vm(self.name(), &ram) {
            Ok(conn) => Ok(Attach::Attached(conn)),
            Err(ClientError::Server(e))
                if e.kind == ErrorKind::AlreadyExists || e.kind == ErrorKind::InvalidArgument =>
            {
                // A registration of an earlier run: its session is still in
                // luod's record with no VMM attached (AlreadyExists), or luod
                // still lists it with its VMM gone (`disconnected`). Its
                // QEMU is gone (QEMU dies with its launcher): our memfds
                // replace it. A VM another launcher runs is left alone.
                let mut c = connect(self.s)?;
                if e.kind == ErrorKind::InvalidArgument
                    && phase_of(&mut c, self.name())?.as_deref() != Some("disconnected")
                {
                    return Err(ClientError::Server(e));
                }
                match c.call(&Request::VmAbandon {
                    name: self.name().to_string(),
                })? {
                    Response::Done => say(format!("VM {}: dropped luod's stale registration", self.name())),
                    other => say(format!("VM {}: dropping a stale registration: {other:?}", self.name())),
                }
                connect(self.s)?.register_vm(self.name(), &ram).map(Attach::Attached)
            }
            Err(e) => Err(e),
        }
    }

    fn answer(&mut self, call: VmCall) -> VmAnswer {
        if let Some(status) = self.qemu.exited() {
            if call == VmCall::Cancel {
                self.in_cycle = false;
                return VmAnswer::Ok { state: None };
            }
            return VmAnswer::Failed(format!("QEMU exited ({status})"));
        }
        match call {
            VmCall::Prepare => match self.qemu.veto() {
                Ok(None) => {
                    self.in_cycle = true;
                    VmAnswer::Ok { state: None }
                }
                Ok(Some(reason)) => VmAnswer::Veto(reason),
                Err(e) => VmAnswer::Failed(e.to_string()),
            },
            VmCall::Freeze => {
                let t = Instant::now();
                match self.qemu.checkpoint(self.state.as_fd(), self.cfg.memory_mib) {
                    Ok(cp) => {
                        self.frozen = true;
                        say(format!(
                            "VM {} checkpointed: state_bytes={} checkpoint_ms={:.1} was_running={}",
                            self.name(),
                            cp.state_bytes,
                            t.elapsed().as_secs_f64() * 1e3,
                            cp.was_running
                        ));
                        match serde_json::to_vec(&cp) {
                            Ok(blob) => VmAnswer::Ok { state: Some(blob) },
                            Err(e) => VmAnswer::Failed(format!("encoding the checkpoint: {e}")),
                        }
                    }
                    Err(e) => {
                        // luod undoes only the VMs that froze: resume this one here.
                        if self.qemu.exited().is_none() {
                            let _ = self.qemu.resume();
                        }
                        VmAnswer::Failed(e.to_string())
                    }
                }
            }
            VmCall::Unfreeze | VmCall::Cancel => {
                if call == VmCall::Cancel {
                    self.in_cycle = false;
                }
                let was = self.frozen;
                self.frozen = false;
                match self.qemu.resume() {
                    Ok(()) => {
                        if was {
                            say(format!("VM {} resumed after {}", self.name(), call.as_str()));
                        }
                        VmAnswer::Ok { state: None }
                    }
                    Err(e) => VmAnswer::Failed(e.to_string()),
                }
            }
        }
    }

    /// Gives the VM up in luod (its memory is released) when QEMU is gone.
    fn abandon(&self) {
        if !self.registered {
            return;
        }
        let req = Request::VmAbandon {
            name: self.name().to_string(),
        };
        match connect(self.s).and_then(|mut c| c.call(&req)) {
            Ok(Response::Done) => say(format!("VM {}: registration with luod dropped", self.name())),
            Ok(other) => say(format!("VM {}: dropping the registration: {other:?}", self.name())),
            Err(e) => say(format!("VM {}: dropping the registration: {e}", self.name())),
        }
    }

    fn serve(mut self, signals: &Signals) -> Outcome {
        let mut next_attach = Instant::now();
        let mut last_error: Option<String> = None;
        loop {
            if signals.stop.load(Ordering::SeqCst) && self.frozen {
                // The checkpoint is in luod's hands (RAM and device state in
                // the preserved memfds): this is the stop of an orderly kexec
                // (`systemctl kexec` stops this unit before luod), so the
                // launcher ends at once, keeping the registration for the
                // next kernel. Waiting would hold the shutdown for the whole
                // of TimeoutStopSec.
                say(format!(
                    "VM {}: stopping (signal) with the VM checkpointed: luod keeps its RAM and device state for \
                     the next kernel; QEMU quits",
                    self.name()
                ));
                self.conn = None;
                self.qemu.quit();
                return Outcome::Done;
            }
            if signals.stop.load(Ordering::SeqCst) && !self.in_cycle {
                say(format!("VM {}: stopping (signal): QEMU quits", self.name()));
                self.conn = None;
                self.abandon();
                self.qemu.quit();
                return Outcome::Done;
            }
            if let Some(status) = self.qemu.exited()
                && !self.in_cycle
            {
                say(format!("VM {}: QEMU exited ({status})", self.name()));
                self.conn = None;
                self.abandon();
                return if status.success() {
                    Outcome::Done
                } else {
                    Outcome::QemuDied
                };
            }
            if self.conn.is_none() && Instant::now() >= next_attach {
                next_attach = Instant::now() + Duration::from_millis(200);
                match self.attach() {
                    Ok(Attach::Attached(c)) => {
                        say(format!(
                            "VM {} registered with luod (QEMU {}, tokens {RAM_TOKEN}: RAM, {STATE_TOKEN}: state)",
                            self.name(),
                            self.qemu.version()
                        ));
                        self.registered = true;
                        self.conn = Some(c);
                        last_error = None;
                    }
                    Ok(Attach::Later) => {}
                    Err(e) => {
                        let text = e.to_string();
                        if last_error.as_deref() != Some(text.as_str()) {
                            say(format!(
                                "VM {}: waiting to register with luod: {text} (retrying)",
                                self.name()
                            ));
                            last_error = Some(text);
                        }
                    }
                    Ok(Attach::HandedOver) => {
                        say(format!(
                            "VM {} was handed over to the new kernel: the old QEMU quits",
                            self.name()
                        ));
                        self.qemu.quit();
                        return Outcome::Done;
                    }
                }
            }
            let Some(conn) = self.conn.as_ref() else {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            };
            let readable = {
                let fd: BorrowedFd<'_> = conn.socket().as_fd();
                let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
                matches!(poll(&mut fds, PollTimeout::from(100u16)), Ok(n) if n > 0)
            };
            if !readable {
                continue;
            }
            let call = self.conn.as_mut().map(VmConnection::next_call);
            match call {
                Some(Ok(Some(call))) => {
                    let answer = self.answer(call);
                    if let Some(c) = self.conn.as_mut()
                        && let Err(e) = c.answer(answer)
                    {
                        say(format!("VM {}: answering {}: {e}", self.name(), call.as_str()));
                        self.conn = None;
                    }
                }
                _ => {
                    self.conn = None;
                    if self.frozen {
                        say(format!(
                            "VM {}: luod closed the connection with the VM checkpointed (a kexec, or luod \
                             restarted): waiting for luod",
                            self.name()
                        ));
                    }
                }
            }
        }
    }
}
