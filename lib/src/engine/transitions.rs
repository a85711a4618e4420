//! The transitions: prepare, freeze, reboot, finish, cancel.
//!
//! Each one checks the state machine first, then does its steps; when step
//! `k` fails, the undo of steps `k-1..0` runs in reverse and the record is not
//! changed. Only the last step writes the new record generation.

use super::images::{self, Images};
use super::{Caller, Engine, EngineError, hex, now};
use crate::kernel::{Handoff, KernelLoad, RebootOutcome, memfd};
use crate::protocol::{PrepareArgs, TransitionReport};
use crate::record::{
    Cycle, DataSource, HISTORY_LIMIT, Handover, HandoverRecord, KernelImage, Outcome, Section, Update,
};
use crate::region::Region;
use crate::state::{Event, State, transition};
use crate::subsystem::{Blobs, PrepareContext};
use std::os::fd::OwnedFd;
use std::time::Instant;

/// What a successful `reboot` means for luod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rebooted {
    /// The kexec was simulated: luod must exit now with
    /// [`SIMULATED_KEXEC_EXIT`](crate::engine::SIMULATED_KEXEC_EXIT).
    Simulated(TransitionReport),
    /// systemd accepted an orderly `systemctl kexec`: luod stays up, refuses
    /// every change, and exits when systemd stops it.
    Orderly(TransitionReport),
}

/// A target kernel a request gave: its images, checked as files and as a
/// kernel, and the command line it boots with.
#[derive(Debug)]
pub(super) struct Target {
    pub images: Images,
    pub cmdline: String,
}

impl Target {
    /// What the record keeps: the names the client gave, the digests (read
    /// from the descriptors now), the command line.
    pub fn record(&self) -> Result<KernelImage, EngineError> {
        Ok(KernelImage {
            kernel: self.images.kernel.name.clone(),
            kernel_sha256: self.images.kernel.sha256()?,
            initrd: self.images.initrd.as_ref().map(|i| i.name.clone()),
            initrd_sha256: self.images.initrd.as_ref().map(|i| i.sha256()).transpose()?,
            cmdline: self.cmdline.clone(),
        })
    }

    /// Refuses when an image is not the one `args` pins (by SHA-256),
    /// before anything loads. Reads the pinned images whole.
    pub fn verify_pins(&self, args: &PrepareArgs) -> Result<(), EngineError> {
        if let Some(pin) = &args.kernel_sha256 {
            self.images.kernel.verify(pin)?;
        }
        match (&args.initrd_sha256, &self.images.initrd) {
            (Some(pin), Some(initrd)) => initrd.verify(pin),
            (Some(_), None) => Err(EngineError::InvalidArgument(
                "--initrd-sha256 pins an initrd, but no --initrd was given".into(),
            )),
            (None, _) => Ok(()),
        }
    }

    /// Refuses when an image changed since the request came.
    pub fn unchanged(&self) -> Result<(), EngineError> {
        self.images.kernel.unchanged()?;
        self.images.initrd.as_ref().map_or(Ok(()), |i| i.unchanged())
    }
}

fn sections(blobs: Blobs) -> Vec<Section> {
    blobs
        .into_iter()
        .map(|(name, b)| Section {
            name,
            version: b.version,
            blob: b.data,
        })
        .collect()
}

impl<R: Region> Engine<R> {
    /// The target kernel `args` describe, with the images `fds` carries
    /// (checked as files and as a kernel, not yet read whole); `None` when no
    /// kernel is given. `what` names the request for messages.
    pub(super) fn target(
        &self,
        what: &str,
        args: &PrepareArgs,
        fds: Vec<OwnedFd>,
    ) -> Result<Option<Target>, EngineError> {
        let images = images::take(what, args, fds)?;
        self.target_from(args, images)
    }

