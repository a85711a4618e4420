//! luoctl against a real luod: exit codes, the one-line error on stderr,
//! `--json` output, and files in and out of sessions (see luoctl/CLI.md).

use liveupdate::state::State;
use liveupdate_tests::*;
use serde_json::Value;
use std::path::Path;
use std::process::Output;

/// Exit codes of luoctl (CLI.md, "Exit codes").
const EXIT_UNREACHABLE: i32 = 4;
const EXIT_USAGE: i32 = 2;
const EXIT_CHECK_FAILED: i32 = 3;
const EXIT_LOCAL_IO: i32 = 7;
const EXIT_WRONG_STATE: i32 = 11;
const EXIT_VETOED: i32 = 13;
const EXIT_NOT_FOUND: i32 = 15;

/// Exit code, stdout and stderr of a luoctl run.
fn run(luod: &Luod, args: &[&str]) -> (i32, String, String) {
    parts(luod.luoctl(args))
}

fn parts(out: Output) -> (i32, String, String) {
    output_parts(out)
}

/// Runs luoctl and checks it succeeds.
#[track_caller]
fn ok(luod: &Luod, args: &[&str]) -> String {
    let (code, stdout, stderr) = run(luod, args);
    assert_eq!(code, 0, "luoctl {args:?} failed: {stderr}");
    stdout
}

/// `luoctl --json ARGS`: the exit code and the one JSON object on stdout.
#[track_caller]
fn json(luod: &Luod, args: &[&str]) -> (i32, Value) {
    luod.luoctl_json(args)
}

/// `status --json`, checked successful.
#[track_caller]
fn json_status(luod: &Luod) -> Value {
    let (code, status) = json(luod, &["status"]);
    assert_eq!(code, 0, "{status}");
    assert_eq!(status["ok"], true);
    status
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// The one line luoctl prints on stderr for an error, without its newline.
#[track_caller]
fn one_line(stderr: &str) -> &str {
    let line = stderr
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("stderr ends with a newline: {stderr:?}"));
    assert!(!line.contains('\n'), "one line on stderr: {stderr:?}");
    line
}

#[test]
fn a_veto_reason_reaches_the_cli_with_the_veto_exit_code() {
    // 4 MiB: two slots of 2 MiB, 2093056 bytes of data.
    let luod = Luod::started("4M");
    let big = luod.dir().join("big");
    std::fs::write(&big, pattern(5, 3 << 20)).expect("write a 3 MiB file");
    ok(&luod, &["session", "create", "vm0"]);
    ok(
        &luod,
        &["session", "preserve", "vm0", "--token", "1", "--file", path(&big)],
    );
    let before = luod.status();

    let reason = "1 preserved file(s) hold 3145728 bytes but the region holds at most 2093056 bytes of data \
                  (1052672 bytes short); give luod a larger region or preserve less";
    let (code, stdout, stderr) = run(&luod, &["prepare"]);
    assert_eq!(code, EXIT_VETOED, "stderr: {stderr}");
    assert_eq!(stdout, "", "nothing on stdout");
    let line = one_line(&stderr);
    assert!(line.starts_with("luoctl: prepare: "), "{line}");
    assert!(
        line.contains(&format!("vetoed: {reason}")),
        "the veto's reason with its numbers: {line}"
    );

    let (code, v) = json(&luod, &["prepare"]);
    assert_eq!(code, EXIT_VETOED);
    assert_eq!(v["ok"], false);
    let e = &v["error"];
    assert_eq!(
        (e["kind"].as_str(), e["code"].as_i64(), e["what"].as_str()),
        (Some("vetoed"), Some(13), Some("prepare"))
    );
    assert!(e["message"].as_str().is_some_and(|m| m.contains(reason)), "{e}");
    assert_eq!(
        (e["step"]["subsystem"].as_str(), e["step"]["veto"].as_bool()),
        (Some("region-capacity"), Some(true))
    );
    assert_eq!(e["step"]["reason"], reason);

    assert_unchanged(&before, &luod.status());
}

#[test]
fn json_status_shows_state_backend_generation_sessions_and_subsystems() {
    let luod = Luod::started("8M");
    let file = luod.dir().join("ram");
    std::fs::write(&file, pattern(6, 5000)).expect("write the file");
    ok(&luod, &["session", "create", "vm0"]);
    ok(
        &luod,
        &["session", "preserve", "vm0", "--token", "0x10", "--file", path(&file)],
    );

    let status = json_status(&luod);
    assert_eq!(status["state"], "normal");
    assert_eq!(status["backend"], "file");
    assert_eq!(
        status["generation"], 1,
        "one record for the session; the file is an entry of its journal"
    );
    assert_eq!(
        status["subsystems"],
        serde_json::json!(["region-capacity", "iommu", "devices", "kvm"])
    );
    assert_eq!(
        status["sessions"],
        serde_json::json!([{
            "name": "vm0",
            "owner_uid": 0,
            "files": [{ "token": 16, "size": 5000, "retrieved": false }],
            "incoming": false,
        }])
    );
    assert_eq!(status["last_cycle"], Value::Null);
    assert_eq!(status["live_updates"], 0);
}

