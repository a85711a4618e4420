//! luod never opens a path a client names: `luoctl prepare/check --kernel K
//! --initrd I` opens the images with the caller's own rights and sends them
//! as descriptors; luod takes only regular files open for reading. And only
//! a memfd open read-write is preserved.
//!
//! Runs as root, as CI does: luod's socket is given to group 65534
//! (nogroup), and luoctl also runs as uid/gid 65534 (nobody) from a copy in
//! the test's directory.

use liveupdate::protocol::{ErrorKind, ImageFile, PrepareArgs, Request, Response, StatusReport};
use liveupdate::state::State;
use liveupdate_tests::*;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const NOBODY: u32 = 65534;
const EXIT_CHECK_FAILED: i32 = 3;
const EXIT_UNREACHABLE: i32 = 4;
const EXIT_LOCAL_IO: i32 = 7;
const EXIT_INVALID_ARGUMENT: i32 = 10;

/// How long luoctl (and root's `status` after it) may take: luod must never
/// wait on a client's file.
const PROMPT: Duration = Duration::from_secs(5);

/// The hint of a refused image.
const IMAGE_HINT: &str =
    "give --kernel/--initrd as regular files you can read: luoctl opens them with your rights and sends them to luod";

/// A luod whose socket group 65534 may use, in a directory anyone may enter,
/// with a copy of luoctl nobody can run.
fn shared_luod() -> Luod {
    let luod = Luod::new("8M").arg("--socket-group").arg(NOBODY.to_string()).launched();
    std::fs::set_permissions(luod.dir(), std::fs::Permissions::from_mode(0o755)).expect("chmod 0755 the directory");
    let luoctl = luod.dir().join("luoctl");
    liveupdate_tests::copy_binary("luoctl", &luoctl);
    luod
}

/// Who runs luoctl.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum As {
    Root,
    Nobody,
}

/// Runs luoctl as `who` with `args` on `socket`; (exit code, stderr).
/// Panics when it does not finish within [`PROMPT`].
fn luoctl_at(luod: &Luod, socket: &Path, who: As, args: &[&str]) -> (i32, String) {
    let mut cmd = Command::new(luod.dir().join("luoctl"));
    cmd.arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if who == As::Nobody {
        cmd.uid(NOBODY).gid(NOBODY);
    }
    let started = Instant::now();
    let mut child = cmd.spawn().expect("run luoctl");
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for luoctl") {
            break s;
        }
        if started.elapsed() > PROMPT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("luoctl {args:?} as {who:?} did not finish within {PROMPT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr).expect("read stderr");
    (status.code().expect("luoctl exited"), stderr.trim_end().to_string())
}

fn luoctl(luod: &Luod, who: As, args: &[&str]) -> (i32, String) {
    luoctl_at(luod, &luod.socket(), who, args)
}

/// Root's `status`, which must come at once.
#[track_caller]
fn prompt_status(luod: &Luod) -> StatusReport {
    let started = Instant::now();
    let s = luod.status();
    assert!(started.elapsed() < PROMPT, "status took {:?}", started.elapsed());
    s
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn mkfifo(p: &Path) {
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o666)).expect("mkfifo");
    // The umask may have taken bits away.
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o666)).expect("chmod the FIFO");
}

/// A file with a bzImage boot header, readable by anyone.
fn bzimage(p: &Path) -> Vec<u8> {
    let mut bz = pattern(7, 0x1000);
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    std::fs::write(p, &bz).expect("write the image");
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).expect("chmod the image");
    bz
}

fn not_regular(role: &str, p: &Path, what: &str) -> String {
    format!(
        "{role} {} is {what}, not a regular file: luod reads only regular files, which cannot block it",
        p.display()
    )
}

/// luoctl's line for a `check` whose only failed items are `failed`, out of 6.
fn check_failed(failed: &[String]) -> String {
    format!(
        "luoctl: check: prepare would be refused ({} of 7 checks failed): {}; fix what failed, then check again",
        failed.len(),
        failed.join("; ")
    )
}

const NOT_PRIVILEGED: &str = "privilege: transitions need root or CAP_SYS_BOOT";

