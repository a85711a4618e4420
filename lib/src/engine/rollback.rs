//! Hooks in the cycle, validation, and rollback by live update.
//!
//! - Hooks (`crate::hooks`) run at `pre-prepare`, `pre-freeze`,
//!   `post-update` (first thing luod's engine thread does in the new
//!   kernel, before any client request is served: a retrieve or claim waits
//!   behind it), `post-finish` and `on-failure`. Their summaries go into the
//!   cycle ([`Update::hooks`], then the history).
//! - A failing `post-update` hook is a failed validation
//!   ([`Update::validation`]): `finish` refuses until an operator accepts it,
//!   or luod rolls back at once with `rollback = "auto"`.
//! - At `prepare` luod records the kernel running now ([`Update::previous`]):
//!   the target of the luod kexec this boot came from
//!   ([`HandoverRecord::booted`]), else the operator's
//!   `--rollback-kernel` (with `--rollback-initrd`, `--rollback-cmdline`),
//!   else `/boot/vmlinuz-RELEASE` and `/boot/initrd.img-RELEASE`. These are
//!   root's paths (luod's configuration, or a path root or a `CAP_SYS_BOOT`
//!   caller gave at `prepare`), never a path an unprivileged client names,
//!   and luod opens them only when they belong to root and nobody else may
//!   write to them.
//! - `rollback` (in `updated`, or in `normal` while still on the boot the
//!   cycle led to) prepares a cycle back to that kernel, after checking its
//!   digests; freeze and reboot follow as for any cycle. From `updated` the
//!   incoming sessions and VMs, not taken back yet, are carried again as
//!   they are.

use super::vms::{VmSaved, saved_vms_of};
use super::{Caller, Engine, EngineError, hex, now};
use crate::hooks::{HookContext, HookFailure, Hooks, Phase};
use crate::protocol::{ImageFile, PrepareArgs, TransitionReport};
use crate::record::{Booted, HookRun, KernelImage, Outcome, Update, Validation, push_hook};
use crate::region::Region;
use crate::state::State;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// `rollback` settings (luod `--rollback`, `--rollback-kernel`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RollbackConfig {
    /// Roll back at once when a `post-update` hook fails.
    pub auto: bool,
    /// The running kernel's image, when this boot did not come from a luod
    /// kexec (default `/boot/vmlinuz-$(uname -r)`).
    pub kernel: Option<PathBuf>,
    /// Its initrd (default `/boot/initrd.img-$(uname -r)` when it exists).
    pub initrd: Option<PathBuf>,
    /// Its command line (default `/proc/cmdline`).
    pub cmdline: Option<String>,
}

/// What luod's engine thread does after the `post-update` hooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterValidation {
    /// Nothing ran, or every hook passed, or the failure waits for an
    /// operator.
    Serve,
    /// The validation failed and `rollback = "auto"`: roll back now.
    RollBack,
}

/// Events of the record about hooks that ran outside a cycle.
pub const HOOK_EVENT: &str = "hook-failed";

/// Reads a file luod opens on root's word: it must be a regular file of
/// root's that nobody else may write. Returns it open, with its digest.
fn open_trusted(path: &Path, what: &str) -> Result<(OwnedFd, [u8; 32]), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{what} {} cannot be opened: {e}", path.display()))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("{what} {}: fstat failed: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{what} {} is not a regular file", path.display()));
    }
    if meta.uid() != 0 || meta.permissions().mode() & 0o022 != 0 {
        return Err(format!(
            "{what} {} is refused: it must belong to root and not be writable by group or others \
             (uid {}, mode {:04o})",
            path.display(),
            meta.uid(),
            meta.permissions().mode() & 0o7777
        ));
    }
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut reader = &file;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("{what} {} cannot be read: {e}", path.display())),
        }
    }
    Ok((file.into(), h.finalize().into()))
}

impl<R: Region> Engine<R> {
    /// Runs hooks from `hooks` (none when not set).
    pub fn set_hooks(&mut self, hooks: Hooks) {
        self.hooks = Some(hooks);
    }

    /// Rollback settings.
    pub fn set_rollback(&mut self, config: RollbackConfig) {
        self.rollback = config;
    }

