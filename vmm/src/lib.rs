//! `luo-test-vmm`: a small KVM VMM whose guest survives a live update.
//!
//! The guest is a few real-mode instructions (see [`guest`]) that increment a
//! counter in guest RAM, write it into a ring of slots and, every N
//! iterations, report progress with an `out` (a `KVM_EXIT_IO`). Guest RAM is a
//! memfd. The VMM can pause the vCPU, serialize its registers ([`state`]),
//! and a fresh process can take the same memfd (or a copy of its content) and
//! the state and continue the guest where it stopped.
//!
//! ```no_run
//! use luo_test_vmm::{Vm, create_ram_memfd};
//! let ram = create_ram_memfd("guest-ram", 2 << 20)?;
//! let mut vm = Vm::new(ram, 2 << 20)?;
//! vm.boot(1 << 16)?;
//! let running = vm.spawn();
//! std::thread::sleep(std::time::Duration::from_secs(1));
//! let (vm, report) = running.pause()?;
//! let blob = vm.save_state(true)?;
//! // ... hand vm.ram_fd() and blob to the next process, which calls
//! // Vm::restore(ram_fd, &blob) and then run_until / spawn.
//! # let _ = (report, blob);
//! # Ok::<(), luo_test_vmm::VmError>(())
//! ```

use std::cell::Cell;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use sha2::{Digest, Sha256};

pub mod guest;
pub mod ram;
pub mod state;

pub use ram::{GuestRam, create_memfd as create_ram_memfd};
pub use state::{Stamp, StateError, VmStateV1};

/// Default guest RAM size: 2 MiB.
pub const DEFAULT_RAM_SIZE: usize = 2 << 20;
/// Default progress period: one progress exit every 2^16 iterations.
pub const DEFAULT_PROGRESS_EVERY: u64 = 1 << 16;
/// Where KVM puts the real-mode TSS (needed on Intel without unrestricted
/// guest; harmless on AMD). Outside guest RAM.
const TSS_ADDR: usize = 0xfffb_d000;