#[test]
fn check_with_a_fifo_returns_at_once_for_root_and_for_nobody_and_status_stays_prompt() {
    let luod = shared_luod();
    let fifo = luod.dir().join("fifo");
    mkfifo(&fifo);
    let before = prompt_status(&luod);
    let args = ["check", "--kernel", path(&fifo), "--cmdline", "quiet"];
    let item = format!("target kernel: {}", not_regular("kernel image", &fifo, "a FIFO"));

    assert_eq!(
        luoctl(&luod, As::Root, &args),
        (EXIT_CHECK_FAILED, check_failed(std::slice::from_ref(&item)))
    );
    assert_eq!(prompt_status(&luod), before);
    assert_eq!(
        luoctl(&luod, As::Nobody, &args),
        (EXIT_CHECK_FAILED, check_failed(&[NOT_PRIVILEGED.into(), item]))
    );
    assert_eq!(prompt_status(&luod), before);

    // prepare: the same refusal, nothing loaded, nothing recorded.
    let (code, stderr) = luoctl(
        &luod,
        As::Root,
        &["prepare", "--kernel", path(&fifo), "--cmdline", "quiet"],
    );
    assert_eq!(
        (code, stderr),
        (
            EXIT_INVALID_ARGUMENT,
            format!(
                "luoctl: prepare: {}; {IMAGE_HINT}",
                not_regular("kernel image", &fifo, "a FIFO")
            )
        )
    );
    assert_eq!(prompt_status(&luod), before);
}

#[test]
fn a_directory_or_a_device_gets_one_clear_error() {
    let luod = shared_luod();
    let dir = luod.dir().join("boot");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let kernel = luod.dir().join("vmlinuz");
    bzimage(&kernel);
    let null = Path::new("/dev/null");
    let before = prompt_status(&luod);
    let cases = [
        (
            vec!["--kernel", path(&dir)],
            not_regular("kernel image", &dir, "a directory"),
        ),
        (
            vec!["--kernel", "/dev/null"],
            not_regular("kernel image", null, "a character device"),
        ),
        (
            vec!["--kernel", path(&kernel), "--initrd", "/dev/null"],
            not_regular("initrd", null, "a character device"),
        ),
        (
            vec!["--kernel", path(&kernel), "--initrd", path(&dir)],
            not_regular("initrd", &dir, "a directory"),
        ),
    ];
    for (images, why) in cases {
        let mut prepare = vec!["prepare"];
        prepare.extend(&images);
        prepare.extend(["--cmdline", "quiet"]);
        assert_eq!(
            luoctl(&luod, As::Root, &prepare),
            (EXIT_INVALID_ARGUMENT, format!("luoctl: prepare: {why}; {IMAGE_HINT}")),
            "{images:?}"
        );
        let mut check = vec!["check"];
        check.extend(&images);
        check.extend(["--cmdline", "quiet"]);
        let item = format!("target kernel: {why}");
        assert_eq!(
            luoctl(&luod, As::Nobody, &check),
            (EXIT_CHECK_FAILED, check_failed(&[NOT_PRIVILEGED.into(), item])),
            "{images:?}"
        );
        assert_eq!(prompt_status(&luod), before, "{images:?}: nothing changed");
    }
}

#[test]
fn a_file_the_caller_cannot_read_fails_in_luoctl_which_never_asks_luod() {
    let luod = shared_luod();
    let secret = luod.dir().join("root-only-vmlinuz");
    bzimage(&secret);
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod 0600");
    let before = prompt_status(&luod);
    let want = format!(
        "luoctl: check: cannot open --kernel {}: Permission denied (os error 13)",
        secret.display()
    );
    let args = ["check", "--kernel", path(&secret), "--cmdline", "quiet"];
    assert_eq!(luoctl(&luod, As::Nobody, &args), (EXIT_LOCAL_IO, want.clone()));
    // luod is not asked: with no luod at all the answer is the same.
    let nowhere = luod.dir().join("no-luod.sock");
    assert_eq!(luoctl_at(&luod, &nowhere, As::Nobody, &args), (EXIT_LOCAL_IO, want));
    // Root can read it, and luod checks what root sent.
    let (code, stderr) = luoctl(&luod, As::Root, &args);
    assert_eq!((code, stderr.as_str()), (0, ""));
    assert_eq!(prompt_status(&luod), before);
    // And a luoctl with no luod to talk to says so only once the file opened.
    assert_eq!(luoctl_at(&luod, &nowhere, As::Root, &args).0, EXIT_UNREACHABLE);
}

