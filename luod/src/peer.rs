//! Who is on the other end of a connection, and whether it is privileged.
//!
//! Privilege (driving transitions, seeing every session) means uid 0 or
//! `CAP_SYS_BOOT` *in luod's own user namespace* (the initial one, where
//! luod runs): a process that is root inside a user namespace of its own
//! (`unshare -Ur`) has a full `CapEff` there, but no power over the host, so
//! it is not privileged.
//!
//! The check is bound to the process that connected, without a pid race:
//! `SO_PEERPIDFD` (Linux 6.5+) gives a pidfd for it, and after reading its
//! `/proc` entries luod checks through the pidfd that it is still alive, so
//! the pid was not reused by another process meanwhile. On older kernels
//! (`ENOPROTOOPT`) the pid's start time is compared before and after instead.
//! Anything that cannot be established counts as unprivileged.

use liveupdate::engine::Caller;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials, sockopt::PeerPidfd};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;

/// `CAP_SYS_BOOT`'s bit in the capability sets.
const CAP_SYS_BOOT: u32 = 22;

/// The caller behind `sock`: its uid and pid from `SO_PEERCRED` (mapped into
/// luod's user namespace by the kernel), and whether it is privileged.
///
/// Fails when luod is short of descriptors or memory to look (rather than
/// taking root for unprivileged): the connection is then refused.
pub fn caller(sock: &UnixStream) -> std::io::Result<Caller> {
    let cred = getsockopt(sock, PeerCredentials)?;
    let uid = cred.uid();
    let pid = cred.pid();
    let privileged = match getsockopt(sock, PeerPidfd) {
        Ok(pidfd) => privileged_by_pidfd(&pidfd, uid)?,
        // Kernels before 6.5 do not have SO_PEERPIDFD.
        Err(nix::errno::Errno::ENOPROTOOPT) => privileged_by_start_time(pid, uid)?,
        Err(e) => return Err(e.into()),
    };
    Ok(Caller { uid, pid, privileged })
}

/// Reads a `/proc` file: `Ok(None)` when it cannot be read because the
/// process is gone or hidden, `Err` when luod itself lacks the resources.
fn read_proc_file(path: &str) -> std::io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if scarce(&e) => Err(e),
        Err(_) => Ok(None),
    }
}

/// Out of descriptors or memory: luod's problem, not the caller's.
fn scarce(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS)
    )
}

/// What `/proc/PID` says about a process.
#[derive(Debug)]
struct ProcView {
    /// Effective uid, as seen from luod's namespace.
    euid: u32,
    /// Effective capabilities (relative to the process's user namespace).
    cap_eff: u64,
    /// The process's user namespace (device, inode of `/proc/PID/ns/user`);
    /// `None` on a kernel without user namespaces (`CONFIG_USER_NS` off),
    /// where every process lives in the initial one.
    userns: Option<(u64, u64)>,
}

fn read_proc(pid: i32) -> std::io::Result<Option<ProcView>> {
    let Some(status) = read_proc_file(&format!("/proc/{pid}/status"))? else {
        return Ok(None);
    };
    let userns = match std::fs::metadata(format!("/proc/{pid}/ns/user")) {
        Ok(ns) => Some((ns.dev(), ns.ino())),
        Err(e) if scarce(&e) => return Err(e),
        // No user namespaces in this kernel: luod's own is missing too, and
        // there is only the initial one.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && own_userns().is_none() => None,
        Err(_) => return Ok(None),
    };
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
    let parsed = || {
        let cap_eff = u64::from_str_radix(field("CapEff:")?, 16).ok()?;
        // Uid: real, effective, saved, filesystem.
        let euid = field("Uid:")?.split_whitespace().nth(1)?.parse().ok()?;
        Some(ProcView { euid, cap_eff, userns })
    };
    Ok(parsed())
}

/// luod's own user namespace.
fn own_userns() -> Option<(u64, u64)> {
    let ns = std::fs::metadata("/proc/self/ns/user").ok()?;
    Some((ns.dev(), ns.ino()))
}

/// The rule, on what was read: the process lives in luod's user namespace,
/// and is uid 0 there, or has `CAP_SYS_BOOT` with the same effective uid it
/// connected with (not a set-uid program it executed since).
fn judge(view: &ProcView, connected_uid: u32) -> bool {
    if view.userns != own_userns() {
        return false;
    }
    connected_uid == 0 || (view.euid == connected_uid && view.cap_eff & (1 << CAP_SYS_BOOT) != 0)
}

/// The pid a pidfd refers to, from `/proc/self/fdinfo` (`None` when the
/// process has exited or lives in a pid namespace luod cannot see).
fn pidfd_pid(pidfd: &OwnedFd) -> std::io::Result<Option<i32>> {
    let Some(info) = read_proc_file(&format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))? else {
        return Ok(None);
    };
    let pid = info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|p| p.trim().parse::<i32>().ok());
    Ok(pid.filter(|p| *p > 0))
}

