//! What luod is doing right now: the request being served (which step,
//! since when) and what it waits for (a subsystem, a VM). Written by the
//! thread that runs a change; read by `status` without waiting for it.

use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};

/// A change in progress, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The request being served (`freeze`, `prepare`, `session-preserve`...).
    pub step: String,
    /// When it started, nanoseconds since the Unix epoch.
    pub since: u64,
    /// What it waits for now (`subsystem kvm`, `VM vm0`), if known.
    pub waiting_for: Option<String>,
}

/// A cell holding the change in progress, shared by the thread that runs
/// changes, the subsystems it calls and the readers of `status`. Cloning
/// shares the cell.
#[derive(Debug, Clone, Default)]
pub struct ProgressCell(Arc<Mutex<Option<Progress>>>);

/// Clears the cell when the change it began is over.
#[derive(Debug)]
#[must_use = "the change shows as in progress until this is dropped"]
pub struct Running(ProgressCell);

impl Drop for Running {
    fn drop(&mut self) {
        *self.0.lock() = None;
    }
}

impl ProgressCell {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Progress>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `step` as in progress from now until the returned guard drops.
    pub fn begin(&self, step: &str) -> Running {
        *self.lock() = Some(Progress {
            step: step.to_string(),
            since: crate::engine::now(),
            waiting_for: None,
        });
        Running(self.clone())
    }

    /// Says what the change in progress waits for now (nothing when no
    /// change is in progress: a subsystem called outside a request).
    pub fn waiting_for(&self, what: impl FnOnce() -> String) {
        if let Some(p) = self.lock().as_mut() {
            p.waiting_for = Some(what());
        }
    }

    /// The change in progress, if any.
    pub fn get(&self) -> Option<Progress> {
        self.lock().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_shows_until_its_guard_drops_with_what_it_waits_for() {
        let cell = ProgressCell::default();
        assert_eq!(cell.get(), None);
        cell.waiting_for(|| "ignored: nothing runs".into());
        assert_eq!(cell.get(), None);
        let running = cell.clone().begin("freeze");
        cell.waiting_for(|| "VM vm0".into());
        let p = cell.get().expect("in progress");
        assert_eq!(p.step, "freeze");
        assert_eq!(p.waiting_for.as_deref(), Some("VM vm0"));
        assert!(p.since > 0);
        drop(running);
        assert_eq!(cell.get(), None);
    }
}
