//! The running kernel's policy on signed kexec images, from the facts it
//! shows at runtime.
//!
//! `kexec_file_load` verifies the image's signature when the kernel was
//! built with `CONFIG_KEXEC_SIG` (`kimage_validate_signature` in
//! `kernel/kexec_file.c`). A failed verification refuses the image when
//! `CONFIG_KEXEC_SIG_FORCE` is set (the verifier's errno: `EKEYREJECTED`,
//! `ENOKEY`, `EBADMSG`, ...) or when the kernel is locked down (`EPERM`;
//! lockdown is `integrity` or `confidentiality`, often set by Secure Boot);
//! otherwise it is only logged. `kernel.kexec_load_disabled` forbids any
//! load (`EPERM`).
//!
//! Where each fact is read: the lockdown mode from
//! `SYSFS/kernel/security/lockdown` (`none [integrity] confidentiality`),
//! the kernel's build options from `/boot/config-RELEASE`,
//! `/proc/sys/kernel/kexec_load_disabled`, and, for comparison, the module
//! signature parameter `SYSFS/module/module/parameters/sig_enforce`.

use nix::errno::Errno;
use std::path::{Path, PathBuf};

/// The facts, each `None` when the kernel does not show it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SignaturePolicy {
    /// The lockdown mode (`none`, `integrity`, `confidentiality`); `None`
    /// without the lockdown LSM.
    pub lockdown: Option<String>,
    /// `CONFIG_KEXEC_SIG` (and where that was read).
    pub kexec_sig: Option<bool>,
    /// `CONFIG_KEXEC_SIG_FORCE`.
    pub kexec_sig_force: Option<bool>,
    /// The kernel config file read, or the one looked for.
    pub config_path: PathBuf,
    /// `kernel.kexec_load_disabled`.
    pub kexec_load_disabled: Option<bool>,
    /// `module.sig_enforce`.
    pub module_sig_enforce: Option<bool>,
}

impl SignaturePolicy {
    /// Reads the facts under `sysfs` (normally `/sys`), `proc` (`/proc`) and
    /// `config` (the kernel config file, `/boot/config-RELEASE`).
    pub fn read(sysfs: &Path, proc: &Path, config: &Path) -> SignaturePolicy {
        let read = |p: PathBuf| std::fs::read_to_string(p).ok();
        let lockdown = read(sysfs.join("kernel/security/lockdown")).and_then(|s| selected_lockdown(&s));
        let flag = |s: &str| match s.trim() {
            "Y" | "y" | "1" => Some(true),
            "N" | "n" | "0" => Some(false),
            _ => None,
        };
        let kconfig = read(config.to_path_buf());
        let option = |name: &str| kconfig.as_deref().map(|c| config_option(c, name));
        SignaturePolicy {
            lockdown,
            kexec_sig: option("CONFIG_KEXEC_SIG"),
            kexec_sig_force: option("CONFIG_KEXEC_SIG_FORCE"),
            config_path: config.to_path_buf(),
            kexec_load_disabled: read(proc.join("sys/kernel/kexec_load_disabled")).and_then(|s| flag(&s)),
            module_sig_enforce: read(sysfs.join("module/module/parameters/sig_enforce")).and_then(|s| flag(&s)),
        }
    }

    /// The running kernel's policy, with sysfs at `sysfs`.
    pub fn current(sysfs: &Path) -> SignaturePolicy {
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        Self::read(
            sysfs,
            Path::new("/proc"),
            &PathBuf::from(format!("/boot/config-{release}")),
        )
    }

    /// True when the lockdown mode restricts kexec to signed images.
    fn locked_down(&self) -> bool {
        matches!(self.lockdown.as_deref(), Some("integrity" | "confidentiality"))
    }

    /// Whether `kexec_file_load` refuses an image without a valid signature:
    /// `None` when the facts do not tell.
    pub fn signatures_required(&self) -> Option<bool> {
        if self.locked_down() || self.kexec_sig_force == Some(true) {
            Some(true)
        } else if self.kexec_sig_force == Some(false) {
            Some(false)
        } else {
            None
        }
    }

    /// The policy in one sentence, with the facts it rests on.
    pub fn describe(&self) -> String {
        let verdict = match self.signatures_required() {
            Some(true) if self.locked_down() => format!(
                "signed kexec images required: the kernel is locked down ({}), so an image without a valid \
                 signature is refused (EPERM)",
                self.lockdown.as_deref().unwrap_or("?")
            ),
            Some(true) => "signed kexec images required: CONFIG_KEXEC_SIG_FORCE is set, so an image without a valid \
                           signature is refused"
                .to_string(),
            Some(false) => "signatures not required: no lockdown and CONFIG_KEXEC_SIG_FORCE is not set (an \
                            invalid signature is only logged)"
                .to_string(),
            None => format!(
                "signature policy unknown: no lockdown, and {} cannot be read to tell whether \
                 CONFIG_KEXEC_SIG_FORCE is set (a refused signature shows at prepare)",
                self.config_path.display()
            ),
        };
        let yes_no = |b: Option<bool>, y: &str, n: &str| match b {
            Some(true) => y.to_string(),
            Some(false) => n.to_string(),
            None => "unknown".to_string(),
        };
        let mut facts = vec![format!(
            "lockdown {}",
            self.lockdown.as_deref().unwrap_or("not available")
        )];
        if self.kexec_sig.is_some() {
            facts.push(format!("CONFIG_KEXEC_SIG {}", yes_no(self.kexec_sig, "set", "not set")));
            facts.push(format!(
                "CONFIG_KEXEC_SIG_FORCE {}",
                yes_no(self.kexec_sig_force, "set", "not set")
            ));
        }
        facts.push(format!(
            "kexec_load_disabled {}",
            yes_no(self.kexec_load_disabled, "1", "0")
        ));
        facts.push(format!(
            "module sig_enforce {}",
            yes_no(self.module_sig_enforce, "Y", "N")
        ));
        format!("{verdict} ({})", facts.join(", "))
    }

