//! A VMM reports on its VM (`VmReport`): a free-text detail and the VM's
//! blackout in the last live update, which `luoctl vm list` shows beside
//! luod's phase, and `finish` beside the name of a VM that blocks it.
//!
//! Only the uid whose VM it is, or root, may report; uid 65534 in the
//! socket's group cannot touch root's VM (it does not exist for it). A
//! report is bounded and one line, and never waits for a VM call in
//! progress. Runs as root, as CI does.

use liveupdate::kernel::memfd;
use liveupdate::protocol::client::{Client, VmConnection};
use liveupdate::protocol::{ErrorKind, MAX_VM_DETAIL, Request, Response, VmAnswer, VmCall};
use liveupdate::state::State;
use liveupdate_tests::attack::{self, NOBODY, Who};
use liveupdate_tests::*;
use std::os::fd::AsFd;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Registers VM `name` (4 KiB of RAM) and answers luod's calls on a thread;
/// `on_call` runs before each answer (it may report on another connection).
fn vmm(luod: &Luod, name: &str, on_call: impl Fn(VmCall) + Send + 'static) -> JoinHandle<Vec<VmCall>> {
    let ram = memfd::from_bytes(name, &[0x33; 4096]).expect("memfd");
    let client = Client::connect(&luod.socket(), "test-vmm").expect("connect");
    let mut conn: VmConnection = client.register_vm(name, &[(1, ram.as_fd())]).expect("register");
    std::thread::spawn(move || {
        let _ram = ram;
        let mut seen = Vec::new();
        while let Ok(Some(call)) = conn.next_call() {
            seen.push(call);
            on_call(call);
            let state = (call == VmCall::Freeze).then(|| b"regs".to_vec());
            if conn.answer(VmAnswer::Ok { state }).is_err() {
                break;
            }
        }
        seen
    })
}

/// Reports on VM `name` as root, on a connection of its own.
#[allow(clippy::result_large_err)] // a refusal is compared whole, as in the harness
fn report(luod: &Luod, name: &str, detail: Option<&str>, blackout_ms: Option<u64>) -> Reply<()> {
    let mut c = Client::connect(&luod.socket(), "test-report").expect("connect");
    match c.report_vm(name, detail, blackout_ms) {
        Ok(()) => Ok(()),
        Err(liveupdate::protocol::client::ClientError::Server(e)) => Err(*e),
        Err(e) => panic!("report on {name}: {e}"),
    }
}

/// `luoctl --json vm list` as root: each VM's JSON object, by name.
fn vms_json(luod: &Luod) -> Vec<serde_json::Value> {
    let (code, v) = luod.luoctl_json(&["vm", "list"]);
    assert_eq!(code, 0, "{v}");
    v["vms"].as_array().expect("vms").clone()
}

fn vm_json(luod: &Luod, name: &str) -> serde_json::Value {
    vms_json(luod)
        .into_iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("vm list shows {name}"))
}

#[test]
fn a_report_shows_in_vm_list_json_and_text_and_a_partial_report_keeps_the_rest() {
    let luod = Luod::started("8M");
    let _vm = vmm(&luod, "web", |_| {});

    let v = vm_json(&luod, "web");
    assert_eq!(v["phase"], "registered");
    let mut keys: Vec<&String> = v.as_object().expect("object").keys().collect();
    keys.sort();
    assert_eq!(keys, ["blackout_ms", "detail", "name", "owner_uid", "phase", "tokens"]);
    assert!(
        v["detail"].is_null() && v["blackout_ms"].is_null(),
        "null until reported: {v}"
    );
    let text = luod.luoctl_ok(&["vm", "list"]);
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        [
            "VM   OWNER  TOKENS  PHASE       BLACKOUT  DETAIL",
            "web  0      1       registered  -         -"
        ],
        "{text}"
    );

    report(&luod, "web", Some("QEMU 11.1.3, running"), Some(312)).expect("report");
    let v = vm_json(&luod, "web");
    assert_eq!(v["detail"], "QEMU 11.1.3, running");
    assert_eq!(v["blackout_ms"], 312);
    // A report without a blackout keeps the last update's blackout.
    report(&luod, "web", Some("QEMU 11.1.3, checkpointed 281 KB in 48 ms"), None).expect("report");
    let v = vm_json(&luod, "web");
    assert_eq!(v["detail"], "QEMU 11.1.3, checkpointed 281 KB in 48 ms");
    assert_eq!(v["blackout_ms"], 312);
    let text = luod.luoctl_ok(&["vm", "list"]);
    assert_eq!(
        text.lines().nth(1),
        Some("web  0      1       registered  312 ms    QEMU 11.1.3, checkpointed 281 KB in 48 ms"),
        "{text}"
    );
}