/// Errors of the VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm missing or unusable.
    #[error("cannot use /dev/kvm: {0} (no KVM here? in QEMU TCG use -cpu max, which offers AMD SVM)")]
    Kvm(kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{what} failed: {err}")]
    Ioctl {
        /// Which ioctl.
        what: &'static str,
        /// The errno.
        err: kvm_ioctls::Error,
    },
    /// Guest RAM could not be created or mapped.
    #[error("guest RAM: {0}")]
    Ram(#[from] std::io::Error),
    /// RAM size not usable by the guest layout.
    #[error("RAM size {0} bytes is unusable: need a multiple of 4096 of at least {min} bytes", min = guest::MIN_RAM_SIZE)]
    RamSize(usize),
    /// Progress period not a power of two.
    #[error("progress period {0} must be a power of two between 1 and 2^32")]
    ProgressEvery(u64),
    /// The state blob does not decode.
    #[error(transparent)]
    State(#[from] StateError),
    /// The state is for another guest layout.
    #[error("state is for guest layout version {0}, this build runs layout version {1}")]
    Layout(u32, u32),
    /// The RAM handed over is not this guest's (or is damaged).
    #[error("guest RAM check failed: {0}")]
    RamContent(String),
    /// The vCPU exited for a reason this guest never causes.
    #[error("unexpected vCPU exit: {0}")]
    UnexpectedExit(String),
    /// The kick signal handler could not be installed.
    #[error("installing the vCPU kick signal handler: {0}")]
    Signal(std::io::Error),
    /// `run_until` before `boot` or `restore`.
    #[error("the guest was neither booted nor restored")]
    NotBooted,
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |err| VmError::Ioctl { what, err }
}

/// `CLOCK_REALTIME` now, in nanoseconds since the epoch.
pub fn realtime_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The TSC now (`rdtsc`).
pub fn tsc() -> u64 {
    // SAFETY: rdtsc has no memory effects; every x86-64 CPU has it and Linux
    // does not set CR4.TSD, so it does not fault in user mode.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// SHA-256 as lowercase hex.
pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

// ---- kicking the vCPU thread out of KVM_RUN --------------------------------

thread_local! {
    /// `&kvm_run.immediate_exit` of the vCPU this thread runs, or null.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// Signal used to kick a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int) {
    let p = IMMEDIATE_EXIT.with(Cell::get);
    if !p.is_null() {
        // SAFETY: the pointer is set by run_until on this very thread to the
        // immediate_exit byte of the kvm_run mapping of the vCPU it is running,
        // and reset to null before run_until returns (the vCPU, hence the
        // mapping, outlives the call). A volatile byte store is async-signal-safe.
        unsafe { p.write_volatile(1) };
    }
}

fn install_kick_handler() -> Result<(), VmError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let r = INSTALLED.get_or_init(|| {
        // SAFETY: libc::sigaction is plain data for which all-zero is valid.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // No SA_RESTART: KVM_RUN must come back with EINTR.
        sa.sa_flags = 0;
        // SAFETY: sa.sa_mask is a sigset_t inside our own sa.
        unsafe { libc::sigemptyset(&mut sa.sa_mask) };
        // SAFETY: sa is fully initialized; its handler only does a volatile
        // store through a thread-local pointer (async-signal-safe); a null
        // old-action pointer is allowed.
        let rc = unsafe { libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        }
    });
    r.map_err(|e| VmError::Signal(std::io::Error::from_raw_os_error(e)))
}

fn unblock_kick_signal() {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t owned by this frame.
    unsafe { libc::sigemptyset(&mut set) };
    // SAFETY: as above; kick_signal() is a valid signal number.
    unsafe { libc::sigaddset(&mut set, kick_signal()) };
    // SAFETY: set is initialized; a null old-set pointer is allowed.
    unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
}

#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    /// An idle vCPU waits here between progress exits ([`Vm::set_idle`]);
    /// [`Pauser::pause`] wakes it.
    idle_lock: Mutex<()>,
    idle_wake: std::sync::Condvar,
    /// The thread inside `run_until`, while it is inside.
    running_thread: Mutex<Option<libc::pthread_t>>,
    progress: Mutex<LiveProgress>,
}

/// Progress of a VM as seen from another thread ([`Pauser::progress`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LiveProgress {
    /// Progress exits since boot (all processes together).
    pub exits: u64,
    /// First progress of the current (or last) `run_until` call.
    pub first_this_run: Option<Stamp>,
    /// Last progress seen.
    pub last: Option<Stamp>,
}