    /// What hooks are told about the cycle in flight.
    pub(super) fn hook_context(&self) -> HookContext {
        let u = self.record.update.as_ref();
        let t = u.and_then(|u| u.target.as_ref());
        HookContext {
            phase: String::new(),
            cycle: u.map(|u| u.id),
            state: self.record.state.to_string(),
            backend: self.kernel.name().into(),
            release: self.host.kernel_release.clone(),
            kernel: t.map(|t| t.kernel.clone()),
            kernel_sha256: t.map(|t| hex(&t.kernel_sha256)),
            initrd: t.and_then(|t| t.initrd.clone()),
            cmdline: t.map(|t| t.cmdline.clone()),
            previous_kernel: u.and_then(|u| u.previous.as_ref()).map(|p| p.kernel.clone()),
            rollback_of: u.and_then(|u| u.rollback_of),
            sessions: self.record.sessions.len() as u64,
            files: self.record.sessions.iter().map(|s| s.fds.len() as u64).sum(),
            failed_step: None,
            failure: None,
        }
    }

    /// Runs `phase`'s hooks with `ctx`: their summaries and the first
    /// failure.
    pub(super) fn run_hooks(&self, phase: Phase, ctx: &HookContext) -> (Vec<HookRun>, Option<HookFailure>) {
        match &self.hooks {
            Some(h) => {
                let out = h.run(phase, ctx, self.registry.progress());
                (out.runs, out.failure)
            }
            None => (Vec::new(), None),
        }
    }

    /// Adds hook summaries to the cycle in flight and writes the record.
    pub(super) fn record_hooks(&mut self, runs: Vec<HookRun>) {
        if runs.is_empty() {
            return;
        }
        let mut next = self.record.clone();
        let Some(u) = next.update.as_mut() else {
            return;
        };
        for r in runs {
            push_hook(&mut u.hooks, r);
        }
        if let Err(e) = self.commit(next) {
            tracing::error!("cannot record the hooks that ran: {e}");
        }
    }

    /// `on-failure` hooks, after `step` failed with `error`. Their summaries
    /// go into the cycle in flight, or (outside a cycle) an event records
    /// the ones that failed. Wrong-state and permission refusals are not
    /// failures of the cycle and run nothing.
    pub fn failure_hooks(&mut self, step: &str, kind: crate::protocol::ErrorKind, message: &str) {
        use crate::protocol::ErrorKind as K;
        if self.hooks.is_none()
            || self.handed_over
            || matches!(
                kind,
                K::WrongState | K::PermissionDenied | K::InvalidArgument | K::Protocol
            )
        {
            return;
        }
        let mut ctx = self.hook_context();
        ctx.failed_step = Some(step.into());
        ctx.failure = Some(message.to_string());
        let (runs, failure) = self.run_hooks(Phase::OnFailure, &ctx);
        if self.record.update.is_some() {
            self.record_hooks(runs);
        } else if let Some(f) = failure {
            let mut next = self.record.clone();
            next.push_event(crate::record::Event {
                at: now(),
                uid: 0,
                action: HOOK_EVENT.into(),
                subject: format!("on-failure/{}", f.hook),
                detail: f.reason,
            });
            if let Err(e) = self.commit(next) {
                tracing::error!("cannot record the on-failure hooks: {e}");
            }
        }
    }

