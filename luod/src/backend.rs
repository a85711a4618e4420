//! Building the engine for the chosen backend.

use crate::args::{Args, Backend, FdStore};
use liveupdate::engine::{Engine, HostInfo, Kvm, Quotas, RegionCapacity, SharedVms, StartOptions};
use liveupdate::fsutil;
use liveupdate::holder::{FdPark, HolderClient};
use liveupdate::kernel::emulated::{Emulated, KexecMode};
use liveupdate::kernel::luo::{Luo, MemfdRegion};
use liveupdate::kernel::reserved::{self, RangeKind, ReservedRegion};
use liveupdate::record::{LAYOUT_ALIGN, RecordStore};
use liveupdate::region::{FileRegion, Region};
use liveupdate::subsystem::Registry;
use liveupdate::subsystems::devices::Devices;
use liveupdate::subsystems::iommu::Iommu;
use liveupdate::subsystems::qmp::QemuVm;
use liveupdate::systemd::{Notifier, RebootPath, RebootPathCell, SystemdFdStore, take_listen_fds};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Why luod could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A file or directory could not be used.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file or directory luod writes is not one it may use.
    #[error(transparent)]
    File(#[from] liveupdate::fsutil::FileError),
    /// The `--socket` path exists and is not a socket.
    #[error(
        "--socket {path} exists and is not a socket (it is a {kind}); luod never removes it: remove it yourself, or pass another --socket"
    )]
    NotASocket {
        /// The path.
        path: String,
        /// What it is.
        kind: &'static str,
    },
    /// Another luod holds the region.
    #[error("region {0} is in use by another luod (it holds the region's lock); stop that one first")]
    RegionLocked(String),
    /// Another luod serves the socket.
    #[error("another luod already serves {0}; stop it first, or pass another --socket")]
    SocketInUse(String),
    /// No backend could be chosen.
    #[error("{0}")]
    Backend(String),
    /// The region could not be opened.
    #[error(transparent)]
    Region(#[from] liveupdate::region::RegionError),
    /// The reserved range could not be used.
    #[error(transparent)]
    Reserved(#[from] reserved::ReservedError),
    /// The kernel interface did not start.
    #[error(transparent)]
    Kernel(#[from] liveupdate::kernel::KernelError),
    /// The record could not be read.
    #[error(transparent)]
    Record(#[from] liveupdate::record::RecordError),
    /// The engine did not start.
    #[error(transparent)]
    Engine(#[from] liveupdate::engine::EngineError),
}

/// Work luod's start leaves until it serves: the blackout does not wait for it.
pub type AfterReady = Box<dyn FnOnce() + Send>;

/// The engine and what must stay open while it runs.
pub struct Started<R: Region> {
    /// The engine.
    pub engine: Engine<R>,
    /// Held for luod's lifetime (the region file's lock).
    pub _lock: Option<File>,
    /// Run on a thread of its own once luod serves (after `READY=1`).
    pub after_ready: Option<AfterReady>,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StartError + use<> {
    let path = path.display().to_string();
    move |source| StartError::Io { what, path, source }
}

/// The backend `args` ask for, resolving `auto`.
pub fn choose(args: &Args) -> Result<Backend, StartError> {
    if args.backend != Backend::Auto {
        return Ok(args.backend);
    }
    if args.liveupdate_dev.exists() {
        return Ok(Backend::Luo);
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if !reserved::ranges_in_cmdline(&cmdline).unwrap_or_default().is_empty() {
        return Ok(Backend::ReservedMemory);
    }
    if args.region.is_some() {
        return Ok(Backend::File);
    }
    Err(StartError::Backend(format!(
        "no backend available: {} does not exist (the kernel needs CONFIG_LIVEUPDATE and liveupdate=on), \
         the command line reserves no memory (memmap=SIZE$ADDR), and no --region file was given; \
         pass --backend file --region PATH to try luod without a live-update kernel",
        args.liveupdate_dev.display()
    )))
}

/// True when preserved files are parked in systemd's fd store.
fn parks_in_systemd(args: &Args) -> bool {
    match args.fd_store {
        FdStore::Systemd => true,
        FdStore::Auto => std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty()),
        FdStore::Holder => false,
    }
}

/// How `reboot` reaches the new kernel: the systemd path needs luod's
/// sessions in systemd's fd store and a LUO-aware systemd that keeps it.
/// Known at once when luod does not park in systemd's fd store; otherwise
/// a cell the returned detection fills (two `systemctl show`, about 160 ms
/// under TCG), run once luod serves so that it is not inside the blackout;
/// `check`, `status` and `reboot` wait for it.
fn reboot_path(args: &Args) -> (RebootPathCell, Option<AfterReady>) {
    if let Some(path) = reboot_path_without_systemctl(args) {
        tracing::info!("reboot path: {}: {}", path.name(), path.describe());
        return (RebootPathCell::known(path), None);
    }
    let cell = RebootPathCell::pending();
    let (filled, systemctl, unit) = (cell.clone(), args.systemctl.clone(), args.systemd_unit.clone());
    let detect = move || {
        let t = std::time::Instant::now();
        let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let unit = unit.or_else(|| liveupdate::systemd::unit_of_cgroup(&cgroup));
        let path = liveupdate::systemd::detect_reboot_path(&systemctl, unit.as_deref());
        tracing::info!(
            "reboot path: {}: {} (detected in {:.1} ms)",
            path.name(),
            path.describe(),
            ms(t)
        );
        filled.set(path);
    };
    (cell, Some(Box::new(detect)))
}

/// The reboot path when it needs no `systemctl`: the direct path, with why.
fn reboot_path_without_systemctl(args: &Args) -> Option<RebootPath> {
    if !parks_in_systemd(args) {
        return Some(RebootPath::Direct {
            why: if std::env::var_os("NOTIFY_SOCKET").is_some() {
                "luod parks its sessions in its fd holder (--fd-store holder), which does not survive an orderly \
                 shutdown"
                    .into()
            } else {
                "luod does not run under systemd".into()
            },
        });
    }
    None
}

/// Where preserved files are parked: systemd's fd store or the holder.
fn holder(args: &Args) -> Result<Box<dyn FdPark>, StartError> {
    let systemd = match args.fd_store {
        FdStore::Systemd => Some(Notifier::from_env().unwrap_or_else(|| {
            Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "NOTIFY_SOCKET is not set: luod is not running under systemd",
            ))
        })),
        FdStore::Auto => Notifier::from_env(),
        FdStore::Holder => None,
    };
    if let Some(notifier) = systemd {
        let notifier = notifier.map_err(io(
            "cannot use systemd's notification socket",
            Path::new("$NOTIFY_SOCKET"),
        ))?;
        tracing::info!("parking preserved files in systemd's fd store");
        return Ok(Box::new(SystemdFdStore::new(notifier, take_listen_fds())));
    }
    fsutil::private_dir("state directory", &args.state_dir)?;
    let path = args.state_dir.join("holder.sock");
    let spawn_at = path.clone();
    let client = HolderClient::connect_or_spawn(&path, Box::new(move || spawn_holder(&spawn_at)))
        .map_err(io("cannot start the fd holder at", &path))?;
    Ok(Box::new(client))
}

fn open_engine<R: Region>(
    args: &Args,
    kernel: Box<dyn liveupdate::kernel::Kernel>,
    store: RecordStore<R>,
    copying: bool,
    needs: Vec<String>,
) -> Result<Engine<R>, StartError> {
    let mut registry = Registry::new();
    if copying {
        registry
            .register(Box::new(RegionCapacity::new(store.data_capacity())))
            .expect("first registration cannot clash");
    }
    // Restore runs in this order: IOMMU groups are checked and devices
    // rebound to vfio-pci before any VM resumes.
    let iommu = Iommu::new(&args.sysfs_root, args.preserve_devices.clone());
    let iommu_report = iommu.report();
    registry
        .register(Box::new(iommu))
        .map_err(|e| StartError::Backend(e.to_string()))?;
    // Always registered: in the new kernel it rebinds the devices the old
    // kernel's record lists, whatever this luod was started with.
    let devices = Devices::new(&args.sysfs_root, args.preserve_devices.clone());
    let device_report = devices.report();
    registry
        .register(Box::new(devices))
        .map_err(|e| StartError::Backend(e.to_string()))?;
    let qmp_timeout = std::time::Duration::from_secs_f64(args.qmp_timeout.max(0.1));
    for (name, socket) in &args.qemu_vms {
        registry
            .register(Box::new(QemuVm::new(name, socket, qmp_timeout)))
            .map_err(|e| StartError::Backend(e.to_string()))?;
    }
    let vms = SharedVms::default();
    registry
        .register(Box::new(Kvm::new(vms.clone(), vm_timeout(args))))
        .map_err(|e| StartError::Backend(e.to_string()))?;
    let options = StartOptions {
        state_dir: Some(args.state_dir.clone()),
    };
    let mut engine = Engine::open_with(kernel, registry, store, host_info(), options)?;
    engine.set_cmdline_needs(needs);
    engine.set_vms(vms);
    engine.set_sysfs_root(args.sysfs_root.clone());
    engine.set_quotas(Quotas {
        sessions: args.max_sessions_per_uid,
        files: args.max_files_per_uid,
        bytes: args.max_bytes_per_uid,
    });
    engine.set_hooks(liveupdate::hooks::Hooks {
        root: args.hooks_dir.clone(),
        timeout: std::time::Duration::from_secs_f64(args.hook_timeout),
    });
    engine.set_rollback(liveupdate::engine::RollbackConfig {
        auto: args.rollback == crate::args::RollbackMode::Auto,
        kernel: args.rollback_kernel.clone(),
        initrd: args.rollback_initrd.clone(),
        cmdline: args.rollback_cmdline.clone(),
    });
    // What restore found in the new kernel, for `status`.
    if let Some(r) = iommu_report.get() {
        engine.add_note(r.summary());
    }
    for rebound in device_report.get().unwrap_or_default() {
        engine.add_note(format!("device {rebound}"));
    }
    Ok(engine)
}

/// When luod's process started (nanoseconds since the epoch): the blackout's
/// "luod started" is this, not the end of the backend's own start.
static STARTED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// Records luod's start; called first thing in `main`.
pub fn mark_start() {
    let _ = STARTED.set(liveupdate::engine::now());
}

fn host_info() -> HostInfo {
    let mut host = HostInfo::current();
    if let Some(started) = STARTED.get() {
        host.started = *started;
    }
    host
}

fn vm_timeout(args: &Args) -> std::time::Duration {
    std::time::Duration::from_secs_f64(args.vm_timeout.max(0.1))
}

/// The file backend: a region file and a simulated kexec.
pub fn file(args: &Args) -> Result<Started<FileRegion>, StartError> {
    let path = PathBuf::from(args.region.as_deref().ok_or_else(|| {
        StartError::Backend("the file backend needs --region PATH (a file luod creates if missing)".into())
    })?);
    if let Some(dir) = path.parent() {
        fsutil::create_dirs("directory of region", dir, fsutil::DIR_MODE)?;
    }
    let (file, created) = fsutil::open_or_create("region", &path)?;
    // The lock goes on an open file description of its own (the same file,
    // reopened through /proc, never through the path again): the region's
    // mapping keeps its description alive in the forked fd holder, which
    // must not keep the lock after luod exits.
    let lock = {
        use std::os::fd::AsRawFd;
        File::open(format!("/proc/self/fd/{}", file.as_raw_fd())).map_err(io("cannot reopen region", &path))?
    };
    if lock.try_lock().is_err() {
        return Err(StartError::RegionLocked(path.display().to_string()));
    }
    let existing = lock.metadata().map_err(io("cannot stat region", &path))?.len();
    let two_slots = 2 * LAYOUT_ALIGN;
    let region = if created || existing >= two_slots {
        let size = if created { args.region_size } else { existing };
        match FileRegion::with_file(&path, file, size) {
            Err(e) if created => {
                // Nothing of luod's is in a file it created a moment ago.
                let _ = std::fs::remove_file(&path);
                return Err(e.into());
            }
            other => other?,
        }
    } else {
        // Too short for two slots (cut to 0 bytes, truncated, not a region):
        // read, not touched. The engine decides whether it may start afresh
        // (nothing in it, nothing parked) or must wait for the operator.
        FileRegion::stand_in(&path, file, two_slots as usize, args.region_size.max(two_slots))?
    };
    let store = RecordStore::new(region)?;
    let kernel = Emulated::new("file", KexecMode::Simulated, Some(holder(args)?));
    let engine = open_engine(args, Box::new(kernel), store, true, Vec::new())?;
    Ok(Started {
        engine,
        _lock: Some(lock),
        after_ready: None,
    })
}

/// The LUO backend: real sessions, luod's record in its own session.
pub fn luo(args: &Args) -> Result<Started<MemfdRegion>, StartError> {
    let t = std::time::Instant::now();
    let park = holder(args)?;
    tracing::debug!("fd park ready after {:.1} ms", ms(t));
    let (mut kernel, record, how) = Luo::start(&args.liveupdate_dev, park, args.record_size)?;
    tracing::info!("LUO backend: {how:?} start ({:.1} ms)", ms(t));
    let (path, after_ready) = reboot_path(args);
    kernel.set_reboot_path_cell(path);
    let region = MemfdRegion::new(record).map_err(io("cannot map luod's record memfd from", &args.liveupdate_dev))?;
    let store = RecordStore::new(region)?;
    tracing::debug!("record loaded after {:.1} ms", ms(t));
    let engine = open_engine(args, Box::new(kernel), store, false, vec!["liveupdate=on".into()])?;
    tracing::debug!("engine open after {:.1} ms", ms(t));
    Ok(Started {
        engine,
        _lock: None,
        after_ready,
    })
}

fn ms(since: std::time::Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// The reserved-memory backend: a memmap= range, copies at freeze, real kexec.
pub fn reserved_memory(args: &Args) -> Result<Started<ReservedRegion>, StartError> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let (range, pmem) = match args.region.as_deref() {
        Some(dev) if dev.starts_with('/') => {
            let ranges = reserved::ranges_in_cmdline(&cmdline)?;
            let range = ranges
                .into_iter()
                .find(|r| r.kind == RangeKind::Pmem)
                .ok_or(reserved::ReservedError::NoReservation)?;
            (range, Some(PathBuf::from(dev)))
        }
        Some(spec) => (reserved::parse_memmap(spec)?, None),
        None => (
            reserved::ranges_in_cmdline(&cmdline)?
                .into_iter()
                .next()
                .ok_or(reserved::ReservedError::NoReservation)?,
            None,
        ),
    };
    let region = ReservedRegion::open(range, pmem.as_deref())?;
    let store = RecordStore::new(region)?;
    let kernel = Emulated::new("reserved-memory", KexecMode::Real, Some(holder(args)?));
    let engine = open_engine(args, Box::new(kernel), store, true, vec![range.memmap_param()])?;
    Ok(Started {
        engine,
        _lock: None,
        after_ready: None,
    })
}

/// True when this process has one thread (`/proc/self/status`).
fn single_threaded() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .map(|n| n.trim() == "1")
        })
        .unwrap_or(false)
}

