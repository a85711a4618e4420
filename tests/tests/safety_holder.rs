//! The fd holder (the process that keeps a duplicate of every preserved file
//! so that a crash of luod loses nothing) is guarded and never loses files
//! silently:
//!
//! - its socket is 0600, and a connection from another uid is closed
//!   unanswered even when the mode lets it in (`SO_PEERCRED`);
//! - `kill PID` (SIGTERM; the pid is in `STATE_DIR/holder.pid`) ends it;
//! - killed while luod runs, it is replaced at once, with every file parked
//!   again and a note in `status`; preserving, a restart of luod and a full
//!   cycle work as before;
//! - fast restarts of luod never fail to start (an empty holder exiting as
//!   the next luod connects).
//!
//! Runs as root, as CI does; the other user is uid/gid 65534, through the
//! `luo-holder-probe` binary.

use liveupdate::state::State;
use liveupdate_tests::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const NOBODY: u32 = 65534;

fn holder_socket(luod: &Luod) -> PathBuf {
    luod.state_dir().join("holder.sock")
}

/// The pid in `STATE_DIR/holder.pid` (how the README says to find it).
fn holder_pid(luod: &Luod) -> i32 {
    let path = luod.state_dir().join("holder.pid");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{}: {text:?}: {e}", path.display()))
}

/// A new holder's pid, once luod has written it and the holder runs.
fn new_holder_pid(luod: &Luod, old: i32) -> Option<i32> {
    let text = std::fs::read_to_string(luod.state_dir().join("holder.pid")).ok()?;
    let new = text.trim().parse().ok()?;
    (new != old && running(new)).then_some(new)
}

/// True while `pid` runs (a zombie waiting for its parent has ended).
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(status) => !status.lines().any(|l| l.starts_with("State:") && l.contains('Z')),
        Err(_) => false,
    }
}

/// Waits until `pid` has ended; panics after `limit`.
#[track_caller]
fn wait_ended(pid: i32, limit: Duration) {
    assert!(
        poll(limit, || (!running(pid)).then_some(())).is_some(),
        "pid {pid} still runs after {limit:?}"
    );
}

/// Runs `luo-holder-probe SOCKET MODE` (as `uid` when given); its output
/// lines and whether it exited 0.
fn probe(luod: &Luod, mode: &str, uid: Option<u32>) -> (bool, Vec<String>) {
    let mut cmd = match uid {
        Some(uid) => {
            let mut c = Command::new(luod.dir().join("luo-holder-probe"));
            c.uid(uid).gid(uid);
            c
        }
        None => Command::new(binary("luo-holder-probe")),
    };
    let out = cmd
        .arg(holder_socket(luod))
        .arg(mode)
        .output()
        .expect("run luo-holder-probe");
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "luo-holder-probe {mode}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    (out.status.success(), lines)
}

/// Lets uid 65534 run the probe and reach the holder's socket through the
/// directories (the test's directory is private, and the state directory
/// may be): only the socket's own mode and the holder stand in its way.
fn open_the_way_for_nobody(luod: &Luod) {
    for dir in [luod.dir(), luod.state_dir().as_path()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod 0755");
    }
    let probe = luod.dir().join("luo-holder-probe");
    liveupdate_tests::copy_binary("luo-holder-probe", &probe);
}

/// How many times luod's log (which the holder writes to) has `needle`.
fn count_in_log(luod: &Luod, needle: &str) -> usize {
    luod.log().matches(needle).count()
}

/// `status` as root, answered within a second.
#[track_caller]
fn prompt_status(luod: &Luod) -> liveupdate::protocol::StatusReport {
    let t = Instant::now();
    let status = luod.status();
    assert!(t.elapsed() < Duration::from_secs(1), "status took {:?}", t.elapsed());
    status
}

/// From `normal`: prepare, freeze, reboot (simulated), start the new
/// kernel's luod, take every file back with the same bytes, finish.
#[track_caller]
fn full_cycle(luod: &mut Luod, set: &[Preserved]) {
    let mut c = luod.client();
    c.prepare().expect("prepare");
    c.freeze().expect("freeze");
    c.reboot().expect("reboot");
    drop(c);
    luod.expect_kexec_exit();
    luod.start();
    let mut c = luod.client();
    assert_eq!(c.status().state, State::Updated);
    retrieve_and_compare(&mut c, set);
    c.finish().expect("finish");
    let status = c.status();
    assert_eq!((status.state, status.live_updates), (State::Normal, 1));
}