#[test]
fn a_path_in_a_directory_the_caller_cannot_read_answers_the_same_whether_or_not_it_exists() {
    let luod = shared_luod();
    let private = luod.dir().join("private");
    std::fs::create_dir(&private).expect("mkdir");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).expect("chmod 0700");
    let image = private.join("vmlinuz");
    bzimage(&image);
    let args = ["check", "--kernel", path(&image), "--cmdline", "quiet"];
    let nowhere = luod.dir().join("no-luod.sock");
    let present = luoctl(&luod, As::Nobody, &args);
    let present_without_luod = luoctl_at(&luod, &nowhere, As::Nobody, &args);
    std::fs::remove_file(&image).expect("remove the image");
    let absent = luoctl(&luod, As::Nobody, &args);
    let want = (
        EXIT_LOCAL_IO,
        format!(
            "luoctl: check: cannot open --kernel {}: Permission denied (os error 13)",
            image.display()
        ),
    );
    assert_eq!(present, want);
    assert_eq!(present_without_luod, want, "luod was never asked");
    assert_eq!(absent, want);
}

/// `args` naming `n` images, the kernel as descriptor 0 and the initrd as 1.
fn image_args(kernel: &str, initrd: Option<&str>) -> PrepareArgs {
    PrepareArgs {
        kernel: Some(ImageFile {
            fd: 0,
            name: kernel.into(),
        }),
        initrd: initrd.map(|name| ImageFile {
            fd: 1,
            name: name.into(),
        }),
        cmdline: Some("quiet".into()),
        reuse_cmdline: false,
        ..Default::default()
    }
}

fn open_rw(p: &Path) -> OwnedFd {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .expect("open")
        .into()
}

