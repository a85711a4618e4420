//! `luoctl prepare`: start a cycle (normal -> prepared).

use super::{Ctx, Failed, print_transition, unexpected};
use crate::error::Failure;
use crate::exit::ExitCode;
use clap::ArgGroup;
use liveupdate::protocol::{ImageFile, PrepareArgs, Request};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The target kernel, shared by `prepare` and `check`.
///
/// Without `--kernel`, the cycle has no kexec target loaded (the file
/// backend simulates the kexec).
#[derive(Debug, Clone, clap::Args)]
#[command(group(ArgGroup::new("cmdline-source").args(["cmdline", "reuse_cmdline"])))]
pub struct KernelArgs {
    /// Kernel image to load for kexec.
    #[arg(long, value_name = "PATH", requires = "cmdline-source")]
    pub kernel: Option<PathBuf>,

    /// Initrd to load with the kernel.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    pub initrd: Option<PathBuf>,

    /// Command line of the target kernel.
    #[arg(long, value_name = "STRING", requires = "kernel")]
    pub cmdline: Option<String>,

    /// Use the running kernel's command line (plus what the backend needs).
    #[arg(long, requires = "kernel")]
    pub reuse_cmdline: bool,

    /// Pin the kernel image: its SHA-256 (64 hex digits). luod digests the
    /// file it gets and refuses a mismatch before anything loads (exit 20).
    #[arg(long = "sha256", value_name = "HEX", requires = "kernel", value_parser = parse_sha256)]
    pub kernel_sha256: Option<[u8; 32]>,

    /// Pin the initrd: its SHA-256 (64 hex digits).
    #[arg(long, value_name = "HEX", requires = "initrd", value_parser = parse_sha256)]
    pub initrd_sha256: Option<[u8; 32]>,
}

/// Parses a SHA-256 given as 64 hex digits (either case).
pub fn parse_sha256(s: &str) -> Result<[u8; 32], String> {
    let s = s.trim();
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{s:?} is not a SHA-256: give 64 hex digits, as sha256sum prints them"
        ));
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

impl KernelArgs {
    /// The protocol's arguments and the image files to send with them.
    ///
    /// luoctl opens `--kernel` and `--initrd` with the caller's own rights
    /// and sends them as descriptors (the kernel first, then the initrd):
    /// luod never opens a path a client names. An image the caller cannot
    /// open fails here, naming the path, and luod is not asked; luod judges
    /// what was opened (only a regular file will do). The names sent are the
    /// absolute paths, for display and the record.
    pub fn open(&self, what: &str) -> Result<(PrepareArgs, Vec<File>), Failure> {
        let mut files = Vec::new();
        let mut send = |option: &str, path: &Path| -> Result<ImageFile, Failure> {
            let (name, file) = open_image(what, option, path)?;
            files.push(file);
            Ok(ImageFile {
                fd: (files.len() - 1) as u32,
                name,
            })
        };
        let kernel = self.kernel.as_deref().map(|p| send("--kernel", p)).transpose()?;
        let initrd = self.initrd.as_deref().map(|p| send("--initrd", p)).transpose()?;
        let args = PrepareArgs {
            kernel,
            initrd,
            cmdline: self.cmdline.clone(),
            reuse_cmdline: self.reuse_cmdline,
            kernel_sha256: self.kernel_sha256,
            initrd_sha256: self.initrd_sha256,
        };
        Ok((args, files))
    }
}

/// Opens an image for reading with the caller's rights: its absolute path
/// (the name luod shows and records) and the open file.
///
/// `O_NONBLOCK` so that a FIFO does not block luoctl's own open (luod
/// then refuses it, as anything but a regular file), `O_NOCTTY` so that a
/// terminal does not become ours.
fn open_image(what: &str, option: &str, path: &Path) -> Result<(String, File), Failure> {
    let fail = |msg: String| Failure::new(what, ExitCode::LocalIo, msg);
    let abs = std::path::absolute(path).map_err(|e| fail(format!("cannot open {option} {}: {e}", path.display())))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&abs)
        .map_err(|e| fail(format!("cannot open {option} {}: {e}", abs.display())))?;
    Ok((abs.display().to_string(), file))
}

