//! What the read requests (`status`, `history`, `session list`, `vm list`)
//! see: a copy of the engine's committed state, published by the thread
//! that runs changes after each of them, so reads never wait for a change in
//! progress. The views a caller gets are computed here, for the engine's own
//! methods and for luod's readers alike, so both filter the same way.

use super::quotas::owner_prefix;
use super::vms::{VmNote, VmNotes, check_detail, peer_closed, saved_vms_of, vm_session};
use super::{Caller, Engine, EngineError, blackout, summary};
use crate::progress::ProgressCell;
use crate::protocol::{CycleSummary, FileInfo, HistoryReport, SessionInfo, StatusReport, VmInfo};
use crate::record::{FdRecord, HandoverRecord, SessionRecord};
use crate::region::Region;
use crate::state::State;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};

/// The engine's committed state, as of the last change, plus a view of the
/// change in progress.
#[derive(Debug)]
pub struct Snapshot {
    record: SnapRecord,
    generation: u64,
    backend: String,
    region: String,
    subsystems: Vec<String>,
    /// The engine's notes, then the park's as of the snapshot.
    notes: Vec<String>,
    /// The park's notes, read live: its watcher adds one when the holder
    /// is replaced, with no request.
    park_notes: Option<crate::holder::ParkNotes>,
    vms: Vec<VmRow>,
    /// What VMMs reported (shared: a report changes it for every snapshot).
    vm_notes: VmNotes,
    progress: ProgressCell,
    reboot_path: Option<crate::systemd::RebootPathCell>,
}

/// Reports kept before those of VMs luod does not know now are dropped.
const MAX_VM_NOTES: usize = 4096;

/// Files preserved through the journal since a snapshot's base record was
/// copied, in order: (session position, file). Shared by the engine, which
/// appends, and the snapshots, each of which reads its own prefix.
pub(super) type PreserveLog = Arc<Mutex<Vec<(usize, FdRecord)>>>;

/// The engine's copy of its record for snapshots, taken at a full write and
/// shared by every snapshot until the next one; the preserves journaled
/// since go to `log` instead of a new copy each (so publishing a snapshot
/// after a preserve does not cost a copy of the whole record).
#[derive(Debug)]
pub(super) struct SnapBase {
    generation: u64,
    base: Arc<HandoverRecord>,
    files: u64,
    pub(super) log: PreserveLog,
}

/// The record as of a snapshot: the shared base plus the first `len`
/// entries of the log, put together the first time a reader needs it.
#[derive(Debug)]
struct SnapRecord {
    base: Arc<HandoverRecord>,
    log: PreserveLog,
    len: usize,
    full: OnceLock<HandoverRecord>,
}

impl SnapRecord {
    fn get(&self) -> &HandoverRecord {
        if self.len == 0 {
            return &self.base;
        }
        self.full.get_or_init(|| {
            let mut record = (*self.base).clone();
            let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
            for (i, f) in &log[..self.len] {
                if let Some(s) = record.sessions.get_mut(*i) {
                    s.fds.push(f.clone());
                }
            }
            record
        })
    }
}

/// A registered VM as the snapshot keeps it.
#[derive(Debug)]
struct VmRow {
    name: String,
    owner_uid: u32,
    tokens: Vec<u64>,
    /// A duplicate of its VMM's connection, to see whether the VMM closed it.
    conn: Option<UnixStream>,
}

fn session_info(s: &SessionRecord) -> SessionInfo {
    SessionInfo {
        name: s.name.to_string(),
        owner_uid: s.owner_uid,
        files: s
            .fds
            .iter()
            .map(|f| FileInfo {
                token: f.token,
                size: f.size,
                retrieved: f.retrieved,
            })
            .collect(),
        incoming: s.incoming,
    }
}