    /// [`target`](Self::target) with the images already taken.
    pub(super) fn target_from(
        &self,
        args: &PrepareArgs,
        images: Option<Images>,
    ) -> Result<Option<Target>, EngineError> {
        let Some(images) = images else {
            if args.kernel_sha256.is_some() || args.initrd_sha256.is_some() {
                return Err(EngineError::InvalidArgument(
                    "--sha256 and --initrd-sha256 pin the images of --kernel and --initrd: give them".into(),
                ));
            }
            if args.cmdline.is_some() || args.reuse_cmdline {
                return Err(EngineError::InvalidArgument(
                    "--initrd, --cmdline and --reuse-cmdline need --kernel".into(),
                ));
            }
            return Ok(None);
        };
        let cmdline = match (&args.cmdline, args.reuse_cmdline) {
            (Some(c), false) => c.clone(),
            (None, true) => {
                let mut c = self.host.cmdline.clone();
                for need in self.missing_in_cmdline(&c) {
                    c.push(' ');
                    c.push_str(&need);
                }
                c
            }
            (Some(_), true) => {
                return Err(EngineError::InvalidArgument(
                    "give either --cmdline or --reuse-cmdline, not both".into(),
                ));
            }
            (None, false) => {
                return Err(EngineError::InvalidArgument(
                    "--kernel needs --cmdline S or --reuse-cmdline".into(),
                ));
            }
        };
        let missing = self.missing_in_cmdline(&cmdline);
        if !missing.is_empty() {
            return Err(EngineError::InvalidArgument(format!(
                "the target command line lacks {}, which the {} backend needs across the kexec: add it, or use --reuse-cmdline",
                missing.join(" "),
                self.kernel.name()
            )));
        }
        self.kernel.check_image(&images.kernel.name, images.kernel.fd())?;
        Ok(Some(Target { images, cmdline }))
    }

    /// A backend with a real kexec needs a target (unless the kernel has one
    /// loaded already); a backend that copies at freeze always loads it itself.
    pub(super) fn require_target(&self, target: Option<Target>) -> Result<Option<Target>, EngineError> {
        if target.is_none() && self.copies_at_freeze() {
            // Its record sits in memory that may survive a warm reset: only
            // the nonce on a command line luod wrote tells the kexec apart.
            return Err(EngineError::InvalidArgument(format!(
                "the {} backend loads the target kernel itself, so that its command line carries this update's \
                 {}= nonce (an image loaded beforehand cannot prove that the next boot came from its kexec): \
                 give --kernel K (--cmdline S | --reuse-cmdline)",
                self.kernel.name(),
                super::HANDOVER_PARAM
            )));
        }
        if target.is_none() && !self.kernel.simulates_kexec() && !self.kernel.kexec_loaded() {
            return Err(EngineError::InvalidArgument(format!(
                "the {} backend reboots by kexec: give the target with --kernel K (--cmdline S | --reuse-cmdline)",
                self.kernel.name()
            )));
        }
        Ok(target)
    }

    fn report(&self, from: State, started: Instant, notes: Vec<String>) -> TransitionReport {
        let files: u32 = self.record.sessions.iter().map(|s| s.fds.len() as u32).sum();
        TransitionReport {
            from,
            to: self.record.state,
            generation: self.generation,
            sessions: self.record.sessions.len() as u32,
            files,
            bytes: self.record.sessions.iter().flat_map(|s| &s.fds).map(|f| f.size).sum(),
            elapsed_ns: started.elapsed().as_nanos() as u64,
            notes,
        }
    }

    /// Sizes of the preserved files as they are now, in the record.
    pub(super) fn refresh_sizes(&self, next: &mut HandoverRecord) {
        let at = FilePositions::of(next);
        for (name, token, fd) in self.kernel.preserved() {
            if let Some(f) = at.get(next, name, token) {
                f.size = memfd::size(fd).unwrap_or(f.size);
            }
        }
    }

    /// `normal -> prepared`: load the target kernel, prepare every subsystem.
    /// `fds` are the kernel image and initrd `args` names, as the client sent them.
    pub fn prepare(
        &mut self,
        caller: &Caller,
        args: &PrepareArgs,
        fds: Vec<OwnedFd>,
    ) -> Result<TransitionReport, EngineError> {
        let started = Instant::now();
        // Before anything touches them (or drops them): a file of a FUSE
        // filesystem could block luod.
        let fds = images::screen(fds, caller.pid, |i| images::describe(args, i))?;
        Self::require_privileged(caller, "prepare")?;
        self.require_live()?;
        let from = self.record.state;
        let to = transition(from, Event::Prepare)?;
        self.check_bytes_now()?;
        let target = self.target("prepare", args, fds).and_then(|t| self.require_target(t))?;
        self.prepare_target(args, from, to, target, None, started)
    }