#[test]
fn holder_socket_is_0600_and_other_uids_are_refused() {
    let mut luod = Luod::started("16M");
    let set = preserve_set(&mut luod.client(), &["vm0"], &[4096, 777]);
    let socket = holder_socket(&luod);
    let meta = std::fs::symlink_metadata(&socket).expect("the holder's socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid()),
        (0o600, 0),
        "mode and owner of {}",
        socket.display()
    );
    open_the_way_for_nobody(&luod);
    let pid = holder_pid(&luod);
    let before = prompt_status(&luod);

    // Mode 0600 keeps uid 65534 out.
    assert_eq!(
        probe(&luod, "put", Some(NOBODY)),
        (false, vec!["connect: Permission denied (os error 13)".to_string()])
    );
    assert_eq!(
        probe(&luod, "fetch", Some(NOBODY)),
        (
            false,
            vec![format!(
                "error: cannot connect to the fd holder at {}: Permission denied (os error 13)",
                socket.display()
            )]
        )
    );

    // With the mode widened by mistake, SO_PEERCRED still does: every
    // connection is closed unanswered, with a log line.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod 0666");
    let refused = format!("luod fd holder (pid {pid}): refused a connection from uid {NOBODY} (pid ");
    let because = "): only uid 0 (luod's) may use the fd holder\n";
    assert_eq!(count_in_log(&luod, &refused), 0);
    assert_eq!(
        probe(&luod, "put", Some(NOBODY)),
        (false, vec!["closed unanswered".to_string()])
    );
    assert_eq!(
        probe(&luod, "fetch", Some(NOBODY)),
        (
            false,
            vec![format!(
                "error: the fd holder at {} closed the connection 5 times before answering: it serves only its own \
                 uid (this is uid {NOBODY}); its log line says why",
                socket.display()
            )]
        )
    );
    let log = luod.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.starts_with(&refused)).collect();
    assert_eq!(
        lines.len(),
        6,
        "one log line per refused connection (1 put, 5 fetch attempts):\n{log}"
    );
    assert!(log.matches(because).count() >= 6, "{log}");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).expect("chmod 0600");

    // luod and its holder are unaffected.
    assert_unchanged(&before, &prompt_status(&luod));
    assert!(running(pid) && holder_pid(&luod) == pid, "the same holder serves luod");

    // The holder holds luod's two files and nothing of the probe's: seen as
    // root, with luod gone (a holder serves one luod at a time).
    luod.kill();
    assert_eq!(
        probe(&luod, "fetch", None),
        (true, vec![r#""1\0vm0""#.to_string(), r#""2\0vm0""#.to_string()])
    );
    luod.start();
    assert_eq!(sessions_seen(&luod.status().sessions), sessions_of(&set));
    full_cycle(&mut luod, &set);
}

#[test]
fn kill_ends_the_holder() {
    // luod stopped: the holder keeps the files until an operator stops it
    // (before a plain kexec, say) with `kill $(cat STATE_DIR/holder.pid)`.
    let mut luod = Luod::started("8M");
    preserve_set(&mut luod.client(), &["vm0"], &[4096]);
    assert!(luod.stop().success());
    let pid = holder_pid(&luod);
    assert!(running(pid), "the holder outlives luod");
    kill(Pid::from_raw(pid), Signal::SIGTERM).expect("kill the holder");
    wait_ended(pid, Duration::from_secs(5));
    assert!(!holder_socket(&luod).exists(), "the holder removed its socket");
    assert_eq!(
        count_in_log(
            &luod,
            &format!("luod fd holder (pid {pid}): SIGTERM received; exiting, 1 parked file descriptor(s) are closed\n")
        ),
        1,
        "{}",
        luod.log()
    );
    // The next luod says what was lost: nothing silently.
    luod.start();
    let status = luod.status();
    assert!(
        status.sessions.iter().all(|s| s.files.is_empty()),
        "{:?}",
        status.sessions
    );
    assert!(
        status
            .notes
            .contains(&"session vm0 token 1: the preserved file did not survive luod's restart".to_string()),
        "{:?}",
        status.notes
    );
    assert_ne!(holder_pid(&luod), pid, "a new holder");

    // luod running: SIGTERM ends the holder too, and luod replaces it.
    let pid = holder_pid(&luod);
    kill(Pid::from_raw(pid), Signal::SIGTERM).expect("kill the holder");
    wait_ended(pid, Duration::from_secs(5));
    let new = poll(Duration::from_secs(5), || new_holder_pid(&luod, pid)).expect("luod started a new holder");
    // holder.pid is written before luod adds its note: wait for the note.
    let expected = format!(
        "the fd holder (pid {pid}) ended while luod ran; luod parked its 0 file descriptor(s) again in a new holder \
         (pid {new})"
    );
    let note = poll(Duration::from_secs(5), || {
        prompt_status(&luod).notes.last().filter(|n| **n == expected).cloned()
    });
    assert_eq!(note.as_ref(), Some(&expected), "{:?}", prompt_status(&luod).notes);
}

#[test]
fn holder_killed_while_luod_runs_is_replaced_and_nothing_is_lost() {
    let mut luod = Luod::started("16M");
    let mut set = preserve_set(&mut luod.client(), &["vm0", "vm1"], &[4096, (1 << 20) + 3]);
    let old = holder_pid(&luod);
    let killed = Instant::now();
    kill(Pid::from_raw(old), Signal::SIGKILL).expect("kill -9 the holder");

    // luod notices by itself (no request is made) and re-parks everything.
    let note = poll(Duration::from_secs(5), || {
        new_holder_pid(&luod, old)?;
        luod.status().notes.into_iter().last()
    })
    .expect("a note in status after the holder was killed");
    eprintln!("luod replaced its killed fd holder within {:?}", killed.elapsed());
    let new = holder_pid(&luod);
    assert_eq!(
        note,
        format!(
            "the fd holder (pid {old}) ended while luod ran; luod parked its 4 file descriptor(s) again in a new \
             holder (pid {new})"
        )
    );
    let out = luod.luoctl(&["status"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&note),
        "luoctl status shows the note:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(prompt_status(&luod).notes, [note], "the only note");
    let socket = std::fs::symlink_metadata(holder_socket(&luod)).expect("the new holder's socket");
    assert_eq!(socket.mode() & 0o7777, 0o600);

    // Preserving still works (it failed with "reboot failed" before).
    let mut c = luod.client();
    c.create("vm2").expect("create vm2");
    let bytes = pattern(99, 5000);
    c.preserve("vm2", 7, memfd_with("vm2", &bytes).as_fd())
        .expect("preserve after the holder was replaced");
    set.push(Preserved {
        session: "vm2".into(),
        token: 7,
        bytes,
    });
    drop(c);

    // luod killed and started again: every file comes back from the new holder.
    luod.restart();
    let status = prompt_status(&luod);
    assert_eq!(sessions_seen(&status.sessions), sessions_of(&set));
    assert!(status.notes.is_empty(), "{:?}", status.notes);
    assert_eq!(holder_pid(&luod), new, "the new holder survived luod");

    // And a full cycle carries them, byte for byte.
    full_cycle(&mut luod, &set);
}

#[test]
fn a_luod_that_connects_as_the_empty_holder_exits_is_served() {
    // The race of fast restarts, made certain: the holder (nothing parked)
    // is stopped while its luod dies and the next luod connects, then
    // continues and finds both the hang-up of the old luod and the new
    // connection. It must serve the new luod (or that luod must start a new
    // holder), never leave it with a broken connection.
    let mut luod = Luod::started("8M");
    for i in 0..10 {
        let holder = Pid::from_raw(holder_pid(&luod));
        kill(holder, Signal::SIGSTOP).expect("SIGSTOP the holder");
        if i % 2 == 0 {
            assert!(luod.stop().success());
        } else {
            luod.kill();
        }
        std::thread::scope(|s| {
            let starting = s.spawn(|| luod.start());
            // luod reaches the holder's socket within a few milliseconds.
            std::thread::sleep(Duration::from_millis(300));
            kill(holder, Signal::SIGCONT).expect("SIGCONT the holder");
            starting.join().expect("luod started while the holder exited");
        });
        prompt_status(&luod);
    }
}

#[test]
fn two_hundred_fast_restarts_all_start() {
    const RESTARTS: usize = 200;
    let mut luod = Luod::new("8M");
    let t = Instant::now();
    for i in 0..RESTARTS {
        // Luod::start panics, with luod's log, when luod does not serve.
        luod.start();
        if i % 2 == 0 {
            let status = luod.stop();
            assert!(status.success(), "restart {i}: luod exited with {status} after SIGTERM");
        } else {
            luod.kill();
        }
    }
    eprintln!(
        "{RESTARTS} starts of luod (each stopped by SIGTERM or SIGKILL) in {:.1} s, none failed",
        t.elapsed().as_secs_f64()
    );
    // The last holder had nothing parked: it ends once its luod is gone.
    let pid = holder_pid(&luod);
    wait_ended(pid, Duration::from_secs(5));
    assert!(!Path::new(&holder_socket(&luod)).exists());
}
