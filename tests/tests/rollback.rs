//! Rollback by live update end to end (file backend, real luod and luoctl):
//! `luoctl rollback` back to the recorded previous kernel with the preserved
//! files carried through both (simulated) kexecs, the history of both
//! cycles, the refusal when the previous image changed, and the automatic
//! rollback after a failed validation.

use liveupdate::state::State;
use liveupdate_tests::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const EXIT_WRONG_STATE: i32 = 11;

/// A file the kernel check takes for a bzImage; `tag` makes it byte-different.
fn bzimage(path: &Path, tag: u8) {
    let mut bz = vec![0u8; 0x400];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    bz[0x300] = tag;
    std::fs::write(path, &bz).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

/// A luod whose running kernel is `DIR/vmlinuz-0` (--rollback-kernel), with
/// `DIR/vmlinuz-1` as the update's target.
fn luod(extra: &[&str]) -> (Luod, PathBuf, PathBuf) {
    let luod = Luod::new("8M");
    let k0 = luod.dir().join("vmlinuz-0");
    let k1 = luod.dir().join("vmlinuz-1");
    bzimage(&k0, 0);
    bzimage(&k1, 1);
    let mut luod = luod
        .arg("--rollback-kernel")
        .arg(&k0)
        .arg("--rollback-cmdline")
        .arg("console=ttyS0 kernel=0");
    for a in extra {
        luod = luod.arg(*a);
    }
    (luod, k0, k1)
}

/// Preserves `bytes` as session `s` token 1; prepares and reboots into `k1`.
fn update(luod: &mut Luod, k1: &Path, bytes: &[u8]) {
    let input = luod.dir().join("s.in");
    std::fs::write(&input, bytes).unwrap();
    luod.luoctl_ok(&["session", "create", "s"]);
    luod.luoctl_ok(&[
        "session",
        "preserve",
        "s",
        "--token",
        "1",
        "--file",
        input.to_str().unwrap(),
    ]);
    let out = luod.luoctl_ok(&[
        "prepare",
        "--kernel",
        k1.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 kernel=1",
    ]);
    let k0 = luod.dir().join("vmlinuz-0");
    assert!(
        out.contains(&format!("note: a rollback of this cycle goes back to {}", k0.display())),
        "{out}"
    );
    luod.luoctl_ok(&["reboot"]);
    luod.expect_kexec_exit();
}

fn retrieve(luod: &Luod) -> Vec<u8> {
    let out = luod.dir().join("s.out");
    let _ = std::fs::remove_file(&out);
    luod.luoctl_ok(&[
        "session",
        "retrieve",
        "s",
        "--token",
        "1",
        "--output",
        out.to_str().unwrap(),
    ]);
    std::fs::read(&out).unwrap()
}

/// A cycle as these tests look at it: id, outcome, rollback_of, rolled_back_by, target kernel.
type CycleView = (u64, String, Option<u64>, Option<u64>, String);

/// Each cycle of the history.
fn cycles(luod: &Luod) -> Vec<CycleView> {
    luod.luoctl_json(&["history"]).1["cycles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["id"].as_u64().unwrap(),
                c["outcome"].as_str().unwrap().to_string(),
                c["rollback_of"].as_u64(),
                c["rolled_back_by"].as_u64(),
                c["target"]["kernel"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn luoctl_rollback_goes_back_to_the_previous_kernel_carrying_the_files_and_history_shows_both_cycles() {
    let (luod, k0, k1) = luod(&[]);
    let mut luod = luod.launched();
    let data = pattern(7, 300_000);
    update(&mut luod, &k1, &data);
    luod.start();
    assert_eq!(luod.status().state, State::Updated);

    // Nothing taken back yet: the rollback carries the files as they came.
    let out = luod.luoctl_ok(&["rollback"]);
    let lines: Vec<&str> = out.lines().filter(|l| !l.starts_with("  note:")).collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].starts_with("rollback: updated -> prepared (record generation"),
        "{out}"
    );
    assert!(lines[1].starts_with("rollback (freeze): prepared -> frozen"), "{out}");
    assert!(lines[2].starts_with("rollback (reboot): frozen -> updated"), "{out}");
    assert!(
        out.contains(&format!("note: a rollback of this cycle goes back to {}", k1.display())),
        "{out}"
    );
    luod.expect_kexec_exit();
    luod.start();
    assert_eq!(luod.status().state, State::Updated);
    assert_same_bytes("s/1 after both kexecs", &retrieve(&luod), &data);
    luod.luoctl_ok(&["finish"]);
    let (k0, k1) = (k0.display().to_string(), k1.display().to_string());
    assert_eq!(
        cycles(&luod),
        [
            (1, "rolled-back".into(), None, Some(2), k1.clone()),
            (2, "finished".into(), Some(1), None, k0.clone())
        ]
    );
    let h = luod.luoctl_json(&["history"]).1;
    assert_eq!(h["cycles"][0]["previous"]["kernel"].as_str(), Some(k0.as_str()));
    assert_eq!(
        h["cycles"][0]["previous"]["cmdline"].as_str(),
        Some("console=ttyS0 kernel=0")
    );
    let text = luod.luoctl_ok(&["history"]);
    assert!(text.contains("rolled-back (by #2)"), "{text}");
    assert!(text.contains("finished (rollback of #1)"), "{text}");
}

#[test]
fn rollback_after_finish_on_the_same_boot_and_json_reports_each_step() {
    let (luod, _k0, k1) = luod(&[]);
    let mut luod = luod.launched();
    update(&mut luod, &k1, b"first");
    luod.start();
    assert_eq!(retrieve(&luod), b"first");
    luod.luoctl_ok(&["finish"]);
    // The clients preserve again, then the operator rolls back.
    let input = luod.dir().join("s.in");
    std::fs::write(&input, b"second").unwrap();
    luod.luoctl_ok(&["session", "create", "s"]);
    luod.luoctl_ok(&[
        "session",
        "preserve",
        "s",
        "--token",
        "1",
        "--file",
        input.to_str().unwrap(),
    ]);
    let v = luod.luoctl_json(&["rollback"]).1;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(
        (
            v["prepare"]["from"].as_str(),
            v["freeze"]["to"].as_str(),
            v["reboot"]["to"].as_str()
        ),
        (Some("normal"), Some("frozen"), Some("updated"))
    );
    luod.expect_kexec_exit();
    luod.start();
    assert_eq!(retrieve(&luod), b"second");
    luod.luoctl_ok(&["finish"]);
    let c = cycles(&luod);
    assert_eq!(
        c.iter().map(|c| (c.0, c.1.as_str(), c.2, c.3)).collect::<Vec<_>>(),
        [(1, "rolled-back", None, Some(2)), (2, "finished", Some(1), None)]
    );
}

#[test]
fn rollback_is_refused_when_the_previous_image_changed_and_nothing_changes() {
    let (luod, k0, k1) = luod(&[]);
    let mut luod = luod.launched();
    update(&mut luod, &k1, b"data");
    luod.start();
    let recorded = luod.luoctl_json(&["status"]).1;
    bzimage(&k0, 42);
    let before = luod.status();
    let (code, stdout, stderr) = luod.luoctl_parts(&["rollback"]);
    assert_eq!((code, stdout.as_str()), (EXIT_WRONG_STATE, ""), "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "luoctl: rollback: rollback refused: the previous kernel {} changed since cycle 1 recorded it (sha256 ",
            k0.display()
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("put the original back, or prepare an update to the kernel you want"),
        "{stderr}"
    );
    assert_unchanged(&before, &luod.status());
    assert_eq!(luod.luoctl_json(&["status"]).1["generation"], recorded["generation"]);
    // Still carried: the files come back as they were.
    assert_eq!(retrieve(&luod), b"data");
}

#[test]
fn a_failed_validation_with_rollback_auto_goes_back_at_once() {
    let (luod, k0, k1) = luod(&["--rollback", "auto"]);
    let root = luod.dir().join("hooks");
    let dir = root.join("post-update.d");
    std::fs::create_dir_all(&dir).unwrap();
    for d in [&root, &dir] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // Fails the update, passes its rollback.
    let h = dir.join("50-health");
    std::fs::write(
        &h,
        "#!/bin/sh\n[ -n \"$LUOD_ROLLBACK_OF\" ] && { echo 'healthy again'; exit 0; }\necho 'vm0 lost its disk' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&h, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut luod = luod.arg("--hooks-dir").arg(&root).launched();
    let data = pattern(9, 70_000);
    update(&mut luod, &k1, &data);
    // The new kernel's luod validates, fails, rolls back and kexecs (simulated) by itself.
    luod.launch_no_wait();
    luod.expect_kexec_exit();
    assert!(
        luod.log()
            .contains("rolling back to the previous kernel (--rollback auto)"),
        "{}",
        luod.log()
    );
    luod.start();
    let status = poll(Duration::from_secs(10), || {
        let s = luod.luoctl_json(&["history"]).1;
        (s["cycles"].as_array().map(|c| c.len()) == Some(1)).then_some(s)
    })
    .expect("cycle 1 in the history");
    let c1 = &status["cycles"][0];
    assert_eq!(
        (
            c1["outcome"].as_str(),
            c1["rolled_back_by"].as_u64(),
            c1["validation"]["reason"].as_str()
        ),
        (Some("rolled-back"), Some(2), Some("vm0 lost its disk"))
    );
    assert_eq!(luod.status().state, State::Updated);
    assert_same_bytes("s/1 after the update and its rollback", &retrieve(&luod), &data);
    luod.luoctl_ok(&["finish"]);
    assert_eq!(
        cycles(&luod),
        [
            (1, "rolled-back".into(), None, Some(2), k1.display().to_string()),
            (2, "finished".into(), Some(1), None, k0.display().to_string())
        ]
    );
    let h = luod.luoctl_json(&["history"]).1;
    assert_eq!(h["cycles"][1]["hooks"][0]["last_line"].as_str(), Some("healthy again"));
}