#[test]
fn a_detail_too_long_or_not_one_line_or_for_an_unknown_vm_is_refused_and_changes_nothing() {
    let luod = Luod::started("8M");
    let _vm = vmm(&luod, "web", |_| {});
    report(&luod, "web", Some("QEMU 10.0.2, running"), Some(5)).expect("report");

    let long = "x".repeat(MAX_VM_DETAIL + 1);
    let e = assert_refused(
        report(&luod, "web", Some(&long), Some(7)),
        ErrorKind::InvalidArgument,
        "the detail reported for VM web is 1025 bytes; luod keeps at most 1024",
    );
    assert_eq!(e.hint, "");
    assert_refused(
        report(&luod, "web", Some("line one\nline two"), None),
        ErrorKind::InvalidArgument,
        "the detail reported for VM web has a control character (a line break, a tab, ...); it must be one line \
         of text",
    );
    let e = assert_refused(
        report(&luod, "db", Some("QEMU 10.0.2, running"), None),
        ErrorKind::NotFound,
        "no VM named db",
    );
    assert_eq!(
        e.hint,
        "`luoctl vm list` shows the VMs you may see (yours; every VM for root)"
    );
    // Exactly the bound is kept.
    let v = vm_json(&luod, "web");
    assert_eq!(
        (v["detail"].as_str(), v["blackout_ms"].as_u64()),
        (Some("QEMU 10.0.2, running"), Some(5))
    );
    let max = "y".repeat(MAX_VM_DETAIL);
    report(&luod, "web", Some(&max), None).expect("1024 bytes are kept");
    assert_eq!(vm_json(&luod, "web")["detail"], max.as_str());
}

#[test]
fn a_report_sent_while_luod_waits_for_the_vmms_freeze_answer_is_answered_at_once() {
    let luod = Luod::new("8M").arg("--vm-timeout").arg("5").launched();
    let socket = luod.socket();
    let (tx, rx) = std::sync::mpsc::channel();
    let _vm = vmm(&luod, "web", move |call| {
        if call == VmCall::Freeze {
            // The QEMU launcher reports its checkpoint before it answers.
            let started = Instant::now();
            let mut c = Client::connect(&socket, "test-report").expect("connect");
            let r = c.report_vm("web", Some("checkpointed 4 KB in 1 ms"), None);
            let _ = tx.send((r.map_err(|e| e.to_string()), started.elapsed()));
        }
    });
    luod.luoctl_ok(&["prepare"]);
    luod.luoctl_ok(&["freeze"]);
    let (r, took) = rx.recv_timeout(Duration::from_secs(10)).expect("the VMM reported");
    assert_eq!(r, Ok(()));
    assert!(
        took < Duration::from_secs(1),
        "the report waited {took:?} for the freeze"
    );
    assert_eq!(luod.status().state, State::Frozen);
    assert_eq!(vm_json(&luod, "web")["detail"], "checkpointed 4 KB in 1 ms");
    luod.luoctl_ok(&["cancel"]);
}