impl<R: Region> Engine<R> {
    /// A copy of the committed state for readers. The VMs' connections are
    /// duplicated (a duplicate that cannot be made shows as disconnected).
    pub fn snapshot(&self) -> Snapshot {
        let vms = match &self.vms {
            Some(vms) => super::vms::lock(vms)
                .rows()
                .map(|(name, owner_uid, tokens, conn)| VmRow {
                    name: name.to_string(),
                    owner_uid,
                    tokens: tokens.to_vec(),
                    conn: conn.and_then(|c| c.try_clone().ok()),
                })
                .collect(),
            None => Vec::new(),
        };
        let mut cache = self.snap.lock().unwrap_or_else(|p| p.into_inner());
        let reuse = cache.as_ref().is_some_and(|c| {
            c.generation == self.generation
                && c.log.lock().unwrap_or_else(|p| p.into_inner()).len() as u64
                    <= crate::record::MIN_ENTRIES_BEFORE_FOLD.max(c.files)
        });
        if !reuse {
            *cache = Some(SnapBase {
                generation: self.generation,
                base: Arc::new(self.record.clone()),
                files: self.record.sessions.iter().map(|s| s.fds.len() as u64).sum(),
                log: Arc::default(),
            });
        }
        let base = cache.as_ref().expect("set above");
        let record = SnapRecord {
            base: base.base.clone(),
            log: base.log.clone(),
            len: base.log.lock().unwrap_or_else(|p| p.into_inner()).len(),
            full: OnceLock::new(),
        };
        drop(cache);
        Snapshot {
            record,
            generation: self.generation,
            backend: self.kernel.name().to_string(),
            region: self.store.region().describe(),
            subsystems: self.registry.names(),
            notes: match self.kernel.park_notes_cell() {
                Some(_) => self.notes.clone(),
                None => self.notes.iter().cloned().chain(self.kernel.park_notes()).collect(),
            },
            park_notes: self.kernel.park_notes_cell(),
            vms,
            vm_notes: self.vm_notes.clone(),
            progress: self.registry.progress().clone(),
            reboot_path: self.kernel.reboot_path_cell(),
        }
    }

    /// Tells the snapshots to come that the file `file` was preserved in
    /// session `i` through the journal (the record changed without a new
    /// generation).
    pub(super) fn journaled_preserve(&self, i: usize, file: FdRecord) {
        let cache = self.snap.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.as_ref().filter(|c| c.generation == self.generation) {
            c.log.lock().unwrap_or_else(|p| p.into_inner()).push((i, file));
        }
    }

    /// The cell where a change in progress shows its step and what it
    /// waits for (shared with the subsystems and with every [`Snapshot`]).
    pub fn progress(&self) -> &ProgressCell {
        self.registry.progress()
    }
}

impl Snapshot {
    /// The state as of the last change.
    pub fn state(&self) -> State {
        self.record.get().state
    }

    /// The backend's name, without building a whole `status` (which waits
    /// for a reboot path still being detected).
    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// `status`: everything a caller may see.
    pub fn status(&self, caller: &Caller) -> StatusReport {
        let sessions = self
            .record
            .get()
            .sessions
            .iter()
            .filter(|s| caller.privileged || s.owner_uid == caller.uid)
            .map(session_info)
            .collect();
        let last_cycle = match &self.record.get().update {
            Some(u) => Some(CycleSummary {
                id: u.id,
                outcome: "in-progress".into(),
                target_kernel: u.target.as_ref().map(|t| t.kernel.clone()),
                timestamps: u.timestamps.clone(),
                blackout_ns: blackout(&u.timestamps),
            }),
            None => self.record.get().history.last().map(summary),
        };
        StatusReport {
            state: self.record.get().state,
            backend: self.backend.clone(),
            region: self.region.clone(),
            generation: self.generation,
            sessions,
            subsystems: self.subsystems.clone(),
            last_cycle,
            live_updates: self.record.get().live_updates,
            notes: match &self.park_notes {
                Some(cell) => {
                    let park = cell.lock().unwrap_or_else(|p| p.into_inner());
                    self.notes.iter().chain(park.iter()).cloned().collect()
                }
                None => self.notes.clone(),
            },
            in_progress: self.progress.get(),
            reboot_path: self
                .reboot_path
                .as_ref()
                .map(|c| c.get())
                .map(|p| crate::protocol::RebootPathInfo {
                    path: p.name().into(),
                    detail: p.describe(),
                }),
        }
    }

    /// `history`: past cycles, and the events the caller may see (all for a
    /// privileged caller; else its own, and those about its sessions).
    pub fn history_report(&self, caller: &Caller) -> HistoryReport {
        let own = owner_prefix(caller.uid);
        HistoryReport {
            cycles: self.record.get().history.clone(),
            events: self
                .record
                .get()
                .events
                .iter()
                .filter(|e| caller.privileged || e.uid == caller.uid || e.detail.starts_with(&own))
                .cloned()
                .collect(),
        }
    }