impl Shared {
    /// Kicks the thread inside `run_until` (if any) out of `KVM_RUN`.
    fn kick(&self) {
        let guard = self.running_thread.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = *guard {
            // SAFETY: t is the pthread_t of a thread that is inside run_until:
            // it removes itself from running_thread under this mutex before
            // leaving run_until, so it is alive while we hold the mutex.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }
}

/// Asks a running vCPU to stop; clonable and usable from any thread.
#[derive(Debug, Clone)]
pub struct Pauser(Arc<Shared>);

impl Pauser {
    /// Requests a stop and kicks the vCPU thread out of `KVM_RUN` if it is
    /// inside. Returns at once; `run_until` returns soon after (the request
    /// stays pending if no `run_until` is active: the next one returns at once).
    pub fn pause(&self) {
        self.0.stop.store(true, Ordering::SeqCst);
        self.0.kick();
        // Under the lock: an idle vCPU checks `stop` under it before waiting.
        let _idle = self.0.idle_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.0.idle_wake.notify_all();
    }

    /// Live progress, updated at every progress exit.
    pub fn progress(&self) -> LiveProgress {
        *self.0.progress.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why `run_until` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The deadline passed.
    Deadline,
    /// [`Pauser::pause`] was called.
    Paused,
}

/// What one `run_until` call saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunReport {
    /// Why it returned.
    pub stopped_by: StopReason,
    /// Counter in RAM when the call started.
    pub counter_start: u64,
    /// Counter in RAM when the vCPU was out of `KVM_RUN` for good.
    pub counter_end: u64,
    /// Progress exits during this call.
    pub progress_exits: u64,
    /// Last progress before this call (previous call, or the restored state).
    pub previous_progress: Option<Stamp>,
    /// First progress during this call.
    pub first_progress: Option<Stamp>,
    /// Last progress during this call.
    pub last_progress: Option<Stamp>,
    /// `CLOCK_REALTIME` ns when the call started.
    pub started_ns: u64,
    /// `CLOCK_REALTIME` ns when the vCPU was out of `KVM_RUN` for good.
    pub stopped_ns: u64,
    /// TSC when the call started.
    pub started_tsc: u64,
    /// TSC when the vCPU was out of `KVM_RUN` for good.
    pub stopped_tsc: u64,
}

impl RunReport {
    /// VM blackout: from the last guest progress before this run (before the
    /// pause, possibly in another process) to the first progress in it.
    pub fn blackout(&self) -> Option<Duration> {
        let (a, b) = (self.previous_progress?, self.first_progress?);
        Some(Duration::from_nanos(b.realtime_ns.saturating_sub(a.realtime_ns)))
    }

    /// TSC ticks per second, measured over this call (None if under 100 ms).
    pub fn tsc_hz(&self) -> Option<f64> {
        let ns = self.stopped_ns.checked_sub(self.started_ns)?;
        let ticks = self.stopped_tsc.checked_sub(self.started_tsc)?;
        (ns >= 100_000_000).then(|| ticks as f64 / (ns as f64 / 1e9))
    }

    /// VM blackout measured with the TSC (ticks converted with `tsc_hz`):
    /// valid across a kexec on the same machine, where `CLOCK_REALTIME`
    /// restarts from the RTC with one-second resolution.
    pub fn blackout_tsc(&self, tsc_hz: f64) -> Option<Duration> {
        let (a, b) = (self.previous_progress?, self.first_progress?);
        let ticks = b.tsc.checked_sub(a.tsc)?;
        (tsc_hz > 0.0).then(|| Duration::from_secs_f64(ticks as f64 / tsc_hz))
    }

    /// Guest iterations per second during this call.
    pub fn rate(&self) -> f64 {
        let secs = (self.stopped_ns.saturating_sub(self.started_ns)) as f64 / 1e9;
        if secs > 0.0 {
            (self.counter_end - self.counter_start) as f64 / secs
        } else {
            0.0
        }
    }
}

/// A VM with one vCPU and one RAM slot.
///
/// Field order matters: the vCPU and VM fds close before the RAM is unmapped.
#[derive(Debug)]
pub struct Vm {
    vcpu: VcpuFd,
    vm: VmFd,
    kvm: Kvm,
    ram: GuestRam,
    shared: Arc<Shared>,
    ready: bool,
    static_sha256: [u8; 32],
    last_progress: Option<Stamp>,
    progress_exits: u64,
    generation: u32,
    paused_ns: u64,
    restored_from: Option<VmStateV1>,
    idle: Option<Duration>,
}

impl Vm {
    /// Makes the vCPU idle for `idle` after each progress exit, as a guest
    /// that mostly waits does (the guest's loop never halts): the VMM's
    /// thread waits outside `KVM_RUN`, and a pause wakes it at once. `None`
    /// (the default): the vCPU runs flat out.
    pub fn set_idle(&mut self, idle: Option<Duration>) {
        self.idle = idle.filter(|d| !d.is_zero());
    }

    /// Creates a VM whose RAM is the first `ram_size` bytes of `ram` (a memfd
    /// or any fd that can be mapped shared), registered as guest-physical
    /// memory from address 0, and one vCPU. Does not touch the RAM content.
    pub fn new(ram: OwnedFd, ram_size: usize) -> Result<Vm, VmError> {
        if ram_size < guest::MIN_RAM_SIZE || !ram_size.is_multiple_of(4096) {
            return Err(VmError::RamSize(ram_size));
        }
        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let vm = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        vm.set_tss_address(TSS_ADDR).map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        let ram = GuestRam::map(ram, ram_size)?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram_size as u64,
            userspace_addr: ram.host_addr(),
        };
        // SAFETY: userspace_addr is our shared mapping of exactly ram_size
        // bytes of the RAM fd (GuestRam::map checked the fd is that large); it
        // stays mapped until after the VM fd is closed (Vm drops vcpu and vm
        // before ram), so KVM never sees a dangling range.
        unsafe { vm.set_user_memory_region(region) }.map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        let vcpu = vm.create_vcpu(0).map_err(ioctl("KVM_CREATE_VCPU"))?;
        Ok(Vm {
            vcpu,
            vm,
            kvm,
            ram,
            shared: Arc::default(),
            ready: false,
            static_sha256: [0; 32],
            last_progress: None,
            progress_exits: 0,
            generation: 0,
            paused_ns: 0,
            restored_from: None,
            idle: None,
        })
    }

    /// Loads the guest image into RAM (header, code, filler; counter 0) and
    /// sets the vCPU to start the code in real mode. `progress_every` (a power
    /// of two) is how many iterations pass between progress exits.
    pub fn boot(&mut self, progress_every: u64) -> Result<(), VmError> {
        let mask = guest::progress_mask(progress_every).ok_or(VmError::ProgressEvery(progress_every))?;
        guest::write_image(self.ram.as_mut_slice(), mask);
        self.static_sha256 = self.static_checksum();
        let mut sregs = self.vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        for seg in [
            &mut sregs.cs,
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.fs,
            &mut sregs.gs,
            &mut sregs.ss,
        ] {
            seg.base = 0;
            seg.selector = 0;
        }
        self.vcpu.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        let regs = kvm_bindings::kvm_regs {
            rip: guest::CODE_ADDR,
            rflags: 0x2,
            rsp: u64::from(guest::INITIAL_SP),
            ..Default::default()
        };
        self.vcpu.set_regs(&regs).map_err(ioctl("KVM_SET_REGS"))?;
        self.ready = true;
        Ok(())
    }

    /// Takes over a guest paused by another process: `ram` holds the RAM as
    /// it was at the pause (the preserved memfd itself, or a memfd with a copy
    /// of it), `state` the blob from [`Vm::save_state`]. Checks the blob and
    /// the RAM header; call [`Vm::verify_restored_ram`] for the full check.
    pub fn restore(ram: OwnedFd, state: &[u8]) -> Result<Vm, VmError> {
        let st = state::decode(state)?;
        if st.layout_version != guest::LAYOUT_VERSION {
            return Err(VmError::Layout(st.layout_version, guest::LAYOUT_VERSION));
        }
        let size = usize::try_from(st.ram_size).map_err(|_| VmError::RamSize(usize::MAX))?;
        let mut vm = Vm::new(ram, size)?;
        let (magic, layout, _) = guest::read_header(vm.ram.as_slice());
        if !magic || layout != guest::LAYOUT_VERSION {
            return Err(VmError::RamContent(format!(
                "no guest header in the RAM handed over (magic ok: {magic}, layout {layout})"
            )));
        }
        vm.vcpu.set_sregs(&(&st.sregs).into()).map_err(ioctl("KVM_SET_SREGS"))?;
        vm.vcpu.set_regs(&(&st.regs).into()).map_err(ioctl("KVM_SET_REGS"))?;
        vm.static_sha256 = st.static_sha256;
        vm.last_progress = st.last_progress;
        vm.progress_exits = st.progress_exits;
        vm.generation = st.generation + 1;
        vm.paused_ns = st.paused_realtime_ns;
        *vm.shared.progress.lock().unwrap_or_else(|e| e.into_inner()) = LiveProgress {
            exits: st.progress_exits,
            first_this_run: None,
            last: st.last_progress,
        };
        vm.ready = true;
        vm.restored_from = Some(st);
        Ok(vm)
    }

    /// The state this VM was restored from, if any.
    pub fn restored_from(&self) -> Option<&VmStateV1> {
        self.restored_from.as_ref()
    }

    /// The RAM fd (to hand to luod or another process).
    pub fn ram_fd(&self) -> BorrowedFd<'_> {
        self.ram.fd()
    }

