//! Starting the engine: reading the record, and telling a restart of luod in
//! the same kernel from the first start in a new one.

use super::handover::{Judgement, judge};
use super::{Engine, EngineError, now};
use crate::kernel::{Handoff, Kernel, memfd};
use crate::record::{HandoverRecord, RecordStore, SlotStatus};
use crate::region::Region;
use crate::state::State;
use crate::subsystem::{Blob, Registry};
use std::os::fd::AsFd;
use std::path::PathBuf;

/// Facts about the running kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    /// `/proc/sys/kernel/random/boot_id`: differs after every boot and kexec.
    pub boot_id: String,
    /// `uname -r`.
    pub kernel_release: String,
    /// `/proc/cmdline`.
    pub cmdline: String,
    /// When luod started (for the blackout accounting).
    pub started: u64,
}

impl HostInfo {
    /// Reads the running kernel's facts.
    pub fn current() -> Self {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        HostInfo {
            boot_id: read("/proc/sys/kernel/random/boot_id"),
            kernel_release: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            cmdline: read("/proc/cmdline"),
            started: now(),
        }
    }
}

fn slot_note(slots: &[SlotStatus; 2]) -> String {
    let one = |i: usize| match &slots[i] {
        SlotStatus::Empty => "empty".to_string(),
        SlotStatus::Valid { generation } => format!("generation {generation}"),
        SlotStatus::Invalid { reason } => reason.clone(),
        SlotStatus::Newer { version } => format!("format version {version}"),
    };
    format!("slot A: {}; slot B: {}", one(0), one(1))
}

/// How luod starts the engine, beyond the kernel, registry, region and host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartOptions {
    /// luod's state directory: a stale handover record is kept there
    /// (`stale-handover-BOOT.record`). Without one it is not kept aside.
    pub state_dir: Option<PathBuf>,
}

impl<R: Region> Engine<R> {
    /// [`open_with`](Self::open_with) without options.
    pub fn open(
        kernel: Box<dyn Kernel>,
        registry: Registry,
        store: RecordStore<R>,
        host: HostInfo,
    ) -> Result<Self, EngineError> {
        Self::open_with(kernel, registry, store, host, StartOptions::default())
    }

    /// Starts the engine on `store`.
    ///
    /// - No valid record in a blank region (all zeros, or an empty file) with
    ///   nothing parked: `normal`, a fresh record.
    /// - No valid record otherwise (zeroed headers, a region cut short or of
    ///   another size, garbage, files still parked): nothing is written or
    ///   dropped; `status` says what was found and every change is refused
    ///   until the region is restored or the record discarded (see
    ///   `unreadable.rs`).
    /// - A record written at a handover by another kernel (or by a simulated
    ///   kexec) that this boot provably came from (its command line carries
    ///   the cycle's `luod.handover=` nonce; see `handover.rs`): the new
    ///   kernel's start. Preserved files are restored, the subsystems get
    ///   their sections back, the state is `updated`.
    /// - A handover another boot wrote but this boot did not come from (a
    ///   warm reset after freeze): `normal`, nothing handed out, the stale
    ///   record kept in `options.state_dir`, a note and an event.
    /// - Otherwise luod restarted in the same kernel: the state and sessions
    ///   are the record's, and the files come back from where the kernel
    ///   interface parked them.
    pub fn open_with(
        kernel: Box<dyn Kernel>,
        registry: Registry,
        mut store: RecordStore<R>,
        host: HostInfo,
        options: StartOptions,
    ) -> Result<Self, EngineError> {
        let report = store.load()?;
        if let Some(version) = report.slots.iter().find_map(|s| match s {
            SlotStatus::Newer { version } => Some(*version),
            _ => None,
        }) {
            return Err(EngineError::NewerRecord(version));
        }
        let mut notes = Vec::new();
        let mut kernel = kernel;
        let mut unreadable = None;
        let (generation, record) = match report.latest {
            None => {
                // Blank region and nothing parked: a fresh start. Anything
                // else is kept as it is until the operator decides.
                unreadable = super::unreadable::inspect(&mut *kernel, &mut store, &report.slots)?;
                (0, HandoverRecord::new(kernel.name()))
            }
            Some((generation, record)) => {
                if report.slots.iter().any(|s| matches!(s, SlotStatus::Invalid { .. })) {
                    let note = format!(
                        "a record slot is damaged; using record generation {generation} ({}): if the damaged slot was the newer one, the state rolled back to that generation",
                        slot_note(&report.slots)
                    );
                    tracing::warn!("{note}");
                    notes.push(note);
                }
                if let Some(why) = &report.journal.stopped {
                    let note = format!(
                        "the preserve journal after record generation {generation} ends in an entry that was cut \
                         short or is damaged, ignored with anything after it ({why}): the preserve it held was \
                         never acknowledged; {} entr(ies) before it were applied",
                        report.journal.entries
                    );
                    tracing::warn!("{note}");
                    notes.push(note);
                }
                (generation, record)
            }
        };
        let judgement = judge(record.handover.as_ref(), &host);
        let mut engine = Engine {
            kernel,
            registry,
            store,
            record,
            generation,
            host,
            notes,
            cmdline_needs: Vec::new(),
            handed_over: false,
            vms: None,
            state_dir: options.state_dir,
            unreadable: None,
            quotas: super::Quotas::DEFAULT,
            hooks: None,
            rollback: Default::default(),
            carried_vms: Vec::new(),
            vm_notes: Default::default(),
            sysfs_root: std::path::PathBuf::from("/sys"),
            snap: Default::default(),
            tokens: None,
        };
        if let Some(found) = unreadable {
            engine.notes.push(found.note.clone());
            engine.unreadable = Some(found);
            return Ok(engine);
        }
        match judgement {
            Judgement::Incoming => engine.take_incoming()?,
            Judgement::Stale(why) => {
                engine.set_aside_stale(why)?;
                engine.resume_same_kernel()?;
            }
            Judgement::SameBoot => engine.resume_same_kernel()?,
        }
        engine.note_failed_validation();
        Ok(engine)
    }

