//! Operator hooks end to end (file backend, real luod and luoctl): every
//! phase, their order, what they are told (environment and stdin), vetoes
//! reaching luoctl, timeouts, files refused as unsafe, reads that stay
//! prompt while a hook runs, and the finish a failed validation holds back.

use liveupdate::state::State;
use liveupdate_tests::*;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const EXIT_WRONG_STATE: i32 = 11;
const EXIT_VETOED: i32 = 13;

/// The hooks root in luod's directory (created 0755, root's).
fn hooks_root(luod_dir: &Path) -> PathBuf {
    let root = luod_dir.join("hooks");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    root
}

/// Writes an executable shell hook `PHASE.d/NAME`.
fn hook(root: &Path, phase: &str, name: &str, body: &str) -> PathBuf {
    let dir = root.join(format!("{phase}.d"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A hook body that appends its phase, name and cycle facts to `log` and
/// keeps its stdin in `DIR/stdin-PHASE-NAME.json`.
fn recorder(log: &Path) -> String {
    let dir = log.parent().unwrap().display();
    format!(
        "echo \"$LUOD_PHASE $LUOD_HOOK cycle=$LUOD_CYCLE state=$LUOD_STATE kernel=$LUOD_KERNEL backend=$LUOD_BACKEND\" >> {}\n\
         cat > {dir}/stdin-$LUOD_PHASE-$LUOD_HOOK.json\n\
         echo \"$LUOD_HOOK done\"",
        log.display()
    )
}

/// A file the kernel check takes for a bzImage.
fn bzimage(path: &Path, tag: u8) {
    let mut bz = vec![0u8; 0x400];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    bz[0x300] = tag;
    std::fs::write(path, &bz).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

fn luod_with_hooks(extra: &[&str]) -> (Luod, PathBuf) {
    let luod = Luod::new("8M");
    let root = hooks_root(luod.dir());
    let mut luod = luod.arg("--hooks-dir").arg(&root);
    for a in extra {
        luod = luod.arg(*a);
    }
    (luod, root)
}

fn preserve_file(luod: &Luod, session: &str, token: u64, bytes: &[u8]) -> PathBuf {
    let path = luod.dir().join(format!("{session}-{token}.in"));
    std::fs::write(&path, bytes).unwrap();
    luod.luoctl_ok(&["session", "create", session]);
    luod.luoctl_ok(&[
        "session",
        "preserve",
        session,
        "--token",
        &token.to_string(),
        "--file",
        path.to_str().unwrap(),
    ]);
    path
}

#[test]
fn every_phase_runs_in_lexical_order_with_the_cycle_in_its_environment_and_stdin() {
    let (luod, root) = luod_with_hooks(&[]);
    let log = luod.dir().join("hooks.log");
    for phase in ["pre-prepare", "pre-freeze", "post-update", "post-finish"] {
        // Written in reverse order: luod sorts them.
        hook(&root, phase, "20-second", &recorder(&log));
        hook(&root, phase, "10-first", &recorder(&log));
    }
    let mut luod = luod.launched();
    let kernel = luod.dir().join("vmlinuz-next");
    bzimage(&kernel, 1);
    let k = kernel.to_str().unwrap();
    preserve_file(&luod, "s", 1, b"carried bytes");
    luod.luoctl_ok(&["prepare", "--kernel", k, "--cmdline", "console=ttyS0"]);
    luod.luoctl_ok(&["freeze"]);
    luod.luoctl_ok(&["reboot"]);
    luod.expect_kexec_exit();
    luod.start();
    // post-update runs before any change is served: the retrieve waits behind it.
    let out = luod.dir().join("s-1.out");
    luod.luoctl_ok(&[
        "session",
        "retrieve",
        "s",
        "--token",
        "1",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&out).unwrap(), b"carried bytes");
    luod.luoctl_ok(&["finish"]);

    let lines = std::fs::read_to_string(&log).unwrap();
    let want: Vec<String> = [
        ("pre-prepare", "normal", k),
        ("pre-freeze", "prepared", k),
        ("post-update", "updated", k),
        ("post-finish", "normal", k),
    ]
    .iter()
    .flat_map(|(phase, state, kernel)| {
        ["10-first", "20-second"].map(|h| format!("{phase} {h} cycle=1 state={state} kernel={kernel} backend=file"))
    })
    .collect();
    assert_eq!(lines.lines().collect::<Vec<_>>(), want);

    let stdin: Value =
        serde_json::from_slice(&std::fs::read(luod.dir().join("stdin-pre-freeze-10-first.json")).unwrap()).unwrap();
    assert_eq!(
        (
            stdin["phase"].as_str(),
            stdin["cycle"].as_u64(),
            stdin["state"].as_str(),
            stdin["kernel"].as_str(),
            stdin["sessions"].as_u64(),
            stdin["files"].as_u64()
        ),
        (Some("pre-freeze"), Some(1), Some("prepared"), Some(k), Some(1), Some(1))
    );
    assert_eq!(stdin["kernel_sha256"].as_str().map(str::len), Some(64));
    assert!(
        stdin["cmdline"]
            .as_str()
            .unwrap()
            .starts_with("console=ttyS0 luod.handover=")
    );

    // The history keeps a summary of each, in order.
    let h = luod.luoctl_json(&["history"]).1;
    let hooks: Vec<(String, String, String, String)> = h["cycles"][0]["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["phase"].as_str().unwrap().to_string(),
                r["hook"].as_str().unwrap().to_string(),
                r["status"].as_str().unwrap().to_string(),
                r["last_line"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String, String, String)> = ["pre-prepare", "pre-freeze", "post-update", "post-finish"]
        .iter()
        .flat_map(|p| {
            ["10-first", "20-second"].map(|n| (p.to_string(), n.to_string(), "exit 0".into(), format!("{n} done")))
        })
        .collect();
    assert_eq!(hooks, want);
    // And their output is in luod's log.
    assert!(
        luod.log().contains("post-update hook 10-first: 10-first done"),
        "{}",
        luod.log()
    );
    let text = luod.luoctl_ok(&["history"]);
    assert!(text.contains("#1: hook post-finish/20-second exit 0 in"), "{text}");
}

#[test]
fn a_failing_pre_prepare_hook_vetoes_with_its_last_stderr_line_and_on_failure_hooks_run() {
    let (luod, root) = luod_with_hooks(&[]);
    hook(&root, "pre-prepare", "10-fine", "exit 0");
    hook(
        &root,
        "pre-prepare",
        "20-memory",
        "echo 'checking memory'; echo 'first complaint' >&2; echo 'only 3 GiB free, 8 GiB needed' >&2; exit 2",
    );
    let marker = luod.dir().join("30-ran");
    hook(&root, "pre-prepare", "30-never", &format!("touch {}", marker.display()));
    let failure_log = luod.dir().join("failure.log");
    hook(
        &root,
        "on-failure",
        "10-page",
        &format!("echo \"$LUOD_FAILED_STEP|$LUOD_FAILURE\" >> {}", failure_log.display()),
    );
    let luod = luod.launched();
    let before = luod.status();
    let (code, stdout, stderr) = luod.luoctl_parts(&["prepare"]);
    assert_eq!(code, EXIT_VETOED, "{stderr}");
    assert_eq!(stdout, "");
    assert!(
        stderr.starts_with("luoctl: prepare: pre-prepare hook 20-memory vetoed: only 3 GiB free, 8 GiB needed"),
        "{stderr}"
    );
    assert!(!marker.exists(), "a hook after the failing one does not run");
    assert_unchanged(&before, &luod.status());
    assert_eq!(
        std::fs::read_to_string(&failure_log).unwrap(),
        "prepare|pre-prepare hook 20-memory vetoed: only 3 GiB free, 8 GiB needed\n"
    );
    let v = luod.luoctl_json(&["prepare"]).1;
    assert_eq!(
        (v["error"]["kind"].as_str(), v["error"]["code"].as_i64()),
        (Some("vetoed"), Some(13))
    );
    assert_eq!(
        v["error"]["message"].as_str(),
        Some("pre-prepare hook 20-memory vetoed: only 3 GiB free, 8 GiB needed")
    );
}

#[test]
fn a_failing_pre_freeze_hook_vetoes_the_freeze_and_the_cycle_keeps_its_summary() {
    let (luod, root) = luod_with_hooks(&[]);
    hook(
        &root,
        "pre-freeze",
        "10-quiesce",
        "echo 'database still writing' >&2; exit 1",
    );
    let luod = luod.launched();
    luod.luoctl_ok(&["prepare"]);
    let (code, _, stderr) = luod.luoctl_parts(&["freeze"]);
    assert_eq!(code, EXIT_VETOED, "{stderr}");
    assert!(
        stderr.starts_with("luoctl: freeze: pre-freeze hook 10-quiesce vetoed: database still writing"),
        "{stderr}"
    );
    assert_eq!(luod.status().state, State::Prepared);
    luod.luoctl_ok(&["cancel"]);
    let h = luod.luoctl_json(&["history"]).1;
    let run = &h["cycles"][0]["hooks"][0];
    assert_eq!(
        (
            run["phase"].as_str(),
            run["ok"].as_bool(),
            run["status"].as_str(),
            run["last_line"].as_str()
        ),
        (
            Some("pre-freeze"),
            Some(false),
            Some("exit 1"),
            Some("database still writing")
        )
    );
}

#[test]
fn a_hook_past_its_timeout_is_killed_and_vetoes() {
    let (luod, root) = luod_with_hooks(&["--hook-timeout", "0.5"]);
    hook(
        &root,
        "pre-prepare",
        "10-slow",
        "echo 'waiting for the load balancer' >&2; sleep 30",
    );
    let luod = luod.launched();
    let started = Instant::now();
    let (code, _, stderr) = luod.luoctl_parts(&["prepare"]);
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert_eq!(code, EXIT_VETOED, "{stderr}");
    assert!(
        stderr.starts_with("luoctl: prepare: pre-prepare hook 10-slow vetoed: waiting for the load balancer"),
        "{stderr}"
    );
    assert!(
        luod.log()
            .contains("pre-prepare hook 10-slow: timed out after 500ms (luod --hook-timeout); killed"),
        "{}",
        luod.log()
    );
    assert_eq!(luod.status().state, State::Normal);
}

#[test]
fn hooks_a_local_user_could_have_written_are_refused_and_veto() {
    let (luod, root) = luod_with_hooks(&[]);
    let marker = luod.dir().join("ran");
    let touch = format!("touch {}", marker.display());
    let luod = luod.launched();
    let prepare_refused = |why: &str| {
        let before = luod.status();
        let (code, _, stderr) = luod.luoctl_parts(&["prepare"]);
        assert_eq!(code, EXIT_VETOED, "{stderr}");
        assert!(stderr.contains(why), "want {why:?} in {stderr}");
        assert!(!marker.exists(), "a refused hook never runs");
        assert_unchanged(&before, &luod.status());
    };

    // Owned by another uid.
    let h = hook(&root, "pre-prepare", "10-x", &touch);
    nix::unistd::chown(&h, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    prepare_refused(&format!(
        "pre-prepare hook 10-x vetoed: hook {} refused: it belongs to uid 65534, not root",
        h.display()
    ));
    assert!(luod.log().contains("refused: it belongs to uid 65534, not root"));
    // Group-writable.
    nix::unistd::chown(&h, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
    std::fs::set_permissions(&h, std::fs::Permissions::from_mode(0o775)).unwrap();
    prepare_refused("refused: group or others may write to it (mode 0775)");
    // A symbolic link (to a file root owns).
    std::fs::remove_file(&h).unwrap();
    let real = luod.dir().join("real-hook");
    std::fs::write(&real, format!("#!/bin/sh\n{touch}\n")).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(&real, &h).unwrap();
    prepare_refused("refused: it is a symbolic link: put the executable itself there");
    std::fs::remove_file(&h).unwrap();
    // A phase directory others may write to.
    hook(&root, "pre-prepare", "10-x", &touch);
    std::fs::set_permissions(root.join("pre-prepare.d"), std::fs::Permissions::from_mode(0o777)).unwrap();
    prepare_refused(&format!(
        "hook directory {} is refused: group or others may write to it (mode 0777)",
        root.join("pre-prepare.d").display()
    ));
    // Made safe, it runs.
    std::fs::set_permissions(root.join("pre-prepare.d"), std::fs::Permissions::from_mode(0o755)).unwrap();
    luod.luoctl_ok(&["prepare"]);
    assert!(marker.exists());
}

#[test]
fn status_stays_prompt_while_a_hook_runs_and_shows_it() {
    let (luod, root) = luod_with_hooks(&[]);
    let go = luod.dir().join("go");
    hook(
        &root,
        "pre-prepare",
        "10-slow",
        &format!("while [ ! -e {} ]; do sleep 0.05; done", go.display()),
    );
    let luod = luod.launched();
    let mut prepare = luoctl_command(&luod.socket())
        .arg("prepare")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let seen = poll(Duration::from_secs(10), || {
        let started = Instant::now();
        let s = luod.status();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "status took {:?}",
            started.elapsed()
        );
        s.in_progress
            .filter(|p| p.waiting_for.as_deref() == Some("hook pre-prepare/10-slow"))
    })
    .expect("status shows the hook running");
    assert_eq!(seen.step, "prepare");
    std::fs::write(&go, b"").unwrap();
    assert!(prepare.wait().unwrap().success());
    assert_eq!(luod.status().state, State::Prepared);
}

#[test]
fn a_failed_validation_holds_finish_until_the_operator_accepts_it() {
    let (luod, root) = luod_with_hooks(&[]);
    hook(
        &root,
        "post-update",
        "50-vms",
        "echo 'vm0 does not answer its health check' >&2; exit 3",
    );
    let mut luod = luod.launched();
    preserve_file(&luod, "s", 1, b"x");
    luod.luoctl_ok(&["prepare"]);
    luod.luoctl_ok(&["reboot"]);
    luod.expect_kexec_exit();
    luod.start();
    let status = poll(Duration::from_secs(10), || {
        let s = luod.status();
        s.notes.iter().any(|n| n.contains("failed validation")).then_some(s)
    })
    .expect("status notes the failed validation");
    assert_eq!(status.state, State::Updated);
    assert!(
        status.notes.contains(
            &"the update failed validation: post-update hook 50-vms: vm0 does not answer its health check; \
              `luoctl rollback` goes back to the previous kernel, `luoctl finish --accept-failed-validation` keeps \
              this one"
                .to_string()
        ),
        "{:?}",
        status.notes
    );
    let out = luod.dir().join("s.out");
    luod.luoctl_ok(&[
        "session",
        "retrieve",
        "s",
        "--token",
        "1",
        "--output",
        out.to_str().unwrap(),
    ]);
    let before = luod.status();
    let (code, _, stderr) = luod.luoctl_parts(&["finish"]);
    assert_eq!(code, EXIT_VETOED, "{stderr}");
    assert!(
        stderr.starts_with(
            "luoctl: finish: the update failed validation: post-update hook 50-vms: vm0 does not answer its health check"
        ),
        "{stderr}"
    );
    assert_unchanged(&before, &luod.status());
    // A restart of luod does not run the hooks again, nor forget the failure.
    luod.restart();
    assert_eq!(
        luod.status()
            .notes
            .iter()
            .filter(|n| n.contains("failed validation"))
            .count(),
        1,
        "the failure is noted again after the restart"
    );
    let (code, _, _) = luod.luoctl_parts(&["finish"]);
    assert_eq!(code, EXIT_VETOED);
    luod.luoctl_ok(&["finish", "--accept-failed-validation"]);
    let h = luod.luoctl_json(&["history"]).1;
    let c = &h["cycles"][0];
    assert_eq!(
        (
            c["outcome"].as_str(),
            c["validation"]["hook"].as_str(),
            c["validation"]["reason"].as_str(),
            c["validation"]["accepted_by"].as_u64()
        ),
        (
            Some("finished"),
            Some("50-vms"),
            Some("vm0 does not answer its health check"),
            Some(0)
        )
    );
    assert_eq!(c["hooks"].as_array().unwrap().len(), 1, "post-update ran once: {c}");
    // Nothing to accept any more.
    let (code, _, _) = luod.luoctl_parts(&["finish"]);
    assert_eq!(code, EXIT_WRONG_STATE);
}
