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
use crate::qemu::{CHECKPOINT_FORMAT, Checkpoint, Launch, Qemu, QemuError, blackout_ms, wall_clock_ns};
use liveupdate::protocol::client::{Client, ClientError, VmConnection};
use liveupdate::protocol::{ErrorKind, MAX_VM_DETAIL, Request, Response, VmAnswer, VmCall};
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

/// `text` as one line of at most [`MAX_VM_DETAIL`] bytes, as luod keeps a
/// VM's detail: control characters (QEMU's multi-line messages) become
/// spaces, and a longer text is cut at a character boundary and ends with
/// `...`.
pub fn detail_line(text: &str) -> String {
    let line: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if line.len() <= MAX_VM_DETAIL {
        return line;
    }
    let mut end = MAX_VM_DETAIL - 3;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &line[..end])
}

/// The detail of a VM whose restore failed before the claim: luod keeps its
/// RAM and state, and the launcher has exited (3).
pub fn relaunch_failed_detail(name: &str, why: &str) -> String {
    detail_line(&format!(
        "relaunch failed: {why}; RAM and state kept by luod: fix and `systemctl restart luo-qemu@{name}`, or \
         `luoctl vm abandon {name}`"
    ))
}

/// The detail of a VM whose relaunch failed after the claim: this launcher
/// holds its RAM and state and waits for SIGHUP.
pub fn relaunch_failed_after_claim_detail(name: &str, why: &str) -> String {
    detail_line(&format!(
        "relaunch failed after the claim: {why}; RAM and state kept by luo-qemu: fix and `systemctl reload \
         luo-qemu@{name}` (SIGHUP) to retry, or stop it to give the VM up"
    ))
}

/// The detail of a checkpointed VM.
pub fn checkpointed_detail(qemu: &str, state_bytes: u64, took: Duration) -> String {
    format!(
        "QEMU {qemu}, checkpointed {} KiB in {} ms",
        state_bytes.div_ceil(1024),
        took.as_millis()
    )
}

/// What the restore measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreTimes {
    /// From the start of the new QEMU to its monitor answering.
    pub relaunch: Duration,
    /// From `migrate-incoming` to the guest running (or loaded, if paused).
    pub load: Duration,
    /// When the guest ran again, on the wall clock (ns since the epoch).
    pub resumed_at_ns: u64,
}

/// The detail and blackout of a restored VM: the blackout runs from the
/// pause at the checkpoint to the guest running in the new kernel, both on
/// the host's wall clock. Unknown (`None`, and the detail says why) for a
/// guest that was paused anyway, a checkpoint without its pause time, or a
/// wall clock that went back across the kexec.
pub fn restored_report(qemu: &str, run_state: &str, cp: &Checkpoint, t: &RestoreTimes) -> (String, Option<u64>) {
    let mut detail = format!(
        "QEMU {qemu}, {run_state}; restored from QEMU {}'s checkpoint (relaunch {} ms, state load {} ms)",
        cp.qemu,
        t.relaunch.as_millis(),
        t.load.as_millis()
    );
    let blackout = match cp.paused_at_ns {
        _ if !cp.was_running => {
            detail.push_str("; the guest was paused at the checkpoint: no blackout");
            None
        }
        None => {
            detail.push_str("; blackout unknown: the checkpoint has no pause time (an older luo-qemu wrote it)");
            None
        }
        Some(paused) => {
            let b = blackout_ms(paused, t.resumed_at_ns);
            if b.is_none() {
                detail.push_str(&format!(
                    "; blackout unknown: the wall clock went back {} ms across the kexec",
                    (paused - t.resumed_at_ns) / 1_000_000
                ));
            }
            b
        }
    };
    (detail_line(&detail), blackout)
}