    /// First start in the new kernel: restore files and subsystems, enter `updated`.
    fn take_incoming(&mut self) -> Result<(), EngineError> {
        let t = std::time::Instant::now();
        let lap = |what: &str| tracing::debug!("incoming: {what} at {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
        let mut next = self.record.clone();
        let handover = next.handover.take();
        self.kernel.discard_all()?;
        let mut lost = Vec::new();
        for s in &mut next.sessions {
            s.incoming = true;
            if self.kernel.handoff() == Handoff::Kernel {
                if let Err(e) = self.kernel.retrieve_session(&s.name) {
                    lost.extend(
                        s.fds
                            .drain(..)
                            .map(|f| format!("session {} token {}: {e}", s.name, f.token)),
                    );
                }
                continue;
            }
            self.kernel.create_session(&s.name)?;
            let mut kept = Vec::new();
            for f in s.fds.drain(..) {
                let restored = match f.data {
                    Some(i) => {
                        let extent = next.extents.get(i as usize).copied();
                        let bytes = extent
                            .ok_or_else(|| format!("extent {i} missing"))
                            .and_then(|e| self.store.data(&e).map_err(|e| e.to_string()));
                        bytes.and_then(|b| {
                            memfd::from_bytes(&format!("{}:{}", s.name, f.token), b).map_err(|e| e.to_string())
                        })
                    }
                    None => Err("no data was written for it".to_string()),
                };
                match restored.and_then(|fd| {
                    let size = memfd::size(fd.as_fd()).map_err(|e| e.to_string())?;
                    self.kernel
                        .adopt_incoming(&s.name, f.token, fd)
                        .map_err(|e| e.to_string())?;
                    Ok(size)
                }) {
                    Ok(size) => {
                        let mut f = f;
                        f.size = size;
                        f.data = None;
                        kept.push(f);
                    }
                    Err(why) => lost.push(format!("session {} token {}: {why}", s.name, f.token)),
                }
            }
            s.fds = kept;
        }
        lap(&format!("{} session(s) taken from the kernel", next.sessions.len()));
        for l in &lost {
            let note = format!("preserved file lost in the handover: {l}");
            tracing::error!("{note}");
            self.notes.push(note);
        }
        let sections: Vec<(String, Blob)> = next
            .subsystems
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    Blob {
                        version: s.version,
                        data: s.blob.clone(),
                    },
                )
            })
            .collect();
        let running = self.registry.names();
        for (name, _) in sections.iter().filter(|(n, _)| !running.contains(n)) {
            let note = format!(
                "the record holds state of subsystem {name}, which this luod does not run: it was not restored \
                 (start luod with the options that enable {name})"
            );
            tracing::error!("{note}");
            self.notes.push(note);
        }
        for f in self.registry.restore(&sections) {
            let note = format!("subsystem {} failed to restore: {}", f.subsystem, f.error);
            tracing::error!("{note}");
            self.notes.push(note);
        }
        lap("subsystems restored");
        next.state = State::Updated;
        Self::booted_from(&mut next, &self.host.boot_id);
        if let Some(u) = next.update.as_mut() {
            u.timestamps.luod_started = Some(self.host.started);
            u.timestamps.updated = Some(now());
        }
        let from = handover.map(|h| h.kernel_release).unwrap_or_default();
        if let Some(u) = next.update.as_mut() {
            u.from_release = from.clone();
        }
        self.notes.push(format!(
            "came up after a live update from kernel {from} (now {}): {} session(s) to retrieve",
            self.host.kernel_release,
            next.sessions.len()
        ));
        self.commit(next)?;
        lap("record written (state updated)");
        Ok(())
    }

    /// Restart of luod in the same kernel: take the parked files back and
    /// reconcile them with the record.
    fn resume_same_kernel(&mut self) -> Result<(), EngineError> {
        let mut next = self.record.clone();
        if next.handover.take().is_some() {
            let note = "a handover record was written but the kexec did not happen; still frozen".to_string();
            tracing::warn!("{note}");
            self.notes.push(note);
        }
        let recovered = self.kernel.recover()?;
        // Looked up once per file of the record, and the other way round:
        // sets, not scans (a record may hold 100,000 files).
        let parked: std::collections::HashSet<(&crate::names::SessionName, u64)> =
            recovered.iter().map(|(n, t)| (n, *t)).collect();
        let mut changed = false;
        for s in &mut next.sessions {
            if s.incoming && self.kernel.handoff() == Handoff::Kernel {
                // A session of the previous kernel (luod restarted in
                // `updated`): the kernel still holds its files; the park
                // gave back the session fd, since it cannot be retrieved
                // twice. Not an outgoing session to create.
                if let Err(e) = self.kernel.retrieve_session(&s.name) {
                    let name = s.name.clone();
                    s.fds.retain(|f| {
                        if !f.retrieved {
                            let note = format!(
                                "session {name} token {}: the incoming session did not survive luod's restart: {e}",
                                f.token
                            );
                            tracing::error!("{note}");
                            self.notes.push(note);
                        }
                        f.retrieved
                    });
                    changed = true;
                }
                continue;
            }
            if let Err(e) = self.kernel.create_session(&s.name)
                && !matches!(e, crate::kernel::KernelError::SessionExists(_))
            {
                return Err(e.into());
            }
            let before = s.fds.len();
            let name = s.name.clone();
            s.fds.retain(|f| {
                let ok = f.retrieved || parked.contains(&(&name, f.token));
                if !ok {
                    let note = format!(
                        "session {name} token {}: the preserved file did not survive luod's restart",
                        f.token
                    );
                    tracing::error!("{note}");
                    self.notes.push(note);
                }
                ok
            });
            changed |= s.fds.len() != before;
        }
        // Files parked but never acknowledged in the record: drop them.
        let recorded: std::collections::HashSet<(&crate::names::SessionName, u64)> = next
            .sessions
            .iter()
            .flat_map(|s| s.fds.iter().map(move |f| (&s.name, f.token)))
            .collect();
        let unknown: Vec<(crate::names::SessionName, u64)> = recovered
            .iter()
            .filter(|(name, token)| !recorded.contains(&(name, *token)))
            .cloned()
            .collect();
        drop(recorded);
        for (name, token) in unknown {
            tracing::warn!("dropping parked file {name}/{token}: not in the record");
            let _ = self.kernel.retrieve_fd(&name, token);
        }
        if changed || next != self.record {
            self.commit(next)?;
        }
        Ok(())
    }
}
