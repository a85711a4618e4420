//! Per-uid quotas, and the operator's way out of a session that blocks the
//! cycle.
//!
//! - **Quotas.** Every uid but 0 may hold at most [`Quotas::sessions`]
//!   sessions, [`Quotas::files`] preserved files and [`Quotas::bytes`] bytes
//!   of preserved files (luod `--max-sessions-per-uid`, `--max-files-per-uid`,
//!   `--max-bytes-per-uid`). They are checked where sessions and files are
//!   added (`session create`, `session preserve`, and so `vm register`), with
//!   each file's size from `fstat` of the memfd. A memfd can grow after it was
//!   preserved, so `prepare`, `freeze` and `reboot` check every uid's bytes
//!   again, with the sizes as they are now, and refuse while a uid is over its
//!   quota, naming its sessions; the handover itself checks the exact sizes it
//!   records (and a copying backend's store refuses a file whose size changes
//!   while it copies), so a file that grows after that check fails the
//!   handover instead of carrying more than the quota.
//! - **Eviction.** Root (or `CAP_SYS_BOOT`) can `session evict` any uid's
//!   session in `normal`, `prepared` or `updated`, and `session finish`
//!   another uid's session where its owner could. Both release the session's
//!   files and are recorded as an [`Event`] in the record (`luoctl history`).

use super::{Caller, Engine, EngineError, now};
use crate::kernel::KernelError;
use crate::kernel::memfd;
use crate::names::SessionName;
use crate::protocol::HistoryReport;
use crate::record::{Event, HandoverRecord};
use crate::region::Region;
use crate::state::State;
use std::collections::{BTreeMap, HashMap, HashSet};

/// What one uid may hold in luod. uid 0 is exempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Sessions per uid.
    pub sessions: u64,
    /// Preserved files per uid, over all its sessions.
    pub files: u64,
    /// Bytes of preserved files per uid, over all its sessions.
    pub bytes: u64,
}

impl Quotas {
    /// luod's defaults (documented in the README and `luod --help`).
    pub const DEFAULT: Quotas = Quotas {
        sessions: 64,
        files: 1024,
        bytes: 64 << 30,
    };
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas::DEFAULT
    }
}

/// One of the per-uid quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    /// [`Quotas::sessions`].
    Sessions,
    /// [`Quotas::files`].
    Files,
    /// [`Quotas::bytes`].
    Bytes,
}

impl Quota {
    /// The luod flag that sets it.
    pub fn flag(self) -> &'static str {
        match self {
            Quota::Sessions => "--max-sessions-per-uid",
            Quota::Files => "--max-files-per-uid",
            Quota::Bytes => "--max-bytes-per-uid",
        }
    }

    /// What it counts, after a number.
    pub fn unit(self) -> &'static str {
        match self {
            Quota::Sessions => "session(s)",
            Quota::Files => "preserved file(s)",
            Quota::Bytes => "bytes of preserved files",
        }
    }
}

/// The event recorded when root evicts a session.
pub const SESSION_EVICTED: &str = "session-evicted";
/// The event recorded when root finishes another uid's session.
pub const SESSION_FINISHED_BY_ROOT: &str = "session-finished-by-root";

/// The start of a session event's detail: who owned the session. An
/// unprivileged caller sees the events about its own sessions by it.
pub(super) fn owner_prefix(uid: u32) -> String {
    format!("owner uid {uid};")
}

impl<R: Region> Engine<R> {
    /// Sets the per-uid quotas (luod's flags).
    pub fn set_quotas(&mut self, quotas: Quotas) {
        self.quotas = quotas;
    }

    /// The per-uid quotas in force.
    pub fn quotas(&self) -> Quotas {
        self.quotas
    }

    /// Size of each preserved file as it is now (`fstat`), by session and
    /// token; files the kernel interface does not hold keep their recorded size.
    /// Only the sessions `wanted` picks are looked at (one `fstat` per file
    /// of those, none for the others).
    fn live_sizes_of(&self, wanted: impl Fn(&SessionName) -> bool) -> HashMap<(&SessionName, u64), u64> {
        self.kernel
            .preserved()
            .into_iter()
            .filter(|(name, _, _)| wanted(name))
            .filter_map(|(name, token, fd)| memfd::size(fd).ok().map(|size| ((name, token), size)))
            .collect()
    }

    /// Sessions, files and bytes `uid` holds now.
    fn usage(&self, uid: u32) -> (u64, u64, u64) {
        let owned: std::collections::BTreeSet<&SessionName> = self
            .record
            .sessions
            .iter()
            .filter(|s| s.owner_uid == uid)
            .map(|s| &s.name)
            .collect();
        let live = self.live_sizes_of(|name| owned.contains(name));
        let mut usage = (0, 0, 0);
        for s in self.record.sessions.iter().filter(|s| s.owner_uid == uid) {
            usage.0 += 1;
            for f in &s.fds {
                usage.1 += 1;
                usage.2 += live.get(&(&s.name, f.token)).copied().unwrap_or(f.size);
            }
        }
        usage
    }

    /// Refuses to add `adding` sessions, files and bytes to what the owner of
    /// `owner_uid` holds when that would pass one of its quotas.
    pub(super) fn check_quota(&self, owner_uid: u32, adding: (u64, u64, u64)) -> Result<(), EngineError> {
        if owner_uid == 0 {
            return Ok(());
        }
        let used = self.usage(owner_uid);
        let q = self.quotas;
        for (quota, used, adding, limit) in [
            (Quota::Sessions, used.0, adding.0, q.sessions),
            (Quota::Files, used.1, adding.1, q.files),
            (Quota::Bytes, used.2, adding.2, q.bytes),
        ] {
            if adding > 0 && used.saturating_add(adding) > limit {
                return Err(EngineError::QuotaExceeded {
                    quota,
                    uid: owner_uid,
                    used,
                    adding,
                    limit,
                });
            }
        }
        Ok(())
    }

