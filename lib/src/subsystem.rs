//! Subsystem callbacks and the registry that runs them with undo.
//!
//! A subsystem is a participant in the cycle (KVM, the IOMMU, devices, an
//! operator's hook). The registry calls every subsystem in registration order;
//! when step `k` fails it runs the undo of steps `k-1..0` in reverse, so the
//! host is back where it was before the transition, and the error names the
//! subsystem that failed and why.

use serde::{Deserialize, Serialize};
use std::fmt;

/// An opaque, versioned blob a subsystem keeps in the handover record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    /// The subsystem's own version of the blob format.
    pub version: u32,
    /// The bytes.
    pub data: Vec<u8>,
}

/// Facts about the update a subsystem may check at `prepare`.
#[derive(Debug, Clone, Default)]
pub struct PrepareContext {
    /// Command line of the target kernel, when one was loaded.
    pub target_cmdline: Option<String>,
    /// Bytes of preserved files the cycle carries.
    pub preserved_bytes: u64,
    /// Number of preserved files.
    pub preserved_files: u64,
}

/// Why a subsystem callback did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum SubsystemError {
    /// `prepare` refused the update; the reason is for the operator.
    #[error("vetoed: {0}")]
    Veto(String),
    /// The callback failed.
    #[error("{0}")]
    Failed(String),
}

/// A participant in the live-update cycle.
///
/// Every callback but `restore` and `finish` has an undo: `cancel` undoes
/// `prepare`, `unfreeze` undoes `freeze`. Undo callbacks should not fail; when
/// they do, the registry reports it and carries on undoing the others.
pub trait Subsystem: Send {
    /// Receives the cell where the running change shows what it waits for
    /// (the `kvm` subsystem names the VM it calls). Most need nothing.
    fn set_progress(&mut self, _progress: crate::progress::ProgressCell) {}

    /// Unique name; the key of the subsystem's section in the record.
    fn name(&self) -> &str;
    /// Heavy work while workloads still run; may veto with a reason.
    fn prepare(&mut self, ctx: &PrepareContext) -> Result<Option<Blob>, SubsystemError>;
    /// Quiesce; returns the final blob for the record. Inside the blackout.
    fn freeze(&mut self) -> Result<Option<Blob>, SubsystemError>;
    /// Undo of `prepare`.
    fn cancel(&mut self) -> Result<(), SubsystemError>;
    /// Undo of `freeze` (the reboot failed or the cycle was cancelled).
    fn unfreeze(&mut self) -> Result<(), SubsystemError>;
    /// In the new kernel: take back the state saved in the old one.
    fn restore(&mut self, blob: Option<&Blob>) -> Result<(), SubsystemError>;
    /// Close the cycle in the new kernel.
    fn finish(&mut self) -> Result<(), SubsystemError>;
}

/// A registry step, for errors and reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    /// `prepare`.
    Prepare,
    /// `freeze`.
    Freeze,
    /// `cancel` (undo of prepare).
    Cancel,
    /// `unfreeze` (undo of freeze).
    Unfreeze,
    /// `restore`.
    Restore,
    /// `finish`.
    Finish,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Prepare => "prepare",
            Step::Freeze => "freeze",
            Step::Cancel => "cancel",
            Step::Unfreeze => "unfreeze",
            Step::Restore => "restore",
            Step::Finish => "finish",
        })
    }
}

/// An undo callback that failed while the registry was rolling back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UndoFailure {
    /// The subsystem.
    pub subsystem: String,
    /// The undo step that failed.
    pub step: Step,
    /// Why.
    pub error: SubsystemError,
}

/// A subsystem failed a step; the steps before it were undone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("subsystem {subsystem} failed {step}: {error}{}", undo_note(.undo_failures))]
pub struct StepError {
    /// The step.
    pub step: Step,
    /// The subsystem that failed.
    pub subsystem: String,
    /// Why.
    pub error: SubsystemError,
    /// Undo callbacks that failed in turn (normally empty).
    pub undo_failures: Vec<UndoFailure>,
}