    /// The rest of `prepare` (and of `rollback`, with `rollback_of`): the
    /// `pre-prepare` hooks, the nonce, the load, the subsystems, the record.
    pub(super) fn prepare_target(
        &mut self,
        args: &PrepareArgs,
        from: State,
        to: State,
        target: Option<Target>,
        rollback_of: Option<u64>,
        started: Instant,
    ) -> Result<TransitionReport, EngineError> {
        let mut ctx = self.hook_context();
        ctx.cycle = Some(self.record.next_cycle_id);
        ctx.rollback_of = rollback_of;
        if let Some(t) = &target {
            ctx.kernel = Some(t.images.kernel.name.clone());
            ctx.initrd = t.images.initrd.as_ref().map(|i| i.name.clone());
            ctx.cmdline = Some(t.cmdline.clone());
        }
        let (hook_runs, failure) = self.run_hooks(crate::hooks::Phase::PrePrepare, &ctx);
        if let Some(f) = failure {
            return Err(EngineError::HookVeto {
                phase: f.phase.as_str(),
                hook: f.hook,
                reason: f.reason,
            });
        }
        // What luod's start left for later (LUO: its record in a new
        // outgoing session), before anything of this cycle is loaded.
        self.kernel.before_cycle()?;
        // What a rollback of this cycle goes back to.
        let previous = match self.running_kernel() {
            Ok(p) => Some(p),
            Err(why) => {
                tracing::warn!("cycle {}: a rollback will be refused: {why}", self.record.next_cycle_id);
                None
            }
        };
        let mut nonce = None;
        let target = match target {
            Some(mut t) => {
                // A pinned target: the files luod got must be the ones
                // pinned, before anything loads.
                t.verify_pins(args)?;
                // A one-time nonce on the target's command line: the next
                // boot is taken for this cycle's kexec only if it shows it
                // (handover.rs).
                let fresh = super::handover::new_nonce()?;
                t.cmdline = super::handover::stamp_cmdline(&t.cmdline, &fresh);
                nonce = Some(fresh);
                // Digest, load, then make sure the files did not change in
                // between: the record names what was loaded.
                let image = t.record()?;
                let load = KernelLoad {
                    kernel: t.images.kernel.fd(),
                    kernel_name: &t.images.kernel.name,
                    initrd: t.images.initrd.as_ref().map(|i| i.fd()),
                    cmdline: &t.cmdline,
                };
                self.kernel.load_kernel(&load)?;
                if let Err(e) = t.unchanged() {
                    self.unload_quietly(true);
                    return Err(e);
                }
                Some(image)
            }
            None => None,
        };
        let (files, bytes) = self.preserved_totals();
        let ctx = PrepareContext {
            target_cmdline: target.as_ref().map(|t| t.cmdline.clone()),
            preserved_bytes: bytes,
            preserved_files: files,
        };
        let blobs = match self.registry.prepare(&ctx) {
            Ok(b) => b,
            Err(e) => {
                self.unload_quietly(target.is_some());
                return Err(e.into());
            }
        };
        let mut next = self.record.clone();
        if let Some(mut u) = next.update.take() {
            // A rollback from `updated`: cycle N went through, and this one takes it back.
            u.timestamps.finished = Some(now());
            let (sessions, files, bytes) = carried(&next);
            let by = next.next_cycle_id;
            push_history(
                &mut next,
                Cycle {
                    id: u.id,
                    outcome: Outcome::RolledBack,
                    target: u.target.take(),
                    from_release: u.from_release,
                    to_release: self.host.kernel_release.clone(),
                    timestamps: u.timestamps,
                    sessions,
                    files,
                    bytes,
                    previous: u.previous,
                    rollback_of: u.rollback_of,
                    rolled_back_by: Some(by),
                    validation: u.validation,
                    hooks: u.hooks,
                },
            );
            next.live_updates += 1;
        }
        next.state = to;
        let mut subsystems = sections(blobs);
        self.merge_carried_vms(&mut subsystems);
        next.subsystems = subsystems;
        let previous_line = previous.as_ref().map(|p| p.kernel.clone());
        next.update = Some(Update {
            id: next.next_cycle_id,
            from_release: self.host.kernel_release.clone(),
            target,
            timestamps: crate::record::Timestamps {
                prepared: Some(now()),
                ..Default::default()
            },
            nonce,
            previous,
            rollback_of,
            validation: None,
            hooks: hook_runs,
        });
        next.next_cycle_id += 1;
        self.refresh_sizes(&mut next);
        let loaded = next.update.as_ref().is_some_and(|u| u.target.is_some());
        if let Err(e) = self.commit(next) {
            self.registry.cancel();
            self.unload_quietly(loaded);
            return Err(e);
        }
        let mut notes = Vec::new();
        if let Some(u) = self.record.update.as_ref()
            && let Some(t) = u.target.as_ref()
        {
            notes.push(format!("loaded {} (sha256 {})", t.kernel, hex(&t.kernel_sha256)));
            if let Some(nonce) = &u.nonce {
                notes.push(format!(
                    "the target command line carries {}={nonce}: only a boot that shows it takes this update's handover",
                    super::HANDOVER_PARAM
                ));
            }
        }
        match previous_line {
            Some(p) => notes.push(format!("a rollback of this cycle goes back to {p}")),
            None => notes.push(
                "luod could not record the running kernel: a rollback of this cycle will be refused (see luod's log)"
                    .into(),
            ),
        }
        Ok(self.report(from, started, notes))
    }

