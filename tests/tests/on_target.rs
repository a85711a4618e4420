//! `check --kernel K` says when K is the running kernel already (the version
//! string of its header is the running kernel's, and its SHA-256 is that of
//! the kernel the last update loaded), with exit code 9 so that a rolling
//! update skips the host; and when it is not.

use liveupdate::state::State;
use liveupdate_tests::*;
use serde_json::Value;
use std::path::Path;

const EXIT_ALREADY_ON_TARGET: i32 = 9;

fn run(luod: &Luod, args: &[&str]) -> (i32, String, String) {
    let out = luod.luoctl(args);
    (
        out.status.code().expect("luoctl exited"),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// The running kernel's `uname -r` and `uname -v`.
fn uname() -> (String, String) {
    let u = nix::sys::utsname::uname().unwrap();
    (
        u.release().to_string_lossy().into_owned(),
        u.version().to_string_lossy().into_owned(),
    )
}

/// A bzImage whose setup header's version string is `version`, with
/// `seed`-dependent contents.
fn bzimage(p: &Path, version: &str, seed: u64) {
    let mut bz = pattern(seed, 0x2000);
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    // kernel_version: the string is at this value + 0x200.
    bz[0x20e..0x210].copy_from_slice(&0x0e00u16.to_le_bytes());
    bz[0x1000..0x1000 + version.len()].copy_from_slice(version.as_bytes());
    bz[0x1000 + version.len()] = 0;
    std::fs::write(p, &bz).unwrap();
}

/// The version string the running kernel's own image carries.
fn running_version() -> String {
    let (release, build) = uname();
    format!("{release} (builder@host) {build}")
}

fn check(luod: &Luod, kernel: &Path) -> (i32, Value, String) {
    let (code, stdout, stderr) = run(
        luod,
        &[
            "--json",
            "check",
            "--kernel",
            kernel.to_str().unwrap(),
            "--reuse-cmdline",
        ],
    );
    (
        code,
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}")),
        stderr,
    )
}

fn running_item(json: &Value) -> String {
    json["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "running kernel")
        .unwrap_or_else(|| panic!("no running kernel item: {json}"))["detail"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Prepare with `kernel`, freeze, the simulated kexec, luod again: `updated`.
fn update_to(luod: &mut Luod, kernel: &Path) {
    for step in [
        vec!["prepare", "--kernel", kernel.to_str().unwrap(), "--reuse-cmdline"],
        vec!["freeze"],
        vec!["reboot"],
    ] {
        let (code, _, stderr) = run(luod, &step);
        assert_eq!(code, 0, "{step:?}: {stderr}");
    }
    luod.expect_kexec_exit();
    luod.start();
    assert_eq!(luod.status().state, State::Updated);
}

#[test]
fn after_an_update_to_k_check_k_says_already_on_target_with_exit_9() {
    let mut luod = Luod::started("8M");
    let k = luod.dir().join("vmlinuz-k");
    bzimage(&k, &running_version(), 1);
    let (release, _) = uname();
    // Before any update: same version, but no digest to compare with.
    let (code, json, stderr) = check(&luod, &k);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(json["already_on_target"], false);
    assert_eq!(
        running_item(&json),
        format!(
            "{} has the running kernel's version {release}, but no update has loaded a kernel on this host yet, so \
             there is no sha256 to compare it with: not known to be the running image",
            k.display()
        )
    );
    update_to(&mut luod, &k);
    // In `updated` (before finish): already on target, whatever else.
    let (code, json, _) = check(&luod, &k);
    assert_eq!(code, EXIT_ALREADY_ON_TARGET, "{json}");
    assert_eq!(json["already_on_target"], true);
    assert_eq!(json["error"]["kind"], "already-on-target");
    let (code, _, _) = run(&luod, &["finish"]);
    assert_eq!(code, 0);
    let before = luod.status();
    let (code, json, _) = check(&luod, &k);
    assert_eq!(code, EXIT_ALREADY_ON_TARGET, "{json}");
    assert_eq!(
        (&json["ok"], &json["already_on_target"]),
        (&Value::from(false), &Value::from(true))
    );
    let digest = luod.client().history()[0].target.as_ref().unwrap().kernel_sha256;
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        running_item(&json),
        format!(
            "{} is the running kernel: its version {:?} is the running one's, and its sha256 {hex} is that of the \
             kernel cycle 1 loaded ({}): already on target",
            k.display(),
            running_version(),
            k.display()
        )
    );
    // Human: the table, then one line on stderr; exit 9.
    let (code, stdout, stderr) = run(&luod, &["check", "--kernel", k.to_str().unwrap(), "--reuse-cmdline"]);
    assert_eq!(code, EXIT_ALREADY_ON_TARGET);
    assert!(stdout.contains("running kernel"), "{stdout}");
    assert!(
        stderr.starts_with("luoctl: check: already on target: ")
            && stderr.ends_with("; nothing to update on this host\n"),
        "{stderr}"
    );
    assert_unchanged(&before, &luod.status());
}

#[test]
fn a_different_image_of_the_same_version_or_another_version_is_not_on_target() {
    let mut luod = Luod::started("8M");
    let k = luod.dir().join("vmlinuz-k");
    bzimage(&k, &running_version(), 1);
    update_to(&mut luod, &k);
    assert_eq!(run(&luod, &["finish"]).0, 0);
    let (release, build) = uname();
    // Same version string, other bytes (a rebuild): not the image loaded.
    let rebuilt = luod.dir().join("vmlinuz-rebuilt");
    bzimage(&rebuilt, &running_version(), 2);
    let (code, json, stderr) = check(&luod, &rebuilt);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(json["already_on_target"], false);
    let detail = running_item(&json);
    assert!(
        detail.starts_with(&format!(
            "{} has the running kernel's version {release}, but its sha256 ",
            rebuilt.display()
        )) && detail.ends_with(&format!(
            " of the kernel cycle 1 loaded ({}): not known to be the running image",
            k.display()
        )),
        "{detail}"
    );
    // Another version: not the running kernel at all.
    let other = luod.dir().join("vmlinuz-other");
    let other_version = format!("{release}-next (builder@host) #99 SMP");
    bzimage(&other, &other_version, 1);
    let (code, json, _) = check(&luod, &other);
    assert_eq!(code, 0);
    assert_eq!(json["already_on_target"], false);
    assert_eq!(
        running_item(&json),
        format!(
            "{} is not the running kernel: it is {other_version:?}, the running one {:?}",
            other.display(),
            format!("{release} {build}")
        )
    );
    // An image without a version string.
    let bare = luod.dir().join("vmlinuz-bare");
    let mut bz = std::fs::read(&k).unwrap();
    bz[0x20e..0x210].copy_from_slice(&0u16.to_le_bytes());
    std::fs::write(&bare, bz).unwrap();
    let (code, json, _) = check(&luod, &bare);
    assert_eq!((code, json["already_on_target"].as_bool()), (0, Some(false)));
    assert_eq!(
        running_item(&json),
        format!(
            "{} has no version string in its header: not known to be the running kernel",
            bare.display()
        )
    );
    // A later update to another image moves the target: K is no longer it.
    update_to(&mut luod, &rebuilt);
    assert_eq!(run(&luod, &["finish"]).0, 0);
    assert_eq!(check(&luod, &k).0, 0);
    assert_eq!(check(&luod, &rebuilt).0, EXIT_ALREADY_ON_TARGET);
}
