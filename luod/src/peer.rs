//! Who is on the other end of a connection.

use liveupdate::engine::Caller;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use std::os::unix::net::UnixStream;

/// `CAP_SYS_BOOT`'s bit in the capability sets.
const CAP_SYS_BOOT: u32 = 22;

/// The caller behind `sock`, from `SO_PEERCRED`.
///
/// A non-root caller counts as privileged when its effective capabilities
/// (`/proc/PID/status`, read now) include `CAP_SYS_BOOT`.
pub fn caller(sock: &UnixStream) -> std::io::Result<Caller> {
    let cred = getsockopt(sock, PeerCredentials)?;
    let uid = cred.uid();
    let pid = cred.pid();
    let privileged = uid == 0 || has_cap_sys_boot(pid);
    Ok(Caller { uid, pid, privileged })
}

fn has_cap_sys_boot(pid: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_BOOT) != 0)
}