    fn unload_quietly(&mut self, loaded: bool) {
        if loaded && let Err(e) = self.kernel.unload_kernel() {
            tracing::warn!("unloading the target kernel failed: {e}");
        }
    }

    /// `prepared -> frozen`: every subsystem freezes; the record is written.
    pub fn freeze(&mut self, caller: &Caller) -> Result<TransitionReport, EngineError> {
        let started = Instant::now();
        Self::require_privileged(caller, "freeze")?;
        self.require_live()?;
        let from = self.record.state;
        let to = transition(from, Event::Freeze)?;
        self.check_bytes_now()?;
        let (hook_runs, failure) = self.run_hooks(crate::hooks::Phase::PreFreeze, &self.hook_context());
        if let Some(f) = failure {
            self.record_hooks(hook_runs);
            return Err(EngineError::HookVeto {
                phase: f.phase.as_str(),
                hook: f.hook,
                reason: f.reason,
            });
        }
        let freeze_started = now();
        let blobs = self.registry.freeze()?;
        let mut next = self.record.clone();
        next.state = to;
        for (name, blob) in blobs {
            next.subsystems.retain(|s| s.name != name);
            next.subsystems.push(Section {
                name,
                version: blob.version,
                blob: blob.data,
            });
        }
        self.merge_carried_vms(&mut next.subsystems);
        if let Some(u) = next.update.as_mut() {
            for r in hook_runs {
                crate::record::push_hook(&mut u.hooks, r);
            }
        }
        if let Some(u) = next.update.as_mut() {
            u.timestamps.freeze_started = Some(freeze_started);
            u.timestamps.frozen = Some(now());
        }
        self.refresh_sizes(&mut next);
        if let Err(e) = self.commit(next) {
            self.registry.unfreeze();
            return Err(e);
        }
        if self.copies_at_freeze() {
            // The kexec is real and nothing runs after it: the final record
            // and the preserved files go into the region now.
            if let Err(e) = self.write_handover() {
                self.registry.unfreeze();
                let mut back = self.record.clone();
                back.state = from;
                if let Some(u) = back.update.as_mut() {
                    u.timestamps.freeze_started = None;
                    u.timestamps.frozen = None;
                }
                if let Err(e2) = self.commit(back) {
                    tracing::error!("cannot record the undo of a failed freeze: {e2}");
                }
                return Err(e);
            }
        }
        Ok(self.report(from, started, Vec::new()))
    }