/// Tells luod what `vm list` shows for this VM beside its phase, on a
/// connection of its own (the registered one carries only luod's calls).
/// Best effort: a failure is said, never fatal.
fn report(s: &Settings, detail: &str, blackout_ms: Option<u64>) {
    let line = detail_line(detail);
    if let Err(e) = connect(s).and_then(|mut c| c.report_vm(&s.name, Some(&line), blackout_ms)) {
        say(format!("VM {}: reporting to luod ({line}): {e}", s.name));
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
    /// A detail to report once the current call is answered.
    report: Option<String>,
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
        report: None,
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
        report(s, &relaunch_failed_detail(&s.name, &why), None);
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
            Ok((mut qemu, times)) => {
                let run_state = qemu.run_state().unwrap_or_else(|e| format!("state unknown ({e})"));
                let (detail, blackout) = restored_report(&qemu.version(), &run_state, &cp, &times);
                say(format!(
                    "VM {}: blackout_ms={}",
                    s.name,
                    blackout.map_or("unknown".into(), |b| b.to_string())
                ));
                report(s, &detail, blackout);
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
                    report: None,
                    restored: true,
                });
            }
            Err(e) => {
                say(format!(
                    "VM {}: relaunch failed after the claim: {e}; this process keeps its RAM and state: send \
                     SIGHUP to retry, SIGTERM to give it up",
                    s.name
                ));
                report(s, &relaunch_failed_after_claim_detail(&s.name, &e.to_string()), None);
            }
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
) -> Result<(Qemu, RestoreTimes), QemuError> {
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
    let times = RestoreTimes {
        relaunch: started,
        load: t1.elapsed(),
        resumed_at_ns: wall_clock_ns(),
    };
    say(format!(
        "VM {} restored: QEMU {} pid {} (checkpoint by QEMU {}) state_bytes={} relaunch_ms={:.1} load_ms={:.1} \
         running={}",
        s.name,
        qemu.version(),
        qemu.pid(),
        cp.qemu,
        cp.state_bytes,
        times.relaunch.as_secs_f64() * 1e3,
        times.load.as_secs_f64() * 1e3,
        cp.was_running
    ));
    Ok((qemu, times))
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
                        self.report = Some(checkpointed_detail(&cp.qemu, cp.state_bytes, t.elapsed()));
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
                            self.report = Some(format!(
                                "QEMU {}, running (resumed after {})",
                                self.qemu.version(),
                                call.as_str()
                            ));
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
                        if self.restored {
                            // Registered again right after the restore: the
                            // restore's report (versions, parts, blackout)
                            // stays what `vm list` shows.
                            self.restored = false;
                        } else {
                            let run_state = self.qemu.run_state().unwrap_or_else(|e| format!("state unknown ({e})"));
                            report(self.s, &format!("QEMU {}, {run_state}", self.qemu.version()), None);
                        }
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
                    // After the answer, not before: luod waits for it (a
                    // freeze's answer is inside the blackout).
                    if let Some(detail) = self.report.take() {
                        report(self.s, &detail, None);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(paused_at_ns: Option<u64>, was_running: bool) -> Checkpoint {
        Checkpoint {
            format: CHECKPOINT_FORMAT,
            qemu: "10.0.2".into(),
            state_bytes: 287_654,
            was_running,
            memory_mib: 128,
            paused_at_ns,
        }
    }

    const PAUSED: u64 = 1_795_000_000_000_000_000;

    fn times(resumed_at_ns: u64) -> RestoreTimes {
        RestoreTimes {
            relaunch: Duration::from_millis(157),
            load: Duration::from_micros(48_900),
            resumed_at_ns,
        }
    }

    #[test]
    fn a_restored_vm_reports_its_versions_its_parts_and_its_blackout() {
        let (detail, blackout) = restored_report(
            "11.1.3",
            "running",
            &checkpoint(Some(PAUSED), true),
            &times(PAUSED + 21_649_700_000),
        );
        assert_eq!(
            detail,
            "QEMU 11.1.3, running; restored from QEMU 10.0.2's checkpoint (relaunch 157 ms, state load 48 ms)"
        );
        assert_eq!(blackout, Some(21_650));
    }

    #[test]
    fn the_blackout_is_unknown_and_the_detail_says_why_when_it_cannot_be_measured() {
        let (detail, blackout) = restored_report(
            "11.1.3",
            "running",
            &checkpoint(Some(PAUSED), true),
            &times(PAUSED - 1_500_000_000),
        );
        assert_eq!(blackout, None);
        assert!(
            detail.ends_with("; blackout unknown: the wall clock went back 1500 ms across the kexec"),
            "{detail}"
        );
        let (detail, blackout) = restored_report("11.1.3", "running", &checkpoint(None, true), &times(PAUSED));
        assert_eq!(blackout, None);
        assert!(
            detail.ends_with("; blackout unknown: the checkpoint has no pause time (an older luo-qemu wrote it)"),
            "{detail}"
        );
        let (detail, blackout) =
            restored_report("11.1.3", "paused", &checkpoint(Some(PAUSED), false), &times(PAUSED + 5));
        assert_eq!(blackout, None);
        assert!(
            detail.ends_with("; the guest was paused at the checkpoint: no blackout"),
            "{detail}"
        );
    }

    #[test]
    fn a_failed_relaunch_reports_qemus_reason_on_one_bounded_line_with_what_to_do() {
        let why = "QEMU exited (exit status: 1); QEMU said: qemu-system-x86_64: -drive file=/var/lib/vm/db.img: \
                   Could not open '/var/lib/vm/db.img': No such file or directory";
        assert_eq!(
            relaunch_failed_detail("db", why),
            format!(
                "relaunch failed: {why}; RAM and state kept by luod: fix and `systemctl restart luo-qemu@db`, or \
                 `luoctl vm abandon db`"
            )
        );
        assert!(
            relaunch_failed_after_claim_detail("db", "QEMU could not load the checkpoint: bad section")
                .starts_with("relaunch failed after the claim: QEMU could not load the checkpoint: bad section; RAM and state kept by luo-qemu: fix and `systemctl reload luo-qemu@db` (SIGHUP) to retry")
        );
        // QEMU's stderr, many lines of it, becomes one line luod accepts.
        let d = relaunch_failed_detail("db", &"error\n".repeat(400));
        assert_eq!(d.len(), MAX_VM_DETAIL);
        assert!(d.ends_with("...") && !d.chars().any(char::is_control), "{d}");
        // Cut at a character boundary: 'é' is two bytes, the cut falls in one.
        let d = detail_line(&"é".repeat(600));
        assert_eq!(d.len(), MAX_VM_DETAIL - 1);
        assert_eq!(d, format!("{}...", "é".repeat(510)));
    }

    #[test]
    fn a_checkpoint_reports_its_size_and_time() {
        assert_eq!(
            checkpointed_detail("11.1.3", 287_654, Duration::from_micros(48_700)),
            "QEMU 11.1.3, checkpointed 281 KiB in 48 ms"
        );
    }
}