/// `prepare`'s options.
#[derive(Debug, clap::Args)]
pub struct PrepareCmd {
    /// The target kernel.
    #[command(flatten)]
    pub kernel: KernelArgs,
}

/// Asks luod to prepare and prints what happened.
pub fn run(args: &PrepareCmd, ctx: &Ctx) -> Result<(), Failed> {
    let (args, files) = args.kernel.open("prepare")?;
    let req = Request::Prepare(args);
    let fds: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
    let report = match ctx.call_fds("prepare", &req, &fds)? {
        (liveupdate::protocol::Response::Transition(r), _) => r,
        (other, _) => return Err(unexpected("prepare", &req, &other).into()),
    };
    print_transition(ctx, "prepare", &report);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(path: &str) -> KernelArgs {
        KernelArgs {
            kernel: Some(path.into()),
            initrd: None,
            cmdline: Some("console=ttyS0".into()),
            reuse_cmdline: false,
            kernel_sha256: None,
            initrd_sha256: None,
        }
    }

    #[test]
    fn a_kernel_image_luoctl_cannot_open_is_refused_before_asking_luod() {
        let f = kernel("/nonexistent/vmlinuz").open("prepare").unwrap_err();
        assert_eq!(f.code, ExitCode::LocalIo);
        assert_eq!(
            f.message,
            "cannot open --kernel /nonexistent/vmlinuz: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn images_travel_as_descriptors_named_by_their_absolute_paths() {
        let dir = std::env::current_dir().unwrap();
        let args = KernelArgs {
            kernel: Some("Cargo.toml".into()),
            initrd: Some("src/main.rs".into()),
            cmdline: None,
            reuse_cmdline: true,
            kernel_sha256: None,
            initrd_sha256: None,
        };
        let (p, files) = args.open("prepare").unwrap();
        let name = |f: &str| dir.join(f).display().to_string();
        assert_eq!(
            (p.kernel, p.initrd),
            (
                Some(ImageFile {
                    fd: 0,
                    name: name("Cargo.toml")
                }),
                Some(ImageFile {
                    fd: 1,
                    name: name("src/main.rs")
                })
            )
        );
        assert!(p.reuse_cmdline);
        assert_eq!(files.len(), 2);
        assert_eq!(
            std::fs::read_to_string(dir.join("Cargo.toml")).unwrap().len() as u64,
            files[0].metadata().unwrap().len()
        );
    }

    #[test]
    fn a_fifo_does_not_block_luoctls_own_open() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Without O_NONBLOCK this open would wait for a writer forever; luod
        // refuses the FIFO once it gets it.
        let (p, files) = kernel(fifo.to_str().unwrap()).open("check").unwrap();
        assert_eq!(p.kernel.unwrap().name, fifo.display().to_string());
        assert!(std::os::unix::fs::FileTypeExt::is_fifo(
            &files[0].metadata().unwrap().file_type()
        ));
    }

    #[test]
    fn a_pin_is_64_hex_digits() {
        let d = "00ff".repeat(16);
        let mut want = [0u8; 32];
        for (i, b) in want.iter_mut().enumerate() {
            *b = if i % 2 == 0 { 0 } else { 0xff };
        }
        assert_eq!(parse_sha256(&d), Ok(want));
        assert_eq!(parse_sha256(&d.to_uppercase()), Ok(want));
        assert_eq!(
            parse_sha256("abc"),
            Err("\"abc\" is not a SHA-256: give 64 hex digits, as sha256sum prints them".to_string())
        );
        assert!(parse_sha256(&"g".repeat(64)).is_err());
    }

    #[test]
    fn no_kernel_means_no_target_and_no_descriptor() {
        let args = KernelArgs {
            kernel: None,
            initrd: None,
            cmdline: None,
            reuse_cmdline: false,
            kernel_sha256: None,
            initrd_sha256: None,
        };
        let (p, files) = args.open("prepare").unwrap();
        assert_eq!(p, PrepareArgs::default());
        assert!(files.is_empty());
    }
}
