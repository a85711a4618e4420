//! luod calls every VMM at once: a freeze with several hung VMMs fails after
//! one `--vm-timeout`, names every hung VM, and the other VMs are unfrozen.

use liveupdate::kernel::memfd;
use liveupdate::protocol::client::Client;
use liveupdate::protocol::{VmAnswer, VmCall};
use liveupdate::state::State;
use liveupdate_tests::Luod;
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Registers VM `name`; its VMM reports every call on `seen` and answers
/// it, except `freeze` when `hang` (then it keeps the connection open and
/// answers nothing until `stop` is dropped).
fn vmm(luod: &Luod, name: &str, hang: bool, seen: mpsc::Sender<(String, VmCall)>, stop: mpsc::Receiver<()>) {
    let ram = memfd::from_bytes(name, &[7; 4096]).expect("memfd");
    let client = Client::connect(&luod.socket(), "test-vmm").expect("connect");
    let mut conn = client.register_vm(name, &[(1, ram.as_fd())]).expect("register");
    let name = name.to_string();
    std::thread::spawn(move || {
        let _ram = ram;
        while let Ok(Some(call)) = conn.next_call() {
            let _ = seen.send((name.clone(), call));
            if hang && call == VmCall::Freeze {
                let _ = stop.recv();
                return;
            }
            let state = (call == VmCall::Freeze).then(|| b"regs".to_vec());
            if conn.answer(VmAnswer::Ok { state }).is_err() {
                return;
            }
        }
    });
}

#[test]
fn a_freeze_with_two_of_eight_vmms_hung_fails_after_one_timeout_and_unfreezes_the_others() {
    let luod = Luod::new("8M").arg("--vm-timeout").arg("1").launched();
    let hung = ["vm2", "vm5"];
    let (tx, rx) = mpsc::channel();
    let mut stops = Vec::new();
    for k in 0..8 {
        let name = format!("vm{k}");
        let (stop_tx, stop_rx) = mpsc::channel();
        stops.push(stop_tx);
        vmm(&luod, &name, hung.contains(&name.as_str()), tx.clone(), stop_rx);
    }
    let out = luod.luoctl(&["prepare"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));

    let started = Instant::now();
    let out = luod.luoctl(&["freeze"]);
    let elapsed = started.elapsed();
    eprintln!("luoctl freeze, 8 VMs, 2 hung, --vm-timeout 1: exited after {elapsed:?}");
    assert_eq!(out.status.code(), Some(14), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        elapsed >= Duration::from_secs(1),
        "waited for the deadline: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(2),
        "one timeout for both hung VMMs: {elapsed:?}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "VM vm2: its VMM did not answer freeze within 1 s; VM vm5: its VMM did not answer freeze within 1 s"
        ),
        "{stderr}"
    );

    let asked = Instant::now();
    assert_eq!(luod.status().state, State::Prepared);
    assert!(asked.elapsed() < Duration::from_secs(1), "status answers promptly");
    std::thread::sleep(Duration::from_millis(100));
    let mut got: Vec<(String, VmCall)> = rx.try_iter().collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    for k in 0..8 {
        let name = format!("vm{k}");
        let calls: Vec<VmCall> = got.iter().filter(|(n, _)| *n == name).map(|(_, c)| *c).collect();
        let want: &[VmCall] = if hung.contains(&name.as_str()) {
            &[VmCall::Prepare, VmCall::Freeze]
        } else {
            &[VmCall::Prepare, VmCall::Freeze, VmCall::Unfreeze]
        };
        assert_eq!(calls, want, "{name}");
    }
    let out = luod.luoctl(&["--json", "vm", "list"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let phases: Vec<(String, String)> = v["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .map(|vm| {
            (
                vm["name"].as_str().unwrap().to_string(),
                vm["phase"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (name, phase) in phases {
        let want = if hung.contains(&name.as_str()) {
            "disconnected"
        } else {
            "registered"
        };
        assert_eq!(phase, want, "{name}");
    }
    drop(stops);
}
