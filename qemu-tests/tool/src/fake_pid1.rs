//! `luo-qemu-tool fake-pid1`: plays the part of a LUO-aware systemd (261+)
//! around luod in the busybox guest, so that luod's systemd reboot path runs
//! against the real kernel where no systemd is. It is a fake of systemd's
//! side only (`src/core/luo.c`, `src/shared/luo-util.c`,
//! `src/shutdown/shutdown.c`), kept to what luod can observe:
//!
//! - luod's fd store: a notification socket (`NOTIFY_SOCKET`) that keeps
//!   `FDSTORE=1`/`FDNAME=` fds and drops `FDSTOREREMOVE=1` ones; `READY=1`
//!   and `STATUS=` are printed.
//! - `systemctl kexec`: the fake `systemctl` writes `kexec` into the control
//!   FIFO; then, as systemd does, luod is stopped (SIGTERM), the LUO session
//!   `systemd` is created, each fd-store entry that is a LUO session
//!   (`/proc/self/fd` link `anon_inode:[luo_session] NAME`) is recorded by
//!   name and every other fd is `PRESERVE_FD`ed under a new token (a failure
//!   drops that fd, logged), the mapping goes under token 0, and the kexec
//!   happens with every session fd still open.
//! - `Restart=on-failure`: luod killed (not stopped) is started again with
//!   its fd store.
//! - `--restore` (the new kernel): `RETRIEVE_SESSION systemd`, the mapping,
//!   each child session retrieved by name and each fd by token, `FINISH` of
//!   `systemd`, the device closed; everything goes back into the fd store
//!   and luod gets it through `LISTEN_FDS`/`LISTEN_FDNAMES`.
//!
//! Markers: `@@LUO info fake-pid1: ...` lines for the report, and
//! `FAKE-PID1 carried S sessions, P fds, dropped D` (compared with
//! `--expect`, a mismatch fails the scenario before the kexec) and
//! `FAKE-PID1 restored N fds` (also written to `/run/fake-pid1.restored`).

use liveupdate::kernel::{kexec, memfd, uapi};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, String>;

/// systemd's own session name.
const SESSION: &str = "systemd";

fn info(msg: &str) {
    println!("@@LUO info fake-pid1: {msg}");
}

/// The fd store: name -> fd, in the order stored.
type Store = Vec<(String, OwnedFd)>;

