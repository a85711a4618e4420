//! luo-qemu end to end: a real luod (file backend, simulated kexec), the
//! launcher and a real, unmodified QEMU (10.0 from bookworm-backports, TCG)
//! running a Linux guest (Debian's stock kernel, a busybox init that prints
//! a counter, its boot id, its uptime and the MD5 of a tmpfs file every
//! 100 ms; `qemu-launcher/guest/init`).
//!
//! The fixtures come from the project's scripts: `qemu-tests/fetch-qemu.sh`
//! (QEMU 10, unpacked into the cache, not installed),
//! `qemu-tests/fetch-stock-kernel.sh` and `qemu-launcher/guest/make-initrd.sh`.

use liveupdate::state::State;
use liveupdate_tests::{Luod, binary};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The guests run one test at a time: TCG guests on 2 shared cores.
static SERIAL: Mutex<()> = Mutex::new(());

struct Fixtures {
    qemu10: String,
    kernel: String,
    initrd: PathBuf,
    _dir: tempfile::TempDir,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

fn script(path: &str, args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(repo().join(path))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("run script");
    assert!(out.status.success(), "{path} failed: {}", out.status);
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .lines()
        .last()
        .unwrap_or("")
        .to_string()
}

fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let initrd = dir.path().join("initrd.gz");
        script("qemu-launcher/guest/make-initrd.sh", &[initrd.to_str().expect("utf-8")]);
        Fixtures {
            qemu10: script("qemu-tests/fetch-qemu.sh", &[]),
            kernel: script("qemu-tests/fetch-stock-kernel.sh", &[]),
            initrd,
            _dir: dir,
        }
    })
}

/// One guest line: `GUEST: tick n=N boot=B up=U tmpfs=M`.
#[derive(Debug, Clone, PartialEq)]
struct Tick {
    n: u64,
    boot: String,
    up: f64,
    tmpfs: String,
}

fn ticks(serial: &Path) -> Vec<Tick> {
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("GUEST: tick ")?;
            let field = |k: &str| rest.split(' ').find_map(|w| w.strip_prefix(k)).map(str::to_string);
            Some(Tick {
                n: field("n=")?.parse().ok()?,
                boot: field("boot=")?,
                up: field("up=")?.parse().ok()?,
                tmpfs: field("tmpfs=")?,
            })
        })
        .collect()
}

fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A VM's configuration and files in `dir`.
struct VmFiles {
    name: String,
    dir: PathBuf,
}