#[test]
fn after_an_update_the_launcher_reports_a_failed_relaunch_which_vm_list_and_finish_show() {
    let mut luod = Luod::started("8M");
    let old = vmm(&luod, "web", |_| {});
    report(&luod, "web", Some("QEMU 11.1.3, running"), None).expect("report");
    let mut c = luod.client();
    c.prepare().expect("prepare");
    c.freeze().expect("freeze");
    c.reboot().expect("reboot");
    drop(c);
    luod.expect_kexec_exit();
    assert_eq!(old.join().expect("vmm"), [VmCall::Prepare, VmCall::Freeze]);
    luod.start();

    // luod keeps reports in memory: the new luod knows none yet.
    let v = vm_json(&luod, "web");
    assert_eq!(v["phase"], "awaiting-claim");
    assert!(v["detail"].is_null() && v["blackout_ms"].is_null(), "{v}");

    let why = "relaunch failed: cannot open disk /var/lib/vm/web.qcow2; RAM and state kept: fix and `systemctl \
               reload luo-qemu@web`, or `luoctl vm abandon web`";
    report(&luod, "web", Some(why), None).expect("report before the claim");
    assert_eq!(vm_json(&luod, "web")["detail"], why);
    let (code, stdout, stderr) = luod.luoctl_parts(&["finish"]);
    assert_eq!(code, 11, "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!("1 VM(s) of the update were not restored: web ({why})")),
        "finish names the VM and why: {stderr}"
    );
    assert_eq!(luod.status().state, State::Updated);

    let mut new = Client::connect(&luod.socket(), "new-vmm").expect("connect");
    new.claim_vm("web").expect("claim");
    report(&luod, "web", Some("QEMU 11.1.3, running"), Some(1234)).expect("report after the claim");
    let v = vm_json(&luod, "web");
    assert_eq!(v["phase"], "claimed");
    assert_eq!(
        (v["detail"].as_str(), v["blackout_ms"].as_u64()),
        (Some("QEMU 11.1.3, running"), Some(1234))
    );
    luod.luoctl_ok(&["finish"]);
    // After finish the VM registers again; its blackout of the update stays.
    let ram = memfd::from_bytes("web", &[0x33; 4096]).expect("memfd");
    let _conn = Client::connect(&luod.socket(), "new-vmm")
        .expect("connect")
        .register_vm("web", &[(1, ram.as_fd())])
        .expect("register again");
    let v = vm_json(&luod, "web");
    assert_eq!(
        (v["phase"].as_str(), v["blackout_ms"].as_u64()),
        (Some("registered"), Some(1234))
    );
}

#[test]
fn an_abandoned_vm_loses_its_report() {
    let luod = Luod::started("8M");
    let ram = memfd::from_bytes("web", &[1; 4096]).expect("memfd");
    let conn = Client::connect(&luod.socket(), "vmm")
        .expect("connect")
        .register_vm("web", &[(1, ram.as_fd())])
        .expect("register");
    report(&luod, "web", Some("QEMU 11.1.3, running"), Some(9)).expect("report");
    drop(conn);
    luod.luoctl_ok(&["vm", "abandon", "web"]);
    let _conn = Client::connect(&luod.socket(), "vmm")
        .expect("connect")
        .register_vm("web", &[(1, ram.as_fd())])
        .expect("register anew");
    let v = vm_json(&luod, "web");
    assert!(
        v["detail"].is_null() && v["blackout_ms"].is_null(),
        "a new VM of the same name starts blank: {v}"
    );
}

/// Sends `requests` on one connection as `who`, through the test client.
fn client_as(who: Who, luod: &Luod, requests: &[Request]) -> Vec<Reply<Response>> {
    let socket = luod.socket();
    let json: Vec<String> = requests
        .iter()
        .map(|r| serde_json::to_string(r).expect("request as JSON"))
        .collect();
    let mut args = vec![socket.to_str().expect("UTF-8 path")];
    args.extend(json.iter().map(String::as_str));
    let out = attack::command_as(who, &attack::test_client(luod.dir()), &args)
        .output()
        .expect("run the test client");
    assert!(
        out.status.success(),
        "the test client as {who:?} failed ({}): {}",
        out.status,
        attack::stderr(&out)
    );
    serde_json::from_slice(&out.stdout).expect("the client's JSON answers")
}

fn report_req(name: &str, detail: &str, blackout_ms: Option<u64>) -> Request {
    Request::VmReport {
        name: name.into(),
        detail: Some(detail.into()),
        blackout_ms,
    }
}

