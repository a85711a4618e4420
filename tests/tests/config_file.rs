//! luod's configuration file: `--config`, `--check-config [--json]`, errors
//! naming the key and the line, and flags over file over defaults, on the
//! real luod binary.

use liveupdate_tests::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn luod(args: &[&str]) -> Command {
    let mut c = Command::new(binary("luod"));
    c.args(args).env_remove("LUOD_SOCKET").stdin(Stdio::null());
    c
}

fn run(mut c: Command) -> (i32, String, String) {
    let out: Output = c.output().expect("run luod");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn check_json(config: &Path, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["--config", config.to_str().unwrap(), "--check-config", "--json"];
    args.extend_from_slice(extra);
    let (code, stdout, _) = run(luod(&args));
    (
        code,
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}")),
    )
}

fn key<'a>(json: &'a Value, key: &str) -> &'a Value {
    json["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key"] == key)
        .unwrap_or_else(|| panic!("no key {key} in {json}"))
}

#[test]
fn an_unknown_key_is_refused_with_its_line_and_luod_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("luod.sock");
    let cfg = write(
        dir.path(),
        "luod.toml",
        &format!("# a comment\nsocket = \"{}\"\n\nvm_timeout = 5\n", sock.display()),
    );
    let want = format!(
        "luod: {} line 4: unknown key `vm_timeout`: luod has no flag --vm_timeout (each key is a flag's long name; \
         see `luod --help`)\n",
        cfg.display()
    );
    let (code, stdout, stderr) = run(luod(&["--config", cfg.to_str().unwrap(), "--check-config"]));
    assert_eq!((code, stdout.as_str(), stderr.as_str()), (2, "", want.as_str()));
    // Started for real: the same refusal, before anything is created.
    let (code, _, stderr) = run(luod(&["--config", cfg.to_str().unwrap(), "--backend", "file"]));
    assert_eq!((code, stderr.as_str()), (2, want.as_str()));
    assert!(!sock.exists());
}

#[test]
fn a_bad_value_is_refused_naming_the_key_and_line_with_the_flags_own_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "socket = \"/run/x.sock\"\nmax-connections = 0\n",
            "line 2: key `max-connections`: \"0\" is not valid: 0 is not in 1..=65536",
        ),
        (
            "\n\n\nvm-timeout = \"soon\"\n",
            "line 4: key `vm-timeout`: \"soon\" is not valid: \"soon\" is not a number of seconds (e.g. 5 or 0.5)",
        ),
        (
            "backend = \"floppy\"\n",
            "line 1: key `backend`: \"floppy\" is not one of auto, luo, reserved-memory, file",
        ),
        (
            "record-size = \"1T\"\n",
            "line 1: key `record-size`: \"1T\" is not valid: unknown size suffix 'T': use K, M or G",
        ),
        (
            "preserve-device = [\"0000:00:01.0\", \"nonsense\"]\n",
            "line 1: key `preserve-device`: \"nonsense\" is not valid: ",
        ),
        (
            "socket = [\"/a\", \"/b\"]\n",
            "line 1: key `socket`: takes one value, not a list",
        ),
        (
            "client-timeout = true\n",
            "line 1: key `client-timeout`: takes a string or a number, not a boolean",
        ),
        (
            "[socket]\npath = \"/x\"\n",
            "line 1: key `socket`: takes a string or a number, not a table",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let cfg = write(dir.path(), &format!("c{i}.toml"), text);
        let (code, stdout, stderr) = run(luod(&["--config", cfg.to_str().unwrap(), "--check-config"]));
        let prefix = format!("luod: {} {want}", cfg.display());
        assert_eq!((code, stdout.as_str()), (2, ""), "{text}");
        assert!(
            stderr.starts_with(&prefix) && stderr.ends_with('\n'),
            "{text}: {stderr:?} vs {prefix:?}"
        );
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        // With --json the refusal is a JSON object on stdout too.
        let (code, json) = check_json(&cfg, &[]);
        assert_eq!(code, 2);
        assert_eq!(json["ok"], false);
        assert!(json["error"].as_str().unwrap().starts_with(&prefix[6..]), "{json}");
    }
    // Not TOML at all: toml's own message, with the line.
    let cfg = write(dir.path(), "syntax.toml", "socket = \"/x\"\nvm-timeout = \n");
    let (code, _, stderr) = run(luod(&["--config", cfg.to_str().unwrap(), "--check-config"]));
    assert_eq!(code, 2);
    assert!(
        stderr.starts_with(&format!("luod: {} line 2: ", cfg.display())),
        "{stderr}"
    );
}