/// `fake-pid1 --notify PATH --control FIFO --exec "LUOD ARGS" [--restore]`.
pub fn run(notify: &str, control: &str, exec: &str, restore: bool, expect: Option<&str>) -> Result<()> {
    let mut store: Store = if restore { restore_store()? } else { Vec::new() };
    let _ = std::fs::remove_file(notify);
    let sock = UnixDatagram::bind(notify).map_err(|e| format!("bind {notify}: {e}"))?;
    let _ = std::fs::remove_file(control);
    nix::unistd::mkfifo(control, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(|e| format!("mkfifo {control}: {e}"))?;
    // Read-write: the FIFO never reports EOF when a writer closes.
    let ctl = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(control)
        .map_err(|e| format!("open {control}: {e}"))?;
    let mut luod = Some(spawn(exec, notify, &store)?);
    loop {
        let mut fds = [
            nix::poll::PollFd::new(sock.as_fd(), nix::poll::PollFlags::POLLIN),
            nix::poll::PollFd::new(ctl.as_fd(), nix::poll::PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(500u16)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        let notified = fds[0].revents().is_some_and(|r| !r.is_empty());
        let commanded = fds[1].revents().is_some_and(|r| !r.is_empty());
        if notified {
            receive(&sock, &mut store)?;
        }
        if commanded {
            let mut buf = [0u8; 64];
            let n = (&ctl).read(&mut buf).map_err(|e| format!("read {control}: {e}"))?;
            if String::from_utf8_lossy(&buf[..n]).contains("kexec") {
                info("systemctl kexec: stopping luod, then the LUO handover of the fd store");
                if let Some(child) = luod.take() {
                    stop(child)?;
                }
                // Notifications luod sent before it exited.
                sock.set_nonblocking(true).map_err(|e| e.to_string())?;
                while receive(&sock, &mut store)? {}
                return shutdown_kexec(store, expect);
            }
        }
        if let Some(child) = luod.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            info(&format!(
                "luod exited ({status}); its fd store holds {} fd(s)",
                store.len()
            ));
            luod = None;
            // Notifications luod sent before it died.
            sock.set_nonblocking(true).map_err(|e| e.to_string())?;
            while receive(&sock, &mut store)? {}
            sock.set_nonblocking(false).map_err(|e| e.to_string())?;
            if !status.success() {
                // Restart=on-failure: again, with the fd store.
                std::thread::sleep(Duration::from_millis(200));
                luod = Some(spawn(exec, notify, &store)?);
            }
        }
    }
}

/// Starts luod with the fd store passed as fds 3.. (`LISTEN_FDS`).
fn spawn(exec: &str, notify: &str, store: &Store) -> Result<Child> {
    let words: Vec<&str> = exec.split_whitespace().collect();
    let (prog, args) = words.split_first().ok_or("--exec is empty")?;
    let names: Vec<&str> = store.iter().map(|(n, _)| n.as_str()).collect();
    let raws: Vec<RawFd> = store.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    // LISTEN_PID must be luod's pid: a shell sets it to its own and execs.
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$@\"")
        .arg("sh")
        .arg(prog)
        .args(args)
        .env("NOTIFY_SOCKET", notify)
        .env("LISTEN_FDS", raws.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"));
    // SAFETY: between fork and exec the closure only calls dup2 and close
    // (async-signal-safe, no allocation) on descriptors this process owns
    // (`raws` stays valid: `store` outlives the spawn).
    unsafe { cmd.pre_exec(move || place(&raws)) };
    let child = cmd.spawn().map_err(|e| format!("spawn {prog}: {e}"))?;
    info(&format!(
        "started luod (pid {}) with {} fd(s): {}",
        child.id(),
        names.len(),
        names.join(" ")
    ));
    Ok(child)
}

/// In the child, between fork and exec: fd `raws[i]` becomes `3 + i`. Each
/// is first moved above the target range so that placing one never
/// clobbers one not yet placed.
fn place(raws: &[RawFd]) -> std::io::Result<()> {
    let dup2 = |from: RawFd, to: RawFd| {
        // SAFETY: dup2 on descriptors this process owns.
        if unsafe { libc::dup2(from, to) } < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    let base = 1000;
    for (i, fd) in raws.iter().enumerate() {
        dup2(*fd, base + i as RawFd)?;
    }
    for i in 0..raws.len() as RawFd {
        dup2(base + i, 3 + i)?;
        // SAFETY: closes the temporary copy made just above.
        unsafe { libc::close(base + i) };
    }
    Ok(())
}

/// One notification; false when none was waiting (non-blocking socket).
fn receive(sock: &UnixDatagram, store: &mut Store) -> Result<bool> {
    let mut buf = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 16]);
    let msg = match recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
        Ok(m) => m,
        Err(nix::errno::Errno::EAGAIN) => return Ok(false),
        Err(e) => return Err(format!("recvmsg: {e}")),
    };
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(|e| e.to_string())? {
        if let ControlMessageOwned::ScmRights(v) = c {
            for raw in v {
                // SAFETY: SCM_RIGHTS just installed this descriptor in this
                // process; nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
    }
    let n = msg.bytes;
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    let field = |k: &str| text.lines().find_map(|l| l.strip_prefix(k)).map(str::to_string);
    let name = field("FDNAME=").unwrap_or_else(|| "stored".into());
    if text.lines().any(|l| l == "FDSTOREREMOVE=1") {
        store.retain(|(n, _)| *n != name);
    } else if text.lines().any(|l| l == "FDSTORE=1") {
        for fd in fds {
            store.push((name.clone(), fd));
        }
    } else {
        for l in text.lines() {
            println!("fake-pid1: luod says {l}");
        }
    }
    Ok(true)
}

/// SIGTERM, then waits (SIGKILL after 20 s), as systemd stops a unit.
fn stop(mut child: Child) -> Result<()> {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            info(&format!("luod stopped ({status})"));
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            info("luod did not stop within 20 s: killed");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The name of the LUO session `fd` is, if it is one (as systemd tells).
fn session_name(fd: &OwnedFd) -> Option<String> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    link.to_string_lossy()
        .strip_prefix("anon_inode:[luo_session] ")
        .map(str::to_string)
}

fn open_dev() -> Result<OwnedFd> {
    nix::fcntl::open(
        "/dev/liveupdate",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("open /dev/liveupdate: {e}"))
}

/// systemd-shutdown's part: the session `systemd`, then the kexec.
fn shutdown_kexec(store: Store, expect: Option<&str>) -> Result<()> {
    let dev = open_dev()?;
    let session = uapi::create_session(dev.as_fd(), SESSION).map_err(|e| format!("CREATE_SESSION systemd: {e}"))?;
    let (mut token, mut sessions, mut plain, mut dropped) = (1u64, 0, 0, 0);
    let mut mapping = String::new();
    for (name, fd) in &store {
        if let Some(s) = session_name(fd) {
            mapping.push_str(&format!("{name} session {s}\n"));
            sessions += 1;
            continue;
        }
        match uapi::preserve_fd(session.as_fd(), fd.as_fd(), token) {
            Ok(()) => {
                mapping.push_str(&format!("{name} fd {token}\n"));
                token += 1;
                plain += 1;
            }
            Err(e) => {
                println!("fake-pid1: Failed to preserve LUO fd (name '{name}'), will be lost across kexec: {e}");
                dropped += 1;
            }
        }
    }
    let map = memfd::from_bytes("luo-mapping", mapping.as_bytes()).map_err(|e| format!("mapping memfd: {e}"))?;
    uapi::preserve_fd(session.as_fd(), map.as_fd(), 0).map_err(|e| format!("PRESERVE_FD mapping: {e}"))?;
    let carried = format!("{sessions} sessions, {plain} fds, dropped {dropped}");
    println!("FAKE-PID1 carried {carried}");
    if let Some(want) = expect
        && want != carried
    {
        println!("@@LUO fail fake-pid1 carried {carried}, the scenario expected {want}");
        return Err(format!("carried {carried}, expected {want}"));
    }
    info(&format!(
        "handover: {sessions} session(s) by name, {plain} fd(s) preserved, {dropped} dropped"
    ));
    drop(dev);
    nix::unistd::sync();
    // `store`, `session` and `map` stay open: closing them unpreserves.
    let err = kexec::reboot_into_loaded();
    let _keep = (store, session, map);
    Err(format!("kexec failed: {err}"))
}

/// PID 1's part in the new kernel: the fd store back from `systemd`.
fn restore_store() -> Result<Store> {
    let dev = open_dev()?;
    let session = uapi::retrieve_session(dev.as_fd(), SESSION).map_err(|e| format!("RETRIEVE_SESSION systemd: {e}"))?;
    let map = uapi::retrieve_fd(session.as_fd(), 0).map_err(|e| format!("RETRIEVE_FD mapping: {e}"))?;
    let mut text = String::new();
    std::fs::File::from(map)
        .read_to_string(&mut text)
        .map_err(|e| format!("read mapping: {e}"))?;
    let mut store = Vec::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        let got = match parts.as_slice() {
            [name, "session", s] => uapi::retrieve_session(dev.as_fd(), s)
                .map(|fd| (name.to_string(), fd))
                .map_err(|e| format!("RETRIEVE_SESSION {s}: {e}")),
            [name, "fd", t] => t
                .parse::<u64>()
                .map_err(|e| e.to_string())
                .and_then(|t| uapi::retrieve_fd(session.as_fd(), t).map_err(|e| format!("RETRIEVE_FD {t}: {e}")))
                .map(|fd| (name.to_string(), fd)),
            _ => Err(format!("bad mapping line {line:?}")),
        };
        match got {
            Ok(entry) => store.push(entry),
            Err(e) => println!("fake-pid1: {e} (skipped)"),
        }
    }
    uapi::finish(session.as_fd()).map_err(|e| format!("FINISH systemd: {e}"))?;
    drop(session);
    drop(dev);
    println!("FAKE-PID1 restored {} fds", store.len());
    let _ = std::fs::write("/run/fake-pid1.restored", format!("{}\n", store.len()));
    info(&format!("restored {} fd(s) from the LUO session systemd", store.len()));
    Ok(store)
}