impl StepError {
    /// True when the failure is a `prepare` veto.
    pub fn is_veto(&self) -> bool {
        matches!(self.error, SubsystemError::Veto(_))
    }
}

fn undo_note(failures: &[UndoFailure]) -> String {
    if failures.is_empty() {
        return String::new();
    }
    let list: Vec<String> = failures
        .iter()
        .map(|f| format!("{} {}: {}", f.subsystem, f.step, f.error))
        .collect();
    format!(" (undo also failed: {})", list.join("; "))
}

/// Blobs returned by a step, keyed by subsystem name, in registration order.
pub type Blobs = Vec<(String, Blob)>;

/// Subsystems in registration order.
#[derive(Default)]
pub struct Registry {
    subsystems: Vec<Box<dyn Subsystem>>,
    progress: crate::progress::ProgressCell,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

/// Registering a name twice.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a subsystem named {0} is already registered")]
pub struct DuplicateSubsystem(pub String);

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// Adds a subsystem after the ones already registered.
    pub fn register(&mut self, s: Box<dyn Subsystem>) -> Result<(), DuplicateSubsystem> {
        if self.subsystems.iter().any(|x| x.name() == s.name()) {
            return Err(DuplicateSubsystem(s.name().to_string()));
        }
        let mut s = s;
        s.set_progress(self.progress.clone());
        self.subsystems.push(s);
        Ok(())
    }

    /// The cell where the running change shows the subsystem it waits for.
    pub fn progress(&self) -> &crate::progress::ProgressCell {
        &self.progress
    }

    /// Names in registration order.
    pub fn names(&self) -> Vec<String> {
        self.subsystems.iter().map(|s| s.name().to_string()).collect()
    }

    /// Number of subsystems.
    pub fn len(&self) -> usize {
        self.subsystems.len()
    }

    /// True when no subsystem is registered.
    pub fn is_empty(&self) -> bool {
        self.subsystems.is_empty()
    }

    /// Runs `prepare` on each; on failure at `k`, `cancel` on `k-1..0`.
    pub fn prepare(&mut self, ctx: &PrepareContext) -> Result<Blobs, StepError> {
        self.forward(Step::Prepare, Step::Cancel, |s| s.prepare(ctx))
    }

    /// Runs `freeze` on each; on failure at `k`, `unfreeze` on `k-1..0`.
    pub fn freeze(&mut self) -> Result<Blobs, StepError> {
        self.forward(Step::Freeze, Step::Unfreeze, |s| s.freeze())
    }

    /// Runs `cancel` on every subsystem in reverse order.
    pub fn cancel(&mut self) -> Vec<UndoFailure> {
        self.undo(self.subsystems.len(), Step::Cancel)
    }

    /// Runs `unfreeze` on every subsystem in reverse order.
    pub fn unfreeze(&mut self) -> Vec<UndoFailure> {
        self.undo(self.subsystems.len(), Step::Unfreeze)
    }

    /// Runs `restore` on each with its section, if any. Restore has no undo:
    /// every subsystem is tried and the failures are returned.
    pub fn restore(&mut self, sections: &[(String, Blob)]) -> Vec<UndoFailure> {
        let mut failures = Vec::new();
        for s in &mut self.subsystems {
            let blob = sections.iter().find(|(n, _)| n == s.name()).map(|(_, b)| b);
            if let Err(error) = s.restore(blob) {
                failures.push(UndoFailure {
                    subsystem: s.name().to_string(),
                    step: Step::Restore,
                    error,
                });
            }
        }
        failures
    }

    /// Runs `finish` on each, stopping at the first failure (the cycle stays
    /// open so `finish` can be retried once the cause is fixed).
    pub fn finish(&mut self) -> Result<(), StepError> {
        for s in &mut self.subsystems {
            self.progress.waiting_for(|| format!("subsystem {}", s.name()));
            if let Err(error) = s.finish() {
                return Err(StepError {
                    step: Step::Finish,
                    subsystem: s.name().to_string(),
                    error,
                    undo_failures: Vec::new(),
                });
            }
        }
        Ok(())
    }