#[test]
fn flags_win_over_the_file_and_the_file_over_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "luod.toml",
        "vm-timeout = 2\nclient-timeout = 7\nsocket = \"/run/file.sock\"\npreserve-device = [\"0000:00:01.0\", \
         \"0000:00:02.0\"]\nqemu-vm = [\"a=/run/a.qmp\"]\n",
    );
    let (code, json) = check_json(&cfg, &["--vm-timeout", "3", "--qemu-vm", "b=/run/b.qmp"]);
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["ok"], true);
    assert_eq!(json["config"], cfg.to_str().unwrap());
    assert_eq!(json["config_found"], true);
    let row = |k: &str| {
        let v = key(&json, k);
        (
            v["value"].clone(),
            v["source"].as_str().unwrap().to_string(),
            v["line"].clone(),
        )
    };
    assert_eq!(
        row("vm-timeout"),
        (Value::from("3"), "command line".into(), Value::Null)
    );
    assert_eq!(row("client-timeout"), (Value::from("7"), "file".into(), Value::from(2)));
    assert_eq!(
        row("socket"),
        (Value::from("/run/file.sock"), "file".into(), Value::from(3))
    );
    assert_eq!(
        row("preserve-device"),
        (
            serde_json::json!(["0000:00:01.0", "0000:00:02.0"]),
            "file".into(),
            Value::from(4)
        )
    );
    // A repeatable flag on the command line replaces the file's list.
    assert_eq!(
        row("qemu-vm"),
        (serde_json::json!(["b=/run/b.qmp"]), "command line".into(), Value::Null)
    );
    assert_eq!(
        row("max-connections"),
        (Value::from("256"), "default".into(), Value::Null)
    );
    assert_eq!(row("region"), (Value::Null, "unset".into(), Value::Null));
    // The environment (LUOD_SOCKET) wins over the file as well.
    let (code, stdout, _) = run({
        let mut c = luod(&["--config", cfg.to_str().unwrap(), "--check-config", "--json"]);
        c.env("LUOD_SOCKET", "/run/env.sock");
        c
    });
    assert_eq!(code, 0);
    let json: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(key(&json, "socket")["value"], "/run/env.sock");
    assert_eq!(key(&json, "socket")["source"], "environment");
    // The human form: one `key = value  # source` line per key.
    let (code, stdout, _) = run(luod(&[
        "--config",
        cfg.to_str().unwrap(),
        "--check-config",
        "--vm-timeout",
        "3",
    ]));
    assert_eq!(code, 0);
    assert_eq!(
        stdout.lines().next(),
        Some(format!("# luod configuration: {}", cfg.display()).as_str())
    );
    let line = |k: &str| -> String {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("{k} = ")))
            .unwrap_or_else(|| panic!("{k} in {stdout}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(line("vm-timeout"), "vm-timeout = \"3\" # command line");
    assert_eq!(line("client-timeout"), "client-timeout = \"7\" # file, line 2");
    assert_eq!(line("backend"), "backend = \"auto\" # default");
    assert!(stdout.contains("# region is not set"), "{stdout}");
}