    /// A copying backend with a real kexec writes the handover at `freeze`;
    /// a simulated one at `reboot`.
    fn copies_at_freeze(&self) -> bool {
        self.kernel.handoff() == Handoff::Copy && !self.kernel.simulates_kexec()
    }

    /// `frozen -> (kexec)`; freezes first when `prepared`. A copying backend
    /// writes every preserved file and the record into the region here.
    ///
    /// On failure the subsystems unfreeze and the state is `prepared`.
    pub fn reboot(&mut self, caller: &Caller) -> Result<Rebooted, EngineError> {
        let started = Instant::now();
        Self::require_privileged(caller, "reboot")?;
        self.require_live()?;
        let from = self.record.state;
        if from == State::Prepared {
            self.freeze(caller)?;
        }
        transition(self.record.state, Event::Reboot)?;
        if self.record.handover.is_none() {
            // A file may have grown since freeze: refused, still frozen.
            self.check_bytes_now()?;
        }
        if self.record.handover.is_none()
            && let Err(e) = self.write_handover()
        {
            return Err(self.unfreeze_after(e.to_string()));
        }
        match self.kernel.reboot() {
            Ok(RebootOutcome::Simulated) => {
                self.handed_over = true;
                let mut report = self.report(from, started, Vec::new());
                report.to = State::Updated;
                report.notes.push(format!(
                    "simulated kexec: record generation {} written to {}; luod exits now, start it again on the same region",
                    self.generation,
                    self.store.region().describe()
                ));
                Ok(Rebooted::Simulated(report))
            }
            Ok(RebootOutcome::Orderly(note)) => {
                // systemd stops luod next and kexecs: the record is final.
                // The state stays `frozen` (with its handover) until the new
                // kernel's luod takes it.
                self.handed_over = true;
                let mut report = self.report(from, started, Vec::new());
                report.notes.push(note);
                Ok(Rebooted::Orderly(report))
            }
            Err(e) => Err(self.unfreeze_after(e.to_string())),
        }
    }

    /// Writes the outgoing record (and, for a copying backend, the data).
    fn write_handover(&mut self) -> Result<(), EngineError> {
        let mut next = self.record.clone();
        next.handover = Some(Handover {
            boot_id: self.host.boot_id.clone(),
            simulated: self.kernel.simulates_kexec(),
            kernel_release: self.host.kernel_release.clone(),
            nonce: next.update.as_ref().and_then(|u| u.nonce.clone()),
        });
        if !self.copies_at_freeze() {
            // Written at the reboot itself: the reboot call is now. (A
            // copying backend with a real kexec writes at freeze, and its
            // record cannot change after that without copying again.)
            if let Some(u) = next.update.as_mut() {
                u.timestamps.reboot = Some(now());
            }
        }
        let preserved = self.kernel.preserved_sources();
        let mut sources = Vec::new();
        if self.kernel.handoff() == Handoff::Copy {
            let at = FilePositions::of(&next);
            for (name, token, source) in &preserved {
                let Some(f) = at.get(&mut next, name, *token) else {
                    continue;
                };
                // The store reads the size again as it copies, and refuses a
                // file that changed size in between.
                f.size = source.data_len();
                f.data = Some(sources.len() as u32);
                sources.push(*source);
            }
        }
        if self.kernel.handoff() != Handoff::Copy {
            self.refresh_sizes(&mut next);
        }
        // The sizes the handover records (and a copying backend copies: its
        // store refuses a file whose size changes while it copies).
        self.check_bytes(&next)?;
        let refs: Vec<&dyn DataSource> = sources.iter().map(|s| s as &dyn DataSource).collect();
        let report = self.store.write(&mut next, &refs)?;
        self.generation = report.generation;
        self.record = next;
        Ok(())
    }