#[test]
fn a_raw_client_sending_a_fifo_or_a_directory_is_refused_by_luod() {
    let luod = shared_luod();
    let fifo = luod.dir().join("fifo");
    mkfifo(&fifo);
    // Read-write: the open does not wait for a writer, and a read would block
    // (the pipe is empty): luod must not read it.
    let fifo_fd = open_rw(&fifo);
    let dir_fd: OwnedFd = std::fs::File::open(luod.dir()).expect("open the directory").into();
    let kernel = luod.dir().join("vmlinuz");
    bzimage(&kernel);
    let kernel_fd: OwnedFd = std::fs::File::open(&kernel).expect("open the image").into();
    let mut c = luod.client();
    let before = c.status();
    let cases: [(PrepareArgs, Vec<BorrowedFd<'_>>, String); 3] = [
        (
            image_args("fifo", None),
            vec![fifo_fd.as_fd()],
            "kernel image fifo is a FIFO, not a regular file: luod reads only regular files, which cannot block it"
                .into(),
        ),
        (
            image_args("dir", None),
            vec![dir_fd.as_fd()],
            "kernel image dir is a directory, not a regular file: luod reads only regular files, which cannot block it"
                .into(),
        ),
        (
            image_args("vmlinuz", Some("fifo")),
            vec![kernel_fd.as_fd(), fifo_fd.as_fd()],
            "initrd fifo is a FIFO, not a regular file: luod reads only regular files, which cannot block it".into(),
        ),
    ];
    for (args, fds, want) in cases {
        let e = assert_refused(
            c.call_fds(&Request::Prepare(args.clone()), &fds),
            ErrorKind::InvalidArgument,
            &want,
        );
        assert_eq!(e.hint, IMAGE_HINT);
        match c.call_fds(&Request::Check(args), &fds) {
            Ok((Response::Check(r), _)) => {
                let item = r
                    .items
                    .iter()
                    .find(|i| i.name == "target kernel")
                    .expect("target kernel item");
                assert_eq!((r.ok, item.ok, item.detail.as_str()), (false, false, want.as_str()));
            }
            other => panic!("check answered {other:?}"),
        }
        assert_eq!(prompt_status(&luod), before);
    }
    // Descriptors that do not match the images named: refused, not guessed.
    assert_refused(
        c.call_fds(&Request::Prepare(image_args("vmlinuz", None)), &[]),
        ErrorKind::InvalidArgument,
        "prepare names 1 image(s) but 0 file descriptor(s) came with it: send each image (kernel first, then \
         initrd) as a descriptor with SCM_RIGHTS",
    );
    assert_refused(
        c.call_fds(&Request::Prepare(PrepareArgs::default()), &[kernel_fd.as_fd()]),
        ErrorKind::InvalidArgument,
        "prepare names 0 image(s) but 1 file descriptor(s) came with it: send each image (kernel first, then \
         initrd) as a descriptor with SCM_RIGHTS",
    );
    assert_eq!(c.status(), before);
}

#[test]
fn luod_reads_the_image_from_the_descriptor_and_records_the_name_the_client_gave() {
    let luod = shared_luod();
    let kernel = luod.dir().join("vmlinuz");
    let bytes = bzimage(&kernel);
    let fd: OwnedFd = std::fs::File::open(&kernel).expect("open the image").into();
    // Gone from the filesystem: only the descriptor leads to it.
    std::fs::remove_file(&kernel).expect("unlink the image");
    let mut c = luod.client();
    let report = match c.call_fds(
        &Request::Prepare(image_args("/nonexistent/vmlinuz-next", None)),
        &[fd.as_fd()],
    ) {
        Ok((Response::Transition(r), _)) => r,
        other => panic!("prepare answered {other:?}"),
    };
    let sha = sha256_hex(&bytes);
    assert_eq!(
        report.notes.first().map(String::as_str),
        Some(format!("loaded /nonexistent/vmlinuz-next (sha256 {sha})").as_str()),
        "{:?}",
        report.notes
    );
    let status = c.status();
    assert_eq!(status.state, State::Prepared);
    assert_eq!(
        status.last_cycle.and_then(|c| c.target_kernel).as_deref(),
        Some("/nonexistent/vmlinuz-next")
    );
    c.cancel().expect("cancel");
    let history = c.history();
    let target = history
        .last()
        .and_then(|c| c.target.clone())
        .expect("the cycle's target");
    assert_eq!(
        (target.kernel.as_str(), liveupdate::engine::hex(&target.kernel_sha256)),
        ("/nonexistent/vmlinuz-next", sha)
    );
}

#[test]
fn luoctl_prepare_sends_the_images_and_luod_records_their_absolute_names() {
    let luod = shared_luod();
    let kernel = luod.dir().join("vmlinuz");
    let bytes = bzimage(&kernel);
    let initrd = luod.dir().join("initrd.img");
    std::fs::write(&initrd, b"an initrd").expect("write the initrd");
    let (code, stderr) = luoctl(
        &luod,
        As::Root,
        &[
            "prepare",
            "--kernel",
            path(&kernel),
            "--initrd",
            path(&initrd),
            "--cmdline",
            "quiet",
        ],
    );
    assert_eq!((code, stderr.as_str()), (0, ""));
    let mut c = luod.client();
    c.cancel().expect("cancel");
    let target = c.history().last().and_then(|c| c.target.clone()).expect("target");
    assert_eq!(
        (
            target.kernel,
            liveupdate::engine::hex(&target.kernel_sha256),
            target.initrd,
            target.initrd_sha256.map(|d| liveupdate::engine::hex(&d))
        ),
        (
            kernel.display().to_string(),
            sha256_hex(&bytes),
            Some(initrd.display().to_string()),
            Some(sha256_hex(b"an initrd"))
        )
    );
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    liveupdate::engine::hex(&sha2::Sha256::digest(bytes))
}

/// `fd` opened again through `/proc/self/fd` with `flags`.
fn reopen(fd: BorrowedFd<'_>, flags: nix::fcntl::OFlag) -> OwnedFd {
    let path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    nix::fcntl::open(
        &path,
        flags | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .expect("reopen")
}

#[test]
fn only_a_memfd_open_read_write_is_preserved() {
    use nix::fcntl::OFlag;
    let luod = shared_luod();
    let mut c = luod.client();
    c.create("vm0").expect("create vm0");
    let bytes = pattern(3, 8192);
    let ram = memfd_with("ram", &bytes);
    let before = c.status();
    for (flags, mode) in [
        (OFlag::O_PATH, "with O_PATH"),
        (OFlag::O_WRONLY, "write-only"),
        (OFlag::O_RDONLY, "read-only"),
    ] {
        let e = assert_refused(
            c.preserve("vm0", 1, reopen(ram.as_fd(), flags).as_fd()),
            ErrorKind::InvalidArgument,
            &format!(
                "cannot preserve /memfd:luod:ram (deleted): it is open {mode}; only a memfd open read-write (O_RDWR) can \
                 be preserved"
            ),
        );
        assert_eq!(
            e.hint,
            "hand over the memfd from memfd_create(2) itself, or a reopen with O_RDWR"
        );
        assert_eq!(prompt_status(&luod), before, "{mode}: nothing preserved");
    }
    // The same memfd reopened read-write is fine, and crosses the update.
    c.preserve("vm0", 1, reopen(ram.as_fd(), OFlag::O_RDWR).as_fd())
        .expect("a read-write reopen is preserved");
    c.prepare().expect("prepare");
    c.reboot().expect("reboot");
    let mut luod = luod;
    luod.expect_kexec_exit();
    luod.start();
    let mut c = luod.client();
    let (fd, size) = c.retrieve("vm0", 1).expect("retrieve");
    assert_eq!(size, bytes.len() as u64);
    assert_file_holds("vm0/1", fd, &bytes);
}

/// A FUSE filesystem of one regular file (mounted on a file), served by a
/// thread of the test that answers `INIT`, `GETATTR`, `OPEN` and `RELEASE`
/// but never `READ`, `FLUSH` or `STATFS`: a file whose reads (and close)
/// wait forever, as any user can make one in a user namespace of its own.
/// Dropping it aborts the connection (every waiting call then fails) and
/// unmounts it; so does the server on its own after [`FUSE_LIFETIME`], so
/// that a luod stuck on the file fails the test instead of hanging it.
struct StalledFuse {
    mountpoint: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stalled: std::sync::Arc<std::sync::Mutex<Vec<u32>>>,
    server: Option<std::thread::JoinHandle<()>>,
    /// The test's own open file: closed after the abort (its close would wait).
    opened: Option<OwnedFd>,
}

/// How long the stalled FUSE server lives at most.
const FUSE_LIFETIME: Duration = Duration::from_secs(20);

const FUSE_GETATTR: u32 = 3;
const FUSE_FORGET: u32 = 2;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_STATFS: u32 = 17;
const FUSE_RELEASE: u32 = 18;
const FUSE_FLUSH: u32 = 25;
const FUSE_INIT: u32 = 26;
const FUSE_INTERRUPT: u32 = 36;

impl StalledFuse {
    /// Mounts it; only `luod_pid`'s `FLUSH`es are left unanswered (see
    /// [`serve_fuse`]).
    fn mount(mountpoint: &Path, luod_pid: i32) -> StalledFuse {
        std::fs::write(mountpoint, b"").expect("create the mount point");
        let dev: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .expect("open /dev/fuse")
            .into();
        let target = std::ffi::CString::new(path(mountpoint)).expect("mount point");
        let opts = std::ffi::CString::new(format!("fd={},rootmode=100644,user_id=0,group_id=0", dev.as_raw_fd()))
            .expect("options");
        // SAFETY: every pointer is a NUL-terminated string that outlives the
        // call; the kernel only reads them.
        let rc = unsafe {
            libc::mount(
                c"luo-test-fuse".as_ptr(),
                target.as_ptr(),
                c"fuse".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                opts.as_ptr().cast(),
            )
        };
        assert_eq!(rc, 0, "mount fuse: {}", std::io::Error::last_os_error());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stalled = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let server = {
            let (stop, stalled) = (stop.clone(), stalled.clone());
            std::thread::spawn(move || serve_fuse(dev, &stop, &stalled, luod_pid))
        };
        StalledFuse {
            mountpoint: mountpoint.to_path_buf(),
            stop,
            stalled,
            server: Some(server),
            opened: None,
        }
    }

    /// Opens the file (the server answers `OPEN`).
    fn open(&mut self) -> BorrowedFd<'_> {
        let fd: OwnedFd = std::fs::File::open(&self.mountpoint)
            .expect("open the FUSE file")
            .into();
        self.opened = Some(fd);
        self.opened.as_ref().expect("just opened").as_fd()
    }

    /// The requests left unanswered so far (opcodes).
    fn stalled(&self) -> Vec<u32> {
        self.stalled.lock().expect("stalled").clone()
    }
}

impl Drop for StalledFuse {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.server.take() {
            let _ = t.join();
        }
        // The connection is aborted: closing our file no longer waits.
        self.opened.take();
        let target = std::ffi::CString::new(path(&self.mountpoint)).expect("mount point");
        // SAFETY: `target` is a NUL-terminated string that outlives the call.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// The thread group of the task `tid` (a FUSE request names the thread).
fn tgid_of(tid: u32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))?
        .trim()
        .parse()
        .ok()
}