/// Preserves `bytes` through luoctl, goes through prepare, freeze and the
/// simulated kexec with luoctl, and starts luod again (`updated`).
fn cycle_to_updated(luod: &mut Luod, bytes: &[u8]) {
    let file = luod.dir().join("ram");
    std::fs::write(&file, bytes).expect("write the file");
    ok(luod, &["session", "create", "vm0"]);
    ok(
        luod,
        &["session", "preserve", "vm0", "--token", "1", "--file", path(&file)],
    );
    std::fs::remove_file(&file).expect("remove the original");
    for (step, from, to) in [
        ("prepare", "normal", "prepared"),
        ("freeze", "prepared", "frozen"),
        ("reboot", "frozen", "updated"),
    ] {
        let (code, report) = json(luod, &[step]);
        assert_eq!(code, 0, "{step}: {report}");
        assert_eq!(
            (report["ok"].as_bool(), report["from"].as_str(), report["to"].as_str()),
            (Some(true), Some(from), Some(to)),
            "{step}"
        );
        assert_eq!(
            (report["sessions"].as_u64(), report["files"].as_u64()),
            (Some(1), Some(1)),
            "{step}: {report}"
        );
        assert_eq!(report["bytes"], bytes.len(), "{step}");
    }
    luod.expect_kexec_exit();
    luod.start();
    assert_eq!(luod.status().state, State::Updated);
}

#[test]
fn session_retrieve_writes_the_preserved_bytes_to_the_output_file() {
    let mut luod = Luod::new("8M").launched();
    let bytes = pattern(7, (1 << 20) + 5);
    cycle_to_updated(&mut luod, &bytes);

    let out = luod.dir().join("retrieved");
    let (code, v) = json(
        &luod,
        &["session", "retrieve", "vm0", "--token", "1", "--output", path(&out)],
    );
    assert_eq!(code, 0, "{v}");
    assert_eq!(
        v,
        serde_json::json!({ "ok": true, "session": "vm0", "token": 1, "size": bytes.len(), "output": path(&out) })
    );
    assert_same_bytes(
        "the retrieved file",
        &std::fs::read(&out).expect("read the output"),
        &bytes,
    );
}

#[test]
fn json_status_after_a_cycle_shows_its_outcome_and_timestamps() {
    let mut luod = Luod::new("8M").launched();
    cycle_to_updated(&mut luod, &pattern(8, 4096));
    let out = luod.dir().join("retrieved");
    ok(
        &luod,
        &["session", "retrieve", "vm0", "--token", "1", "--output", path(&out)],
    );
    let (code, finished) = json(&luod, &["finish"]);
    assert_eq!(code, 0, "{finished}");
    assert_eq!(
        (finished["from"].as_str(), finished["to"].as_str()),
        (Some("updated"), Some("normal"))
    );

    let status = json_status(&luod);
    assert_eq!(status["state"], "normal");
    assert_eq!(status["live_updates"], 1);
    let cycle = &status["last_cycle"];
    assert_eq!(
        (cycle["id"].as_u64(), cycle["outcome"].as_str()),
        (Some(1), Some("finished")),
        "{cycle}"
    );
    let t = &cycle["timestamps"];
    let steps = [
        "prepared",
        "freeze_started",
        "frozen",
        "reboot",
        "luod_started",
        "updated",
        "finished",
    ];
    let mut last = 0;
    for step in steps {
        let at = t[step]
            .as_u64()
            .unwrap_or_else(|| panic!("timestamp {step} is a number of nanoseconds: {t}"));
        assert!(at >= last, "{step} comes after the step before it: {t}");
        last = at;
    }
    assert_eq!(t["cancelled"], Value::Null);
    assert!(cycle["blackout_ns"].as_u64().is_some(), "{cycle}");
}