    /// In the new kernel, before any client request: the `post-update`
    /// hooks, once per cycle. A failure is recorded as the cycle's failed
    /// validation.
    pub fn post_update(&mut self) -> AfterValidation {
        let ran =
            self.record.update.as_ref().is_none_or(|u| {
                u.hooks.iter().any(|h| h.phase == Phase::PostUpdate.as_str()) || u.validation.is_some()
            });
        if self.record.state != State::Updated || ran || self.hooks.is_none() {
            return AfterValidation::Serve;
        }
        let ctx = self.hook_context();
        let (runs, failure) = self.run_hooks(Phase::PostUpdate, &ctx);
        if runs.is_empty() && failure.is_none() {
            // No post-update hook installed: nothing to record, and the
            // record clients already read stays the one they see.
            return AfterValidation::Serve;
        }
        let mut next = self.record.clone();
        let Some(u) = next.update.as_mut() else {
            return AfterValidation::Serve;
        };
        for r in runs {
            push_hook(&mut u.hooks, r);
        }
        if let Some(f) = &failure {
            u.validation = Some(Validation {
                hook: f.hook.clone(),
                reason: f.reason.clone(),
                accepted_by: None,
                accepted_at: None,
            });
        }
        if let Err(e) = self.commit(next) {
            tracing::error!("cannot record the post-update hooks: {e}");
        }
        let Some(f) = failure else {
            return AfterValidation::Serve;
        };
        let note = format!(
            "the update failed validation: post-update hook {}: {}{}",
            f.hook,
            f.reason,
            if self.rollback.auto {
                "; rolling back to the previous kernel (rollback = auto)"
            } else {
                "; `luoctl rollback` goes back to the previous kernel, `luoctl finish --accept-failed-validation` keeps this one"
            }
        );
        tracing::error!("{note}");
        self.notes.push(note);
        let err = EngineError::ValidationFailed {
            hook: f.hook.clone(),
            reason: f.reason.clone(),
        };
        self.failure_hooks("post-update", err.kind(), &err.to_string());
        if self.rollback.auto {
            AfterValidation::RollBack
        } else {
            AfterValidation::Serve
        }
    }

    /// After a restart of luod: a failed validation nobody accepted yet is
    /// said again in `status` notes.
    pub(super) fn note_failed_validation(&mut self) {
        if let Some(v) = self.record.update.as_ref().and_then(|u| u.validation.as_ref())
            && v.accepted_by.is_none()
            && self.record.state == State::Updated
        {
            self.notes.push(format!(
                "the update failed validation: post-update hook {}: {}; `luoctl rollback` goes back to the previous \
                 kernel, `luoctl finish --accept-failed-validation` keeps this one",
                v.hook, v.reason
            ));
        }
    }

    /// Refuses `finish` while the validation failed and nobody accepted
    /// it; with `accept`, records the acceptance in `next`.
    pub(super) fn check_validation(
        &self,
        caller: &Caller,
        accept: bool,
        next: &mut crate::record::HandoverRecord,
    ) -> Result<(), EngineError> {
        let Some(v) = next.update.as_mut().and_then(|u| u.validation.as_mut()) else {
            return Ok(());
        };
        if v.accepted_by.is_some() {
            return Ok(());
        }
        if !accept {
            return Err(EngineError::ValidationFailed {
                hook: v.hook.clone(),
                reason: v.reason.clone(),
            });
        }
        v.accepted_by = Some(caller.uid);
        v.accepted_at = Some(now());
        tracing::warn!(
            "uid {} accepted the update despite its failed validation (post-update hook {}: {})",
            caller.uid,
            v.hook,
            v.reason
        );
        Ok(())
    }

    /// The kernel running now, for [`Update::previous`]: `Err` says why
    /// luod cannot tell (a rollback of this cycle will be refused).
    pub(super) fn running_kernel(&self) -> Result<KernelImage, String> {
        if let Some(b) = &self.record.booted
            && b.boot_id == self.host.boot_id
        {
            return b.image.clone().ok_or_else(|| {
                format!(
                    "this boot came from cycle {}'s kexec, whose kernel was loaded outside luod",
                    b.cycle
                )
            });
        }
        let release = &self.host.kernel_release;
        let kernel = self
            .rollback
            .kernel
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/boot/vmlinuz-{release}")));
        let initrd = match &self.rollback.initrd {
            Some(p) => Some(p.clone()),
            None if self.rollback.kernel.is_none() => {
                Some(PathBuf::from(format!("/boot/initrd.img-{release}"))).filter(|p| p.exists())
            }
            None => None,
        };
        let (_, kernel_sha256) = open_trusted(&kernel, "the running kernel's image")?;
        let initrd_sha256 = match &initrd {
            Some(p) => Some(open_trusted(p, "the running kernel's initrd")?.1),
            None => None,
        };
        Ok(KernelImage {
            kernel: kernel.display().to_string(),
            kernel_sha256,
            initrd: initrd.map(|p| p.display().to_string()),
            initrd_sha256,
            cmdline: self
                .rollback
                .cmdline
                .clone()
                .unwrap_or_else(|| self.host.cmdline.clone()),
        })
    }

