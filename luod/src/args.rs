//! Command-line arguments.

use clap::{Parser, ValueEnum};
use std::path::PathBuf;

/// Where preserved state goes across the kexec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// `luo` when /dev/liveupdate exists, else `reserved-memory` when the
    /// kernel command line reserves a range with memmap=, else `file` when
    /// --region names a file.
    Auto,
    /// The kernel's Live Update Orchestrator (/dev/liveupdate, Linux 6.19+):
    /// the kernel carries the preserved memfds; luod's record lives in a
    /// memfd of its own session. Real kexec.
    Luo,
    /// A physical range reserved with memmap=SIZE$ADDR (or SIZE!ADDR) on both
    /// kernels' command lines: luod copies the preserved memfds and its
    /// record there at freeze. Real kexec.
    ReservedMemory,
    /// A file-backed region and a simulated kexec: luod writes the record and
    /// the preserved files into the region at `reboot` and exits with status
    /// 75; a luod started again on the same region comes up in `updated`.
    File,
}

/// Where luod parks file descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FdStore {
    /// `systemd` under systemd, else `holder`.
    Auto,
    /// systemd's fd store (`FDSTORE=1`).
    Systemd,
    /// A holder process luod forks (`luod --holder`).
    Holder,
}

/// The live-update daemon.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Args {
    /// Unix socket to serve (mode 0660).
    #[arg(long, default_value = liveupdate::protocol::DEFAULT_SOCKET, env = "LUOD_SOCKET")]
    pub socket: PathBuf,

    /// Group (name or gid) that owns the socket, so its members can connect
    /// (the socket is mode 0660). Default: luod's own group.
    #[arg(long)]
    pub socket_group: Option<String>,

    /// Directory for luod's runtime files (the fd holder's socket, stale
    /// handover records kept aside).
    #[arg(long, default_value = "/run/luod")]
    pub state_dir: PathBuf,

    /// Backend.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: Backend,

    /// The region. File backend: a file that holds the handover record and
    /// the preserved files across the simulated kexec. Reserved-memory
    /// backend: the range as SIZE$ADDR or SIZE!ADDR (default: the memmap= of
    /// /proc/cmdline), or a pmem device path.
    #[arg(long)]
    pub region: Option<String>,

    /// The LUO device (luo backend).
    #[arg(long, default_value = "/dev/liveupdate")]
    pub liveupdate_dev: PathBuf,

    /// Size of luod's record memfd (luo backend), e.g. 4M.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    pub record_size: u64,

    /// Size of the region when luod creates it, e.g. 256M or 1G. An existing
    /// region keeps its size (its layout depends on it).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub region_size: u64,

    /// Where preserved files and sessions are parked so that a crash of luod
    /// loses nothing: systemd's fd store (under systemd, with
    /// FileDescriptorStoreMax= set, as in luod.service), or a holder process
    /// luod forks. `auto`: systemd when NOTIFY_SOCKET is set.
    #[arg(long, value_enum, default_value = "auto")]
    pub fd_store: FdStore,

    /// The `systemctl` luod runs under systemd (LUO backend, systemd's fd
    /// store): at start `systemctl show` tells whether PID 1 is LUO-aware
    /// (systemd 261 or later) and keeps luod's fd store across a kexec
    /// (FileDescriptorStorePreserve=); if so, `reboot` runs `systemctl kexec`
    /// (an orderly shutdown), else luod kexecs itself. `luoctl check` names
    /// the path.
    #[arg(long, default_value = "systemctl")]
    pub systemctl: std::path::PathBuf,

    /// luod's systemd unit, for `systemctl show` (default: read from
    /// /proc/self/cgroup).
    #[arg(long)]
    pub systemd_unit: Option<String>,

    /// Seconds a client may take to say hello after connecting, to send a
    /// whole frame once it started one, and to read luod's answer; 1 to 3600.
    /// A client idle between requests after its hello is kept.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_SECS))]
    pub client_timeout: u64,

    /// Most client connections served at once (1 to 65536). An extra client
    /// gets an error and is closed; root keeps a reserve of 8 more, so an
    /// operator can still run `luoctl status` when others fill the cap.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_connections: u32,

    /// Most connections one uid other than root may have open at once (1 to
    /// 65536): one user cannot take every place of --max-connections.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_connections_per_uid: u32,

    /// Seconds the VMMs may take to answer each call (prepare, freeze,
    /// unfreeze, cancel): every VMM is called at once and all answers are
    /// due by this one deadline; one that does not answer fails the step.
    /// More than 0, at most 3600.
    #[arg(long, default_value_t = 5.0, value_parser = parse_seconds)]
    pub vm_timeout: f64,

    /// sysfs mount point (the IOMMU and device subsystems read it).
    #[arg(long, default_value = "/sys")]
    pub sysfs_root: PathBuf,

    /// A PCI device (DDDD:BB:DD.F) passed through to a VM that must stay
    /// bound to vfio-pci across the update; repeat for several. prepare
    /// requires each to be bound to vfio-pci and in an IOMMU group; the new
    /// kernel's luod rebinds them before VMMs restore.
    #[arg(long = "preserve-device", value_name = "ADDR", value_parser = parse_pci)]
    pub preserve_devices: Vec<liveupdate::subsystems::PciAddress>,

    /// A QEMU VM that is not luod-aware, as NAME=QMP_SOCKET: stopped at
    /// freeze, continued on unfreeze/cancel and after the update; repeat
    /// for several.
    #[arg(long = "qemu-vm", value_name = "NAME=SOCKET", value_parser = parse_qemu_vm)]
    pub qemu_vms: Vec<(String, PathBuf)>,

    /// Seconds to wait for a QEMU's QMP answer (more than 0, at most 3600).
    #[arg(long, default_value_t = 5.0, value_parser = parse_seconds)]
    pub qmp_timeout: f64,

    /// Most sessions one uid may hold (uid 0 is exempt); `session create`
    /// past it is refused.
    #[arg(long, default_value_t = liveupdate::engine::Quotas::DEFAULT.sessions)]
    pub max_sessions_per_uid: u64,

    /// Most preserved files one uid may hold over all its sessions (uid 0 is
    /// exempt); `session preserve` past it is refused.
    #[arg(long, default_value_t = liveupdate::engine::Quotas::DEFAULT.files)]
    pub max_files_per_uid: u64,

    /// Most bytes of preserved files one uid may hold over all its sessions
    /// (uid 0 is exempt), e.g. 64G: `session preserve` past it is refused,
    /// and prepare, freeze and reboot are refused while a uid is over it (a
    /// memfd that grew after it was preserved).
    #[arg(long, default_value = "64G", value_parser = parse_size)]
    pub max_bytes_per_uid: u64,

    /// Configuration file: one key per flag (see luod/luod.toml); a flag
    /// given here wins over the file. A missing file is fine at the default
    /// path, an error at a path given here.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Check the configuration (the file and the flags), print the effective
    /// one with where each value came from, and exit: 0 when it is valid, 2
    /// when not. Starts nothing.
    #[arg(long)]
    pub check_config: bool,

    /// With --check-config: print the configuration as JSON.
    #[arg(long, requires = "check_config")]
    pub json: bool,

    /// Internal: run as the fd holder serving this socket.
    #[arg(long, hide = true)]
    pub holder: Option<PathBuf>,
}