impl VmFiles {
    fn new(dir: &Path, name: &str, qemu: &str, extra: &[&str]) -> VmFiles {
        let f = fixtures();
        let serial = dir.join(format!("{name}.serial"));
        let mut args: Vec<String> = Vec::new();
        args.extend(
            [
                "-nodefaults",
                "-machine",
                "q35",
                "-accel",
                "tcg",
                "-display",
                "none",
                "-kernel",
                &f.kernel,
                "-initrd",
                f.initrd.to_str().expect("utf-8"),
                "-append",
                "console=ttyS0 quiet",
                "-chardev",
                &format!("file,id=ser,path={},append=on", serial.display()),
                "-serial",
                "chardev:ser",
            ]
            .map(str::to_string),
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        let toml = format!("qemu = {qemu:?}\nmemory_mib = 128\nstate_mib = 4\ntimeout_secs = 30\nargs = {args:?}\n");
        std::fs::write(dir.join(format!("{name}.toml")), toml).expect("config");
        VmFiles {
            name: name.into(),
            dir: dir.to_path_buf(),
        }
    }

    fn serial(&self) -> PathBuf {
        self.dir.join(format!("{}.serial", self.name))
    }

    fn ticks(&self) -> Vec<Tick> {
        ticks(&self.serial())
    }

    fn wait_ticks(&self, after: u64) -> Tick {
        wait_for(
            &format!("VM {} to tick past {after}", self.name),
            Duration::from_secs(300),
            || self.ticks().into_iter().rfind(|t| t.n > after),
        )
    }
}

/// A running `luo-qemu run NAME`; its stdout goes to NAME.launcher.N.
struct Launcher {
    child: Child,
    out: PathBuf,
}

static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Launcher {
    fn start(luod: &Luod, vm: &VmFiles) -> Launcher {
        let k = RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let out = vm.dir.join(format!("{}.launcher.{k}", vm.name));
        let child = Command::new(binary("luo-qemu"))
            .args(["run", &vm.name, "--config-dir"])
            .arg(&vm.dir)
            .arg("--socket")
            .arg(luod.socket())
            .arg("--run-dir")
            .arg(&vm.dir)
            .stdout(std::fs::File::create(&out).expect("out"))
            .stderr(std::fs::File::create(out.with_extension("err")).expect("err"))
            .spawn()
            .expect("spawn luo-qemu");
        Launcher { child, out }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
            + &std::fs::read_to_string(self.out.with_extension("err")).unwrap_or_default()
    }

    fn wait_line(&mut self, needle: &str) -> String {
        let out = self.out.clone();
        wait_for(
            &format!("luo-qemu to print {needle:?}"),
            Duration::from_secs(300),
            || {
                let text = std::fs::read_to_string(&out).unwrap_or_default();
                if let Ok(Some(status)) = self.child.try_wait() {
                    let line = text.lines().find(|l| l.contains(needle)).map(str::to_string);
                    return Some(line.unwrap_or_else(|| panic!("luo-qemu exited ({status}):\n{}", self.output())));
                }
                text.lines().find(|l| l.contains(needle)).map(str::to_string)
            },
        )
    }

    fn wait_exit(&mut self) -> i32 {
        let s = wait_for("luo-qemu to exit", Duration::from_secs(60), || {
            self.child.try_wait().expect("wait")
        });
        s.code().unwrap_or(-1)
    }

    /// QEMU's pid, from the line that says it started.
    fn qemu_pid(&mut self) -> i32 {
        let line = self.wait_line(" pid ");
        line.split(" pid ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|p| p.parse().ok())
            .expect("pid")
    }

    fn stop(mut self) -> i32 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        self.wait_exit()
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// VM `name` as `luoctl --json vm list` shows it, once `ready` accepts it.
fn vm_json(luod: &Luod, name: &str, what: &str, ready: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    wait_for(what, Duration::from_secs(30), || {
        let (code, v) = luod.luoctl_json(&["vm", "list"]);
        assert_eq!(code, 0, "{v}");
        v["vms"]
            .as_array()
            .expect("vms")
            .iter()
            .find(|vm| vm["name"] == name)
            .filter(|vm| ready(vm))
            .cloned()
    })
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn a_qemu_vm_keeps_its_guest_across_the_simulated_kexec() {
    let _g = lock();
    let f = fixtures();
    let mut luod = Luod::started("300M");
    let vm = VmFiles::new(luod.dir(), "web", &f.qemu10, &[]);
    let mut old = Launcher::start(&luod, &vm);
    assert!(old.wait_line("started fresh").contains("QEMU 10.0"), "{}", old.output());
    old.wait_line(" registered with luod (QEMU");
    let list = luod.luoctl(&["vm", "list"]);
    let text = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(text.contains("web") && text.contains("registered"), "{text}");
    // The launcher reports QEMU's version and the VM's run state.
    let v = vm_json(&luod, "web", "the launcher's report at registration", |v| {
        !v["detail"].is_null()
    });
    assert_eq!(v["phase"], "registered");
    assert_eq!(v["detail"], "QEMU 10.0.2, running", "{v}");
    assert!(v["blackout_ms"].is_null(), "no update yet: {v}");
    let first = vm.wait_ticks(15);

    let mut c = luod.client();
    c.prepare().expect("prepare");
    let frozen_at = Instant::now();
    c.freeze().expect("freeze");
    let cp = old.wait_line("checkpointed");
    assert!(cp.contains("was_running=true"), "{cp}");
    let v = vm_json(&luod, "web", "the launcher's report of the checkpoint", |v| {
        v["detail"].as_str().is_some_and(|d| d.contains("checkpointed"))
    });
    let detail = v["detail"].as_str().expect("detail");
    assert!(
        detail.starts_with("QEMU 10.0.2, checkpointed ") && detail.contains(" KiB in ") && detail.ends_with(" ms"),
        "{detail}"
    );
    let last = vm.ticks().pop().expect("ticks before the update");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        vm.ticks().pop(),
        Some(last.clone()),
        "the guest is stopped after freeze"
    );
    c.reboot().expect("reboot");
    drop(c);
    luod.expect_kexec_exit();

    // "The new kernel": luod starts again; the old launcher sees the VM was
    // handed over and its QEMU quits.
    luod.start();
    assert_eq!(luod.status().state, State::Updated);
    assert_eq!(old.wait_exit(), 0, "{}", old.output());
    assert!(
        old.output().contains("was handed over to the new kernel"),
        "{}",
        old.output()
    );
    let out = luod.luoctl(&["finish"]);
    assert_eq!(out.status.code(), Some(11), "finish waits for the VM");
    assert!(
        stderr_of(&out).contains("1 VM(s) of the update were not restored: web"),
        "{}",
        stderr_of(&out)
    );

    let mut new = Launcher::start(&luod, &vm);
    let restored = new.wait_line("restored");
    assert!(restored.contains("checkpoint by QEMU 10.0.2"), "{restored}");
    let most = frozen_at.elapsed();
    // The VM's blackout, from the pause at the checkpoint to the guest
    // running again, on the wall clock: within what the test saw.
    // The restored VM registers again at once, while luod is `updated` (so a
    // rollback would carry it), and keeps the restore's report.
    let v = vm_json(&luod, "web", "the launcher's report of the restore", |v| {
        !v["blackout_ms"].is_null() && v["phase"] == "registered"
    });
    let blackout = v["blackout_ms"].as_u64().expect("blackout_ms");
    assert!(
        blackout > 0 && u128::from(blackout) <= most.as_millis(),
        "blackout {blackout} ms, freeze to restore {most:?}"
    );
    let detail = v["detail"].as_str().expect("detail");
    assert!(
        detail.starts_with("QEMU 10.0.2, running; restored from QEMU 10.0.2's checkpoint (relaunch "),
        "{detail}"
    );
    assert!(
        new.output().contains(&format!("VM web: blackout_ms={blackout}")),
        "{}",
        new.output()
    );
    eprintln!("VM blackout across the simulated kexec: {blackout} ms (freeze to restore seen by the test: {most:?})");
    // The parts of the blackout the launcher measures.
    eprintln!("{cp}\n{restored}");
    let after = vm.wait_ticks(last.n + 5);
    let next = vm
        .ticks()
        .into_iter()
        .find(|t| t.n == last.n + 1)
        .expect("the tick after the last one");
    assert_eq!(next.boot, first.boot, "same boot id: the guest did not reboot");
    assert_eq!(after.boot, first.boot);
    assert_eq!(next.tmpfs, first.tmpfs, "the tmpfs file is intact");
    assert!(
        next.up > last.up && next.up < last.up + 2.0,
        "uptime continues: {last:?} then {next:?}"
    );
    assert!(
        !vm.ticks().iter().any(|t| t.boot != first.boot),
        "no tick from another boot"
    );

    let out = luod.luoctl(&["finish"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    // The registration made in `updated` carries on past `finish`, for the
    // next update (one registration, no other); the restore's report and the
    // last update's blackout stay.
    let v = vm_json(&luod, "web", "the VM after finish", |v| v["phase"] == "registered");
    assert_eq!(
        new.output().matches("VM web registered with luod").count(),
        1,
        "{}",
        new.output()
    );
    assert_eq!(v["detail"].as_str(), Some(detail), "{v}");
    assert_eq!(v["blackout_ms"].as_u64(), Some(blackout), "{v}");
    assert_eq!(new.stop(), 0);
}

#[test]
fn prepare_is_vetoed_for_an_old_qemu_and_for_private_memory_and_nothing_pauses() {
    use liveupdate::subsystems::qmp::Qmp;
    let _g = lock();
    let f = fixtures();
    let luod = Luod::started("600M");
    // Each QEMU gets a second monitor, for the test to see it still runs.
    let monitor = |name: &str| {
        let path = luod.dir().join(format!("{name}.ops"));
        (
            format!("socket,id=ops,path={},server=on,wait=off", path.display()),
            path,
        )
    };
    let (old_mon, old_ops) = monitor("old");
    let (private_mon, private_ops) = monitor("private");
    let old_qemu = "/usr/bin/qemu-system-x86_64";
    let old = VmFiles::new(
        luod.dir(),
        "old",
        old_qemu,
        &["-chardev", &old_mon, "-mon", "chardev=ops,mode=control"],
    );
    let private = VmFiles::new(
        luod.dir(),
        "private",
        &f.qemu10,
        &[
            "-object",
            "memory-backend-ram,id=scratch,size=8M",
            "-chardev",
            &private_mon,
            "-mon",
            "chardev=ops,mode=control",
        ],
    );
    let mut lo = Launcher::start(&luod, &old);
    lo.wait_line(" registered with luod (QEMU");
    let mut lp = Launcher::start(&luod, &private);
    lp.wait_line(" registered with luod (QEMU");
    let before = luod.status();

    let out = luod.luoctl(&["prepare"]);
    assert_eq!(out.status.code(), Some(13), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert!(
        err.contains("vetoed: VM old: QEMU 7.2.")
            && err.contains("is older than 8.2 and has no cpr-reboot migration mode"),
        "{err}"
    );
    assert!(
        err.contains(
            "VM private: memory backend scratch is not shared (share=off): cpr-reboot cannot keep it in place"
        ),
        "{err}"
    );
    let after = luod.status();
    assert_eq!(after.state, State::Normal);
    assert_eq!(after.sessions, before.sessions, "preserved data unchanged");
    // Nothing paused: both VMs still run.
    for ops in [&old_ops, &private_ops] {
        let mut q = Qmp::connect(ops, Duration::from_secs(30)).expect("the test's monitor");
        let status = q.query_status().expect("query-status");
        assert!(status.running && status.status == "running", "{status:?}");
    }
    assert_eq!(lo.stop(), 0);
    assert_eq!(lp.stop(), 0);
}

#[test]
fn qemu_killed_during_freeze_fails_the_freeze_and_the_other_vm_resumes() {
    let _g = lock();
    let f = fixtures();
    let luod = Luod::started("600M");
    let a = VmFiles::new(luod.dir(), "a", &f.qemu10, &[]);
    let b = VmFiles::new(luod.dir(), "b", &f.qemu10, &[]);
    let mut la = Launcher::start(&luod, &a);
    let qemu_a = la.qemu_pid();
    la.wait_line(" registered with luod (QEMU");
    let mut lb = Launcher::start(&luod, &b);
    lb.wait_line(" registered with luod (QEMU");
    a.wait_ticks(5);
    b.wait_ticks(5);
    let mut c = luod.client();
    c.prepare().expect("prepare");
    let pid = nix::unistd::Pid::from_raw(qemu_a);
    // QEMU a stops answering (SIGSTOP), then dies while luod waits for its freeze.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("SIGKILL");
    });
    let out = luod.luoctl(&["freeze"]);
    killer.join().expect("killer");
    let err = stderr_of(&out);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("VM a: freeze failed: QEMU exited (signal: 9 (SIGKILL))"),
        "{err}"
    );
    assert_eq!(luod.status().state, State::Prepared);
    // b was frozen and resumed: it ticks again.
    let tb = b.ticks().pop().expect("tick").n;
    b.wait_ticks(tb + 3);
    assert!(lb.output().contains("VM b resumed after unfreeze") || !lb.output().contains("checkpointed"));
    let out = luod.luoctl(&["cancel"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(la.wait_exit(), 4, "{}", la.output());
    assert_eq!(lb.stop(), 0);
}

#[test]
fn a_failed_relaunch_keeps_the_vm_preserved_until_a_retry_restores_it() {
    let _g = lock();
    let f = fixtures();
    let mut luod = Luod::started("300M");
    let disk = luod.dir().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk image");
    let drive = format!("file={},if=virtio,format=raw", disk.display());
    let vm = VmFiles::new(luod.dir(), "db", &f.qemu10, &["-drive", &drive]);
    let mut old = Launcher::start(&luod, &vm);
    old.wait_line(" registered with luod (QEMU");
    let first = vm.wait_ticks(5);
    let mut c = luod.client();
    c.prepare().expect("prepare");
    c.reboot().expect("reboot");
    drop(c);
    luod.expect_kexec_exit();
    luod.start();
    assert_eq!(old.wait_exit(), 0, "{}", old.output());
    let last = vm.ticks().pop().expect("tick");

    // The disk image is missing in the new kernel: the relaunch fails, the
    // VM stays preserved by luod.
    let moved = luod.dir().join("disk.img.away");
    std::fs::rename(&disk, &moved).expect("move the disk away");
    let mut failed = Launcher::start(&luod, &vm);
    assert_eq!(failed.wait_exit(), 3, "{}", failed.output());
    let text = failed.output();
    assert!(
        text.contains("VM db: relaunch failed: QEMU exited (exit status: 1); QEMU said:"),
        "{text}"
    );
    assert!(text.contains("disk.img"), "QEMU's reason names the image: {text}");
    assert!(text.contains("its RAM and state stay preserved by luod"), "{text}");
    let list = luod.luoctl(&["vm", "list"]);
    assert!(
        String::from_utf8_lossy(&list.stdout).contains("awaiting-claim"),
        "{:?}",
        list
    );
    // vm list and finish show why, and what to do.
    let v = vm_json(&luod, "db", "the launcher's report of the failure", |v| {
        !v["detail"].is_null()
    });
    assert_eq!(v["phase"], "awaiting-claim");
    let detail = v["detail"].as_str().expect("detail");
    assert!(
        detail.starts_with("relaunch failed: QEMU exited (exit status: 1); QEMU said:")
            && detail.contains("disk.img")
            && detail.ends_with(
                "; RAM and state kept by luod: fix and `systemctl restart luo-qemu@db`, or `luoctl vm abandon db`"
            ),
        "{detail}"
    );
    let out = luod.luoctl(&["finish"]);
    assert!(
        stderr_of(&out).contains(&format!("were not restored: db ({detail})")),
        "{}",
        stderr_of(&out)
    );

    // The operator puts the image back and retries.
    std::fs::rename(&moved, &disk).expect("restore the disk");
    let mut retry = Launcher::start(&luod, &vm);
    retry.wait_line("restored");
    let v = vm_json(&luod, "db", "the report of the restore", |v| {
        !v["blackout_ms"].is_null()
    });
    assert!(
        v["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("QEMU 10.0.2, running; restored")),
        "{v}"
    );
    let next = vm.wait_ticks(last.n + 2);
    assert_eq!(next.boot, first.boot, "the same guest, not a fresh boot");
    assert_eq!(next.tmpfs, first.tmpfs);
    assert!(luod.luoctl(&["finish"]).status.success());
    assert_eq!(retry.stop(), 0);
}

#[test]
fn a_running_migration_vetoes_prepare_with_qemus_status_and_prepare_works_once_it_is_cancelled() {
    use liveupdate::subsystems::qmp::Qmp;
    let _g = lock();
    let f = fixtures();
    let luod = Luod::started("300M");
    let ops = luod.dir().join("ops.qmp");
    let chardev = format!("socket,id=ops,path={},server=on,wait=off", ops.display());
    let vm = VmFiles::new(
        luod.dir(),
        "mig",
        &f.qemu10,
        &["-chardev", &chardev, "-mon", "chardev=ops,mode=control"],
    );
    let mut l = Launcher::start(&luod, &vm);
    l.wait_line(" registered with luod (QEMU");
    vm.wait_ticks(3);
    // The operator starts a (slow) migration on QEMU's second monitor.
    let mut q = Qmp::connect(&ops, Duration::from_secs(30)).expect("operator's QMP");
    q.execute(
        "migrate-set-parameters",
        Some(serde_json::json!({ "max-bandwidth": 4096 })),
    )
    .expect("max-bandwidth");
    q.execute("migrate", Some(serde_json::json!({ "uri": "exec:cat > /dev/null" })))
        .expect("migrate");
    let before = luod.status();
    let out = luod.luoctl(&["prepare"]);
    assert_eq!(out.status.code(), Some(13), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert!(
        err.contains(
            "vetoed: VM mig: a migration is running (QEMU's migration status: active); let it finish or cancel it \
             (QMP migrate_cancel), then prepare again"
        ),
        "{err}"
    );
    assert_eq!(luod.status().sessions, before.sessions);
    assert_eq!(luod.status().state, State::Normal);
    q.execute("migrate_cancel", None).expect("migrate_cancel");
    wait_for("the migration to end", Duration::from_secs(60), || {
        let s = q.execute("query-migrate", None).expect("query-migrate");
        (s["status"] == "cancelled").then_some(())
    });
    let out = luod.luoctl(&["prepare"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(luod.luoctl(&["cancel"]).status.success());
    let t = vm.ticks().pop().expect("tick").n;
    vm.wait_ticks(t + 3);
    drop(q);
    assert_eq!(l.stop(), 0);
}

/// The phase luod's `vm list --json` gives VM `name`.
fn phase(luod: &Luod, name: &str) -> String {
    let (rc, v) = luod.luoctl_json(&["vm", "list"]);
    assert_eq!(rc, 0, "{v}");
    v["vms"]
        .as_array()
        .and_then(|vms| vms.iter().find(|vm| vm["name"] == name))
        .and_then(|vm| vm["phase"].as_str())
        .unwrap_or("none")
        .to_string()
}

#[test]
fn a_restored_vm_registers_in_updated_and_a_rollback_carries_it_back_to_the_previous_kernel() {
    let _g = lock();
    let f = fixtures();
    // The kernel to go back to (the file backend simulates the kexec): a
    // bzImage header luod's image check takes, a file of root's.
    let images = tempfile::tempdir().expect("tempdir");
    let previous = images.path().join("vmlinuz-previous");
    let mut bz = vec![0u8; 0x400];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    std::fs::write(&previous, &bz).expect("image");
    std::fs::set_permissions(
        &previous,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o644),
    )
    .expect("chmod");
    let mut luod = Luod::new("300M")
        .arg("--rollback-kernel")
        .arg(&previous)
        .arg("--rollback-cmdline")
        .arg("console=ttyS0")
        .launched();
    let vm = VmFiles::new(luod.dir(), "web", &f.qemu10, &[]);
    let mut old = Launcher::start(&luod, &vm);
    old.wait_line(" registered with luod (QEMU");
    let first = vm.wait_ticks(15);
    let mut c = luod.client();
    c.prepare().expect("prepare");
    c.freeze().expect("freeze");
    old.wait_line("checkpointed");
    c.reboot().expect("reboot");
    drop(c);
    luod.expect_kexec_exit();
    luod.start();
    assert_eq!(old.wait_exit(), 0, "{}", old.output());

    // The new launcher restores the VM and registers it again at once,
    // while luod is still `updated`.
    let mut new = Launcher::start(&luod, &vm);
    new.wait_line("restored");
    new.wait_line("VM web registered with luod");
    assert_eq!(luod.status().state, State::Updated);
    assert_eq!(phase(&luod, "web"), "registered");
    let running = vm.wait_ticks(first.n + 5);

    // A failed validation, say: back to the previous kernel. luoctl rollback
    // prepares, freezes (the launcher checkpoints the VM) and kexecs.
    let out = luod.luoctl(&["rollback"]);
    assert!(out.status.success(), "luoctl rollback: {}", stderr_of(&out));
    let cp = new.wait_line("checkpointed");
    assert!(cp.contains("was_running=true"), "{cp}");
    luod.expect_kexec_exit();
    let last = vm.ticks().pop().expect("ticks before the rollback");
    assert!(
        last.n >= running.n,
        "the guest ran after its restore: {running:?} then {last:?}"
    );
    luod.start();
    assert_eq!(new.wait_exit(), 0, "{}", new.output());
    assert_eq!(phase(&luod, "web"), "awaiting-claim");

    let mut third = Launcher::start(&luod, &vm);
    third.wait_line("restored");
    third.wait_line("VM web registered with luod");
    let after = vm.wait_ticks(last.n + 5);
    let next = vm
        .ticks()
        .into_iter()
        .find(|t| t.n == last.n + 1)
        .expect("the tick after the last one");
    assert_eq!(
        (next.boot.as_str(), after.boot.as_str()),
        (first.boot.as_str(), first.boot.as_str())
    );
    assert_eq!(next.tmpfs, first.tmpfs, "the tmpfs file is intact");
    assert!(
        !vm.ticks().iter().any(|t| t.boot != first.boot),
        "no tick from another boot"
    );

    let out = luod.luoctl(&["finish"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(phase(&luod, "web"), "registered", "finish keeps the registration");
    let (_, history) = luod.luoctl_json(&["history"]);
    let cycles: Vec<(u64, String, Option<u64>)> = history["cycles"]
        .as_array()
        .expect("cycles")
        .iter()
        .map(|c| {
            (
                c["id"].as_u64().unwrap_or(0),
                c["outcome"].as_str().unwrap_or("").to_string(),
                c["rollback_of"].as_u64(),
            )
        })
        .collect();
    assert_eq!(
        cycles,
        [
            (1, "rolled-back".to_string(), None),
            (2, "finished".to_string(), Some(1))
        ]
    );
    assert_eq!(third.stop(), 0);
}

#[test]
fn luod_killed_while_the_vm_is_frozen_comes_back_and_cancel_resumes_the_same_qemu() {
    let _g = lock();
    let f = fixtures();
    let mut luod = Luod::started("300M");
    let vm = VmFiles::new(luod.dir(), "keep", &f.qemu10, &[]);
    let mut l = Launcher::start(&luod, &vm);
    let pid = l.qemu_pid();
    l.wait_line(" registered with luod (QEMU");
    // A second launcher for the same VM is refused and changes nothing.
    let mut twin = Launcher::start(&luod, &vm);
    assert_eq!(twin.wait_exit(), 1, "{}", twin.output());
    assert!(
        twin.output().contains(
            "VM keep: luod shows it registered by a running VMM: another luo-qemu runs this VM; stop that one first"
        ),
        "{}",
        twin.output()
    );
    let first = vm.wait_ticks(3);
    let mut c = luod.client();
    c.prepare().expect("prepare");
    c.freeze().expect("freeze");
    drop(c);
    l.wait_line("checkpointed");
    let last = vm.ticks().pop().expect("tick");
    luod.kill();
    l.wait_line("luod closed the connection with the VM checkpointed");
    luod.start();
    assert_eq!(luod.status().state, State::Frozen);
    // The launcher attaches again (same tokens, no fds) and cancel resumes it.
    wait_for("the launcher to attach again", Duration::from_secs(30), || {
        (l.output().matches("VM keep registered with luod").count() == 2).then_some(())
    });
    let out = luod.luoctl(&["cancel"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let next = vm.wait_ticks(last.n + 2);
    assert_eq!(next.boot, first.boot);
    assert!(l.output().contains("VM keep resumed after unfreeze"), "{}", l.output());
    assert!(
        l.output().contains(&format!("pid {pid}")) && !l.output().contains("restored"),
        "the same QEMU"
    );
    assert_eq!(luod.status().state, State::Normal);
    assert_eq!(l.stop(), 0);
}
