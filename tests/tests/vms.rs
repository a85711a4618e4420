//! VMs end to end through luod: a VMM registers its VM over luod's socket,
//! luod calls it at prepare and freeze, and after the (simulated) kexec a new
//! VMM claims the VM's memory and state.

use liveupdate::kernel::memfd;
use liveupdate::protocol::client::{Client, VmConnection};
use liveupdate::protocol::{VmAnswer, VmCall};
use liveupdate::state::State;
use liveupdate_tests::Luod;
use std::os::fd::AsFd;
use std::thread::JoinHandle;

/// Registers VM `name` (4 KiB of RAM filled with `fill`) and answers luod's
/// calls on a thread with `answer`.
fn vmm(luod: &Luod, name: &str, fill: u8, answer: fn(VmCall) -> VmAnswer) -> JoinHandle<Vec<VmCall>> {
    let ram = memfd::from_bytes(name, &[fill; 4096]).expect("memfd");
    let client = Client::connect(&luod.socket(), "test-vmm").expect("connect");
    let mut conn: VmConnection = client.register_vm(name, &[(1, ram.as_fd())]).expect("register");
    std::thread::spawn(move || {
        let _ram = ram;
        let mut seen = Vec::new();
        while let Ok(Some(call)) = conn.next_call() {
            seen.push(call);
            if conn.answer(answer(call)).is_err() {
                break;
            }
        }
        seen
    })
}

fn ok(call: VmCall) -> VmAnswer {
    VmAnswer::Ok {
        state: (call == VmCall::Freeze).then(|| b"vcpu registers".to_vec()),
    }
}

#[test]
fn a_vmm_veto_reaches_luoctl_prepare_and_the_host_stays_normal() {
    let luod = Luod::started("8M");
    let _vm = vmm(&luod, "vm0", 1, |c| match c {
        VmCall::Prepare => VmAnswer::Veto("live migration in progress".into()),
        other => ok(other),
    });
    let out = luod.luoctl(&["prepare"]);
    assert_eq!(out.status.code(), Some(13), "the veto exit code");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("vetoed: VM vm0: live migration in progress"),
        "{stderr}"
    );
    assert_eq!(luod.status().state, State::Normal);
    let list = luod.luoctl(&["vm", "list"]);
    let stdout = String::from_utf8_lossy(&list.stdout);
    assert!(stdout.contains("vm0") && stdout.contains("registered"), "{stdout}");
}

#[test]
fn a_vm_survives_the_simulated_kexec_and_its_new_vmm_claims_it() {
    let mut luod = Luod::started("8M");
    let old_vmm = vmm(&luod, "vm0", 0x5a, ok);
    let mut c = luod.client();
    c.prepare().expect("prepare");
    c.freeze().expect("freeze");
    c.reboot().expect("reboot");
    drop(c);
    luod.expect_kexec_exit();
    assert_eq!(old_vmm.join().expect("vmm thread"), [VmCall::Prepare, VmCall::Freeze]);

    luod.start();
    assert_eq!(luod.status().state, State::Updated);
    let out = luod.luoctl(&["finish"]);
    assert_eq!(out.status.code(), Some(11), "finish waits for the VM");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("1 VM(s) of the update were not restored: vm0"),
        "{stderr}"
    );
    assert!(
        stderr.contains("luoctl vm abandon NAME"),
        "says how to give up on it: {stderr}"
    );

    let mut new_vmm = Client::connect(&luod.socket(), "new-vmm").expect("connect");
    let liveupdate::protocol::client::ClaimedVm { ram, state } = new_vmm.claim_vm("vm0").expect("claim");
    assert_eq!(state, b"vcpu registers");
    assert_eq!(ram.len(), 1);
    let mut bytes = vec![0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::from(ram.into_iter().next().unwrap().1), &mut bytes, 0)
        .expect("read RAM");
    assert!(bytes.iter().all(|b| *b == 0x5a), "guest RAM intact");
    let out = luod.luoctl(&["finish"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_vm_nobody_claims_is_abandoned_with_luoctl_and_finish_goes_on() {
    let mut luod = Luod::started("8M");
    let _vm = vmm(&luod, "lost", 3, ok);
    let mut c = luod.client();
    c.prepare().expect("prepare");
    c.reboot().expect("reboot");
    drop(c);
    luod.expect_kexec_exit();
    luod.start();
    let out = luod.luoctl(&["vm", "abandon", "lost"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = luod.luoctl(&["--json", "vm", "list"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["vms"][0]["phase"], "abandoned");
    assert!(luod.luoctl(&["finish"]).status.success());
}