/// Serves the FUSE connection. A `FLUSH` from any process but luod is
/// answered: every child that the test process (or a parallel test) forks
/// holds a copy of the test's own open file until its `exec` closes it, and
/// that close flushes too; luod's `FLUSH`es are the ones counted.
fn serve_fuse(dev: OwnedFd, stop: &std::sync::atomic::AtomicBool, stalled: &std::sync::Mutex<Vec<u32>>, luod_pid: i32) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut buf = vec![0u8; (1 << 20) + 4096];
    let started = Instant::now();
    while !stop.load(std::sync::atomic::Ordering::SeqCst) && started.elapsed() < FUSE_LIFETIME {
        let mut fds = [PollFd::new(dev.as_fd(), PollFlags::POLLIN)];
        if !matches!(poll(&mut fds, PollTimeout::from(50u16)), Ok(n) if n > 0) {
            continue;
        }
        let Ok(n) = nix::unistd::read(&dev, &mut buf) else {
            return;
        };
        if n < 40 {
            continue;
        }
        let u32_at = |o: usize| u32::from_le_bytes(buf[o..o + 4].try_into().expect("4 bytes"));
        let (opcode, unique) = (u32_at(4), u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes")));
        let reply = |error: i32, body: &[u8]| {
            let mut out = Vec::with_capacity(16 + body.len());
            out.extend(((16 + body.len()) as u32).to_le_bytes());
            out.extend(error.to_le_bytes());
            out.extend(unique.to_le_bytes());
            out.extend(body);
            let _ = nix::unistd::write(&dev, &out);
        };
        match opcode {
            FUSE_INIT => {
                let mut body = Vec::new();
                for v in [7u32, 31, 0, 0] {
                    body.extend(v.to_le_bytes()); // major, minor, max_readahead, flags
                }
                body.extend(16u16.to_le_bytes()); // max_background
                body.extend(12u16.to_le_bytes()); // congestion_threshold
                body.extend(4096u32.to_le_bytes()); // max_write
                body.extend(1u32.to_le_bytes()); // time_gran
                body.extend(1u16.to_le_bytes()); // max_pages
                body.resize(64, 0);
                reply(0, &body);
            }
            FUSE_GETATTR => {
                let mut body = Vec::new();
                body.extend(0u64.to_le_bytes()); // attr_valid: no caching
                body.extend([0u8; 8]); // attr_valid_nsec, dummy
                for v in [1u64, 0x1000, 8, 0, 0, 0] {
                    body.extend(v.to_le_bytes()); // ino, size, blocks, atime, mtime, ctime
                }
                for v in [0u32, 0, 0, 0o100644, 1, 0, 0, 0, 4096, 0] {
                    body.extend(v.to_le_bytes()); // nsecs, mode, nlink, uid, gid, rdev, blksize, flags
                }
                reply(0, &body);
            }
            FUSE_OPEN => reply(0, &[0u8; 16]),
            FUSE_RELEASE => reply(0, &[]),
            FUSE_FORGET | FUSE_INTERRUPT => {}
            FUSE_FLUSH if tgid_of(u32_at(32)) != Some(luod_pid) => reply(0, &[]),
            FUSE_READ | FUSE_FLUSH | FUSE_STATFS => stalled.lock().expect("stalled").push(opcode),
            _ => reply(-libc::ENOSYS, &[]),
        }
    }
}

