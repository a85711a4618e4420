//! Command-line arguments.

use clap::{Parser, ValueEnum};
use std::path::PathBuf;

/// Where preserved state goes across the kexec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// A file-backed region and a simulated kexec: luod writes the record and
    /// the preserved files into the region at `reboot` and exits with status
    /// 75; a luod started again on the same region comes up in `updated`.
    File,
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

    /// Directory for luod's runtime files (the fd holder's socket).
    #[arg(long, default_value = "/run/luod")]
    pub state_dir: PathBuf,

    /// Backend.
    #[arg(long, value_enum, default_value = "file")]
    pub backend: Backend,

    /// Region file (file backend): holds the handover record and the
    /// preserved files' contents across the (simulated) kexec.
    #[arg(long, required_unless_present = "holder")]
    pub region: Option<PathBuf>,

    /// Size of the region when luod creates it, e.g. 256M or 1G. An existing
    /// region keeps its size (its layout depends on it).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub region_size: u64,

    /// Seconds a client may take to send the rest of a frame it started.
    #[arg(long, default_value_t = 10)]
    pub client_timeout: u64,

    /// Internal: run as the fd holder serving this socket.
    #[arg(long, hide = true)]
    pub holder: Option<PathBuf>,
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
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size: give bytes, or a number with K, M or G"))?;
    n.checked_mul(mult).ok_or_else(|| format!("{s} is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("256m"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("1T").is_err());
        assert!(parse_size("lots").is_err());
    }
}
