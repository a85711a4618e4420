//! Files luod creates are private and not redirectable (issue 7, item 3),
//! and a region the file system cannot back fails at start (item 7).
//!
//! Every file luod writes (the region, the holder's pid file, the bytes of a
//! short region kept aside) is 0600 and created with O_NOFOLLOW (O_EXCL when
//! new); the state directory is created 0700 and refused when another uid
//! owns it or others may write to it. A symbolic link planted where luod
//! writes is never followed and its target never touched; a `--socket` path
//! that is not a socket is refused, never removed. A region larger than its
//! file system's free space is refused at start with the numbers, instead of
//! a SIGBUS later.

use liveupdate_tests::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .mode()
        & 0o7777
}

/// Runs a luod that must refuse to start (file backend, paths in `dir`
/// unless `args` override them) and returns its exit status and stderr.
/// Kills it and fails when it starts serving instead.
fn refused_luod(dir: &Path, args: &[&std::ffi::OsStr]) -> (std::process::ExitStatus, String) {
    let has = |flag: &str| args.iter().any(|a| *a == flag);
    let mut cmd = Command::new(binary("luod"));
    cmd.args(["--backend", "file", "--fd-store", "holder"]);
    if !has("--socket") {
        cmd.arg("--socket").arg(dir.join("luod.sock"));
    }
    if !has("--state-dir") {
        cmd.arg("--state-dir").arg(dir.join("state"));
    }
    if !has("--region") {
        cmd.arg("--region").arg(dir.join("region"));
    }
    if !has("--region-size") {
        cmd.args(["--region-size", "8M"]);
    }
    let mut child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn luod");
    let deadline = Instant::now() + STARTUP_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("luod did not refuse to start");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status, stderr)
}

/// Asserts that luod exited with status 1 and printed `line` as its reason.
#[track_caller]
fn assert_refused_start(result: (std::process::ExitStatus, String), line: &str) {
    let (status, stderr) = result;
    assert_eq!(status.code(), Some(1), "exit status {status}; stderr: {stderr}");
    assert!(
        stderr.lines().any(|l| l == format!("luod: {line}")),
        "stderr says `luod: {line}`:\n{stderr}"
    );
}

#[test]
fn every_file_luod_creates_is_0600_and_its_state_directory_0700() {
    let mut luod = Luod::started("8M");
    let set = preserve_set(&mut luod.client(), &["vm0"], &[4096]);
    let pid_file = luod.state_dir().join("holder.pid");
    let region = luod.region();
    assert_eq!(mode(&luod.state_dir()), 0o700, "state directory");
    assert_eq!(mode(&region), 0o600, "region");
    assert_eq!(mode(&pid_file), 0o600, "holder pid file");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .expect("a pid");
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the holder runs as pid {pid}"
    );
    // Allocated, not sparse.
    assert!(std::fs::metadata(&region).unwrap().blocks() * 512 >= 8 << 20);
    // A region an older luod left world-readable is made private again.
    assert!(luod.stop().success());
    std::fs::set_permissions(&region, std::fs::Permissions::from_mode(0o644)).unwrap();
    luod.start();
    assert_eq!(mode(&region), 0o600, "region after a restart");
    assert_eq!(sessions_seen(&luod.status().sessions), sessions_of(&set));
}

#[test]
fn a_symlink_at_the_region_path_is_refused_and_its_target_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("elsewhere");
    std::fs::write(&target, b"someone else's bytes").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
    let link = dir.path().join("region");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert_refused_start(
        refused_luod(dir.path(), &[]),
        &format!(
            "region {} is a symbolic link (to {t}); luod does not follow links for the files it writes: \
             pass the resolved path {t} instead, or remove the link",
            link.display(),
            t = target.display()
        ),
    );
    assert_eq!(std::fs::read(&target).unwrap(), b"someone else's bytes");
    assert_eq!(mode(&target), 0o644, "the target's mode is untouched");
    // A dangling link is not followed to create a file either.
    let nowhere = dir.path().join("nowhere");
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&nowhere, &link).unwrap();
    let (status, _) = refused_luod(dir.path(), &[]);
    assert_eq!(status.code(), Some(1));
    assert!(!nowhere.exists(), "nothing created through the link");
}

