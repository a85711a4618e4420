//! The template unit `systemd/luo-qemu@.service`: systemd accepts it
//! (`systemd-analyze verify` on an instance, with the built binary), it runs
//! `luo-qemu run %i` with the configuration directory the launcher reads by
//! default, and it does not restart a launcher whose restore failed (exit 3:
//! luod keeps the VM; a restart loop would only repeat the failure).

use std::path::Path;
use std::process::Command;

fn unit() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/luo-qemu@.service"))
        .expect("read the unit")
}

fn setting(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("the unit has no {key}="))
        .to_string()
}

#[test]
fn the_unit_runs_the_launcher_for_its_instance() {
    let text = unit();
    assert_eq!(setting(&text, "ExecStart"), "/usr/bin/luo-qemu run %i");
    assert_eq!(setting(&text, "ConditionPathExists"), "/etc/luod/vms/%i.toml");
    assert_eq!(setting(&text, "After"), "luod.service network-online.target");
    assert_eq!(setting(&text, "Restart"), "on-failure");
    let no_restart = setting(&text, "RestartPreventExitStatus");
    assert_eq!(
        no_restart.split(' ').collect::<Vec<_>>(),
        [
            (luo_qemu::launcher::Outcome::Failed as u8 + 1).to_string(),
            (luo_qemu::launcher::Outcome::RelaunchFailed as u8).to_string()
        ],
        "bad configuration (2) and a failed restore (3) are not restarted"
    );
    // The directory in the unit is the launcher's default.
    let help = Command::new(env!("CARGO_BIN_EXE_luo-qemu"))
        .args(["run", "--help"])
        .output()
        .expect("luo-qemu run --help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("[default: /etc/luod/vms]"), "{help}");
    assert_eq!(luo_qemu::config::CONFIG_DIR, "/etc/luod/vms");
}

#[test]
fn systemd_accepts_an_instance_of_the_unit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let instance = dir.path().join("luo-qemu@web.service");
    let text = unit().replace("/usr/bin/luo-qemu", env!("CARGO_BIN_EXE_luo-qemu"));
    std::fs::write(&instance, text).expect("write the instance");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&instance)
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()
        .expect("systemd-analyze (Debian's systemd package) runs");
    let err = String::from_utf8_lossy(&out.stderr);
    let complaints: Vec<&str> = err.lines().filter(|l| l.contains("luo-qemu@web.service")).collect();
    assert!(out.status.success() && complaints.is_empty(), "{err}");
}