    /// A failed reboot: unfreeze, back to `prepared`, record written.
    fn unfreeze_after(&mut self, why: String) -> EngineError {
        for f in self.registry.unfreeze() {
            tracing::error!(
                "while unfreezing after a failed reboot, {} {}: {}",
                f.subsystem,
                f.step,
                f.error
            );
        }
        let mut next = self.record.clone();
        next.state = State::Prepared;
        next.handover = None;
        if let Some(u) = next.update.as_mut() {
            u.timestamps.freeze_started = None;
            u.timestamps.frozen = None;
            u.timestamps.reboot = None;
        }
        if let Err(e) = self.commit(next) {
            tracing::error!("cannot record the unfreeze after a failed reboot: {e}");
        }
        EngineError::RebootFailed(why)
    }

    /// `updated -> normal`: subsystems finish, sessions end, the cycle goes
    /// into the history.
    pub fn finish(&mut self, caller: &Caller) -> Result<TransitionReport, EngineError> {
        self.finish_accepting(caller, false)
    }

    /// `finish`; with `accept`, also when the update failed its validation
    /// (the acceptance is recorded in the cycle).
    pub fn finish_accepting(&mut self, caller: &Caller, accept: bool) -> Result<TransitionReport, EngineError> {
        let started = Instant::now();
        Self::require_privileged(caller, "finish")?;
        self.require_live()?;
        let from = self.record.state;
        let to = transition(from, Event::Finish)?;
        let mut next = self.record.clone();
        self.check_validation(caller, accept, &mut next)?;
        let unclaimed = self.unclaimed_vms();
        if !unclaimed.is_empty() {
            return Err(EngineError::VmsNotRestored(unclaimed));
        }
        // Sessions made in this kernel (a VM registered again after its
        // claim, reclaim.rs) are outgoing: they stay, for the next update.
        let pending: Vec<String> = self
            .record
            .sessions
            .iter()
            .filter(|s| s.incoming)
            .flat_map(|s| {
                s.fds
                    .iter()
                    .filter(|f| !f.retrieved)
                    .map(move |f| format!("{}/{}", s.name, f.token))
            })
            .collect();
        if !pending.is_empty() {
            return Err(EngineError::NotRetrieved(pending.len(), pending.join(", ")));
        }
        self.registry.finish()?;
        let mut notes = Vec::new();
        for s in self.record.sessions.iter().filter(|s| s.incoming) {
            if let Err(e) = self.kernel.finish_session(&s.name) {
                notes.push(format!("session {} did not finish in the kernel: {e}", s.name));
            }
        }
        let report_before = self.report(from, started, Vec::new());
        next.state = to;
        next.sessions.retain(|s| !s.incoming);
        next.subsystems.clear();
        self.carried_vms.clear();
        if let Some(mut u) = next.update.take() {
            u.timestamps.finished = Some(now());
            Self::mark_rolled_back(&mut next, &u);
            push_history(
                &mut next,
                Cycle {
                    id: u.id,
                    outcome: Outcome::Finished,
                    target: u.target.take(),
                    from_release: u.from_release,
                    to_release: self.host.kernel_release.clone(),
                    timestamps: u.timestamps,
                    sessions: report_before.sessions,
                    files: report_before.files,
                    bytes: report_before.bytes,
                    previous: u.previous,
                    rollback_of: u.rollback_of,
                    rolled_back_by: None,
                    validation: u.validation,
                    hooks: u.hooks,
                },
            );
        }
        next.live_updates += 1;
        self.commit(next)?;
        // post-finish: after the cycle is closed; their summaries join it in the history.
        let mut ctx = self.hook_context();
        if let Some(c) = self.record.history.last() {
            ctx.cycle = Some(c.id);
            ctx.rollback_of = c.rollback_of;
            ctx.kernel = c.target.as_ref().map(|t| t.kernel.clone());
        }
        let (runs, _) = self.run_hooks(crate::hooks::Phase::PostFinish, &ctx);
        if !runs.is_empty() {
            let mut next = self.record.clone();
            if let Some(c) = next.history.last_mut() {
                for r in runs {
                    crate::record::push_hook(&mut c.hooks, r);
                }
            }
            if let Err(e) = self.commit(next) {
                tracing::error!("cannot record the post-finish hooks: {e}");
            }
        }
        let mut report = self.report(from, started, notes);
        (report.sessions, report.files, report.bytes) =
            (report_before.sessions, report_before.files, report_before.bytes);
        Ok(report)
    }

