//! A fake kernel for tests of the logic above the kernel interface: the
//! userspace emulation plus failures injected per operation, and a kexec
//! whose "image loaded" state the test controls.

use super::emulated::Emulated;
use super::{Handoff, Kernel, KernelError, KernelLoad, RebootOutcome};
use crate::names::SessionName;
use std::collections::HashMap;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// An operation of the [`Kernel`] trait, for failure injection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `create_session`.
    CreateSession,
    /// `preserve_fd`.
    PreserveFd,
    /// `retrieve_fd`.
    RetrieveFd,
    /// `finish_session`.
    FinishSession,
    /// `check_image`.
    CheckImage,
    /// `load_kernel`.
    LoadKernel,
    /// `reboot`.
    Reboot,
    /// `before_cycle` (the start of `prepare` and `rollback`).
    BeforeCycle,
}

/// Failures to inject, shared with the test that set them.
pub type Failures = Arc<Mutex<HashMap<Op, KernelError>>>;

/// The emulation with injected failures. `check_image` makes the real
/// bzImage check unless a failure is injected; `load_kernel` loads nothing
/// and sets the "image loaded" flag.
#[derive(Debug)]
pub struct FakeKernel {
    inner: Emulated,
    failures: Failures,
    real_kexec: bool,
    /// How preserved files cross the kexec: `Kernel` plays LUO, `Copy` the
    /// file and reserved-memory backends.
    handoff: Handoff,
    kexec_loaded: Arc<AtomicBool>,
    /// The reboot path of a real-kexec fake: the systemd path runs the
    /// (fake) `systemctl` it names, through the LUO backend's own code.
    reboot_path: Option<crate::systemd::RebootPathCell>,
    /// How many times `before_cycle` ran.
    before_cycle: Arc<std::sync::atomic::AtomicUsize>,
}

impl FakeKernel {
    /// A fake kernel whose kexec is simulated (as the file backend's), and
    /// the handle that injects failures into it.
    pub fn new() -> (Self, Failures) {
        Self::build(false, Arc::default())
    }

    /// A fake kernel whose kexec is real (as the LUO and reserved-memory
    /// backends'): `prepare` needs a target unless `kexec_loaded` says an
    /// image is loaded already. `load_kernel` sets the flag, `unload_kernel`
    /// clears it; `reboot` always fails (there is nothing to kexec into).
    ///
    /// It plays the LUO backend: the kernel carries the files (no copy at
    /// `freeze`), so an image loaded outside luod is a valid target.
    pub fn real_kexec(kexec_loaded: Arc<AtomicBool>) -> (Self, Failures) {
        let (mut fake, failures) = Self::build(true, kexec_loaded);
        fake.handoff = Handoff::Kernel;
        (fake, failures)
    }

    fn build(real_kexec: bool, kexec_loaded: Arc<AtomicBool>) -> (Self, Failures) {
        let failures = Failures::default();
        (
            FakeKernel {
                inner: Emulated::new("fake", super::emulated::KexecMode::Simulated, None),
                failures: failures.clone(),
                real_kexec,
                handoff: Handoff::Copy,
                kexec_loaded,
                reboot_path: None,
                before_cycle: Arc::default(),
            },
            failures,
        )
    }

    /// A fake kernel that reports a real kexec, as the reserved-memory
    /// backend does: the handover is written at `freeze`, and a start
    /// judges the record by boot id and command line. Its `reboot` fails
    /// (nothing here can kexec); a test plays the next boot by opening a new
    /// engine on the same region with another [`HostInfo`](crate::engine::HostInfo).
    pub fn with_real_kexec() -> (Self, Failures) {
        let (mut fake, failures) = Self::new();
        fake.real_kexec = true;
        (fake, failures)
    }

    /// Plays the LUO backend's reboot along `path` (see
    /// [`Luo`](super::luo::Luo)): direct fails (nothing to kexec into), the
    /// systemd path runs `systemctl kexec`.
    pub fn set_reboot_path(&mut self, path: crate::systemd::RebootPath) {
        self.reboot_path = Some(crate::systemd::RebootPathCell::known(path));
    }

    /// As [`set_reboot_path`](Self::set_reboot_path), with a path a test
    /// fills later (luod detects it once it serves).
    pub fn set_reboot_path_cell(&mut self, cell: crate::systemd::RebootPathCell) {
        self.reboot_path = Some(cell);
    }

