//! Building the engine for the chosen backend.

use crate::args::{Args, Backend};
use liveupdate::engine::{Engine, HostInfo, RegionCapacity};
use liveupdate::holder::HolderClient;
use liveupdate::kernel::emulated::{Emulated, KexecMode};
use liveupdate::record::RecordStore;
use liveupdate::region::FileRegion;
use liveupdate::subsystem::Registry;
use std::fs::File;
use std::path::Path;

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
    /// Another luod holds the region.
    #[error("region {0} is in use by another luod (it holds the region's lock); stop that one first")]
    RegionLocked(String),
    /// Another luod serves the socket.
    #[error("another luod already serves {0}; stop it first, or pass another --socket")]
    SocketInUse(String),
    /// The region could not be opened.
    #[error(transparent)]
    Region(#[from] liveupdate::region::RegionError),
    /// The record could not be read.
    #[error(transparent)]
    Record(#[from] liveupdate::record::RecordError),
    /// The engine did not start.
    #[error(transparent)]
    Engine(#[from] liveupdate::engine::EngineError),
}

/// The engine and what must stay open while it runs.
pub struct Started {
    /// The engine.
    pub engine: Engine<FileRegion>,
    /// Held for luod's lifetime: the region's lock.
    pub _lock: File,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StartError + use<> {
    let path = path.display().to_string();
    move |source| StartError::Io { what, path, source }
}

/// Opens the backend named in `args`.
pub fn start(args: &Args) -> Result<Started, StartError> {
    match args.backend {
        Backend::File => start_file(args),
    }
}

fn start_file(args: &Args) -> Result<Started, StartError> {
    let path = args.region.as_deref().expect("clap requires --region without --holder");
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io("cannot create the directory of region", path))?;
    }
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io("cannot open region", path))?;
    if lock.try_lock().is_err() {
        return Err(StartError::RegionLocked(path.display().to_string()));
    }
    let existing = lock.metadata().map_err(io("cannot stat region", path))?.len();
    let size = if existing > 0 { existing } else { args.region_size };
    let region = FileRegion::open(path, size)?;
    let store = RecordStore::new(region)?;
    std::fs::create_dir_all(&args.state_dir).map_err(io("cannot create state directory", &args.state_dir))?;
    let holder_path = args.state_dir.join("holder.sock");
    let holder = HolderClient::connect_or_spawn(&holder_path, || spawn_holder(&holder_path))
        .map_err(io("cannot start the fd holder at", &holder_path))?;
    let kernel = Emulated::new("file", KexecMode::Simulated, Some(Box::new(holder)));
    let mut registry = Registry::new();
    registry
        .register(Box::new(RegionCapacity::new(store.data_capacity())))
        .expect("first registration cannot clash");
    let engine = Engine::open(Box::new(kernel), registry, store, HostInfo::current())?;
    Ok(Started { engine, _lock: lock })
}

/// Starts `luod --holder PATH` in its own process group, reaped by a thread.
fn spawn_holder(path: &Path) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(exe)
        .arg("--holder")
        .arg(path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .process_group(0)
        .spawn()?;
    std::thread::spawn(move || child.wait());
    Ok(())
}