    /// `prepared | frozen -> normal`: unfreeze if frozen, cancel every
    /// subsystem, unload the target kernel. Sessions stay preserved.
    pub fn cancel(&mut self, caller: &Caller) -> Result<TransitionReport, EngineError> {
        let started = Instant::now();
        Self::require_privileged(caller, "cancel")?;
        self.require_live()?;
        let from = self.record.state;
        let to = transition(from, Event::Cancel)?;
        let mut notes = Vec::new();
        let mut failures = Vec::new();
        if from == State::Frozen {
            failures.extend(self.registry.unfreeze());
        }
        failures.extend(self.registry.cancel());
        for f in failures {
            notes.push(format!("subsystem {} failed {}: {}", f.subsystem, f.step, f.error));
        }
        let mut next = self.record.clone();
        let loaded = next.update.as_ref().is_some_and(|u| u.target.is_some());
        self.unload_quietly(loaded);
        self.carried_vms.clear();
        next.state = to;
        next.handover = None;
        next.subsystems.clear();
        if let Some(mut u) = next.update.take() {
            u.timestamps.cancelled = Some(now());
            let files = next.sessions.iter().map(|s| s.fds.len() as u32).sum();
            let bytes = next.sessions.iter().flat_map(|s| &s.fds).map(|f| f.size).sum();
            let sessions = next.sessions.len() as u32;
            push_history(
                &mut next,
                Cycle {
                    id: u.id,
                    outcome: Outcome::Cancelled,
                    target: u.target.take(),
                    from_release: u.from_release,
                    to_release: String::new(),
                    timestamps: u.timestamps,
                    sessions,
                    files,
                    bytes,
                    previous: u.previous,
                    rollback_of: u.rollback_of,
                    rolled_back_by: None,
                    validation: u.validation,
                    hooks: u.hooks,
                },
            );
        }
        self.commit(next)?;
        Ok(self.report(from, started, notes))
    }
}

/// Sessions, files and bytes the record carries.
fn carried(record: &HandoverRecord) -> (u32, u32, u64) {
    (
        record.sessions.len() as u32,
        record.sessions.iter().map(|s| s.fds.len() as u32).sum(),
        record.sessions.iter().flat_map(|s| &s.fds).map(|f| f.size).sum(),
    )
}

fn push_history(record: &mut HandoverRecord, cycle: Cycle) {
    record.history.push(cycle);
    let excess = record.history.len().saturating_sub(HISTORY_LIMIT);
    record.history.drain(..excess);
}

/// Where each file of a record is, by session name and token: one pass over
/// the record instead of a search per file.
struct FilePositions {
    sessions: std::collections::HashMap<crate::names::SessionName, (usize, std::collections::HashMap<u64, usize>)>,
}

impl FilePositions {
    fn of(record: &HandoverRecord) -> Self {
        let mut sessions = std::collections::HashMap::with_capacity(record.sessions.len());
        for (i, s) in record.sessions.iter().enumerate() {
            // The first session of a name, as a search would find.
            sessions.entry(s.name.clone()).or_insert_with(|| {
                let mut tokens = std::collections::HashMap::with_capacity(s.fds.len());
                for (j, f) in s.fds.iter().enumerate() {
                    tokens.entry(f.token).or_insert(j);
                }
                (i, tokens)
            });
        }
        FilePositions { sessions }
    }

    /// The file `token` of session `name` in `record` (the record these
    /// positions were taken of).
    fn get<'r>(
        &self,
        record: &'r mut HandoverRecord,
        name: &crate::names::SessionName,
        token: u64,
    ) -> Option<&'r mut crate::record::FdRecord> {
        let (i, tokens) = self.sessions.get(name)?;
        let j = tokens.get(&token)?;
        record.sessions.get_mut(*i)?.fds.get_mut(*j)
    }
}