    /// The cycle a rollback undoes now and the kernel it goes back to, or
    /// why there is none.
    fn rollback_plan(&self) -> Result<(u64, KernelImage), EngineError> {
        let refuse = |why: String| Err(EngineError::RollbackRefused(why));
        match self.record.state {
            State::Updated => {
                let Some(u) = self.record.update.as_ref() else {
                    return refuse("no cycle is in flight".into());
                };
                if u.rollback_of.is_some() {
                    return refuse(format!(
                        "cycle {} is itself a rollback (of cycle {}): finish it, then prepare the update again",
                        u.id,
                        u.rollback_of.unwrap_or_default()
                    ));
                }
                let taken: Vec<String> = self
                    .record
                    .sessions
                    .iter()
                    .flat_map(|s| {
                        s.fds
                            .iter()
                            .filter(|f| f.retrieved)
                            .map(move |f| format!("{}/{}", s.name, f.token))
                    })
                    .collect();
                if !taken.is_empty() {
                    return refuse(format!(
                        "clients took back {} file(s) already ({}), which a rollback from updated could not carry: \
                         finish the cycle (`luoctl finish --accept-failed-validation` if its validation failed), \
                         let the clients preserve again, then `luoctl rollback` from normal",
                        taken.len(),
                        taken.join(", ")
                    ));
                }
                match &u.previous {
                    Some(p) => Ok((u.id, p.clone())),
                    None => refuse(format!(
                        "cycle {} did not record the kernel it came from (see luod's log at its prepare)",
                        u.id
                    )),
                }
            }
            State::Normal => {
                let Some(b) = self.record.booted.as_ref().filter(|b| b.boot_id == self.host.boot_id) else {
                    return refuse(
                        "this boot did not come from a luod live update: there is no cycle to roll back".into(),
                    );
                };
                let Some(c) = self.record.history.iter().find(|c| c.id == b.cycle) else {
                    return refuse(format!("cycle {} is no longer in the history", b.cycle));
                };
                if c.rollback_of.is_some() {
                    return refuse(format!(
                        "cycle {} was itself a rollback (of cycle {}): prepare the update again instead",
                        c.id,
                        c.rollback_of.unwrap_or_default()
                    ));
                }
                match &c.previous {
                    Some(p) => Ok((c.id, p.clone())),
                    None => refuse(format!("cycle {} did not record the kernel it came from", c.id)),
                }
            }
            state => refuse(format!(
                "state is {state}: rollback needs updated, or normal after `finish` on the boot the update led to"
            )),
        }
    }

    /// `rollback`: prepares a cycle back to the previous kernel (the images
    /// checked against their recorded digests, then loaded); `freeze` and
    /// `reboot` follow. From `updated`, cycle N is closed as rolled back and
    /// its sessions and VMs are carried again.
    pub fn rollback(&mut self, caller: &Caller) -> Result<TransitionReport, EngineError> {
        let started = std::time::Instant::now();
        Self::require_privileged(caller, "rollback")?;
        self.require_live()?;
        let from = self.record.state;
        let (of, previous) = self.rollback_plan()?;
        // The images, opened by luod on root's word, must be what was recorded.
        let (kernel_fd, digest) = open_trusted(Path::new(&previous.kernel), "the previous kernel").map_err(|e| {
            EngineError::RollbackRefused(format!("{e}: it must be there as it was when cycle {of} recorded it"))
        })?;
        if digest != previous.kernel_sha256 {
            return Err(EngineError::RollbackRefused(format!(
                "the previous kernel {} changed since cycle {of} recorded it (sha256 {} now, {} recorded): \
                 put the original back, or prepare an update to the kernel you want",
                previous.kernel,
                hex(&digest),
                hex(&previous.kernel_sha256)
            )));
        }
        let mut fds = vec![kernel_fd];
        let mut args = PrepareArgs {
            kernel: Some(ImageFile {
                fd: 0,
                name: previous.kernel.clone(),
            }),
            initrd: None,
            cmdline: Some(previous.cmdline.clone()),
            reuse_cmdline: false,
            // Pinned too: what is loaded is what was recorded, whatever
            // happens to the file between the digest above and the load.
            kernel_sha256: Some(previous.kernel_sha256),
            initrd_sha256: None,
        };
        if let (Some(path), Some(sha)) = (&previous.initrd, &previous.initrd_sha256) {
            let (fd, digest) = open_trusted(Path::new(path), "the previous initrd").map_err(|e| {
                EngineError::RollbackRefused(format!("{e}: it must be there as it was when cycle {of} recorded it"))
            })?;
            if digest != *sha {
                return Err(EngineError::RollbackRefused(format!(
                    "the previous initrd {path} changed since cycle {of} recorded it (sha256 {} now, {} recorded): \
                     put the original back, or prepare an update to the kernel you want",
                    hex(&digest),
                    hex(sha)
                )));
            }
            fds.push(fd);
            args.initrd = Some(ImageFile {
                fd: 1,
                name: path.clone(),
            });
            args.initrd_sha256 = Some(*sha);
        }
        let target = self.target("rollback", &args, fds)?;
        let carried = if from == State::Updated {
            saved_vms_of(&self.record)
        } else {
            Vec::new()
        };
        if from == State::Updated {
            self.carry_incoming()?;
        }
        self.carried_vms = carried;
        let done = self.prepare_target(&args, from, State::Prepared, target, Some(of), started);
        if done.is_err() {
            self.carried_vms.clear();
        }
        done
    }

