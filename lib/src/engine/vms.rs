//! VMs: VMMs register their VMs with luod, luod drives them through the
//! cycle with the `kvm` subsystem, and in the new kernel a new VMM claims
//! each VM back.
//!
//! A VM is a session named `vm-NAME` holding its guest-RAM memfds, plus a
//! live connection to its VMM. At `prepare` and `freeze` luod sends every
//! VMM a [`VmCall`] at once (a scoped thread per VM, for the call only) and
//! collects their [`VmAnswer`]s against one deadline, the call timeout: a
//! hung VMM costs one timeout per step, not one per VM. A VMM that vetoes,
//! fails, hangs or disconnects fails the step (the error names every such
//! VM), and the VMs that answered are undone (`cancel`, `unfreeze`), all at
//! once too, so they resume. The state each VMM returns at `freeze` goes into the record
//! (the `kvm` section); in the new kernel `VmClaim` hands it back with the
//! memfds.

use super::{Caller, Engine, EngineError};
use crate::kernel::KernelError;
use crate::names::SessionName;
use crate::protocol::frame::{self, FrameError};
use crate::protocol::{Request, Response, VmAnswer, VmCall, VmInfo};
use crate::region::Region;
use crate::state::State;
use crate::subsystem::{Blob, PrepareContext, Subsystem, SubsystemError};
use serde::{Deserialize, Serialize};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Name of the subsystem (and of its section in the record).
pub const KVM: &str = "kvm";
/// Version of the `kvm` section's blob.
pub(super) const KVM_BLOB_VERSION: u32 = 1;

/// The session that holds a VM's memory.
pub fn vm_session(name: &str) -> String {
    format!("vm-{name}")
}

/// A VM as the record keeps it (the `kvm` section, version 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSaved {
    /// VM name.
    pub name: String,
    /// Uid of its VMM.
    pub owner_uid: u32,
    /// Tokens of its memfds in session `vm-NAME`.
    pub tokens: Vec<u64>,
    /// The state its VMM returned at `freeze`.
    pub state: Vec<u8>,
}

#[derive(Debug)]
struct Vm {
    name: String,
    owner_uid: u32,
    tokens: Vec<u64>,
    conn: Option<UnixStream>,
    state: Option<Vec<u8>>,
}

/// The registered VMs, shared by the engine (registration) and the `kvm`
/// subsystem (calls). Lock order: the engine, then this table.
#[derive(Debug, Default)]
pub struct VmTable {
    vms: Vec<Vm>,
}

impl VmTable {
    /// True when no VM is registered.
    pub fn is_empty(&self) -> bool {
        self.vms.is_empty()
    }

    /// Each VM's name, owner, tokens and VMM connection, in order.
    pub(super) fn rows(&self) -> impl Iterator<Item = (&str, u32, &[u64], Option<&UnixStream>)> {
        self.vms
            .iter()
            .map(|v| (v.name.as_str(), v.owner_uid, v.tokens.as_slice(), v.conn.as_ref()))
    }

    /// Forgets VM `name` (its session ended); its VMM's connection closes.
    pub(super) fn forget(&mut self, name: &str) {
        self.vms.retain(|v| v.name != name);
    }

    /// Adds a registered VM with its VMM's connection.
    pub(super) fn push_registered(&mut self, name: &str, owner_uid: u32, tokens: &[u64], conn: UnixStream) {
        self.vms.push(Vm {
            name: name.into(),
            owner_uid,
            tokens: tokens.to_vec(),
            conn: Some(conn),
            state: None,
        });
    }
}

/// What a new VMM gets when it claims a VM.
#[derive(Debug)]
pub struct Claimed {
    /// Tokens of the memfds, in order.
    pub tokens: Vec<u64>,
    /// The state the previous VMM saved at `freeze`.
    pub state: Vec<u8>,
    /// The memfds.
    pub fds: Vec<OwnedFd>,
}

/// The VMs a record's `kvm` section saved at `freeze`.
pub(super) fn saved_vms_of(record: &crate::record::HandoverRecord) -> Vec<VmSaved> {
    record
        .subsystems
        .iter()
        .find(|s| s.name == KVM && s.version == KVM_BLOB_VERSION)
        .and_then(|s| postcard::from_bytes(&s.blob).ok())
        .unwrap_or_default()
}

/// What a VMM reported about its VM ([`Request::VmReport`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmNote {
    /// Free text: the VMM's version, the VM's run state, a failure's reason.
    pub detail: Option<String>,
    /// The VM's blackout in the last live update, in milliseconds.
    pub blackout_ms: Option<u64>,
}

