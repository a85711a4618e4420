//! Devices and IOMMU groups through luod: `--preserve-device` puts the
//! device and IOMMU subsystems in the cycle; their vetoes reach luoctl.
//! (Their sysfs logic is tested on recorded real trees in
//! `lib/tests/sysfs_subsystems.rs`.)

use liveupdate::state::State;
use liveupdate_tests::Luod;

#[test]
fn a_preserved_device_that_is_not_there_vetoes_prepare_with_the_reason() {
    let sysfs = tempfile::tempdir().expect("tempdir");
    let luod = Luod::new("8M")
        .arg("--sysfs-root")
        .arg(sysfs.path())
        .arg("--preserve-device")
        .arg("0000:00:03.0")
        .launched();
    let status = luod.status();
    assert_eq!(status.subsystems, ["region-capacity", "iommu", "devices", "kvm"]);
    let out = luod.luoctl(&["prepare"]);
    assert_eq!(out.status.code(), Some(13), "the veto exit code");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("vetoed:") && stderr.contains("0000:00:03.0"),
        "{stderr}"
    );
    assert_eq!(luod.status().state, State::Normal);
}

#[test]
fn a_malformed_device_address_is_refused_at_startup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(liveupdate_tests::binary("luod"))
        .args(["--backend", "file", "--region"])
        .arg(dir.path().join("region"))
        .args(["--preserve-device", "0000:00:3g.0"])
        .output()
        .expect("run luod");
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("0000:00:3g.0"), "{stderr}");
}