#[test]
fn an_error_is_one_line_on_stderr_and_nothing_on_stdout() {
    let luod = Luod::started("8M");
    let before = luod.status();

    let (code, stdout, stderr) = run(&luod, &["freeze"]);
    assert_eq!((code, stdout.as_str()), (EXIT_WRONG_STATE, ""));
    assert_eq!(
        one_line(&stderr),
        "luoctl: freeze: cannot freeze in state normal: freeze is allowed only in prepared; run `luoctl prepare` first"
    );

    let (code, stdout, stderr) = run(&luod, &["session", "finish", "ghost"]);
    assert_eq!((code, stdout.as_str()), (EXIT_NOT_FOUND, ""));
    let line = one_line(&stderr);
    assert!(
        line.starts_with("luoctl: session finish ghost: no session named ghost"),
        "{line}"
    );

    let nowhere = luod.dir().join("nowhere.sock");
    let (code, stdout, stderr) = parts(luoctl_command(&nowhere).arg("status").output().expect("run luoctl"));
    assert_eq!((code, stdout.as_str()), (EXIT_UNREACHABLE, ""));
    let line = one_line(&stderr);
    assert!(
        line.starts_with(&format!(
            "luoctl: status: cannot connect to luod at {}",
            nowhere.display()
        )),
        "{line}"
    );

    assert_unchanged(&before, &luod.status());
}

#[test]
fn with_json_an_error_is_one_json_object_on_stdout() {
    let luod = Luod::started("8M");
    let before = luod.status();

    let (code, v) = json(&luod, &["freeze"]);
    assert_eq!(code, EXIT_WRONG_STATE);
    assert_eq!(
        v,
        serde_json::json!({
            "ok": false,
            "error": {
                "kind": "wrong-state",
                "code": 11,
                "what": "freeze",
                "message": "cannot freeze in state normal: freeze is allowed only in prepared",
                "hint": "run `luoctl prepare` first",
                "step": null,
            }
        })
    );

    let (code, v) = json(&luod, &["session", "create", ""]);
    assert_eq!(code, 10);
    assert_eq!(
        (v["ok"].as_bool(), v["error"]["kind"].as_str()),
        (Some(false), Some("invalid-argument"))
    );
    assert_eq!(
        v["error"]["message"],
        "session name is empty: give a name of 1 to 63 bytes"
    );

    let (code, v) = json(
        &luod,
        &["session", "preserve", "vm0", "--token", "x", "--file", "/dev/null"],
    );
    assert_eq!(code, EXIT_USAGE);
    assert_eq!(
        (v["error"]["kind"].as_str(), v["error"]["code"].as_i64()),
        (Some("usage"), Some(2)),
        "{v}"
    );

    let nowhere = luod.dir().join("nowhere.sock");
    let out = luoctl_command(&nowhere)
        .args(["--json", "status"])
        .output()
        .expect("run luoctl");
    let (code, stdout, _) = parts(out);
    let v: Value = serde_json::from_str(&stdout).expect("one JSON object");
    assert_eq!(code, EXIT_UNREACHABLE);
    assert_eq!(
        (v["error"]["kind"].as_str(), v["error"]["code"].as_i64()),
        (Some("unreachable"), Some(4)),
        "{v}"
    );

    assert_unchanged(&before, &luod.status());
}

#[test]
fn a_bad_output_path_fails_before_the_file_is_taken_back() {
    let mut luod = Luod::new("8M").launched();
    let bytes = pattern(9, 10_000);
    cycle_to_updated(&mut luod, &bytes);

    let missing = luod.dir().join("no-such-dir").join("out");
    let (code, stdout, stderr) = run(
        &luod,
        &["session", "retrieve", "vm0", "--token", "1", "--output", path(&missing)],
    );
    assert_eq!((code, stdout.as_str()), (EXIT_LOCAL_IO, ""), "stderr: {stderr}");
    one_line(&stderr);
    let status = luod.status();
    assert!(!status.sessions[0].files[0].retrieved, "the file is still retrievable");

    let out = luod.dir().join("out");
    ok(
        &luod,
        &["session", "retrieve", "vm0", "--token", "1", "--output", path(&out)],
    );
    assert_same_bytes(
        "the retrieved file",
        &std::fs::read(&out).expect("read the output"),
        &bytes,
    );
}

#[test]
fn check_exits_3_and_names_the_failing_item_when_prepare_would_be_refused() {
    let luod = Luod::started("4M");
    let big = luod.dir().join("big");
    std::fs::write(&big, pattern(5, 3 << 20)).expect("write a 3 MiB file");
    ok(&luod, &["session", "create", "vm0"]);
    ok(
        &luod,
        &["session", "preserve", "vm0", "--token", "1", "--file", path(&big)],
    );

    let (code, v) = json(&luod, &["check"]);
    assert_eq!(code, EXIT_CHECK_FAILED, "{v}");
    assert_eq!(v["ok"], false);
    let items: Vec<(&str, bool)> = v["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| (i["name"].as_str().expect("name"), i["ok"].as_bool().expect("ok")))
        .collect();
    assert_eq!(
        items,
        [
            ("state", true),
            ("privilege", true),
            ("target kernel", true),
            ("kexec signatures", true),
            ("command line", true),
            ("region capacity", false),
            ("record room", true)
        ]
    );
    assert_eq!(v["error"]["kind"], "check-failed");
    assert_eq!(luod.status().state, State::Normal, "check changes nothing");
}