#[test]
fn a_real_luod_runs_with_the_files_settings_and_the_command_line_over_them() {
    let dir = tempfile::tempdir().unwrap();
    let from_file = dir.path().join("file.sock");
    let from_flag = dir.path().join("flag.sock");
    let cfg = write(
        dir.path(),
        "luod.toml",
        &format!(
            "backend = \"file\"\nregion = \"{}\"\nregion-size = \"8M\"\nstate-dir = \"{}\"\nsocket = \"{}\"\n",
            dir.path().join("region").display(),
            dir.path().join("state").display(),
            from_file.display()
        ),
    );
    let serve = |extra: &[&str]| -> std::process::Child {
        let mut args = vec!["--config", cfg.to_str().unwrap()];
        args.extend_from_slice(extra);
        luod(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
    };
    let status_of = |socket: &Path| -> Option<String> {
        poll(Duration::from_secs(10), || {
            let out = luoctl_command(socket).args(["--json", "status"]).output().ok()?;
            out.status.success().then(|| String::from_utf8(out.stdout).unwrap())
        })
    };
    let mut child = serve(&[]);
    let status = status_of(&from_file);
    child.kill().unwrap();
    child.wait().unwrap();
    let status: Value = serde_json::from_str(&status.expect("luod serves the file's socket")).unwrap();
    assert_eq!(status["backend"], "file", "{status}");
    assert!(std::fs::metadata(dir.path().join("region")).unwrap().len() == 8 << 20);
    // --socket on the command line wins over the file's.
    let mut child = serve(&["--socket", from_flag.to_str().unwrap()]);
    let served = status_of(&from_flag);
    let file_socket_there = from_file.exists();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(served.is_some(), "luod serves --socket");
    assert!(!file_socket_there || luoctl_command(&from_file).arg("status").output().unwrap().status.code() == Some(4));
}

#[test]
fn a_missing_file_is_fine_at_the_default_path_and_an_error_at_an_explicit_one() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.toml");
    let (code, stdout, stderr) = run(luod(&["--config", missing.to_str().unwrap(), "--check-config"]));
    assert_eq!(
        (code, stdout.as_str(), stderr),
        (
            2,
            "",
            format!(
                "luod: cannot read the configuration file {}: No such file or directory (os error 2)\n",
                missing.display()
            )
        )
    );
    // Without --config: /etc/luod/luod.toml, which may or may not exist
    // here; either way the check passes and says which.
    let (code, stdout, stderr) = run(luod(&["--check-config", "--json"]));
    assert_eq!(code, 0, "{stderr}");
    let json: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["config"], "/etc/luod/luod.toml");
    assert_eq!(json["config_found"], Path::new("/etc/luod/luod.toml").exists());
    let (code, stdout, _) = run(luod(&["--check-config"]));
    assert_eq!(code, 0);
    if !Path::new("/etc/luod/luod.toml").exists() {
        assert_eq!(
            stdout.lines().next(),
            Some("# luod configuration: /etc/luod/luod.toml does not exist: defaults and flags only")
        );
    }
}

#[test]
fn the_shipped_configuration_checks_clean_and_its_output_reads_back() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../luod/luod.toml");
    let (code, json) = check_json(&shipped, &[]);
    assert_eq!(code, 0, "{json}");
    // Every key commented out: every value is the default (or unset).
    for k in json["keys"].as_array().unwrap() {
        assert!(["default", "unset"].contains(&k["source"].as_str().unwrap()), "{k}");
    }
    // What --check-config prints is a configuration luod reads back to the
    // same values.
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "a.toml", "vm-timeout = 0.5\nqemu-vm = [\"a=/run/a.qmp\"]\n");
    let (_, printed, _) = run(luod(&["--config", cfg.to_str().unwrap(), "--check-config"]));
    let again = write(dir.path(), "b.toml", &printed);
    let (code, json) = check_json(&again, &[]);
    assert_eq!(code, 0, "{printed}");
    assert_eq!(key(&json, "vm-timeout")["value"], "0.5");
    assert_eq!(key(&json, "qemu-vm")["value"], serde_json::json!(["a=/run/a.qmp"]));
    assert_eq!(key(&json, "max-bytes-per-uid")["value"], "64G");
}