/// Forks the holder: no second exec of luod's binary, which is most of the
/// holder's start-up cost (it matters in the new kernel, inside the blackout).
fn fork_holder(path: &Path) -> std::io::Result<()> {
    use nix::unistd::{ForkResult, fork, setpgid};
    // SAFETY: luod is single-threaded here (checked just before, and luod
    // starts no thread before its backend is open), so the child is a
    // consistent copy: no lock is held by a thread that does not exist in
    // it. The child only runs the holder loop and exits without returning
    // into luod's code.
    match unsafe { fork() }? {
        ForkResult::Child => {
            // luod blocks SIGTERM and SIGINT (one thread waits for them);
            // the holder must not inherit that, or `kill PID` would do
            // nothing. run_holder reads the two itself and exits cleanly.
            let _ = nix::sys::signal::SigSet::empty().thread_set_mask();
            // Nothing of luod's may stay open here: its listening socket or
            // the region's lock would make a luod started later believe
            // another one runs.
            // SAFETY: close_range(3, ~0, 0) closes descriptors this child
            // owns; nothing in it uses them afterwards (the holder opens its
            // own socket).
            let closed = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
            if closed != 0 {
                std::process::exit(1);
            }
            let _ = setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0));
            // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most
            // 16 bytes from a pointer that is valid for the call.
            unsafe { libc::prctl(libc::PR_SET_NAME, c"luod-holder".as_ptr()) };
            let code = match liveupdate::holder::run_holder(path) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("luod fd holder: {e}");
                    1
                }
            };
            std::process::exit(code);
        }
        ForkResult::Parent { child } => {
            write_holder_pid(path, child.as_raw() as u32);
            std::thread::spawn(move || nix::sys::wait::waitpid(child, None));
            Ok(())
        }
    }
}

/// Starts `luod --holder PATH` in its own process group, reaped by a thread
/// (forked while luod is single-threaded, at start; re-executed when luod
/// replaces a holder that died, as then it has threads).
fn spawn_holder(path: &Path) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    if single_threaded() {
        return fork_holder(path);
    }
    // /proc/self/exe re-executes this very binary even where its path
    // cannot be read back (an initramfs, a deleted file after an upgrade).
    let mut child = std::process::Command::new("/proc/self/exe")
        .arg("--holder")
        .arg(path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .process_group(0)
        .spawn()?;
    write_holder_pid(path, child.id());
    std::thread::spawn(move || child.wait());
    Ok(())
}

/// Writes the holder's pid beside its socket (`holder.pid`), for operators
/// and scripts that must find it (e.g. to stop it before a plain kexec).
fn write_holder_pid(socket: &Path, pid: u32) {
    let path = socket.with_file_name("holder.pid");
    if let Err(e) = fsutil::write_private("holder pid file", &path, format!("{pid}\n").as_bytes()) {
        tracing::warn!("{e}");
    }
}