#[test]
fn an_image_on_a_fuse_filesystem_is_refused_without_luod_touching_it() {
    let luod = shared_luod();
    let mut fuse = StalledFuse::mount(&luod.dir().join("fuse-image"), luod.pid());
    let fd = fuse.open();
    let mut c = luod.client();
    let before = c.status();
    let want = "kernel image /mnt/vmlinuz is on a FUSE filesystem (fuse), whose reads a process answers, possibly \
                never: luod does not read it; copy it to a local filesystem";
    let args = image_args("/mnt/vmlinuz", None);
    let started = Instant::now();
    let checked = c.call_fds(&Request::Check(args.clone()), &[fd]);
    assert!(started.elapsed() < PROMPT, "check took {:?}", started.elapsed());
    match checked {
        Ok((Response::Check(r), _)) => {
            let item = r
                .items
                .iter()
                .find(|i| i.name == "target kernel")
                .expect("target kernel item");
            assert_eq!((r.ok, item.ok, item.detail.as_str()), (false, false, want));
        }
        other => panic!("check answered {other:?}"),
    }
    assert_eq!(prompt_status(&luod), before);
    let started = Instant::now();
    let prepared = c.call_fds(&Request::Prepare(args), &[fd]);
    assert!(started.elapsed() < PROMPT, "prepare took {:?}", started.elapsed());
    let e = assert_refused(prepared, ErrorKind::InvalidArgument, want);
    assert_eq!(e.hint, IMAGE_HINT);
    assert_eq!(prompt_status(&luod), before);
    // luod never read it; its closes wait on a thread of their own.
    assert!(!fuse.stalled().contains(&FUSE_READ), "{:?}", fuse.stalled());
    let flushes = poll(PROMPT, || {
        let n = fuse.stalled().iter().filter(|op| **op == FUSE_FLUSH).count();
        (n >= 2).then_some(n)
    });
    assert_eq!(
        flushes,
        Some(2),
        "luod closed both copies (each close waits): {:?}",
        fuse.stalled()
    );
    drop(fuse);
    assert_eq!(prompt_status(&luod), before);
}