#[test]
fn uid_65534_cannot_report_on_roots_vm_but_reports_on_its_own_which_root_sees() {
    let luod = Luod::new("8M").arg("--socket-group").arg(NOBODY.to_string()).launched();
    attack::share(&luod);
    let _vm = vmm(&luod, "root-vm", |_| {});
    report(&luod, "root-vm", Some("QEMU 11.1.3, running"), Some(40)).expect("root reports");

    for who in [Who::Nobody, Who::NobodyInOwnUserns] {
        let answers = client_as(who, &luod, &[report_req("root-vm", "hijacked", Some(1))]);
        let [Err(e)] = answers.as_slice() else {
            panic!("{who:?}: refused: {answers:?}");
        };
        assert_eq!(
            (e.kind, e.message.as_str()),
            (ErrorKind::NotFound, "no VM named root-vm"),
            "{who:?}"
        );
    }
    let v = vm_json(&luod, "root-vm");
    assert_eq!(
        (v["detail"].as_str(), v["blackout_ms"].as_u64()),
        (Some("QEMU 11.1.3, running"), Some(40))
    );

    // uid 65534 registers a VM of its own (the connection closes: disconnected) and reports on it.
    let answers = client_as(
        Who::Nobody,
        &luod,
        &[Request::VmRegister {
            name: "nobody-vm".into(),
            tokens: vec![1],
        }],
    );
    assert!(matches!(answers.as_slice(), [Ok(Response::Done)]), "{answers:?}");
    let answers = client_as(
        Who::Nobody,
        &luod,
        &[
            report_req("nobody-vm", "QEMU 10.0.2, running", Some(77)),
            Request::VmList,
        ],
    );
    let [Ok(Response::Done), Ok(Response::Vms(seen))] = answers.as_slice() else {
        panic!("{answers:?}");
    };
    assert_eq!(seen.len(), 1, "uid 65534 sees only its own VM: {seen:?}");
    assert_eq!(
        (
            seen[0].name.as_str(),
            seen[0].owner_uid,
            seen[0].detail.as_deref(),
            seen[0].blackout_ms
        ),
        ("nobody-vm", NOBODY, Some("QEMU 10.0.2, running"), Some(77))
    );
    let v = vm_json(&luod, "nobody-vm");
    assert_eq!(v["detail"], "QEMU 10.0.2, running");
    // Root may report on any VM.
    report(&luod, "nobody-vm", Some("set by root"), None).expect("root reports on uid 65534's VM");
    assert_eq!(vm_json(&luod, "nobody-vm")["detail"], "set by root");
    assert_eq!(vm_json(&luod, "root-vm")["detail"], "QEMU 11.1.3, running");
}

#[test]
fn a_vms_blackout_outlives_the_moment_after_finish_when_it_is_not_listed_and_others_report() {
    let mut luod = Luod::started("8M");
    let a = vmm(&luod, "a", |_| {});
    let b = vmm(&luod, "b", |_| {});
    let mut c = luod.client();
    c.prepare().expect("prepare");
    c.reboot().expect("reboot");
    drop(c);
    luod.expect_kexec_exit();
    a.join().expect("vmm a");
    b.join().expect("vmm b");
    luod.start();
    let mut rams = Vec::new();
    for (name, ms) in [("a", 11), ("b", 22)] {
        let mut new = Client::connect(&luod.socket(), "new-vmm").expect("connect");
        rams.push(new.claim_vm(name).expect("claim").ram);
        report(&luod, name, Some("restored"), Some(ms)).expect("report");
    }
    luod.luoctl_ok(&["finish"]);
    // Neither VM is listed until its VMM registers again; a registers and
    // reports first: b's report stays.
    assert_eq!(vms_json(&luod), Vec::<serde_json::Value>::new());
    let ram = memfd::from_bytes("a", &[1; 4096]).expect("memfd");
    let _a = Client::connect(&luod.socket(), "vmm")
        .expect("connect")
        .register_vm("a", &[(1, ram.as_fd())])
        .expect("register a");
    report(&luod, "a", Some("running"), None).expect("report a");
    let ram_b = memfd::from_bytes("b", &[1; 4096]).expect("memfd");
    let _b = Client::connect(&luod.socket(), "vmm")
        .expect("connect")
        .register_vm("b", &[(1, ram_b.as_fd())])
        .expect("register b");
    let got: Vec<(String, Option<u64>)> = vms_json(&luod)
        .iter()
        .map(|v| (v["name"].as_str().expect("name").to_string(), v["blackout_ms"].as_u64()))
        .collect();
    assert_eq!(got, [("a".to_string(), Some(11)), ("b".to_string(), Some(22))]);
}