    /// `session list`: the caller's own sessions.
    pub fn session_list(&self, caller: &Caller) -> Vec<SessionInfo> {
        self.record
            .get()
            .sessions
            .iter()
            .filter(|s| s.owner_uid == caller.uid)
            .map(session_info)
            .collect()
    }

    /// `vm report`: what VM `name`'s VMM says of it, kept in memory for
    /// `vm list` (a value given as `None` stays as it was). Allowed to the
    /// uid whose VM it is (registered, or carried by the update) and to a
    /// privileged caller; to anyone else the VM does not exist. Never waits
    /// for a change in progress (a VM call included): it touches only the
    /// reports.
    pub fn vm_report(
        &self,
        caller: &Caller,
        name: &str,
        detail: Option<String>,
        blackout_ms: Option<u64>,
    ) -> Result<(), EngineError> {
        let known = self.vm_owners();
        match known.iter().find(|(n, _)| n == name) {
            Some((_, owner)) if caller.privileged || *owner == caller.uid => {}
            _ => return Err(EngineError::NoSuchVm(name.to_string())),
        }
        if let Some(d) = &detail {
            check_detail(name, d)?;
        }
        let mut notes = self.vm_notes.lock().unwrap_or_else(|p| p.into_inner());
        // A report outlives a moment when its VM is not listed (after
        // `finish`, until its VMM registers again): it goes when the VM is
        // abandoned or evicted. Only a table grown past MAX_VM_NOTES drops
        // the reports of VMs luod does not know now.
        if notes.len() >= MAX_VM_NOTES {
            notes.retain(|n, _| known.iter().any(|(k, _)| k == n));
        }
        let note = notes.entry(name.to_string()).or_default();
        if detail.is_some() {
            note.detail = detail;
        }
        if blackout_ms.is_some() {
            note.blackout_ms = blackout_ms;
        }
        Ok(())
    }

    /// Every VM `vm list` would show root, with its owner.
    fn vm_owners(&self) -> Vec<(String, u32)> {
        if self.record.get().state == State::Updated {
            saved_vms_of(self.record.get())
                .into_iter()
                .map(|v| (v.name, v.owner_uid))
                .collect()
        } else {
            self.vms.iter().map(|v| (v.name.clone(), v.owner_uid)).collect()
        }
    }