    /// From `updated`: the files not taken back go into fresh sessions for
    /// the next kexec (the kernel's incoming sessions cannot be preserved
    /// again). A failure leaves what was moved in the new sessions, where
    /// `status` and a later rollback or finish see them.
    fn carry_incoming(&mut self) -> Result<(), EngineError> {
        let sessions: Vec<(crate::names::SessionName, Vec<u64>)> = self
            .record
            .sessions
            .iter()
            .filter(|s| s.incoming)
            .map(|s| (s.name.clone(), s.fds.iter().map(|f| f.token).collect()))
            .collect();
        for (name, tokens) in sessions {
            let mut files = Vec::new();
            for t in &tokens {
                files.push((*t, self.kernel.retrieve_fd(&name, *t)?));
            }
            self.kernel.finish_session(&name)?;
            self.kernel.create_session(&name)?;
            for (t, fd) in files {
                self.kernel.preserve_fd(&name, t, fd)?;
            }
            let mut next = self.record.clone();
            if let Some(s) = next.sessions.iter_mut().find(|s| s.name == name) {
                s.incoming = false;
            }
            self.commit(next)?;
        }
        Ok(())
    }

    /// The VMs a rollback from `updated` carries, merged into the `kvm`
    /// section `freeze` writes (their VMMs never claimed them here).
    pub(super) fn merge_carried_vms(&self, sections: &mut Vec<crate::record::Section>) {
        if self.carried_vms.is_empty() {
            return;
        }
        let kvm = super::vms::KVM;
        let mut vms: Vec<VmSaved> = sections
            .iter()
            .find(|s| s.name == kvm)
            .and_then(|s| postcard::from_bytes(&s.blob).ok())
            .unwrap_or_default();
        for c in &self.carried_vms {
            if !vms.iter().any(|v| v.name == c.name) {
                vms.push(c.clone());
            }
        }
        match postcard::to_allocvec(&vms) {
            Ok(blob) => {
                sections.retain(|s| s.name != kvm);
                sections.push(crate::record::Section {
                    name: kvm.into(),
                    version: super::vms::KVM_BLOB_VERSION,
                    blob,
                });
            }
            Err(e) => tracing::error!("cannot encode the carried VMs: {e}"),
        }
    }

    /// When luod comes up `updated`: remembers which kernel this boot is.
    pub(super) fn booted_from(next: &mut crate::record::HandoverRecord, boot_id: &str) {
        if let Some(u) = &next.update {
            next.booted = Some(Booted {
                boot_id: boot_id.to_string(),
                cycle: u.id,
                image: u.target.clone(),
            });
        }
    }

    /// At `finish` of a rollback: cycle N is recorded as rolled back by it.
    pub(super) fn mark_rolled_back(next: &mut crate::record::HandoverRecord, update: &Update) {
        if let Some(of) = update.rollback_of
            && let Some(c) = next.history.iter_mut().find(|c| c.id == of)
        {
            c.outcome = Outcome::RolledBack;
            c.rolled_back_by = Some(update.id);
        }
    }
}