/// True while the process behind `pidfd` has not exited
/// (`pidfd_send_signal(pidfd, 0)`, which sends nothing).
fn pidfd_alive(pidfd: &OwnedFd) -> bool {
    // SAFETY: pidfd_send_signal with signal 0 only checks that the process
    // exists and may be signalled; the fd is a valid pidfd owned by
    // `pidfd` for the whole call, and the siginfo pointer is null, which
    // the syscall accepts.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    // EPERM means the process exists but luod may not signal it (luod is
    // normally root, so this does not happen); only ESRCH means gone.
    rc == 0 || nix::errno::Errno::last() == nix::errno::Errno::EPERM
}

fn privileged_by_pidfd(pidfd: &OwnedFd, uid: u32) -> std::io::Result<bool> {
    let Some(pid) = pidfd_pid(pidfd)? else { return Ok(false) };
    let Some(view) = read_proc(pid)? else { return Ok(false) };
    // The process was alive after the reads, so `pid` was still its pid
    // while luod read /proc/PID: what was read is about the connecting process.
    Ok(pidfd_alive(pidfd) && judge(&view, uid))
}

/// The start time of `pid` (field 22 of `/proc/PID/stat`, in clock ticks since boot).
fn start_time(pid: i32) -> std::io::Result<Option<u64>> {
    let Some(stat) = read_proc_file(&format!("/proc/{pid}/stat"))? else {
        return Ok(None);
    };
    // The command name (field 2) may hold spaces and parentheses: count the
    // fields after its closing parenthesis, which start at field 3.
    let field = || {
        stat[stat.rfind(')')? + 1..]
            .split_whitespace()
            .nth(22 - 3)?
            .parse()
            .ok()
    };
    Ok(field())
}

fn privileged_by_start_time(pid: i32, uid: u32) -> std::io::Result<bool> {
    if pid <= 0 {
        return Ok(false);
    }
    let Some(before) = start_time(pid)? else {
        return Ok(false);
    };
    let Some(view) = read_proc(pid)? else { return Ok(false) };
    Ok(start_time(pid)? == Some(before) && judge(&view, uid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luod_itself_is_judged_privileged_when_root() {
        // The unit tests run as root, as CI does.
        let view = read_proc(std::process::id() as i32).unwrap().expect("/proc/self");
        assert_eq!(judge(&view, 0), nix::unistd::geteuid().is_root());
    }

    #[test]
    fn another_user_namespace_is_never_privileged() {
        let view = ProcView {
            euid: 0,
            cap_eff: u64::MAX,
            userns: Some((0, 1)),
        };
        assert!(!judge(&view, 0));
        assert!(!judge(&view, 65534));
        // A process whose namespace could not be read, on a kernel that has
        // user namespaces (this one), is not in luod's either.
        let unknown = ProcView { userns: None, ..view };
        assert!(!judge(&unknown, 0));
    }

    #[test]
    fn cap_sys_boot_counts_only_with_the_uid_the_process_connected_with() {
        let userns = Some(own_userns().expect("own user namespace"));
        let view = ProcView {
            euid: 1000,
            cap_eff: 1 << CAP_SYS_BOOT,
            userns,
        };
        assert!(judge(&view, 1000));
        assert!(!judge(&view, 1001), "the process changed its uid since it connected");
        let no_cap = ProcView {
            euid: 1000,
            cap_eff: !(1 << CAP_SYS_BOOT),
            userns,
        };
        assert!(!judge(&no_cap, 1000));
    }

    #[test]
    fn the_start_time_is_read_past_a_command_name_with_spaces() {
        let me = std::process::id() as i32;
        let t = start_time(me).unwrap().expect("own start time");
        assert!(t > 0);
        assert_eq!(start_time(me).unwrap(), Some(t));
        assert_eq!(
            privileged_by_start_time(me, 0).unwrap(),
            nix::unistd::geteuid().is_root()
        );
    }

    #[test]
    fn a_socket_pair_peer_is_this_process() {
        let (a, _b) = UnixStream::pair().expect("pair");
        let c = caller(&a).expect("caller");
        assert_eq!(c.pid, std::process::id() as i32);
        assert_eq!(c.privileged, nix::unistd::geteuid().is_root());
    }

    /// A root process connects and exits (and is reaped) before luod looks:
    /// whatever now has its pid, the connection is not privileged.
    #[test]
    fn a_peer_that_exited_before_the_check_is_not_privileged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // The child runs only async-signal-safe calls: the socket address is
        // built before the fork.
        let addr = nix::sys::socket::UnixAddr::new(&path).unwrap();
        // SAFETY: the child only calls socket(2), connect(2) and _exit(2),
        // all async-signal-safe, on memory prepared before the fork.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                use nix::sys::socket::{AddressFamily, SockFlag, SockType, connect, socket};
                let ok = socket(AddressFamily::Unix, SockType::Stream, SockFlag::empty(), None)
                    .and_then(|s| connect(s.as_raw_fd(), &addr).map(|()| s));
                // SAFETY: _exit ends the child without running the parent's
                // destructors or atexit handlers.
                unsafe { libc::_exit(i32::from(ok.is_err())) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let (conn, _) = listener.accept().unwrap();
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
                let c = caller(&conn).unwrap();
                assert_eq!((c.uid, c.pid), (nix::unistd::geteuid().as_raw(), child.as_raw()));
                assert!(!c.privileged, "a connection whose process is gone is never privileged");
                assert!(!privileged_by_start_time(child.as_raw(), 0).unwrap());
            }
        }
    }
}