    /// Refuses a record in which a uid (other than 0) holds more bytes than
    /// its quota; `record`'s sizes must be current.
    pub(super) fn check_bytes(&self, record: &HandoverRecord) -> Result<(), EngineError> {
        self.check_bytes_sized(record, |_, f| f.size)
    }

    /// [`check_bytes`](Self::check_bytes) with each file's size from `size`.
    fn check_bytes_sized(
        &self,
        record: &HandoverRecord,
        size: impl Fn(&SessionName, &crate::record::FdRecord) -> u64,
    ) -> Result<(), EngineError> {
        let mut by_uid: BTreeMap<u32, (u64, Vec<String>)> = BTreeMap::new();
        for s in record.sessions.iter().filter(|s| s.owner_uid != 0) {
            let e = by_uid.entry(s.owner_uid).or_default();
            e.0 = s.fds.iter().fold(e.0, |sum, f| sum.saturating_add(size(&s.name, f)));
            e.1.push(s.name.to_string());
        }
        match by_uid.into_iter().find(|(_, (bytes, _))| *bytes > self.quotas.bytes) {
            Some((uid, (bytes, sessions))) => Err(EngineError::QuotaOverrun {
                uid,
                bytes,
                limit: self.quotas.bytes,
                sessions,
            }),
            None => Ok(()),
        }
    }

    /// [`check_bytes`](Self::check_bytes) with every file's size as it is now.
    /// (No copy of the record: the sizes are looked up as the sums are made.)
    /// Only the files of sessions a quota applies to (uids other than 0) are
    /// looked at: root's files, however many, cost nothing here.
    pub(super) fn check_bytes_now(&self) -> Result<(), EngineError> {
        let counted: HashSet<&SessionName> = self
            .record
            .sessions
            .iter()
            .filter(|s| s.owner_uid != 0)
            .map(|s| &s.name)
            .collect();
        if counted.is_empty() {
            return Ok(());
        }
        let live = self.live_sizes_of(|name| counted.contains(name));
        self.check_bytes_sized(&self.record, |name, f| {
            live.get(&(name, f.token)).copied().unwrap_or(f.size)
        })
    }

    /// The session named `name` of any owner: its index and owner.
    pub(super) fn any_session(&self, name: &str) -> Result<(usize, u32), EngineError> {
        let name = SessionName::new(name)?;
        self.record
            .sessions
            .iter()
            .position(|s| s.name == name)
            .map(|i| (i, self.record.sessions[i].owner_uid))
            .ok_or_else(|| EngineError::Kernel(KernelError::NoSuchSession(name.to_string())))
    }

    /// Ends session `i` of the record: removes it with `event` recorded (when
    /// given), then releases its files in the kernel. (The VM table is not
    /// touched: `vm_register` calls this with the table locked.)
    pub(super) fn end_session(&mut self, i: usize, event: Option<(&Caller, &str)>) -> Result<(), EngineError> {
        let session = self.record.sessions[i].name.clone();
        let mut next = self.record.clone();
        let removed = next.sessions.remove(i);
        if let Some((caller, action)) = event {
            let live = self.live_sizes_of(|name| *name == session);
            let bytes: u64 = removed
                .fds
                .iter()
                .map(|f| live.get(&(&session, f.token)).copied().unwrap_or(f.size))
                .sum();
            let pending = removed.fds.iter().filter(|f| !f.retrieved).count();
            next.push_event(Event {
                at: now(),
                uid: caller.uid,
                action: action.into(),
                subject: session.to_string(),
                detail: format!(
                    "{} {} file(s), {bytes} bytes released ({pending} not retrieved) in state {}",
                    owner_prefix(removed.owner_uid),
                    removed.fds.len(),
                    self.record.state
                ),
            });
        }
        self.commit(next)?;
        if let Err(e) = self.kernel.finish_session(&session) {
            tracing::warn!("session {session} did not finish in the kernel: {e}");
        }
        Ok(())
    }

    /// Root releases a session of any uid, with its files, and records it.
    /// Allowed in `normal`, `prepared` (the session leaves the cycle; a VM's
    /// VMM is disconnected) and `updated` (files not retrieved are
    /// discarded); refused in `frozen`, where the record is final.
    pub fn session_evict(&mut self, caller: &Caller, name: &str) -> Result<(), EngineError> {
        self.require_live()?;
        Self::require_privileged(caller, "session evict")?;
        let (i, owner) = self.any_session(name)?;
        if self.record.state == State::Frozen {
            return Err(EngineError::SessionsLocked {
                what: "evicting a session",
                state: self.record.state,
            });
        }
        let session = self.record.sessions[i].name.to_string();
        self.end_session(i, Some((caller, SESSION_EVICTED)))?;
        if let (Some(vm), Some(vms)) = (session.strip_prefix("vm-"), &self.vms) {
            vms.lock().unwrap_or_else(|p| p.into_inner()).forget(vm);
            self.forget_vm_note(vm);
        }
        tracing::warn!("uid {} evicted session {session} of uid {owner}", caller.uid);
        Ok(())
    }

    /// `history`: the cycles, and the events the caller may see (root: all;
    /// others: those it caused and those about its own sessions).
    pub fn history_report(&self, caller: &Caller) -> HistoryReport {
        self.snapshot().history_report(caller)
    }
}
