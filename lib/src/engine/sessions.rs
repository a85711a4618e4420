//! Session requests: create, preserve, list, retrieve, finish.
//!
//! Names are host-wide (as in the kernel), but a client sees and touches only
//! the sessions its uid created: another uid's session answers "no session
//! named ...", exactly like one that does not exist.

use super::{Caller, Engine, EngineError};
use crate::kernel::KernelError;
use crate::kernel::memfd;
use crate::names::SessionName;
use crate::protocol::SessionInfo;
use crate::record::{FdRecord, JournalEntry, SessionRecord};
use crate::region::Region;
use crate::state::State;
use std::os::fd::{AsFd, OwnedFd};

impl<R: Region> Engine<R> {
    fn own_session(&self, caller: &Caller, name: &str) -> Result<usize, EngineError> {
        let name = SessionName::new(name)?;
        self.record
            .sessions
            .iter()
            .position(|s| s.name == name && s.owner_uid == caller.uid)
            .ok_or_else(|| EngineError::Kernel(KernelError::NoSuchSession(name.to_string())))
    }

    /// Creates a session owned by the caller. Only in `normal`.
    pub fn session_create(&mut self, caller: &Caller, name: &str) -> Result<(), EngineError> {
        self.require_live()?;
        let name = SessionName::new(name)?;
        if name.as_str() == crate::kernel::luo::RECORD_SESSION {
            return Err(EngineError::InvalidArgument(format!(
                "session name {name} is reserved for luod's own record; choose another name"
            )));
        }
        if name.as_str() == crate::kernel::luo::SYSTEMD_SESSION {
            return Err(EngineError::InvalidArgument(format!(
                "session name {name} is reserved for systemd's own LUO session (systemd refuses it in a fd store); \
                 choose another name"
            )));
        }
        if self.record.state != State::Normal {
            return Err(EngineError::SessionsLocked {
                what: "creating a session",
                state: self.record.state,
            });
        }
        if self.record.sessions.iter().any(|s| s.name == name) {
            return Err(EngineError::Kernel(KernelError::SessionExists(name.to_string())));
        }
        self.check_quota(caller.uid, (1, 0, 0))?;
        self.kernel.create_session(&name)?;
        let mut next = self.record.clone();
        next.sessions.push(SessionRecord {
            name: name.clone(),
            owner_uid: caller.uid,
            fds: Vec::new(),
            incoming: false,
        });
        if let Err(e) = self.commit(next) {
            let _ = self.kernel.finish_session(&name);
            return Err(e);
        }
        Ok(())
    }

    /// Preserves `fd` under `token` in the caller's session. Only in `normal`:
    /// once `prepare` has checked what the cycle carries, nothing is added.
    pub fn session_preserve(
        &mut self,
        caller: &Caller,
        name: &str,
        token: u64,
        fd: OwnedFd,
    ) -> Result<u64, EngineError> {
        // Before anything touches it: only a memfd is taken. Anything else is
        // closed off the engine lock (a FUSE file's close waits on its server).
        if !memfd::is_memfd(fd.as_fd()) {
            let what = memfd::describe(fd.as_fd());
            super::close_elsewhere(vec![fd]);
            return Err(KernelError::Unsupported { what }.into());
        }
        self.require_live()?;
        let i = self.own_session(caller, name)?;
        if self.record.state != State::Normal {
            return Err(EngineError::SessionsLocked {
                what: "preserving a file",
                state: self.record.state,
            });
        }
        let session = self.record.sessions[i].name.clone();
        if self.token_taken(i, token) {
            return Err(EngineError::Kernel(KernelError::TokenExists {
                session: session.to_string(),
                token,
            }));
        }
        memfd::require_read_write(fd.as_fd())?;
        let size = memfd::size(fd.as_fd()).map_err(|e| EngineError::Io(format!("cannot stat the file: {e}")))?;
        self.check_quota(self.record.sessions[i].owner_uid, (0, 1, size))?;
        self.kernel.preserve_fd(&session, token, fd)?;
        let file = FdRecord {
            token,
            size,
            data: None,
            retrieved: false,
        };
        if let Err(e) = self.record_preserved(i, file) {
            let _ = self.kernel.retrieve_fd(&session, token);
            return Err(e);
        }
        Ok(size)
    }

