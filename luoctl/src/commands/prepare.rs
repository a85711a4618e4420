//! `luoctl prepare`: start a cycle (normal -> prepared).

use super::{Ctx, Failed, print_transition, transition};
use crate::error::Failure;
use crate::exit::ExitCode;
use clap::ArgGroup;
use liveupdate::protocol::{PrepareArgs, Request};
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
}

impl KernelArgs {
    /// The protocol's arguments. Paths are made absolute (luod does not share
    /// our working directory) and must exist; luod checks the rest.
    pub fn to_protocol(&self, what: &str) -> Result<PrepareArgs, Failure> {
        Ok(PrepareArgs {
            kernel: self.kernel.as_deref().map(|p| image(what, "--kernel", p)).transpose()?,
            initrd: self.initrd.as_deref().map(|p| image(what, "--initrd", p)).transpose()?,
            cmdline: self.cmdline.clone(),
            reuse_cmdline: self.reuse_cmdline,
        })
    }
}

/// `path` made absolute, after checking that it names an existing file.
fn image(what: &str, option: &str, path: &Path) -> Result<String, Failure> {
    let fail = |msg: String| Failure::new(what, ExitCode::InvalidArgument, msg);
    let abs = std::path::absolute(path).map_err(|e| fail(format!("{option} {}: {e}", path.display())))?;
    match std::fs::metadata(&abs) {
        Ok(m) if m.is_dir() => return Err(fail(format!("{option} {} is a directory", abs.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(fail(format!("{option} {} does not exist", abs.display())));
        }
        // Anything else (e.g. a root-only /boot) is for luod, which reads
        // the image with its own privileges, to judge.
        _ => {}
    }
    abs.into_os_string()
        .into_string()
        .map_err(|p| fail(format!("{option} {} is not valid UTF-8", Path::new(&p).display())))
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
    let req = Request::Prepare(args.kernel.to_protocol("prepare")?);
    let report = transition(ctx, "prepare", &req)?;
    print_transition(ctx, "prepare", &report);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_kernel_image_is_refused_before_asking_luod() {
        let args = KernelArgs {
            kernel: Some("/nonexistent/vmlinuz".into()),
            initrd: None,
            cmdline: Some("console=ttyS0".into()),
            reuse_cmdline: false,
        };
        let f = args.to_protocol("prepare").unwrap_err();
        assert_eq!(f.code, ExitCode::InvalidArgument);
        assert_eq!(f.message, "--kernel /nonexistent/vmlinuz does not exist");
    }

    #[test]
    fn relative_image_paths_become_absolute() {
        let dir = std::env::current_dir().unwrap();
        let args = KernelArgs {
            kernel: Some("Cargo.toml".into()),
            initrd: None,
            cmdline: None,
            reuse_cmdline: true,
        };
        let p = args.to_protocol("prepare").unwrap();
        assert_eq!(p.kernel, Some(dir.join("Cargo.toml").to_string_lossy().into_owned()));
        assert!(p.reuse_cmdline);
    }

    #[test]
    fn no_kernel_means_no_target() {
        let args = KernelArgs {
            kernel: None,
            initrd: None,
            cmdline: None,
            reuse_cmdline: false,
        };
        assert_eq!(args.to_protocol("prepare").unwrap(), PrepareArgs::default());
    }
}