/// The VMMs' reports, by VM name: in luod's memory only (never in the
/// record), shared by the engine and every snapshot, and kept apart from the
/// [`VmTable`] so that a report never waits for a VM call in progress.
pub type VmNotes = Arc<Mutex<std::collections::BTreeMap<String, VmNote>>>;

/// Checks a reported detail: one line of text of at most
/// [`crate::protocol::MAX_VM_DETAIL`] bytes.
pub(super) fn check_detail(name: &str, detail: &str) -> Result<(), EngineError> {
    let max = crate::protocol::MAX_VM_DETAIL;
    if detail.len() > max {
        return Err(EngineError::InvalidArgument(format!(
            "the detail reported for VM {name} is {} bytes; luod keeps at most {max}",
            detail.len()
        )));
    }
    if detail.chars().any(char::is_control) {
        return Err(EngineError::InvalidArgument(format!(
            "the detail reported for VM {name} has a control character (a line break, a tab, ...); it must be \
             one line of text"
        )));
    }
    Ok(())
}

/// A [`VmTable`] shared between the engine and the `kvm` subsystem.
pub type SharedVms = Arc<Mutex<VmTable>>;

pub(super) fn lock(vms: &SharedVms) -> std::sync::MutexGuard<'_, VmTable> {
    vms.lock().unwrap_or_else(|p| p.into_inner())
}

/// The `kvm` subsystem: drives every registered VM's VMM.
#[derive(Debug)]
pub struct Kvm {
    vms: SharedVms,
    timeout: Duration,
    progress: crate::progress::ProgressCell,
}

impl Kvm {
    /// The subsystem over `vms`, waiting at most `timeout` for the answers
    /// to each call (one deadline for all VMs).
    pub fn new(vms: SharedVms, timeout: Duration) -> Self {
        Kvm {
            vms,
            timeout,
            progress: Default::default(),
        }
    }
}

/// True when the VMM closed its end of `conn` (or the connection broke);
/// looks without waiting and without taking anything from the stream.
pub(super) fn peer_closed(conn: &UnixStream) -> bool {
    use nix::sys::socket::{MsgFlags, recv};
    use std::os::fd::AsRawFd;
    let mut byte = [0u8; 1];
    match recv(conn.as_raw_fd(), &mut byte, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
        // End of stream: the VMM closed the connection.
        Ok(0) => true,
        // Something waits to be read: still connected.
        Ok(_) => false,
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => false,
        // ECONNRESET and the like: the connection is gone.
        Err(_) => true,
    }
}

/// Sends `call` to `vm`'s VMM and waits for its answer until `deadline`
/// (`timeout` is the step's whole allowance, for the message). A VMM that
/// does not answer in time, or answers out of turn, is disconnected: its
/// stream could no longer be trusted to pair answers with calls.
fn call(vm: &mut Vm, call: VmCall, deadline: Instant, timeout: Duration) -> Result<Option<Vec<u8>>, SubsystemError> {
    let name = vm.name.clone();
    let what = call.as_str();
    let Some(conn) = vm.conn.as_ref() else {
        return Err(SubsystemError::Failed(format!(
            "VM {name}: its VMM is not connected (it exited, or luod restarted and it has not registered again)"
        )));
    };
    // A zero timeout means "none" to the socket: keep at least a millisecond.
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let _ = conn.set_write_timeout(Some(left()));
    let result =
        frame::send(conn, &Response::VmCall(call), &[]).and_then(|()| frame::recv_within::<Request>(conn, left()));
    let fail = |why: String| SubsystemError::Failed(format!("VM {name}: {why}"));
    let outcome = match result {
        Ok((Request::VmAnswer(VmAnswer::Ok { state }), _)) => return Ok(state),
        Ok((Request::VmAnswer(VmAnswer::Veto(reason)), _)) => {
            return Err(SubsystemError::Veto(format!("VM {name}: {reason}")));
        }
        Ok((Request::VmAnswer(VmAnswer::Failed(reason)), _)) => return Err(fail(format!("{what} failed: {reason}"))),
        Ok((other, _)) => fail(format!("its VMM answered {} to {what}", other.kind())),
        Err(FrameError::Deadline { .. }) => fail(format!(
            "its VMM did not answer {what} within {} s",
            timeout.as_secs_f32()
        )),
        Err(FrameError::Io(e)) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            fail(format!(
                "its VMM did not answer {what} within {} s",
                timeout.as_secs_f32()
            ))
        }
        Err(FrameError::Closed | FrameError::Truncated { .. }) => fail(format!("its VMM disconnected during {what}")),
        Err(e) => fail(format!("{what}: {e}")),
    };
    vm.conn = None;
    Err(outcome)
}