    fn forward(
        &mut self,
        step: Step,
        undo: Step,
        mut call: impl FnMut(&mut dyn Subsystem) -> Result<Option<Blob>, SubsystemError>,
    ) -> Result<Blobs, StepError> {
        let mut blobs = Vec::new();
        for k in 0..self.subsystems.len() {
            let s = self.subsystems[k].as_mut();
            self.progress.waiting_for(|| format!("subsystem {}", s.name()));
            match call(s) {
                Ok(Some(blob)) => blobs.push((s.name().to_string(), blob)),
                Ok(None) => {}
                Err(error) => {
                    let subsystem = s.name().to_string();
                    let undo_failures = self.undo(k, undo);
                    return Err(StepError {
                        step,
                        subsystem,
                        error,
                        undo_failures,
                    });
                }
            }
        }
        Ok(blobs)
    }

    /// Runs `step` on subsystems `upto-1..0` in reverse; collects failures.
    fn undo(&mut self, upto: usize, step: Step) -> Vec<UndoFailure> {
        let mut failures = Vec::new();
        for s in self.subsystems[..upto].iter_mut().rev() {
            self.progress.waiting_for(|| format!("subsystem {} ({step})", s.name()));
            let r = match step {
                Step::Cancel => s.cancel(),
                Step::Unfreeze => s.unfreeze(),
                _ => unreachable!("only cancel and unfreeze are undo steps"),
            };
            if let Err(error) = r {
                failures.push(UndoFailure {
                    subsystem: s.name().to_string(),
                    step,
                    error,
                });
            }
        }
        failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    type Log = Arc<Mutex<Vec<String>>>;

    /// A subsystem that logs its calls and fails the step it is told to.
    struct Probe {
        name: String,
        log: Log,
        fail: Option<Step>,
        veto: bool,
    }

    impl Probe {
        fn call(&self, step: Step) -> Result<(), SubsystemError> {
            self.log.lock().unwrap().push(format!("{}.{step}", self.name));
            if self.fail == Some(step) {
                if self.veto {
                    return Err(SubsystemError::Veto(format!("{} says no", self.name)));
                }
                return Err(SubsystemError::Failed(format!("{} broke", self.name)));
            }
            Ok(())
        }
    }

    impl Subsystem for Probe {
        fn name(&self) -> &str {
            &self.name
        }
        fn prepare(&mut self, _: &PrepareContext) -> Result<Option<Blob>, SubsystemError> {
            self.call(Step::Prepare)?;
            Ok(Some(Blob {
                version: 1,
                data: self.name.as_bytes().to_vec(),
            }))
        }
        fn freeze(&mut self) -> Result<Option<Blob>, SubsystemError> {
            self.call(Step::Freeze)?;
            Ok(None)
        }
        fn cancel(&mut self) -> Result<(), SubsystemError> {
            self.call(Step::Cancel)
        }
        fn unfreeze(&mut self) -> Result<(), SubsystemError> {
            self.call(Step::Unfreeze)
        }
        fn restore(&mut self, _: Option<&Blob>) -> Result<(), SubsystemError> {
            self.call(Step::Restore)
        }
        fn finish(&mut self) -> Result<(), SubsystemError> {
            self.call(Step::Finish)
        }
    }

    fn three(fail_at: Option<(usize, Step)>, veto: bool) -> (Registry, Log) {
        let log: Log = Arc::default();
        let mut r = Registry::new();
        for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
            let fail = fail_at.filter(|(k, _)| *k == i).map(|(_, s)| s);
            r.register(Box::new(Probe {
                name: name.into(),
                log: log.clone(),
                fail,
                veto,
            }))
            .unwrap();
        }
        (r, log)
    }

