//! What the read requests (`status`, `history`, `session list`, `vm list`)
//! see: a copy of the engine's committed state, published by the thread
//! that runs changes after each of them, so reads never wait for a change in
//! progress. The views a caller gets are computed here, for the engine's own
//! methods and for luod's readers alike, so both filter the same way.

use super::quotas::owner_prefix;
use super::vms::{peer_closed, saved_vms_of, vm_session};
use super::{Caller, Engine, blackout, summary};
use crate::progress::ProgressCell;
use crate::protocol::{CycleSummary, FileInfo, HistoryReport, SessionInfo, StatusReport, VmInfo};
use crate::record::{HandoverRecord, SessionRecord};
use crate::region::Region;
use crate::state::State;
use std::os::unix::net::UnixStream;

/// The engine's committed state, as of the last change, plus a view of the
/// change in progress.
#[derive(Debug)]
pub struct Snapshot {
    record: HandoverRecord,
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
    progress: ProgressCell,
    reboot_path: Option<crate::systemd::RebootPathCell>,
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
        Snapshot {
            record: self.record.clone(),
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
            progress: self.registry.progress().clone(),
            reboot_path: self.kernel.reboot_path_cell(),
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
        self.record.state
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
            .sessions
            .iter()
            .filter(|s| caller.privileged || s.owner_uid == caller.uid)
            .map(session_info)
            .collect();
        let last_cycle = match &self.record.update {
            Some(u) => Some(CycleSummary {
                id: u.id,
                outcome: "in-progress".into(),
                target_kernel: u.target.as_ref().map(|t| t.kernel.clone()),
                timestamps: u.timestamps.clone(),
                blackout_ns: blackout(&u.timestamps),
            }),
            None => self.record.history.last().map(summary),
        };
        StatusReport {
            state: self.record.state,
            backend: self.backend.clone(),
            region: self.region.clone(),
            generation: self.generation,
            sessions,
            subsystems: self.subsystems.clone(),
            last_cycle,
            live_updates: self.record.live_updates,
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
            cycles: self.record.history.clone(),
            events: self
                .record
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
            .sessions
            .iter()
            .filter(|s| s.owner_uid == caller.uid)
            .map(session_info)
            .collect()
    }

    /// `vm list`: the VMs the caller may see (all for a privileged caller).
    pub fn vm_list(&self, caller: &Caller) -> Vec<VmInfo> {
        let visible = |uid: u32| caller.privileged || uid == caller.uid;
        if self.record.state == State::Updated {
            return saved_vms_of(&self.record)
                .into_iter()
                .filter(|v| visible(v.owner_uid))
                .map(|v| {
                    let session = self
                        .record
                        .sessions
                        .iter()
                        .find(|s| s.name.as_str() == vm_session(&v.name));
                    let phase = match session {
                        None => "abandoned",
                        Some(s) if s.fds.iter().all(|f| f.retrieved) => "claimed",
                        Some(_) => "awaiting-claim",
                    };
                    VmInfo {
                        name: v.name,
                        owner_uid: v.owner_uid,
                        tokens: v.tokens,
                        phase: phase.into(),
                    }
                })
                .collect();
        }
        self.vms
            .iter()
            .filter(|v| visible(v.owner_uid))
            .map(|v| VmInfo {
                name: v.name.clone(),
                owner_uid: v.owner_uid,
                tokens: v.tokens.clone(),
                phase: if v.conn.as_ref().is_some_and(|c| !peer_closed(c)) {
                    "registered"
                } else {
                    "disconnected"
                }
                .into(),
            })
            .collect()
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
