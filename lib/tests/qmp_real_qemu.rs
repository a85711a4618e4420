//! The QMP driver and the `QemuVm` subsystem against a real
//! `qemu-system-x86_64` process.
//!
//! Each test starts its own QEMU with an empty machine (`-machine none`, TCG,
//! no devices, no display), paused at start (`-S`), its QMP socket in a fresh
//! temporary directory, and kills it when the test ends (the [`Qemu`] drop
//! guard), whether the test passed or not. QEMU must be installed: the tests
//! fail, not skip, when it is missing (`apt-get install -y qemu-system-x86`).

use liveupdate::subsystem::{PrepareContext, Subsystem, SubsystemError};
use liveupdate::subsystems::qmp::{FrozenVm, QemuVm, Qmp, QmpError, Resume, VmStatus};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const QEMU: &str = "qemu-system-x86_64";
/// Generous: QEMU under TCG on a shared 2-core machine.
const T: Duration = Duration::from_secs(10);
/// For tests that expect a timeout.
const SHORT: Duration = Duration::from_millis(500);

/// A running QEMU, killed on drop.
struct Qemu {
    child: Child,
    dir: tempfile::TempDir,
    qmp: PathBuf,
}

fn qemu_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(QEMU))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{QEMU} is not installed, and these tests need a real QEMU: \
             install it with `sudo apt-get install -y qemu-system-x86`"
            )
        })
}

impl Qemu {
    /// Starts QEMU paused (`-S`) with QMP at `<tmp>/qmp.sock`, and waits
    /// until the socket accepts connections.
    fn start() -> Qemu {
        Qemu::start_with(|_| Vec::new())
    }