#[test]
fn a_symlink_at_the_holder_pid_path_is_not_followed() {
    let luod = Luod::new("8M");
    let state = luod.state_dir();
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let target = luod.dir().join("precious");
    std::fs::write(&target, b"keep me").unwrap();
    let pid_file = state.join("holder.pid");
    std::os::unix::fs::symlink(&target, &pid_file).unwrap();
    let mut luod = luod.launched();
    luod.client().create("vm0").expect("luod serves");
    assert_eq!(
        std::fs::read(&target).unwrap(),
        b"keep me",
        "the link's target is untouched"
    );
    assert!(std::fs::symlink_metadata(&pid_file).unwrap().file_type().is_symlink());
    let expected = format!(
        "holder pid file {} is a symbolic link (to {t}); luod does not follow links for the files it writes: \
         pass the resolved path {t} instead, or remove the link",
        pid_file.display(),
        t = target.display()
    );
    assert!(luod.log().contains(&expected), "luod's log says why: {}", luod.log());
    assert!(luod.is_running());
}

#[test]
fn a_state_directory_of_another_uid_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    nix::unistd::chown(&state, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    assert_refused_start(
        refused_luod(dir.path(), &[]),
        &format!(
            "state directory {} is owned by uid 65534, not by luod's uid 0: another user could read or replace \
             luod's files there; chown it to uid 0, or choose another path",
            state.display()
        ),
    );
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0, "nothing written there");
}

#[test]
fn a_state_directory_others_may_write_to_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    assert_refused_start(
        refused_luod(dir.path(), &[]),
        &format!(
            "state directory {} is writable by group or others (mode 0777): another user could plant or replace \
             luod's files there; `chmod go-w` it, or choose another path",
            state.display()
        ),
    );
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0, "nothing written there");
    assert_eq!(mode(&state), 0o777, "luod changes nothing");
}

#[test]
fn a_socket_path_that_is_not_a_socket_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("luod.sock");
    std::fs::write(&socket, b"not a socket").unwrap();
    assert_refused_start(
        refused_luod(dir.path(), &[]),
        &format!(
            "--socket {} exists and is not a socket (it is a regular file); luod never removes it: remove it \
             yourself, or pass another --socket",
            socket.display()
        ),
    );
    assert_eq!(std::fs::read(&socket).unwrap(), b"not a socket");
    // A symbolic link is not a socket either, even to one.
    std::fs::remove_file(&socket).unwrap();
    let real = dir.path().join("real.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&real).unwrap();
    std::os::unix::fs::symlink(&real, &socket).unwrap();
    assert_refused_start(
        refused_luod(dir.path(), &[]),
        &format!(
            "--socket {} exists and is not a socket (it is a symbolic link); luod never removes it: remove it \
             yourself, or pass another --socket",
            socket.display()
        ),
    );
    assert!(std::fs::symlink_metadata(&socket).unwrap().file_type().is_symlink());
}

#[test]
fn a_stale_socket_nobody_listens_on_is_replaced() {
    let luod = Luod::new("8M");
    drop(std::os::unix::net::UnixListener::bind(luod.socket()).unwrap());
    assert!(luod.socket().exists(), "a stale socket file");
    let luod = luod.launched();
    assert_eq!(luod.status().state, liveupdate::state::State::Normal);
}

/// A tmpfs of `size` mounted on a directory of its own, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size},mode=0700").as_str()),
        )
        .unwrap_or_else(|e| {
            panic!(
                "mount a {size} tmpfs on {}: {e} (the tests run as root)",
                dir.path().display()
            )
        });
        Tmpfs { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn a_region_larger_than_its_file_system_fails_at_start_with_the_reason() {
    let fs = Tmpfs::mount("2m");
    let dir = tempfile::tempdir().unwrap();
    let region = fs.path().join("region");
    let free = {
        let s = nix::sys::statvfs::statvfs(&fs.path()).unwrap();
        s.blocks_available() * s.fragment_size()
    };
    assert_eq!(free, 2 << 20);
    let result = refused_luod(dir.path(), &["--region".as_ref(), region.as_os_str()]);
    assert_eq!(result.0.signal(), None, "no SIGBUS: {:?}", result.0);
    assert_refused_start(
        result,
        &format!(
            "cannot allocate 8388608 bytes (8 MiB) for region file {}: the file system has only 2097152 bytes \
             (2 MiB) free (ENOSPC); free space, give luod a smaller --region-size, or put the region on another \
             file system",
            region.display()
        ),
    );
    assert!(!region.exists(), "the file luod created for the region is removed");
    // A region that fits works on the same file system.
    let mut luod = Command::new(binary("luod"))
        .args(["--backend", "file", "--fd-store", "holder", "--region-size", "1M"])
        .arg("--region")
        .arg(&region)
        .arg("--socket")
        .arg(dir.path().join("luod.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let served = poll(STARTUP_DEADLINE, || {
        liveupdate::protocol::client::Client::connect(&dir.path().join("luod.sock"), "test").ok()
    });
    let _ = luod.kill();
    let _ = luod.wait();
    assert!(served.is_some(), "luod serves with a 1 MiB region on the 2 MiB tmpfs");
}

use std::os::unix::process::ExitStatusExt;