    /// Counts the calls of `before_cycle`.
    pub fn before_cycle_calls(&self) -> Arc<std::sync::atomic::AtomicUsize> {
        self.before_cycle.clone()
    }

    fn check(&self, op: Op) -> Result<(), KernelError> {
        match self.failures.lock().expect("failures lock").get(&op) {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

impl Kernel for FakeKernel {
    fn name(&self) -> &'static str {
        "fake"
    }
    fn handoff(&self) -> Handoff {
        self.handoff
    }
    fn simulates_kexec(&self) -> bool {
        !self.real_kexec
    }
    fn create_session(&mut self, name: &SessionName) -> Result<(), KernelError> {
        self.check(Op::CreateSession)?;
        self.inner.create_session(name)
    }
    fn retrieve_session(&mut self, name: &SessionName) -> Result<(), KernelError> {
        self.inner.retrieve_session(name)
    }
    fn preserve_fd(&mut self, session: &SessionName, token: u64, fd: OwnedFd) -> Result<(), KernelError> {
        self.check(Op::PreserveFd)?;
        self.inner.preserve_fd(session, token, fd)
    }
    fn retrieve_fd(&mut self, session: &SessionName, token: u64) -> Result<OwnedFd, KernelError> {
        self.check(Op::RetrieveFd)?;
        self.inner.retrieve_fd(session, token)
    }
    fn finish_session(&mut self, session: &SessionName) -> Result<(), KernelError> {
        self.check(Op::FinishSession)?;
        self.inner.finish_session(session)
    }
    fn preserved(&self) -> Vec<(&SessionName, u64, BorrowedFd<'_>)> {
        self.inner.preserved()
    }
    fn descriptors_per_file(&self) -> u64 {
        self.inner.descriptors_per_file()
    }
    fn preserved_sources(&self) -> Vec<(&SessionName, u64, crate::record::PreservedSource<'_>)> {
        self.inner.preserved_sources()
    }
    fn adopt_incoming(&mut self, session: &SessionName, token: u64, fd: OwnedFd) -> Result<(), KernelError> {
        self.inner.adopt_incoming(session, token, fd)
    }
    fn recover(&mut self) -> Result<Vec<(SessionName, u64)>, KernelError> {
        self.inner.recover()
    }
    fn discard_all(&mut self) -> Result<(), KernelError> {
        self.inner.discard_all()
    }
    fn check_image(&self, name: &str, image: BorrowedFd<'_>) -> Result<(), KernelError> {
        self.check(Op::CheckImage)?;
        self.inner.check_image(name, image)
    }
    fn kexec_loaded(&self) -> bool {
        self.kexec_loaded.load(Ordering::SeqCst)
    }
    fn load_kernel(&mut self, _load: &KernelLoad<'_>) -> Result<(), KernelError> {
        self.check(Op::LoadKernel)?;
        self.kexec_loaded.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn unload_kernel(&mut self) -> Result<(), KernelError> {
        self.kexec_loaded.store(false, Ordering::SeqCst);
        Ok(())
    }
    fn reboot(&mut self) -> Result<RebootOutcome, KernelError> {
        self.check(Op::Reboot)?;
        let nothing = || KernelError::Reboot("the fake kernel has nothing to kexec into".into());
        if let Some(path) = &self.reboot_path {
            return super::luo::reboot_along(&path.get(), self.kexec_loaded.load(Ordering::SeqCst), nothing);
        }
        if self.real_kexec {
            return Err(nothing());
        }
        self.inner.reboot()
    }
    fn reboot_path(&self) -> Option<crate::systemd::RebootPath> {
        self.reboot_path.as_ref().map(|c| c.get())
    }
    fn reboot_path_cell(&self) -> Option<crate::systemd::RebootPathCell> {
        self.reboot_path.clone()
    }
    fn before_cycle(&mut self) -> Result<(), KernelError> {
        self.check(Op::BeforeCycle)?;
        self.before_cycle.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn park_notes(&self) -> Vec<String> {
        self.inner.park_notes()
    }

    fn park_notes_cell(&self) -> Option<crate::holder::ParkNotes> {
        self.inner.park_notes_cell()
    }
}