    /// [`Qemu::start`] with more arguments, made from the temporary directory.
    fn start_with(extra: impl FnOnce(&Path) -> Vec<String>) -> Qemu {
        let dir = tempfile::tempdir().unwrap();
        let extra = extra(dir.path());
        let qmp = dir.path().join("qmp.sock");
        let log = std::fs::File::create(dir.path().join("qemu.log")).unwrap();
        let mut cmd = Command::new(qemu_binary());
        cmd.args([
            "-accel",
            "tcg",
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args(&extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {QEMU}: {e}"));
        let mut q = Qemu { child, dir, qmp };
        q.wait_for_socket(&q.qmp.clone());
        q
    }

    fn wait_for_socket(&mut self, path: &Path) {
        let deadline = Instant::now() + T;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{QEMU} exited with {status} before opening {}: {}",
                    path.display(),
                    self.log()
                );
            }
            // A plain connect that is dropped at once: QEMU takes the next
            // client after it sees this one go.
            if UnixStream::connect(path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{QEMU} did not open {} within {T:?}: {}", path.display(), self.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("qemu.log")).unwrap_or_default()
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Stops the process (SIGSTOP) and waits until every thread is stopped,
    /// so that nothing it does afterwards can race with the test.
    fn freeze_process(&self) {
        kill(self.pid(), Signal::SIGSTOP).unwrap();
        let tasks = format!("/proc/{}/task", self.child.id());
        let deadline = Instant::now() + T;
        loop {
            let all_stopped = std::fs::read_dir(&tasks).unwrap().all(|t| {
                let stat = std::fs::read_to_string(t.unwrap().path().join("stat")).unwrap_or_default();
                // The state follows the command name, which is in parentheses.
                stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T'))
            });
            if all_stopped {
                return;
            }
            assert!(Instant::now() < deadline, "{QEMU} did not stop within {T:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Undoes [`Qemu::freeze_process`].
    fn thaw_process(&self) {
        kill(self.pid(), Signal::SIGCONT).unwrap();
    }

    fn connect(&self) -> Qmp {
        Qmp::connect(&self.qmp, T).unwrap_or_else(|e| panic!("{e}; QEMU log: {}", self.log()))
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status(running: bool, status: &str) -> VmStatus {
    VmStatus {
        running,
        status: status.to_string(),
    }
}

#[test]
fn query_status_cont_and_stop_drive_a_real_qemu() {
    let qemu = Qemu::start();
    let mut qmp = qemu.connect();
    assert!(qmp.version().major >= 7);
    // -S: not started yet.
    assert_eq!(qmp.query_status().unwrap(), status(false, "prelaunch"));
    qmp.cont().unwrap();
    assert_eq!(qmp.query_status().unwrap(), status(true, "running"));
    qmp.stop().unwrap();
    assert_eq!(qmp.query_status().unwrap(), status(false, "paused"));
    qmp.cont().unwrap();
    assert_eq!(qmp.query_status().unwrap(), status(true, "running"));
    // QEMU sends RESUME and STOP before the replies to cont and stop: they
    // were collected on the way, in order, and did not disturb the replies.
    let events: Vec<String> = qmp.take_events().into_iter().map(|e| e.event).collect();
    assert_eq!(events, ["RESUME", "STOP", "RESUME"]);
}

#[test]
fn an_unknown_command_gives_the_qmp_error_class() {
    let qemu = Qemu::start();
    let mut qmp = qemu.connect();
    let err = qmp.execute("no-such-command", None).unwrap_err();
    assert_eq!(
        err,
        QmpError::Command {
            command: "no-such-command".into(),
            class: "CommandNotFound".into(),
            desc: "The command no-such-command has not been found".into(),
        }
    );
    assert_eq!(
        err.to_string(),
        "QEMU refused no-such-command: The command no-such-command has not been found (QMP error class CommandNotFound)"
    );
    // The connection is still usable after an error reply.
    assert_eq!(qmp.query_status().unwrap(), status(false, "prelaunch"));
}

#[test]
fn bad_arguments_give_generic_error_with_qemus_reason() {
    let qemu = Qemu::start();
    let mut qmp = qemu.connect();
    let err = qmp
        .execute("query-status", Some(serde_json::json!({"bogus": 1})))
        .unwrap_err();
    let QmpError::Command { class, desc, .. } = err else {
        panic!("not a command error: {err}")
    };
    assert_eq!(class, "GenericError");
    assert!(desc.contains("bogus"), "{desc}");
}

#[test]
fn the_human_monitor_socket_is_not_qmp() {
    let mut qemu = Qemu::start_with(|dir| {
        vec![
            "-monitor".into(),
            format!("unix:{},server=on,wait=off", dir.join("hmp.sock").display()),
        ]
    });
    let hmp = qemu.dir.path().join("hmp.sock");
    qemu.wait_for_socket(&hmp);
    let err = Qmp::connect(&hmp, T).unwrap_err();
    let QmpError::NotQmp { path, got } = &err else {
        panic!("not NotQmp: {err}")
    };
    assert_eq!(path, &hmp);
    assert!(got.starts_with("QEMU "), "{got}");
    assert!(got.contains("monitor - type 'help' for more information"), "{got}");
    assert!(
        err.to_string().contains("is not a QMP monitor: it sent \"QEMU "),
        "{err}"
    );
    assert!(err.to_string().ends_with("give luod the socket of QEMU's -qmp option (not -monitor, which speaks the human monitor protocol, nor a serial console)"), "{err}");
}

#[test]
fn a_stopped_qemu_times_out_at_the_greeting() {
    let qemu = Qemu::start();
    qemu.freeze_process();
    let started = Instant::now();
    let err = Qmp::connect(&qemu.qmp, SHORT).unwrap_err();
    let waited = started.elapsed();
    qemu.thaw_process();
    assert_eq!(
        err,
        QmpError::Timeout {
            path: qemu.qmp.clone(),
            waiting_for: "the QMP greeting".into(),
            timeout: SHORT
        }
    );
    assert!(waited >= SHORT && waited < SHORT * 4, "waited {waited:?}");
}

#[test]
fn a_qemu_stopped_mid_session_times_out_at_the_next_command() {
    let qemu = Qemu::start();
    let mut qmp = Qmp::connect(&qemu.qmp, SHORT).unwrap();
    qmp.cont().unwrap();
    qemu.freeze_process();
    let err = qmp.stop().unwrap_err();
    qemu.thaw_process();
    assert_eq!(
        err,
        QmpError::Timeout {
            path: qemu.qmp.clone(),
            waiting_for: "the reply to stop".into(),
            timeout: SHORT
        }
    );
    assert!(
        err.to_string().contains("did not send the reply to stop within 500ms"),
        "{err}"
    );
    // Once QEMU runs again, the late reply to stop is skipped, not taken for
    // the reply to the next command.
    assert_eq!(qmp.query_status().unwrap(), status(false, "paused"));
}

#[test]
fn a_second_client_times_out_while_the_first_holds_the_monitor() {
    let qemu = Qemu::start();
    let _first = qemu.connect();
    let err = Qmp::connect(&qemu.qmp, SHORT).unwrap_err();
    assert!(matches!(err, QmpError::Timeout { .. }), "{err}");
    assert!(
        err.to_string()
            .ends_with("or another client holds the monitor (QEMU serves one QMP client at a time)")
    );
}

#[test]
fn a_qemu_that_quits_gives_closed() {
    let qemu = Qemu::start();
    let mut qmp = qemu.connect();
    qmp.execute("quit", None).unwrap();
    let err = qmp.query_status().unwrap_err();
    assert_eq!(
        err,
        QmpError::Closed {
            path: qemu.qmp.clone(),
            waiting_for: "the reply to query-status".into()
        }
    );
}

#[test]
fn a_missing_socket_says_how_qemu_must_be_started() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.sock");
    let err = Qmp::connect(&path, T).unwrap_err();
    assert_eq!(
        err,
        QmpError::Connect {
            path: path.clone(),
            errno: nix::errno::Errno::ENOENT
        }
    );
    assert!(err.to_string().contains(&format!(
        "is QEMU running with -qmp unix:{},server=on,wait=off?",
        path.display()
    )));
}

fn frozen(blob: &liveupdate::subsystem::Blob) -> FrozenVm {
    assert_eq!(blob.version, 1);
    postcard::from_bytes(&blob.data).unwrap()
}

#[test]
fn qemu_vm_pauses_at_freeze_and_resumes_at_unfreeze() {
    let qemu = Qemu::start();
    qemu.connect().cont().unwrap();
    let mut vm = QemuVm::new("web", &qemu.qmp, T);
    assert_eq!(vm.name(), "qemu:web");
    assert_eq!(vm.prepare(&PrepareContext::default()).unwrap(), None);
    let blob = vm.freeze().unwrap().unwrap();
    assert_eq!(
        frozen(&blob),
        FrozenVm {
            vm: "web".into(),
            status: status(true, "running")
        }
    );
    assert_eq!(qemu.connect().query_status().unwrap(), status(false, "paused"));
    vm.unfreeze().unwrap();
    assert_eq!(qemu.connect().query_status().unwrap(), status(true, "running"));
    // cancel after unfreeze: nothing left to undo.
    vm.cancel().unwrap();
    assert_eq!(qemu.connect().query_status().unwrap(), status(true, "running"));
}

#[test]
fn qemu_vm_never_resumes_a_vm_the_operator_had_paused() {
    let qemu = Qemu::start();
    let mut vm = QemuVm::new("batch", &qemu.qmp, T);
    vm.prepare(&PrepareContext::default()).unwrap();
    let blob = vm.freeze().unwrap().unwrap();
    assert_eq!(frozen(&blob).status, status(false, "prelaunch"));
    vm.unfreeze().unwrap();
    vm.cancel().unwrap();
    assert_eq!(qemu.connect().query_status().unwrap(), status(false, "prelaunch"));
    // Nor after the update.
    vm.restore(Some(&blob)).unwrap();
    assert!(!vm.resume_pending());
    vm.finish().unwrap();
    assert_eq!(qemu.connect().query_status().unwrap(), status(false, "prelaunch"));
}

#[test]
fn qemu_vm_that_ran_is_resumed_at_restore_when_qemu_answers() {
    // A simulated kexec: the same QEMU is still there, paused by freeze.
    let qemu = Qemu::start();
    qemu.connect().cont().unwrap();
    let mut old = QemuVm::new("web", &qemu.qmp, T);
    old.prepare(&PrepareContext::default()).unwrap();
    let blob = old.freeze().unwrap().unwrap();
    drop(old);
    let mut new = QemuVm::new("web", &qemu.qmp, T);
    new.restore(Some(&blob)).unwrap();
    assert!(!new.resume_pending());
    assert_eq!(qemu.connect().query_status().unwrap(), status(true, "running"));
    new.finish().unwrap();
}

#[test]
fn qemu_vm_with_resume_at_finish_waits_for_finish() {
    let qemu = Qemu::start();
    qemu.connect().cont().unwrap();
    let mut old = QemuVm::new("web", &qemu.qmp, T);
    let blob = old.freeze().unwrap().unwrap();
    let mut new = QemuVm::new("web", &qemu.qmp, T).resume(Resume::AtFinish);
    new.restore(Some(&blob)).unwrap();
    assert!(new.resume_pending());
    assert_eq!(qemu.connect().query_status().unwrap(), status(false, "paused"));
    new.finish().unwrap();
    assert!(!new.resume_pending());
    assert_eq!(qemu.connect().query_status().unwrap(), status(true, "running"));
}

#[test]
fn qemu_vm_restore_defers_to_finish_while_the_new_qemu_is_not_up() {
    let qemu = Qemu::start();
    qemu.connect().cont().unwrap();
    let socket = qemu.qmp.clone();
    let blob = QemuVm::new("web", &socket, T).freeze().unwrap().unwrap();
    drop(qemu); // the kexec: the QEMU process is gone
    let mut new = QemuVm::new("web", &socket, SHORT);
    new.restore(Some(&blob)).unwrap();
    assert!(new.resume_pending());
    let err = new.finish().unwrap_err();
    let SubsystemError::Failed(msg) = err else {
        panic!("not Failed: {err}")
    };
    assert!(
        msg.starts_with("QEMU VM web ran before the update and must be resumed, but: cannot connect"),
        "{msg}"
    );
    assert!(new.resume_pending());
}

#[test]
fn qemu_vm_prepare_vetoes_a_vm_that_does_not_answer() {
    let qemu = Qemu::start();
    qemu.freeze_process();
    let mut vm = QemuVm::new("web", &qemu.qmp, SHORT);
    let err = vm.prepare(&PrepareContext::default()).unwrap_err();
    qemu.thaw_process();
    let SubsystemError::Veto(msg) = err else {
        panic!("not a veto: {err}")
    };
    assert!(
        msg.starts_with(&format!(
            "QEMU VM web cannot be paused for the update: QEMU at {} did not send the QMP greeting within 500ms",
            qemu.qmp.display()
        )),
        "{msg}"
    );
}

#[test]
fn qemu_vm_freeze_fails_with_the_vm_named_when_qemu_is_gone() {
    let qemu = Qemu::start();
    let socket = qemu.qmp.clone();
    let mut vm = QemuVm::new("db", &socket, T);
    vm.prepare(&PrepareContext::default()).unwrap();
    drop(qemu);
    let err = vm.freeze().unwrap_err();
    let SubsystemError::Failed(msg) = err else {
        panic!("not Failed: {err}")
    };
    assert!(
        msg.starts_with("could not pause QEMU VM db: cannot connect to the QMP socket"),
        "{msg}"
    );
    // Nothing was paused, so the undo has nothing to do.
    vm.unfreeze().unwrap();
}