/// The longest timeout luod accepts, in seconds (an hour).
pub const MAX_TIMEOUT_SECS: u64 = 3600;

/// Parses a timeout in seconds: a finite number above 0 and at most
/// [`MAX_TIMEOUT_SECS`] (`inf`, `NaN` or `1e20` would not make a duration).
pub fn parse_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds (e.g. 5 or 0.5)"))?;
    if !v.is_finite() || v <= 0.0 || v > MAX_TIMEOUT_SECS as f64 {
        return Err(format!(
            "{s} seconds is out of range: give more than 0 and at most {MAX_TIMEOUT_SECS}"
        ));
    }
    Ok(v)
}

fn parse_pci(s: &str) -> Result<liveupdate::subsystems::PciAddress, String> {
    s.parse()
        .map_err(|e: liveupdate::subsystems::BadPciAddress| e.to_string())
}

fn parse_qemu_vm(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, socket)) if !name.is_empty() && !socket.is_empty() => Ok((name.to_string(), PathBuf::from(socket))),
        _ => Err(format!("{s:?} is not NAME=QMP_SOCKET (e.g. vm0=/run/qemu/vm0.qmp)")),
    }
}

/// Parses `4096`, `64K`, `256M`, `1G` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("unknown size suffix {c:?}: use K, M or G")),
            };
            (&s[..i], mult)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size: give bytes, or a number with K, M or G"))?;
    n.checked_mul(mult).ok_or_else(|| format!("{s} is too large"))
}

#[cfg(test)]
mod tests {
    use super::{parse_seconds, parse_size};

    #[test]
    fn timeouts_are_finite_positive_and_at_most_an_hour() {
        assert_eq!(parse_seconds("5"), Ok(5.0));
        assert_eq!(parse_seconds("0.25"), Ok(0.25));
        assert_eq!(parse_seconds("3600"), Ok(3600.0));
        for bad in ["inf", "-inf", "NaN", "1e20", "0", "-1", "3600.5"] {
            assert_eq!(
                parse_seconds(bad),
                Err(format!(
                    "{bad} seconds is out of range: give more than 0 and at most 3600"
                )),
                "{bad}"
            );
        }
        assert_eq!(
            parse_seconds("soon"),
            Err("\"soon\" is not a number of seconds (e.g. 5 or 0.5)".to_string())
        );
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("256m"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("1T").is_err());
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn quota_defaults_are_the_engines() {
        use clap::Parser;
        let args = super::Args::parse_from(["luod"]);
        let q = liveupdate::engine::Quotas::DEFAULT;
        assert_eq!(
            (
                args.max_sessions_per_uid,
                args.max_files_per_uid,
                args.max_bytes_per_uid
            ),
            (q.sessions, q.files, q.bytes)
        );
    }
}