    /// What VM `name`'s VMM reported, if anything.
    fn note(&self, name: &str) -> VmNote {
        self.vm_notes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    /// `vm list`: the VMs the caller may see (all for a privileged caller).
    pub fn vm_list(&self, caller: &Caller) -> Vec<VmInfo> {
        let visible = |uid: u32| caller.privileged || uid == caller.uid;
        if self.record.get().state == State::Updated {
            return saved_vms_of(self.record.get())
                .into_iter()
                .filter(|v| visible(v.owner_uid))
                .map(|v| {
                    let session = self
                        .record
                        .get()
                        .sessions
                        .iter()
                        .find(|s| s.name.as_str() == vm_session(&v.name));
                    let phase = match session {
                        None => "abandoned",
                        // Claimed and registered again in this kernel (reclaim.rs).
                        Some(s) if !s.incoming => self.vm_phase(&v.name).unwrap_or("claimed"),
                        Some(s) if s.fds.iter().all(|f| f.retrieved) => "claimed",
                        Some(_) => "awaiting-claim",
                    };
                    let note = self.note(&v.name);
                    VmInfo {
                        name: v.name,
                        owner_uid: v.owner_uid,
                        tokens: v.tokens,
                        phase: phase.into(),
                        detail: note.detail,
                        blackout_ms: note.blackout_ms,
                    }
                })
                .collect();
        }
        self.vms
            .iter()
            .filter(|v| visible(v.owner_uid))
            .map(|v| {
                let note = self.note(&v.name);
                VmInfo {
                    name: v.name.clone(),
                    owner_uid: v.owner_uid,
                    tokens: v.tokens.clone(),
                    phase: self.vm_phase(&v.name).unwrap_or("disconnected").into(),
                    detail: note.detail,
                    blackout_ms: note.blackout_ms,
                }
            })
            .collect()
    }

    /// A registered VM's phase: `registered` while its VMM is connected.
    fn vm_phase(&self, name: &str) -> Option<&'static str> {
        let v = self.vms.iter().find(|v| v.name == name)?;
        Some(if v.conn.as_ref().is_some_and(|c| !peer_closed(c)) {
            "registered"
        } else {
            "disconnected"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{HostInfo, now};
    use crate::kernel::fake::FakeKernel;
    use crate::kernel::memfd;
    use crate::progress::Progress;
    use crate::record::RecordStore;
    use crate::region::MemRegion;
    use crate::subsystem::{Blob, PrepareContext, Registry, Subsystem, SubsystemError};
    use std::sync::{Arc, Mutex};

    /// A subsystem that notes what the progress cell shows while it freezes.
    #[derive(Debug, Default)]
    struct Probe {
        cell: ProgressCell,
        seen: Arc<Mutex<Option<Progress>>>,
    }

    impl Subsystem for Probe {
        fn name(&self) -> &str {
            "probe"
        }
        fn set_progress(&mut self, progress: ProgressCell) {
            self.cell = progress;
        }
        fn prepare(&mut self, _: &PrepareContext) -> Result<Option<Blob>, SubsystemError> {
            Ok(None)
        }
        fn freeze(&mut self) -> Result<Option<Blob>, SubsystemError> {
            *self.seen.lock().unwrap() = self.cell.get();
            Ok(None)
        }
        fn cancel(&mut self) -> Result<(), SubsystemError> {
            Ok(())
        }
        fn unfreeze(&mut self) -> Result<(), SubsystemError> {
            Ok(())
        }
        fn restore(&mut self, _: Option<&Blob>) -> Result<(), SubsystemError> {
            Ok(())
        }
        fn finish(&mut self) -> Result<(), SubsystemError> {
            Ok(())
        }
    }

    fn engine() -> (Engine<MemRegion>, Arc<Mutex<Option<Progress>>>) {
        let probe = Probe::default();
        let seen = probe.seen.clone();
        let mut registry = Registry::new();
        registry.register(Box::new(probe)).unwrap();
        let host = HostInfo {
            boot_id: "boot-1".into(),
            kernel_release: "6.19.0-test".into(),
            cmdline: "console=ttyS0".into(),
            started: now(),
        };
        let store = RecordStore::new(MemRegion::zeroed(8 << 20)).unwrap();
        let engine = Engine::open(Box::new(FakeKernel::new().0), registry, store, host).unwrap();
        (engine, seen)
    }

    const USER: Caller = Caller {
        uid: 1000,
        pid: 1,
        privileged: false,
    };

    #[test]
    fn a_snapshot_keeps_the_state_it_was_taken_in_and_filters_like_the_engine() {
        let (mut e, _) = engine();
        e.session_create(&Caller::ROOT, "root-s").unwrap();
        e.session_create(&USER, "user-s").unwrap();
        let fd = memfd::from_bytes("t", b"abc").unwrap();
        e.session_preserve(&USER, "user-s", 1, fd).unwrap();
        let before = e.snapshot();
        for caller in [Caller::ROOT, USER] {
            assert_eq!(before.status(&caller), e.status(&caller));
            assert_eq!(before.history_report(&caller), e.history_report(&caller));
            assert_eq!(before.session_list(&caller), e.session_list(&caller));
            assert_eq!(before.vm_list(&caller), e.vm_list(&caller));
        }
        let names = |s: &StatusReport| s.sessions.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&before.status(&Caller::ROOT)), ["root-s", "user-s"]);
        assert_eq!(names(&before.status(&USER)), ["user-s"]);

        e.prepare(&Caller::ROOT, &Default::default(), Vec::new()).unwrap();
        assert_eq!(before.state(), State::Normal, "a copy: the change does not show in it");
        assert_eq!(e.snapshot().state(), State::Prepared);
    }

    #[test]
    fn a_change_in_progress_shows_in_every_snapshot_with_the_subsystem_it_waits_for() {
        let (mut e, seen) = engine();
        e.prepare(&Caller::ROOT, &Default::default(), Vec::new()).unwrap();
        let snapshot = e.snapshot();
        assert_eq!(snapshot.status(&Caller::ROOT).in_progress, None);
        {
            let _running = e.progress().clone().begin("freeze");
            assert_eq!(
                snapshot.status(&USER).in_progress.map(|p| p.step),
                Some("freeze".into())
            );
            e.freeze(&Caller::ROOT).unwrap();
        }
        let during = seen
            .lock()
            .unwrap()
            .clone()
            .expect("the probe saw the freeze in progress");
        assert_eq!(during.step, "freeze");
        assert_eq!(during.waiting_for.as_deref(), Some("subsystem probe"));
        assert_eq!(snapshot.status(&Caller::ROOT).in_progress, None, "over");
    }
}
