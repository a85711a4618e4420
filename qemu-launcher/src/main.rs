//! `luo-qemu run NAME`: see the crate documentation and the README's
//! "For QEMU hosts".

use clap::Parser;
use luo_qemu::config::{CONFIG_DIR, VmConfig};
use luo_qemu::launcher::{Outcome, Settings, Signals, run};
use std::path::PathBuf;
use std::time::Duration;

/// Runs a QEMU VM whose guest survives the host's kernel live update.
#[derive(Debug, Parser)]
#[command(name = "luo-qemu", version)]
enum Cli {
    /// Runs VM NAME (configuration NAME.toml): restores it if it came
    /// through a kexec, starts it fresh otherwise, and answers luod.
    Run {
        /// VM name (1 to 60 bytes: letters, digits, '-', '_', '.').
        name: String,
        /// Directory of the VMs' configurations.
        #[arg(long, default_value = CONFIG_DIR)]
        config_dir: PathBuf,
        /// luod's socket (overrides the configuration's luod_socket).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Directory of the QMP socket (overrides the configuration's run_dir).
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// How long to wait for luod at start, e.g. `30s`.
        #[arg(long, default_value = "30s", value_parser = humantime_secs)]
        luod_wait: Duration,
    },
}

fn humantime_secs(s: &str) -> Result<Duration, String> {
    let n = s.strip_suffix('s').unwrap_or(s);
    n.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| format!("{s:?} is not a number of seconds (e.g. 30s)"))
}

fn main() -> std::process::ExitCode {
    let Cli::Run {
        name,
        config_dir,
        socket,
        run_dir,
        luod_wait,
    } = Cli::parse();
    if liveupdate::names::SessionName::new(liveupdate::engine::vm_session(&name)).is_err()
        || name.is_empty()
        || name.contains(['/', '\0'])
    {
        eprintln!("luo-qemu: {name:?} is not a valid VM name (1 to 60 bytes, no '/' or NUL)");
        return std::process::ExitCode::from(2);
    }
    let path = VmConfig::path_of(&config_dir, &name);
    let cfg = match VmConfig::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("luo-qemu: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let run_dir = run_dir
        .or_else(|| cfg.run_dir.clone())
        .unwrap_or_else(|| PathBuf::from("/run/luo-qemu"));
    if let Err(e) = std::fs::create_dir_all(&run_dir) {
        eprintln!("luo-qemu: cannot create {}: {e}", run_dir.display());
        return std::process::ExitCode::from(1);
    }
    let settings = Settings {
        qmp: run_dir.join(format!("{name}.qmp")),
        socket: socket
            .or_else(|| cfg.luod_socket.clone())
            .unwrap_or_else(|| PathBuf::from(liveupdate::protocol::DEFAULT_SOCKET)),
        name,
        luod_wait,
    };
    let signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("luo-qemu: installing signal handlers: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let outcome: Outcome = run(&settings, &cfg, &signals);
    std::process::ExitCode::from(outcome as u8)
}
