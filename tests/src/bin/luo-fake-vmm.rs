//! A VMM without a VM, for tests of what sits above luod (the fleet
//! playbook test, `ansible/tests/test_rolling_local.py`): it does what
//! luo-qemu does with luod, minus QEMU.
//!
//! Usage: `luo-fake-vmm SOCKET NAME`. Registers VM NAME (4 KiB of "RAM")
//! and reports `fake VMM, running`; answers every call (at `freeze` its
//! state is the wall-clock time, in ns since the epoch, as text). When luod
//! goes away (a simulated kexec) it waits for luod to come back; in
//! `updated` it claims its VM, reports `fake VMM, restored` and the
//! blackout (now minus the time saved at `freeze`, in ms), waits for
//! `normal` and registers again. Runs until killed; prints one line per
//! event on stdout.

use liveupdate::protocol::client::{Client, VmConnection};
use liveupdate::protocol::{Request, Response, VmAnswer, VmCall};
use liveupdate::state::State;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn state(socket: &Path) -> Option<State> {
    let mut c = Client::connect(socket, "luo-fake-vmm").ok()?;
    match c.call(&Request::Status).ok()? {
        Response::Status(r) => Some(r.state),
        _ => None,
    }
}

fn report(socket: &Path, name: &str, detail: &str, blackout_ms: Option<u64>) {
    match Client::connect(socket, "luo-fake-vmm").and_then(|mut c| c.report_vm(name, Some(detail), blackout_ms)) {
        Ok(()) => println!("luo-fake-vmm: {name}: reported {detail:?} blackout_ms={blackout_ms:?}"),
        Err(e) => println!("luo-fake-vmm: {name}: report failed: {e}"),
    }
}

/// Answers luod's calls until the connection ends; the wall-clock time of
/// the last `freeze`, if the VM was frozen when it ended.
fn serve(mut conn: VmConnection) -> Option<u64> {
    let mut frozen_at = None;
    while let Ok(Some(call)) = conn.next_call() {
        let state = match call {
            VmCall::Freeze => {
                let now = wall_ns();
                frozen_at = Some(now);
                Some(now.to_string().into_bytes())
            }
            VmCall::Unfreeze | VmCall::Cancel => {
                frozen_at = None;
                None
            }
            VmCall::Prepare => None,
        };
        println!("luo-fake-vmm: {}: {}", conn.name(), call.as_str());
        if conn.answer(VmAnswer::Ok { state }).is_err() {
            break;
        }
    }
    frozen_at
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, name] = args.as_slice() else {
        eprintln!("usage: luo-fake-vmm SOCKET NAME");
        return std::process::ExitCode::from(2);
    };
    let socket = Path::new(socket);
    let mut ram: OwnedFd = liveupdate::kernel::memfd::from_bytes("luo-fake-vmm", &[0u8; 4096]).expect("memfd");
    loop {
        match state(socket) {
            Some(State::Normal) => {
                let registered =
                    Client::connect(socket, "luo-fake-vmm").and_then(|c| c.register_vm(name, &[(1, ram.as_fd())]));
                match registered {
                    Ok(conn) => {
                        println!("luo-fake-vmm: {name}: registered");
                        report(socket, name, "fake VMM, running", None);
                        serve(conn);
                    }
                    Err(e) => println!("luo-fake-vmm: {name}: register failed: {e}"),
                }
            }
            Some(State::Updated) => {
                let claimed = Client::connect(socket, "luo-fake-vmm").and_then(|mut c| c.claim_vm(name));
                match claimed {
                    Ok(vm) => {
                        let frozen_at: Option<u64> = String::from_utf8(vm.state).ok().and_then(|s| s.parse().ok());
                        let blackout_ms = frozen_at
                            .and_then(|t| wall_ns().checked_sub(t))
                            .map(|ns| ns / 1_000_000);
                        if let Some((_, fd)) = vm.ram.into_iter().next() {
                            ram = fd;
                        }
                        println!("luo-fake-vmm: {name}: claimed");
                        report(socket, name, "fake VMM, restored", blackout_ms);
                        while state(socket) == Some(State::Updated) {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                    Err(e) => {
                        println!("luo-fake-vmm: {name}: claim failed: {e}");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