    /// Why `kexec_file_load` failing with `errno` means the image's signature
    /// was refused, or `None` when it does not.
    pub fn explain_refusal(&self, errno: Errno) -> Option<String> {
        match errno {
            Errno::EKEYREJECTED
            | Errno::ENOKEY
            | Errno::EBADMSG
            | Errno::ENODATA
            | Errno::EKEYREVOKED
            | Errno::EKEYEXPIRED
            | Errno::ENOPKG => Some(format!(
                "the kernel verified the image's signature and refused it ({errno}): sign the image with a key the \
                 kernel trusts (its builtin, secondary or platform keyring), or load one that is signed; {}",
                self.describe()
            )),
            Errno::EPERM if self.kexec_load_disabled == Some(true) => None,
            Errno::EPERM if self.locked_down() => Some(format!(
                "the kernel is locked down ({}) and refused the image because it has no valid signature (EPERM): \
                 load an image signed with a key the kernel trusts; {}",
                self.lockdown.as_deref().unwrap_or("?"),
                self.describe()
            )),
            _ => None,
        }
    }
}

/// The selected mode of `/sys/kernel/security/lockdown` (`none [integrity]
/// confidentiality` gives `integrity`).
fn selected_lockdown(s: &str) -> Option<String> {
    s.split_whitespace()
        .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
        .map(str::to_string)
}

/// Whether a kernel config sets `name` (`NAME=y`; `# NAME is not set` or
/// absent: no).
fn config_option(config: &str, name: &str) -> bool {
    config.lines().any(|l| {
        l.strip_prefix(name)
            .and_then(|r| r.strip_prefix('='))
            .is_some_and(|v| v == "y")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(lockdown: Option<&str>, config: Option<&str>) -> (tempfile::TempDir, SignaturePolicy) {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        let proc = dir.path().join("proc");
        if let Some(l) = lockdown {
            std::fs::create_dir_all(sys.join("kernel/security")).unwrap();
            std::fs::write(sys.join("kernel/security/lockdown"), l).unwrap();
        }
        std::fs::create_dir_all(proc.join("sys/kernel")).unwrap();
        std::fs::write(proc.join("sys/kernel/kexec_load_disabled"), "0\n").unwrap();
        let cfg = dir.path().join("config-7.3.0");
        if let Some(c) = config {
            std::fs::write(&cfg, c).unwrap();
        }
        let p = SignaturePolicy::read(&sys, &proc, &cfg);
        (dir, p)
    }

    #[test]
    fn lockdown_integrity_requires_signed_images_and_explains_eperm() {
        let (_d, p) = tree(Some("none [integrity] confidentiality\n"), None);
        assert_eq!(p.lockdown.as_deref(), Some("integrity"));
        assert_eq!(p.signatures_required(), Some(true));
        assert_eq!(
            p.describe(),
            "signed kexec images required: the kernel is locked down (integrity), so an image without a valid \
             signature is refused (EPERM) (lockdown integrity, kexec_load_disabled 0, module sig_enforce unknown)"
        );
        let why = p.explain_refusal(Errno::EPERM).unwrap();
        assert!(
            why.starts_with(
                "the kernel is locked down (integrity) and refused the image because it has no valid signature (EPERM)"
            ),
            "{why}"
        );
    }

    #[test]
    fn sig_force_from_the_kernel_config_and_a_rejected_key() {
        let (_d, p) = tree(
            Some("[none] integrity confidentiality\n"),
            Some("CONFIG_KEXEC_SIG=y\nCONFIG_KEXEC_SIG_FORCE=y\n"),
        );
        assert_eq!(p.signatures_required(), Some(true));
        let why = p.explain_refusal(Errno::EKEYREJECTED).unwrap();
        assert!(
            why.starts_with(
                "the kernel verified the image's signature and refused it (EKEYREJECTED: Key was rejected by \
                 service): sign the image with a key the kernel trusts"
            ),
            "{why}"
        );
        assert!(why.ends_with("CONFIG_KEXEC_SIG_FORCE set, kexec_load_disabled 0, module sig_enforce unknown)"));
        // EPERM without lockdown is not about signatures.
        assert_eq!(p.explain_refusal(Errno::EPERM), None);
    }

    #[test]
    fn no_lockdown_and_no_force_does_not_require_signatures_and_unknown_config_says_so() {
        let (_d, p) = tree(
            Some("[none] integrity confidentiality\n"),
            Some("CONFIG_KEXEC_SIG=y\n# CONFIG_KEXEC_SIG_FORCE is not set\n"),
        );
        assert_eq!(p.signatures_required(), Some(false));
        assert!(p.describe().starts_with("signatures not required: no lockdown"));
        let (d, p) = tree(None, None);
        assert_eq!(p.signatures_required(), None);
        assert_eq!(
            p.describe(),
            format!(
                "signature policy unknown: no lockdown, and {} cannot be read to tell whether CONFIG_KEXEC_SIG_FORCE \
                 is set (a refused signature shows at prepare) (lockdown not available, kexec_load_disabled 0, \
                 module sig_enforce unknown)",
                d.path().join("config-7.3.0").display()
            )
        );
    }
}