    /// RAM size in bytes.
    pub fn ram_size(&self) -> usize {
        self.ram.size()
    }

    /// The guest RAM (the vCPU is not running while `&self` is held).
    pub fn ram(&self) -> &[u8] {
        self.ram.as_slice()
    }

    /// A handle to stop `run_until` from another thread.
    pub fn pauser(&self) -> Pauser {
        Pauser(self.shared.clone())
    }

    /// The guest counter in RAM.
    pub fn counter(&self) -> u64 {
        guest::read_counter(self.ram.as_slice())
    }

    /// Last progress exit seen (in this process, or carried in the restored state).
    pub fn last_progress(&self) -> Option<Stamp> {
        self.last_progress
    }

    /// How many times this guest was restored (0 in the process that booted it).
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// SHA-256 of all of guest RAM.
    pub fn ram_checksum(&self) -> [u8; 32] {
        Sha256::digest(self.ram.as_slice()).into()
    }

    /// SHA-256 of the RAM the guest never writes (all but counter and ring).
    pub fn static_checksum(&self) -> [u8; 32] {
        let ram = self.ram.as_slice();
        let mut h = Sha256::new();
        let mut at = 0usize;
        for (s, e) in guest::GUEST_WRITTEN {
            h.update(&ram[at..s as usize]);
            at = e as usize;
        }
        h.update(&ram[at..]);
        h.finalize().into()
    }

