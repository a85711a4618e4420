//! A VM's configuration: `/etc/luod/vms/NAME.toml`.
//!
//! ```toml
//! qemu = "/usr/bin/qemu-system-x86_64"
//! memory_mib = 1024
//! # Room for QEMU's device state at the checkpoint (guest RAM is not in it).
//! state_mib = 16
//! # Everything else QEMU needs; the launcher adds guest RAM, the QMP socket
//! # and, when it restores the VM, -incoming defer.
//! args = ["-machine", "q35", "-accel", "kvm", "-cpu", "host", "-nodefaults",
//!         "-drive", "file=/var/lib/vms/web.qcow2,if=virtio"]
//! ```

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Where `luo-qemu run NAME` looks for `NAME.toml`.
pub const CONFIG_DIR: &str = "/etc/luod/vms";
/// Default room for the device state, in MiB.
pub const DEFAULT_STATE_MIB: u64 = 16;

/// A VM's configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The QEMU system emulator to run (8.2 or newer for `cpr-reboot`).
    pub qemu: PathBuf,
    /// Guest RAM in MiB (one memfd, preserved by luod).
    pub memory_mib: u64,
    /// Size of the memfd QEMU writes its device state into at the
    /// checkpoint, in MiB. It is preserved with the VM, so it never grows.
    #[serde(default = "default_state_mib")]
    pub state_mib: u64,
    /// QEMU's other arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// luod's socket.
    #[serde(default)]
    pub luod_socket: Option<PathBuf>,
    /// Where the QMP socket goes (`NAME.qmp`).
    #[serde(default)]
    pub run_dir: Option<PathBuf>,
    /// Deadline for each QMP command and for the checkpoint, in seconds.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

fn default_state_mib() -> u64 {
    DEFAULT_STATE_MIB
}

fn default_timeout() -> u64 {
    30
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("{}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, one sentence.
        message: String,
    },
}

/// Arguments the launcher owns: a configuration may not set them.
const OWNED: &[&str] = &["-m", "-incoming", "-qmp", "-daemonize"];

impl VmConfig {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<VmConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        VmConfig::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses and checks a configuration's text.
    pub fn parse(text: &str) -> Result<VmConfig, String> {
        let cfg: VmConfig = toml::from_str(text).map_err(|e| e.message().to_string())?;
        if cfg.memory_mib == 0 {
            return Err("memory_mib must be at least 1".into());
        }
        if cfg.state_mib == 0 {
            return Err("state_mib must be at least 1".into());
        }
        if let Some(a) = cfg.args.iter().find(|a| OWNED.contains(&a.as_str())) {
            return Err(format!(
                "args must not contain {a}: the launcher sets guest RAM (-m), the QMP socket and -incoming itself"
            ));
        }
        if let Some(a) = cfg
            .args
            .iter()
            .find(|a| a.starts_with("memory-backend=") || a.contains(",memory-backend="))
        {
            return Err(format!(
                "args must not choose the RAM backend ({a}): the launcher backs guest RAM with a memfd luod preserves"
            ));
        }
        Ok(cfg)
    }

    /// The configuration of VM `name` in `dir`.
    pub fn path_of(dir: &Path, name: &str) -> PathBuf {
        dir.join(format!("{name}.toml"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_configuration_takes_the_defaults() {
        let c = VmConfig::parse("qemu = \"/usr/bin/qemu-system-x86_64\"\nmemory_mib = 64\n").expect("valid");
        assert_eq!(c.state_mib, DEFAULT_STATE_MIB);
        assert_eq!(c.timeout_secs, 30);
        assert!(c.args.is_empty() && c.luod_socket.is_none());
    }

    #[test]
    fn arguments_the_launcher_owns_are_refused() {
        let e = VmConfig::parse("qemu = \"q\"\nmemory_mib = 64\nargs = [\"-m\", \"2G\"]\n").expect_err("refused");
        assert_eq!(
            e,
            "args must not contain -m: the launcher sets guest RAM (-m), the QMP socket and -incoming itself"
        );
        let e = VmConfig::parse("qemu = \"q\"\nmemory_mib = 64\nargs = [\"-machine\", \"q35,memory-backend=x\"]\n")
            .expect_err("refused");
        assert!(
            e.starts_with("args must not choose the RAM backend (q35,memory-backend=x)"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_and_zero_sizes_are_refused() {
        let e = VmConfig::parse("qemu = \"q\"\nmemory_mib = 64\nmemory = 3\n").expect_err("refused");
        assert!(e.contains("unknown field `memory`"), "{e}");
        let e = VmConfig::parse("qemu = \"q\"\nmemory_mib = 0\n").expect_err("refused");
        assert_eq!(e, "memory_mib must be at least 1");
    }
}