#[test]
fn a_fuse_file_sent_to_preserve_or_as_guest_ram_is_refused_without_luod_waiting_on_it() {
    let luod = shared_luod();
    let mountpoint = luod.dir().join("fuse-ram");
    let mut fuse = StalledFuse::mount(&mountpoint, luod.pid());
    let fd = fuse.open();
    let mut c = luod.client();
    c.create("vm0").expect("create vm0");
    let before = c.status();
    let want = format!("cannot preserve {}: only memfds can be preserved", mountpoint.display());
    let started = Instant::now();
    let preserved = c.preserve("vm0", 1, fd);
    assert!(started.elapsed() < PROMPT, "preserve took {:?}", started.elapsed());
    assert_refused(preserved, ErrorKind::InvalidArgument, &want);
    assert_eq!(prompt_status(&luod), before);
    let started = Instant::now();
    let registered = c.call_fds(
        &Request::VmRegister {
            name: "fuse-vm".into(),
            tokens: vec![1],
        },
        &[fd],
    );
    assert!(started.elapsed() < PROMPT, "vm-register took {:?}", started.elapsed());
    assert_refused(registered, ErrorKind::InvalidArgument, &want);
    assert_eq!(prompt_status(&luod), before);
    let flushes = poll(PROMPT, || {
        let n = fuse.stalled().iter().filter(|op| **op == FUSE_FLUSH).count();
        (n >= 2).then_some(n)
    });
    assert_eq!(
        flushes,
        Some(2),
        "luod closed both copies off its lock: {:?}",
        fuse.stalled()
    );
    assert!(!fuse.stalled().contains(&FUSE_READ), "{:?}", fuse.stalled());
    drop(fuse);
    assert_eq!(prompt_status(&luod), before);
}