    /// The static checksum computed at boot (carried through restores).
    pub fn boot_static_checksum(&self) -> [u8; 32] {
        self.static_sha256
    }

    /// Checks the ring of slots against the counter (see [`guest::check_ring`]).
    pub fn check_ring(&self) -> Result<(), VmError> {
        let counter = self.counter();
        guest::check_ring(self.ram.as_slice(), counter)
            .map_err(|(v, got)| VmError::RamContent(format!("ring slot for {v} holds {got} (counter {counter})")))
    }

    /// For a restored VM, before it runs: RAM equals the RAM at pause (when the
    /// state carries its SHA-256, returned), the counter equals the saved one,
    /// and the ring matches the counter. One pass over RAM. The untouched part
    /// can be compared with the boot image later ([`Vm::static_checksum`]),
    /// outside the blackout, since the guest never writes it.
    pub fn verify_restored_ram(&self) -> Result<Option<[u8; 32]>, VmError> {
        let st = self.restored_from.as_ref().ok_or(VmError::NotBooted)?;
        let mut sum = None;
        if let Some(saved) = st.ram_sha256 {
            let now = self.ram_checksum();
            if now != saved {
                return Err(VmError::RamContent(format!(
                    "RAM SHA-256 {} differs from the one at pause {}",
                    hex(&now),
                    hex(&saved)
                )));
            }
            sum = Some(now);
        }
        if self.counter() != st.counter {
            return Err(VmError::RamContent(format!(
                "counter in RAM {} differs from the one at pause {}",
                self.counter(),
                st.counter
            )));
        }
        self.check_ring()?;
        Ok(sum)
    }

