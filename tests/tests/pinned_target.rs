//! Pinned targets (`prepare`/`check --sha256`, `--initrd-sha256`): a
//! mismatch is refused before anything loads, with its own exit code, and
//! nothing changes. And the kexec signature policy `check` shows.

use liveupdate::state::State;
use liveupdate_tests::*;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::Path;

const EXIT_CHECK_FAILED: i32 = 3;
const EXIT_USAGE: i32 = 2;
const EXIT_DIGEST_MISMATCH: i32 = 20;

fn run(luod: &Luod, args: &[&str]) -> (i32, String, String) {
    let out = luod.luoctl(args);
    (
        out.status.code().expect("luoctl exited"),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// A file the image check takes for a bzImage (boot protocol 2.15), with
/// `seed`-dependent contents.
fn bzimage(p: &Path, seed: u64) -> String {
    let mut bz = pattern(seed, 0x2000);
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    bz[0x20e..0x210].copy_from_slice(&0u16.to_le_bytes());
    std::fs::write(p, &bz).unwrap();
    sha256_of(p)
}

fn sha256_of(p: &Path) -> String {
    Sha256::digest(std::fs::read(p).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_kernel_that_is_not_the_pinned_one_is_refused_and_nothing_changes() {
    let luod = Luod::started("8M");
    let kernel = luod.dir().join("vmlinuz");
    let digest = bzimage(&kernel, 1);
    let wrong = "ab".repeat(32);
    let before = luod.status();
    let (code, stdout, stderr) = run(
        &luod,
        &[
            "prepare",
            "--kernel",
            s(&kernel),
            "--cmdline",
            "quiet",
            "--sha256",
            &wrong,
        ],
    );
    assert_eq!(
        (code, stdout.as_str(), stderr),
        (
            EXIT_DIGEST_MISMATCH,
            "",
            format!(
                "luoctl: prepare: kernel image {} has sha256 {digest}, not the pinned {wrong}: it is not the image \
                 the pin names, so nothing was loaded; check that the image is the one you meant (sha256sum FILE), \
                 or correct the pinned digest\n",
                kernel.display()
            )
        )
    );
    assert_unchanged(&before, &luod.status());
    assert!(luod.client().history().is_empty());
    // --json: the error kind names it.
    let (code, stdout, _) = run(
        &luod,
        &[
            "--json",
            "prepare",
            "--kernel",
            s(&kernel),
            "--cmdline",
            "quiet",
            "--sha256",
            &wrong,
        ],
    );
    let json: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        (code, &json["error"]["kind"], &json["error"]["code"]),
        (20, &Value::from("digest-mismatch"), &Value::from(20))
    );
    assert_unchanged(&before, &luod.status());
    // The right pin (in capitals, as some tools print it) prepares.
    let (code, stdout, stderr) = run(
        &luod,
        &[
            "--json",
            "prepare",
            "--kernel",
            s(&kernel),
            "--cmdline",
            "quiet",
            "--sha256",
            &digest.to_uppercase(),
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let json: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["to"], "prepared");
    assert!(
        json["notes"][0]
            .as_str()
            .unwrap()
            .contains(&format!("(sha256 {digest})")),
        "{json}"
    );
    assert_eq!(luod.status().state, State::Prepared);
}

#[test]
fn an_initrd_that_is_not_the_pinned_one_is_refused_and_nothing_changes() {
    let luod = Luod::started("8M");
    let kernel = luod.dir().join("vmlinuz");
    let kdigest = bzimage(&kernel, 2);
    let initrd = luod.dir().join("initrd.img");
    std::fs::write(&initrd, pattern(3, 5000)).unwrap();
    let idigest = sha256_of(&initrd);
    let wrong = "0".repeat(64);
    let before = luod.status();
    let (code, _, stderr) = run(
        &luod,
        &[
            "prepare",
            "--kernel",
            s(&kernel),
            "--sha256",
            &kdigest,
            "--initrd",
            s(&initrd),
            "--initrd-sha256",
            &wrong,
            "--cmdline",
            "quiet",
        ],
    );
    assert_eq!(
        (code, stderr),
        (
            EXIT_DIGEST_MISMATCH,
            format!(
                "luoctl: prepare: initrd {} has sha256 {idigest}, not the pinned {wrong}: it is not the image the pin \
                 names, so nothing was loaded; check that the image is the one you meant (sha256sum FILE), or \
                 correct the pinned digest\n",
                initrd.display()
            )
        )
    );
    assert_unchanged(&before, &luod.status());
    assert!(luod.client().history().is_empty());
    // check says the same, as a failed item (exit 3), and changes nothing.
    let (code, stdout, _) = run(
        &luod,
        &[
            "--json",
            "check",
            "--kernel",
            s(&kernel),
            "--initrd",
            s(&initrd),
            "--initrd-sha256",
            &wrong,
            "--cmdline",
            "quiet",
        ],
    );
    let json: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(code, EXIT_CHECK_FAILED, "{json}");
    let target = json["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "target kernel")
        .unwrap();
    assert_eq!(target["ok"], false);
    assert!(target["detail"].as_str().unwrap().starts_with(&format!(
        "initrd {} has sha256 {idigest}, not the pinned",
        initrd.display()
    )));
    // Both right: check says they match.
    let (code, stdout, stderr) = run(
        &luod,
        &[
            "--json",
            "check",
            "--kernel",
            s(&kernel),
            "--sha256",
            &kdigest,
            "--initrd",
            s(&initrd),
            "--initrd-sha256",
            &idigest,
            "--cmdline",
            "quiet",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let json: Value = serde_json::from_str(&stdout).unwrap();
    let target = json["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "target kernel")
        .unwrap();
    assert!(
        target["detail"].as_str().unwrap().contains(&format!(
            "(sha256 {kdigest}; kernel and initrd match their pinned sha256)"
        )),
        "{target}"
    );
    assert_unchanged(&before, &luod.status());
}

#[test]
fn a_malformed_pin_or_a_pin_without_its_image_is_a_usage_error() {
    let luod = Luod::started("8M");
    let kernel = luod.dir().join("vmlinuz");
    bzimage(&kernel, 4);
    let before = luod.status();
    let (code, _, stderr) = run(
        &luod,
        &[
            "prepare",
            "--kernel",
            s(&kernel),
            "--cmdline",
            "quiet",
            "--sha256",
            "abc",
        ],
    );
    assert_eq!(code, EXIT_USAGE);
    assert!(
        stderr.contains("\"abc\" is not a SHA-256: give 64 hex digits, as sha256sum prints them"),
        "{stderr}"
    );
    let (code, _, stderr) = run(
        &luod,
        &[
            "prepare",
            "--kernel",
            s(&kernel),
            "--cmdline",
            "quiet",
            "--initrd-sha256",
            &"1".repeat(64),
        ],
    );
    assert_eq!(code, EXIT_USAGE, "{stderr}");
    assert!(stderr.contains("--initrd"), "{stderr}");
    assert_unchanged(&before, &luod.status());
}

#[test]
fn check_shows_the_kexec_signature_policy_from_sysfs() {
    let sys = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(sys.path().join("kernel/security")).unwrap();
    std::fs::write(
        sys.path().join("kernel/security/lockdown"),
        "none [integrity] confidentiality\n",
    )
    .unwrap();
    let luod = Luod::new("8M").arg("--sysfs-root").arg(sys.path()).launched();
    let (code, stdout, stderr) = run(&luod, &["--json", "check"]);
    assert_eq!(code, 0, "{stderr}");
    let json: Value = serde_json::from_str(&stdout).unwrap();
    let item = json["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "kexec signatures")
        .unwrap();
    assert_eq!(item["ok"], true);
    let detail = item["detail"].as_str().unwrap();
    assert!(
        detail.starts_with(
            "signed kexec images required: the kernel is locked down (integrity), so an image without a valid \
             signature is refused (EPERM) (lockdown integrity, "
        ),
        "{detail}"
    );
    // The human table has the same line.
    let (code, stdout, _) = run(&luod, &["check"]);
    assert_eq!(code, 0);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("ok") && l.contains("kexec signatures") && l.contains("locked down (integrity)")),
        "{stdout}"
    );
    // Without lockdown in that sysfs: lockdown not available.
    let luod = Luod::new("8M").arg("--sysfs-root").arg(luod.dir()).launched();
    let (_, stdout, _) = run(&luod, &["--json", "check"]);
    let json: Value = serde_json::from_str(&stdout).unwrap();
    let item = json["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "kexec signatures")
        .unwrap();
    assert!(
        item["detail"].as_str().unwrap().contains("(lockdown not available, "),
        "{item}"
    );
}
