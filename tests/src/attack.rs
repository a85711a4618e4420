//! Clients that run as someone else: uid/gid 65534 in the socket's group,
//! with or without a user namespace of their own, or with `CAP_SYS_BOOT`.
//! Used by the `safety_*` tests, which run as root as CI does.

use crate::Luod;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// uid and gid of `nobody`/`nogroup`, the unprivileged user of the tests.
pub const NOBODY: u32 = 65534;

/// Who runs a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// uid/gid 65534, no supplementary groups.
    Nobody,
    /// uid/gid 65534 that made a user namespace of its own (`unshare -Ur`):
    /// root with every capability in there, 65534 outside.
    NobodyInOwnUserns,
    /// Root that made a user namespace of its own (`unshare -Ur`).
    RootInOwnUserns,
    /// uid/gid 65534 with `CAP_SYS_BOOT` (ambient) in the host's namespace.
    NobodyWithCapSysBoot,
    /// uid 65534 whose primary gid is 65533 and who is in `group` only as a
    /// supplementary group (as `usermod -aG` makes it).
    MemberOf(u32),
    /// uid 65534, gid 65533, no supplementary groups.
    Outsider,
}

/// Gives `luod`'s directory to everyone (0755) and copies the client
/// binaries into it, so uid 65534 can run them and reach the socket (which
/// the caller gave to group 65534 with `--socket-group`).
pub fn share(luod: &Luod) {
    share_dir(luod.dir());
}

/// Makes `dir` traversable and copies `luoctl` and `luo-test-client` into it.
pub fn share_dir(dir: &Path) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod 0755");
    for name in ["luoctl", "luo-test-client"] {
        let to = dir.join(name);
        crate::copy_binary(name, &to);
    }
}

/// A command that runs `program ARGS` as `who`.
pub fn command_as(who: Who, program: &Path, args: &[&str]) -> Command {
    let (uid, gid, groups): (u32, u32, Vec<u32>) = match who {
        Who::Nobody | Who::NobodyInOwnUserns => (NOBODY, NOBODY, vec![]),
        Who::RootInOwnUserns => (0, 0, vec![0]),
        Who::NobodyWithCapSysBoot => (0, 0, vec![0]),
        Who::MemberOf(group) => (NOBODY, NOBODY - 1, vec![group]),
        Who::Outsider => (NOBODY, NOBODY - 1, vec![]),
    };
    let mut cmd = match who {
        Who::NobodyInOwnUserns | Who::RootInOwnUserns => {
            let mut c = Command::new("unshare");
            c.arg("-Ur").arg("--").arg(program);
            c
        }
        Who::NobodyWithCapSysBoot => {
            let mut c = Command::new("setpriv");
            c.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
                .args(["--inh-caps", "+sys_boot", "--ambient-caps", "+sys_boot", "--"])
                .arg(program);
            c
        }
        _ => Command::new(program),
    };
    cmd.args(args).stdin(Stdio::null()).env_remove("LUOD_SOCKET");
    // SAFETY: the closure runs in the forked child before exec and only
    // calls setgroups/setgid/setuid, which are async-signal-safe; the group
    // list was allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let groups: Vec<nix::unistd::Gid> = groups.iter().map(|g| nix::unistd::Gid::from_raw(*g)).collect();
            nix::unistd::setgroups(&groups)?;
            nix::unistd::setgid(nix::unistd::Gid::from_raw(gid))?;
            nix::unistd::setuid(nix::unistd::Uid::from_raw(uid))?;
            Ok(())
        });
    }
    cmd
}

/// Runs the `luoctl` copied into `dir` with `--socket SOCKET ARGS` as `who`.
pub fn luoctl_as(who: Who, dir: &Path, socket: &Path, args: &[&str]) -> Output {
    let socket = socket.to_str().expect("UTF-8 socket path");
    let mut all = vec!["--socket", socket];
    all.extend_from_slice(args);
    command_as(who, &dir.join("luoctl"), &all)
        .output()
        .expect("run luoctl as another user")
}

/// The path of the test client copied into `dir`.
pub fn test_client(dir: &Path) -> PathBuf {
    dir.join("luo-test-client")
}

/// luoctl's stderr, as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// luoctl's stdout parsed as its one JSON object.
#[track_caller]
pub fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "luoctl's stdout is not one JSON object ({e}): {:?}; stderr: {}",
            String::from_utf8_lossy(&out.stdout),
            stderr(out)
        )
    })
}