    /// Runs the vCPU on the calling thread until `deadline` (a helper thread
    /// kicks the vCPU then) or until [`Pauser::pause`]. On return the vCPU is out
    /// of `KVM_RUN` with any pending I/O completed, so its state is consistent
    /// for [`Vm::save_state`] and the VM can run again.
    pub fn run_until(&mut self, deadline: Option<Instant>) -> Result<RunReport, VmError> {
        if !self.ready {
            return Err(VmError::NotBooted);
        }
        install_kick_handler()?;
        unblock_kick_signal();
        let imm: *mut u8 = &mut self.vcpu.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|c| c.set(imm));
        {
            let mut t = self.shared.running_thread.lock().unwrap_or_else(|e| e.into_inner());
            // SAFETY: pthread_self has no preconditions.
            *t = Some(unsafe { libc::pthread_self() });
        }
        self.shared
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first_this_run = None;
        let mut report = RunReport {
            stopped_by: StopReason::Deadline,
            counter_start: self.counter(),
            counter_end: 0,
            progress_exits: 0,
            previous_progress: self.last_progress,
            first_progress: None,
            last_progress: None,
            started_ns: realtime_ns(),
            stopped_ns: 0,
            started_tsc: tsc(),
            stopped_tsc: 0,
        };
        let res = match deadline {
            None => self.run_loop(None, &mut report),
            Some(d) => {
                // An alarm thread kicks the vCPU at the deadline, so it is met
                // even when progress exits are rare.
                let (done, alarm) = std::sync::mpsc::channel::<()>();
                let shared = self.shared.clone();
                std::thread::scope(|s| {
                    s.spawn(move || {
                        let wait = d.saturating_duration_since(Instant::now());
                        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = alarm.recv_timeout(wait) {
                            shared.kick();
                        }
                    });
                    let r = self.run_loop(deadline, &mut report);
                    drop(done);
                    r
                })
            }
        };
        // No more kicks: from here the thread may leave run_until.
        *self.shared.running_thread.lock().unwrap_or_else(|e| e.into_inner()) = None;
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
        // Complete a pending PIO (the `out` that made the last exit): KVM
        // finishes it, advancing RIP past the `out`, then sees immediate_exit
        // and returns EINTR without running guest code.
        self.vcpu.set_kvm_immediate_exit(1);
        let fin = match self.vcpu.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Ok(VcpuExit::Intr) => Ok(()),
            Ok(exit) => Err(VmError::UnexpectedExit(format!("{exit:?} with immediate_exit set"))),
            Err(e) => Err(VmError::Ioctl {
                what: "KVM_RUN (completing I/O)",
                err: e,
            }),
        };
        self.vcpu.set_kvm_immediate_exit(0);
        report.stopped_by = res?;
        fin?;
        report.stopped_ns = realtime_ns();
        report.stopped_tsc = tsc();
        report.counter_end = self.counter();
        self.paused_ns = report.stopped_ns;
        Ok(report)
    }

    fn run_loop(&mut self, deadline: Option<Instant>, report: &mut RunReport) -> Result<StopReason, VmError> {
        loop {
            if self.shared.stop.swap(false, Ordering::SeqCst) {
                return Ok(StopReason::Paused);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(StopReason::Deadline);
            }
            match self.vcpu.run() {
                Ok(VcpuExit::IoOut(guest::PROGRESS_PORT, data)) => {
                    let now = realtime_ns();
                    let tsc = tsc();
                    let counter = guest::read_counter(self.ram.as_slice());
                    let low = match *data {
                        [a, b, c, d] => u32::from_le_bytes([a, b, c, d]),
                        _ => return Err(VmError::UnexpectedExit(format!("progress out of {} bytes", data.len()))),
                    };
                    if low != counter as u32 {
                        return Err(VmError::RamContent(format!(
                            "guest reported counter {low:#x} but RAM holds {counter:#x}"
                        )));
                    }
                    let stamp = Stamp {
                        realtime_ns: now,
                        tsc,
                        counter,
                    };
                    report.first_progress.get_or_insert(stamp);
                    report.last_progress = Some(stamp);
                    report.progress_exits += 1;
                    self.last_progress = Some(stamp);
                    self.progress_exits += 1;
                    let mut live = self.shared.progress.lock().unwrap_or_else(|e| e.into_inner());
                    live.exits = self.progress_exits;
                    live.first_this_run.get_or_insert(stamp);
                    live.last = Some(stamp);
                    drop(live);
                    if let Some(idle) = self.idle {
                        let guard = self.shared.idle_lock.lock().unwrap_or_else(|e| e.into_inner());
                        if !self.shared.stop.load(Ordering::SeqCst) {
                            let _ = self
                                .shared
                                .idle_wake
                                .wait_timeout_while(guard, idle, |_| !self.shared.stop.load(Ordering::SeqCst));
                        }
                    }
                }
                Ok(VcpuExit::Intr) => self.vcpu.set_kvm_immediate_exit(0),
                Err(e) if e.errno() == libc::EINTR => self.vcpu.set_kvm_immediate_exit(0),
                Ok(exit) => return Err(VmError::UnexpectedExit(format!("{exit:?}"))),
                Err(e) => {
                    return Err(VmError::Ioctl {
                        what: "KVM_RUN",
                        err: e,
                    });
                }
            }
        }
    }

    /// Serializes the vCPU state for a fresh process (see [`state`]). With
    /// `with_ram_checksum` the blob carries the SHA-256 of all RAM, so the
    /// restoring side can prove it got the same RAM (costs a pass over RAM).
    pub fn save_state(&self, with_ram_checksum: bool) -> Result<Vec<u8>, VmError> {
        let regs = self.vcpu.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
        let sregs = self.vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        let st = VmStateV1 {
            ram_size: self.ram.size() as u64,
            layout_version: guest::LAYOUT_VERSION,
            regs: (&regs).into(),
            sregs: (&sregs).into(),
            counter: self.counter(),
            ram_sha256: with_ram_checksum.then(|| self.ram_checksum()),
            static_sha256: self.static_sha256,
            last_progress: self.last_progress,
            paused_realtime_ns: self.paused_ns,
            saved_realtime_ns: realtime_ns(),
            generation: self.generation,
            progress_exits: self.progress_exits,
        };
        Ok(state::encode(&st))
    }

    /// Runs the vCPU on a new thread until [`RunningVm::pause`].
    pub fn spawn(self) -> RunningVm {
        // Cleared here too so a watcher never sees the previous run's value.
        self.shared
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first_this_run = None;
        let pauser = self.pauser();
        let handle = std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || {
                let mut vm = self;
                let r = vm.run_until(None);
                (vm, r)
            })
            .expect("spawning the vCPU thread");
        RunningVm { handle, pauser }
    }

    /// The KVM API version (12 on every kernel since 2.6.22).
    pub fn kvm_api_version(&self) -> i32 {
        self.kvm.get_api_version()
    }

    /// The VM fd (for ioctls this crate does not wrap).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }
}

/// A VM whose vCPU runs on its own thread.
#[derive(Debug)]
pub struct RunningVm {
    handle: JoinHandle<(Vm, Result<RunReport, VmError>)>,
    pauser: Pauser,
}

impl RunningVm {
    /// Stops the vCPU at its next exit (kicking it out of `KVM_RUN`) and waits
    /// for it. On error the VM is lost with the thread's result; use
    /// [`RunningVm::pause_keep`] to keep it.
    pub fn pause(self) -> Result<(Vm, RunReport), VmError> {
        let (vm, r) = self.pause_keep();
        r.map(|r| (vm, r))
    }

    /// Like [`RunningVm::pause`] but returns the VM even if the run failed.
    pub fn pause_keep(self) -> (Vm, Result<RunReport, VmError>) {
        self.pauser.pause();
        match self.handle.join() {
            Ok(x) => x,
            Err(p) => std::panic::resume_unwind(p),
        }
    }

    /// A handle to the pauser (e.g. to watch progress).
    pub fn pauser(&self) -> &Pauser {
        &self.pauser
    }

    /// Whether the vCPU thread has stopped on its own (an error).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}