    /// Whether session `i` holds `token` already (through an index of the
    /// record's tokens, built again after each full write).
    fn token_taken(&mut self, i: usize, token: u64) -> bool {
        let generation = self.generation;
        if self.tokens.as_ref().is_none_or(|(g, _)| *g != generation) {
            self.tokens = Some((generation, crate::record::token_set(&self.record)));
        }
        self.tokens
            .as_ref()
            .is_some_and(|(_, set)| set.contains(&(i as u32, token)))
    }

    /// Writes that `file` is preserved in session `i`, then adopts it: an
    /// entry appended to the record's journal when it takes one, else a
    /// full write (which folds the journal in). Either way it is in the
    /// region before the caller is answered.
    fn record_preserved(&mut self, i: usize, file: FdRecord) -> Result<(), EngineError> {
        let entry = JournalEntry::Preserve {
            session: i as u32,
            token: file.token,
            size: file.size,
        };
        if self.store.append(&entry)? {
            if let Some((_, set)) = self.tokens.as_mut() {
                set.insert((i as u32, file.token));
            }
            self.record.sessions[i].fds.push(file.clone());
            self.journaled_preserve(i, file);
            return Ok(());
        }
        let mut next = self.record.clone();
        next.sessions[i].fds.push(file);
        self.commit(next).map(drop)
    }

    /// The caller's sessions.
    pub fn session_list(&self, caller: &Caller) -> Vec<SessionInfo> {
        self.snapshot().session_list(caller)
    }

    /// Takes back a preserved file after an update. Only in `updated`.
    pub fn session_retrieve(&mut self, caller: &Caller, name: &str, token: u64) -> Result<(OwnedFd, u64), EngineError> {
        self.require_live()?;
        let i = self.own_session(caller, name)?;
        if self.record.state != State::Updated {
            return Err(EngineError::SessionsLocked {
                what: "retrieving a file",
                state: self.record.state,
            });
        }
        let session = self.record.sessions[i].name.clone();
        let Some(j) = self.record.sessions[i].fds.iter().position(|f| f.token == token) else {
            return Err(EngineError::Kernel(KernelError::NoSuchToken {
                session: session.to_string(),
                token,
            }));
        };
        if self.record.sessions[i].fds[j].retrieved {
            return Err(EngineError::Kernel(KernelError::AlreadyRetrieved {
                session: session.to_string(),
                token,
            }));
        }
        let fd = self.kernel.retrieve_fd(&session, token)?;
        let size = memfd::size(fd.as_fd()).unwrap_or(self.record.sessions[i].fds[j].size);
        let mut next = self.record.clone();
        next.sessions[i].fds[j].retrieved = true;
        if let Err(e) = self.commit(next) {
            let _ = self.kernel.adopt_incoming(&session, token, fd);
            return Err(e);
        }
        Ok((fd, size))
    }

    /// Ends the caller's session (root: any uid's session, recorded as an
    /// event when it is another uid's). In `normal` its files are
    /// unpreserved; in `updated` files not retrieved are discarded. Refused
    /// while a cycle is in flight (`prepared`, `frozen`).
    pub fn session_finish(&mut self, caller: &Caller, name: &str) -> Result<(), EngineError> {
        self.require_live()?;
        let i = match self.own_session(caller, name) {
            Err(e) if caller.privileged => self.any_session(name).map(|(i, _)| i).map_err(|_| e)?,
            found => found?,
        };
        if matches!(self.record.state, State::Prepared | State::Frozen) {
            return Err(EngineError::SessionsLocked {
                what: "finishing a session",
                state: self.record.state,
            });
        }
        let foreign = self.record.sessions[i].owner_uid != caller.uid;
        self.end_session(i, foreign.then_some((caller, super::quotas::SESSION_FINISHED_BY_ROOT)))
    }
}