/// What the progress report says while `pending` VMs have not answered `what`.
pub(super) fn pending_text(pending: &[String], what: &str) -> String {
    match pending {
        [one] => format!("VM {one} ({what})"),
        many => format!("VMs {} ({what})", many.join(", ")),
    }
}

/// One error for the VMs that failed a step, in table order: a veto when
/// every one of them vetoed, a failure otherwise.
fn combine(mut errors: Vec<SubsystemError>) -> SubsystemError {
    if errors.len() == 1 {
        return errors.remove(0);
    }
    if errors.iter().all(|e| matches!(e, SubsystemError::Veto(_))) {
        let reasons: Vec<String> = errors
            .into_iter()
            .map(|e| match e {
                SubsystemError::Veto(t) | SubsystemError::Failed(t) => t,
            })
            .collect();
        return SubsystemError::Veto(reasons.join("; "));
    }
    SubsystemError::Failed(errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
}

impl Kvm {
    /// Sends `what` to every VM of `vms` at once (one scoped thread per VM,
    /// for this call only) and collects the answers against one deadline:
    /// a hung VMM costs one timeout, whatever the number of VMs. The answers
    /// come back in the order of `vms`; the progress report names the VMs
    /// that have not answered yet.
    fn call_all(&self, vms: Vec<&mut Vm>, what: VmCall) -> Vec<Result<Option<Vec<u8>>, SubsystemError>> {
        if vms.is_empty() {
            return Vec::new();
        }
        let deadline = Instant::now() + self.timeout;
        let pending = Mutex::new(vms.iter().map(|v| v.name.clone()).collect::<Vec<_>>());
        self.progress
            .waiting_for(|| pending_text(&pending.lock().unwrap_or_else(|p| p.into_inner()), what.as_str()));
        let timeout = self.timeout;
        std::thread::scope(|scope| {
            let handles: Vec<_> = vms
                .into_iter()
                .map(|vm| {
                    let pending = &pending;
                    let progress = &self.progress;
                    scope.spawn(move || {
                        let answer = call(vm, what, deadline, timeout);
                        let mut left = pending.lock().unwrap_or_else(|p| p.into_inner());
                        left.retain(|n| *n != vm.name);
                        if !left.is_empty() {
                            progress.waiting_for(|| pending_text(&left, what.as_str()));
                        }
                        answer
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(SubsystemError::Failed(format!(
                            "a VM call ({}) panicked",
                            what.as_str()
                        )))
                    })
                })
                .collect()
        })
    }

    /// Calls `step` on every VM at once; if any fails, calls `undo` on those
    /// that succeeded, at once too (errors of the undo are logged: the
    /// failure is what counts), and fails naming every VM that failed.
    fn forward(&self, step: VmCall, undo: VmCall) -> Result<Vec<VmSaved>, SubsystemError> {
        let mut table = lock(&self.vms);
        let answers = self.call_all(table.vms.iter_mut().collect(), step);
        let mut errors = Vec::new();
        let mut succeeded = Vec::new();
        for (k, answer) in answers.into_iter().enumerate() {
            match answer {
                Ok(state) => {
                    table.vms[k].state = state;
                    succeeded.push(k);
                }
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            let undone: Vec<&mut Vm> = table
                .vms
                .iter_mut()
                .enumerate()
                .filter(|(k, _)| succeeded.contains(k))
                .map(|(_, vm)| vm)
                .collect();
            for u in self.call_all(undone, undo).into_iter().filter_map(Result::err) {
                tracing::error!("while undoing {}: {u}", step.as_str());
            }
            return Err(combine(errors));
        }
        Ok(table
            .vms
            .iter()
            .map(|vm| VmSaved {
                name: vm.name.clone(),
                owner_uid: vm.owner_uid,
                tokens: vm.tokens.clone(),
                state: vm.state.clone().unwrap_or_default(),
            })
            .collect())
    }

    /// Calls `undo` on every VM at once; fails naming every VM that failed.
    fn undo_all(&self, undo: VmCall) -> Result<(), SubsystemError> {
        let mut table = lock(&self.vms);
        let failures: Vec<String> = self
            .call_all(table.vms.iter_mut().collect(), undo)
            .into_iter()
            .filter_map(Result::err)
            .map(|e| e.to_string())
            .collect();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(SubsystemError::Failed(failures.join("; ")))
        }
    }
}

impl Subsystem for Kvm {
    fn name(&self) -> &str {
        KVM
    }
    fn set_progress(&mut self, progress: crate::progress::ProgressCell) {
        self.progress = progress;
    }
    fn prepare(&mut self, _ctx: &PrepareContext) -> Result<Option<Blob>, SubsystemError> {
        self.forward(VmCall::Prepare, VmCall::Cancel).map(|_| None)
    }
    fn freeze(&mut self) -> Result<Option<Blob>, SubsystemError> {
        let saved = self.forward(VmCall::Freeze, VmCall::Unfreeze)?;
        let data = postcard::to_allocvec(&saved)
            .map_err(|e| SubsystemError::Failed(format!("cannot encode VM states: {e}")))?;
        Ok(Some(Blob {
            version: KVM_BLOB_VERSION,
            data,
        }))
    }
    fn cancel(&mut self) -> Result<(), SubsystemError> {
        self.undo_all(VmCall::Cancel)
    }
    fn unfreeze(&mut self) -> Result<(), SubsystemError> {
        self.undo_all(VmCall::Unfreeze)
    }
    fn restore(&mut self, _blob: Option<&Blob>) -> Result<(), SubsystemError> {
        // The VMs wait in the record's kvm section until their VMMs claim them.
        Ok(())
    }
    fn finish(&mut self) -> Result<(), SubsystemError> {
        Ok(())
    }
}

impl<R: Region> Engine<R> {
    /// Connects the engine to the VM table the `kvm` subsystem drives.
    pub fn set_vms(&mut self, vms: SharedVms) {
        self.vms = Some(vms);
    }

    fn vms(&self) -> Result<&SharedVms, EngineError> {
        self.vms
            .as_ref()
            .ok_or_else(|| EngineError::InvalidArgument("this luod does not manage VMs".into()))
    }

    /// The VMs carried by the update in flight (the record's `kvm` section).
    pub fn saved_vms(&self) -> Vec<VmSaved> {
        saved_vms_of(&self.record)
    }

    /// Registers a VM (its memfds, one per token) or, with no fds and the
    /// same tokens, attaches a reconnecting VMM to its VM.
    pub fn vm_register(
        &mut self,
        caller: &Caller,
        name: &str,
        tokens: &[u64],
        fds: Vec<OwnedFd>,
        conn: UnixStream,
    ) -> Result<(), EngineError> {
        // Before anything touches them: guest RAM must be memfds. Anything
        // else is closed off the engine lock (a FUSE file's close waits on
        // its server).
        if let Some(other) = fds.iter().find(|fd| !crate::kernel::memfd::is_memfd(fd.as_fd())) {
            let what = crate::kernel::memfd::describe(other.as_fd());
            super::close_elsewhere(fds);
            return Err(KernelError::Unsupported { what }.into());
        }
        self.require_live()?;
        let session = SessionName::new(vm_session(name))?;
        let vms = self.vms()?.clone();
        let mut table = lock(&vms);
        if let Some(vm) = table.vms.iter_mut().find(|v| v.name == name) {
            if vm.owner_uid != caller.uid || !fds.is_empty() || vm.tokens != tokens {
                return Err(EngineError::InvalidArgument(format!(
                    "VM {name} is registered already; a reconnecting VMM registers with the same tokens and no fds"
                )));
            }
            vm.conn = Some(conn);
            return Ok(());
        }
        if !fds.is_empty() && self.claimed_by(caller, name, tokens) {
            // Claimed in this kernel, registered again before `finish` (reclaim.rs).
            return self.vm_register_claimed(caller, name, tokens, fds, conn, &mut table);
        }
        let existing = self.record.sessions.iter().find(|s| s.name == session);
        if let Some(s) = existing {
            // luod restarted: the VM's session is in the record, its VMM reconnects.
            let same =
                s.owner_uid == caller.uid && fds.is_empty() && s.fds.iter().map(|f| f.token).eq(tokens.iter().copied());
            if !same || self.record.state == State::Updated {
                return Err(EngineError::Kernel(KernelError::SessionExists(session.to_string())));
            }
            table.vms.push(Vm {
                name: name.into(),
                owner_uid: caller.uid,
                tokens: tokens.to_vec(),
                conn: Some(conn),
                state: None,
            });
            return Ok(());
        }
        if fds.is_empty() || fds.len() != tokens.len() {
            return Err(EngineError::MissingFd(
                "vm-register needs one memfd per token (guest RAM), sent with SCM_RIGHTS",
            ));
        }
        if self.record.state != State::Normal {
            return Err(EngineError::SessionsLocked {
                what: "registering a VM",
                state: self.record.state,
            });
        }
        self.session_create(caller, session.as_str())?;
        for (token, fd) in tokens.iter().zip(fds) {
            if let Err(e) = self.session_preserve(caller, session.as_str(), *token, fd) {
                if let Err(undo) = self.session_finish(caller, session.as_str()) {
                    tracing::error!("cannot drop session {session} after a failed registration: {undo}");
                }
                return Err(e);
            }
        }
        table.vms.push(Vm {
            name: name.into(),
            owner_uid: caller.uid,
            tokens: tokens.to_vec(),
            conn: Some(conn),
            state: None,
        });
        Ok(())
    }

    /// In the new kernel: hands a VM's memfds and saved state to its new VMM.
    pub fn vm_claim(&mut self, caller: &Caller, name: &str) -> Result<Claimed, EngineError> {
        self.require_live()?;
        if self.record.state != State::Updated {
            return Err(EngineError::SessionsLocked {
                what: "claiming a VM",
                state: self.record.state,
            });
        }
        let vm = self
            .saved_vms()
            .into_iter()
            .find(|v| v.name == name && v.owner_uid == caller.uid)
            .ok_or_else(|| EngineError::Kernel(KernelError::NoSuchSession(vm_session(name))))?;
        let session = vm_session(name);
        let mut fds = Vec::new();
        for token in &vm.tokens {
            fds.push(self.session_retrieve(caller, &session, *token)?.0);
        }
        Ok(Claimed {
            tokens: vm.tokens,
            state: vm.state,
            fds,
        })
    }

    /// Gives up on a VM: its session ends (its memory is released), and
    /// `finish` no longer waits for it. Its owner or an operator may do it,
    /// in `normal` or `updated`.
    pub fn vm_abandon(&mut self, caller: &Caller, name: &str) -> Result<(), EngineError> {
        self.require_live()?;
        let session = vm_session(name);
        let owner = self
            .record
            .sessions
            .iter()
            .find(|s| s.name.as_str() == session)
            .map(|s| s.owner_uid)
            .ok_or_else(|| EngineError::Kernel(KernelError::NoSuchSession(session.clone())))?;
        if owner != caller.uid && !caller.privileged {
            return Err(EngineError::Kernel(KernelError::NoSuchSession(session)));
        }
        // Root abandoning another uid's VM is recorded, as a session finished by root.
        self.session_finish(caller, &session)?;
        if let Some(vms) = &self.vms {
            lock(vms).forget(name);
        }
        self.forget_vm_note(name);
        Ok(())
    }

    /// The VMs: registered ones and, in `updated`, those awaiting a claim.
    pub fn vm_list(&self, caller: &Caller) -> Vec<VmInfo> {
        if let Some(vms) = &self.vms {
            for vm in &mut lock(vms).vms {
                if vm.conn.as_ref().is_some_and(peer_closed) {
                    vm.conn = None;
                }
            }
        }
        self.snapshot().vm_list(caller)
    }

    /// VMs of the update that no VMM claimed yet (for `finish`), each with
    /// what its VMM reported last, if it did (`web (relaunch failed: ...)`).
    pub(super) fn unclaimed_vms(&self) -> Vec<String> {
        let notes = self.vm_notes.lock().unwrap_or_else(|p| p.into_inner());
        self.saved_vms()
            .into_iter()
            .filter(|v| {
                self.record.sessions.iter().any(|s| {
                    // A session made in this kernel (reclaim.rs) is the VM registered again, not unclaimed.
                    s.incoming && s.name.as_str() == vm_session(&v.name) && s.fds.iter().any(|f| !f.retrieved)
                })
            })
            .map(|v| match notes.get(&v.name).and_then(|n| n.detail.as_deref()) {
                Some(detail) => format!("{} ({detail})", v.name),
                None => v.name,
            })
            .collect()
    }

    /// Drops what VM `name`'s VMM reported (the VM is gone).
    pub(super) fn forget_vm_note(&self, name: &str) {
        self.vm_notes.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
    }

    /// `vm report`: see [`crate::protocol::Request::VmReport`].
    pub fn vm_report(
        &self,
        caller: &Caller,
        name: &str,
        detail: Option<String>,
        blackout_ms: Option<u64>,
    ) -> Result<(), EngineError> {
        self.snapshot().vm_report(caller, name, detail, blackout_ms)
    }
}
