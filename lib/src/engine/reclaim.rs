//! A VM claimed in `updated` registers again before `finish`.
//!
//! In the new kernel a VMM claims its VM (its memfds come out of the
//! incoming session `vm-NAME`) and resumes it at once. Had it to wait for
//! `finish` to register again, a `rollback` from `updated` would find the
//! VM's files taken back and refuse, and the VM would have no VMM connection
//! for the rollback's freeze: a failed health gate could not take the host
//! back with its VMs. So the VMM registers again right after restoring, with
//! the tokens and the memfds it claimed: luod ends the incoming session
//! (every file of it was taken back), preserves the memfds in a new session
//! of the same name, and drives the VM like one registered in `normal`. A
//! rollback then freezes it and carries it to the previous kernel; `finish`
//! keeps the new session and the registration, so the VM is ready for the
//! next update without registering a third time.

use super::vms::{VmTable, vm_session};
use super::{Caller, Engine, EngineError};
use crate::kernel::memfd;
use crate::names::SessionName;
use crate::record::FdRecord;
use crate::region::Region;
use crate::state::State;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;

impl<R: Region> Engine<R> {
    /// True when `name` is a VM of the update in flight that `caller`
    /// claimed under `tokens`: every file of its incoming session was taken
    /// back.
    pub(super) fn claimed_by(&self, caller: &Caller, name: &str, tokens: &[u64]) -> bool {
        self.record.state == State::Updated
            && self
                .saved_vms()
                .iter()
                .any(|v| v.name == name && v.owner_uid == caller.uid && v.tokens == tokens)
            && self.record.sessions.iter().any(|s| {
                s.name.as_str() == vm_session(name)
                    && s.incoming
                    && s.owner_uid == caller.uid
                    && s.fds.iter().all(|f| f.retrieved)
                    && s.fds.iter().map(|f| f.token).eq(tokens.iter().copied())
            })
    }

    /// Registers a VM its VMM claimed in this kernel (see the module's
    /// documentation): the claimed memfds, one per token and of the sizes
    /// that were preserved, go into a new session `vm-NAME` in place of the
    /// incoming one. A failure after the incoming session ended drops the
    /// session from the record (the VMM still holds the memfds and registers
    /// again after `finish`).
    pub(super) fn vm_register_claimed(
        &mut self,
        caller: &Caller,
        name: &str,
        tokens: &[u64],
        fds: Vec<OwnedFd>,
        conn: UnixStream,
        table: &mut VmTable,
    ) -> Result<(), EngineError> {
        if fds.len() != tokens.len() {
            return Err(EngineError::MissingFd(
                "vm-register needs one memfd per token (guest RAM), sent with SCM_RIGHTS",
            ));
        }
        let session = SessionName::new(vm_session(name))?;
        let Some(i) = self.record.sessions.iter().position(|s| s.name == session) else {
            return Err(EngineError::Kernel(crate::kernel::KernelError::NoSuchSession(
                session.to_string(),
            )));
        };
        let mut files = Vec::new();
        for ((token, fd), recorded) in tokens.iter().zip(fds).zip(&self.record.sessions[i].fds) {
            memfd::require_read_write(fd.as_fd())?;
            let size = memfd::size(fd.as_fd()).map_err(|e| EngineError::Io(format!("cannot stat the file: {e}")))?;
            if size != recorded.size {
                return Err(EngineError::InvalidArgument(format!(
                    "VM {name}: the memfd under token {token} is {size} bytes, but the one it claimed was {} bytes: \
                     register the memfds claimed",
                    recorded.size
                )));
            }
            files.push((*token, size, fd));
        }
        self.kernel.finish_session(&session)?;
        let moved = self
            .kernel
            .create_session(&session)
            .map_err(EngineError::from)
            .and_then(|()| {
                let mut kept = Vec::new();
                for (token, size, fd) in files {
                    self.kernel.preserve_fd(&session, token, fd)?;
                    kept.push(FdRecord {
                        token,
                        size,
                        data: None,
                        retrieved: false,
                    });
                }
                Ok(kept)
            });
        let mut next = self.record.clone();
        match moved {
            Ok(kept) => {
                next.sessions[i].incoming = false;
                next.sessions[i].fds = kept;
                self.commit(next)?;
                table.push_registered(name, caller.uid, tokens, conn);
                tracing::info!("VM {name}: its VMM claimed it and registered it again (session {session} is new)");
                Ok(())
            }
            Err(e) => {
                let _ = self.kernel.finish_session(&session);
                next.sessions.remove(i);
                if let Err(c) = self.commit(next) {
                    tracing::error!("cannot drop session {session} after a failed registration: {c}");
                }
                Err(e)
            }
        }
    }
}