    fn take(log: &Log) -> Vec<String> {
        std::mem::take(&mut *log.lock().unwrap())
    }

    #[test]
    fn prepare_runs_in_registration_order_and_collects_blobs() {
        let (mut r, log) = three(None, false);
        let blobs = r.prepare(&PrepareContext::default()).unwrap();
        assert_eq!(take(&log), ["a.prepare", "b.prepare", "c.prepare"]);
        let names: Vec<&str> = blobs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
    }

    #[test]
    fn prepare_failure_at_each_step_cancels_the_earlier_ones_in_reverse() {
        let expected: [&[&str]; 3] = [
            &["a.prepare"],
            &["a.prepare", "b.prepare", "a.cancel"],
            &["a.prepare", "b.prepare", "c.prepare", "b.cancel", "a.cancel"],
        ];
        for (k, want) in expected.iter().enumerate() {
            let (mut r, log) = three(Some((k, Step::Prepare)), false);
            let err = r.prepare(&PrepareContext::default()).unwrap_err();
            assert_eq!(take(&log), *want, "failure at step {k}");
            assert_eq!(err.subsystem, ["a", "b", "c"][k]);
            assert_eq!(err.step, Step::Prepare);
            assert!(err.undo_failures.is_empty());
        }
    }

    #[test]
    fn freeze_failure_at_each_step_unfreezes_the_earlier_ones_in_reverse() {
        let expected: [&[&str]; 3] = [
            &["a.freeze"],
            &["a.freeze", "b.freeze", "a.unfreeze"],
            &["a.freeze", "b.freeze", "c.freeze", "b.unfreeze", "a.unfreeze"],
        ];
        for (k, want) in expected.iter().enumerate() {
            let (mut r, log) = three(Some((k, Step::Freeze)), false);
            r.prepare(&PrepareContext::default()).unwrap();
            take(&log);
            let err = r.freeze().unwrap_err();
            assert_eq!(take(&log), *want, "failure at step {k}");
            assert_eq!(
                err.to_string(),
                format!(
                    "subsystem {} failed freeze: {} broke",
                    ["a", "b", "c"][k],
                    ["a", "b", "c"][k]
                )
            );
        }
    }

    #[test]
    fn veto_reason_is_carried_in_the_error() {
        let (mut r, _log) = three(Some((1, Step::Prepare)), true);
        let err = r.prepare(&PrepareContext::default()).unwrap_err();
        assert!(err.is_veto());
        assert_eq!(err.to_string(), "subsystem b failed prepare: vetoed: b says no");
    }

    #[test]
    fn cancel_and_unfreeze_run_in_reverse_order() {
        let (mut r, log) = three(None, false);
        assert!(r.unfreeze().is_empty());
        assert!(r.cancel().is_empty());
        assert_eq!(
            take(&log),
            [
                "c.unfreeze",
                "b.unfreeze",
                "a.unfreeze",
                "c.cancel",
                "b.cancel",
                "a.cancel"
            ]
        );
    }

    #[test]
    fn an_undo_that_fails_is_reported_and_the_others_still_run() {
        let (mut r, log) = three(Some((0, Step::Cancel)), false);
        let failures = r.cancel();
        assert_eq!(take(&log), ["c.cancel", "b.cancel", "a.cancel"]);
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].subsystem, "a");
    }

    #[test]
    fn restore_tries_every_subsystem_and_reports_failures() {
        let (mut r, log) = three(Some((1, Step::Restore)), false);
        let failures = r.restore(&[]);
        assert_eq!(take(&log), ["a.restore", "b.restore", "c.restore"]);
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].subsystem, "b");
    }

    #[test]
    fn duplicate_names_are_refused() {
        let (mut r, log) = three(None, false);
        let dup = Probe {
            name: "b".into(),
            log,
            fail: None,
            veto: false,
        };
        assert_eq!(r.register(Box::new(dup)).unwrap_err(), DuplicateSubsystem("b".into()));
        assert_eq!(r.len(), 3);
    }
}
