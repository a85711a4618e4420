//! VM tests: the engine drives VMMs over real socket pairs; each VMM is a
//! thread speaking the protocol (the same frames luod sends on its socket).

use super::*;
use crate::kernel::fake::FakeKernel;
use crate::kernel::memfd;
use crate::protocol::frame;
use crate::protocol::{ErrorKind, Request, Response, VmAnswer, VmCall};
use crate::region::MemRegion;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How a fake VMM behaves: the answer it gives to each call.
type Script = fn(VmCall) -> Option<VmAnswer>;

fn ok(call: VmCall) -> Option<VmAnswer> {
    let state = (call == VmCall::Freeze).then(|| b"regs".to_vec());
    Some(VmAnswer::Ok { state })
}

/// A VMM thread: answers calls with `script` (None: never answers), and
/// reports every call it got.
fn vmm(sock: UnixStream, script: Script, seen: mpsc::Sender<VmCall>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        while let Ok((Response::VmCall(call), _)) = frame::recv::<Response>(&sock) {
            let _ = seen.send(call);
            match script(call) {
                Some(answer) => {
                    if frame::send(&sock, &Request::VmAnswer(answer), &[]).is_err() {
                        return;
                    }
                }
                None => std::thread::sleep(Duration::from_secs(3)),
            }
        }
    })
}

fn host() -> HostInfo {
    HostInfo {
        boot_id: "b".into(),
        kernel_release: "r".into(),
        cmdline: String::new(),
        started: now(),
    }
}

fn open(store: RecordStore<MemRegion>) -> (Engine<MemRegion>, SharedVms) {
    let vms = SharedVms::default();
    let mut registry = Registry::new();
    registry
        .register(Box::new(Kvm::new(vms.clone(), Duration::from_millis(300))))
        .unwrap();
    let mut e = Engine::open(Box::new(FakeKernel::new().0), registry, store, host()).unwrap();
    e.set_vms(vms.clone());
    (e, vms)
}

fn register(e: &mut Engine<MemRegion>, name: &str, script: Script) -> (mpsc::Receiver<VmCall>, JoinHandle<()>) {
    let (luod_end, vmm_end) = UnixStream::pair().unwrap();
    let ram = memfd::from_bytes(name, &[7u8; 4096]).unwrap();
    e.vm_register(&Caller::ROOT, name, &[1], vec![ram], luod_end).unwrap();
    let (tx, rx) = mpsc::channel();
    (rx, vmm(vmm_end, script, tx))
}

fn calls(rx: &mpsc::Receiver<VmCall>) -> Vec<VmCall> {
    rx.try_iter().collect()
}

#[test]
fn a_vmm_veto_reaches_the_caller_and_no_vm_is_paused() {
    let (mut e, _) = open(RecordStore::new(MemRegion::zeroed(1 << 20)).unwrap());
    let (rx0, _t0) = register(&mut e, "vm0", ok);
    let (rx1, _t1) = register(&mut e, "vm1", |c| match c {
        VmCall::Prepare => Some(VmAnswer::Veto("guest is running a firmware update".into())),
        _ => ok(c),
    });
    let err = e.prepare(&Caller::ROOT, &PrepareArgs::default(), vec![]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Vetoed);
    assert_eq!(
        err.to_string(),
        "subsystem kvm failed prepare: vetoed: VM vm1: guest is running a firmware update"
    );
    assert_eq!(e.state(), State::Normal);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(calls(&rx0), [VmCall::Prepare, VmCall::Cancel]);
    assert_eq!(calls(&rx1), [VmCall::Prepare]);
}

#[test]
fn a_vmm_that_hangs_in_freeze_fails_it_and_the_other_vms_resume() {
    let (mut e, _) = open(RecordStore::new(MemRegion::zeroed(1 << 20)).unwrap());
    let (rx0, _t0) = register(&mut e, "vm0", ok);
    let (_rx1, _t1) = register(&mut e, "stuck", |c| if c == VmCall::Freeze { None } else { ok(c) });
    e.prepare(&Caller::ROOT, &PrepareArgs::default(), vec![]).unwrap();
    let started = std::time::Instant::now();
    let err = e.freeze(&Caller::ROOT).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2), "bounded by the VM timeout");
    assert_eq!(err.kind(), ErrorKind::SubsystemFailed);
    assert_eq!(
        err.to_string(),
        "subsystem kvm failed freeze: VM stuck: its VMM did not answer freeze within 0.3 s"
    );
    assert_eq!(e.state(), State::Prepared);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(calls(&rx0), [VmCall::Prepare, VmCall::Freeze, VmCall::Unfreeze]);
    assert_eq!(
        e.vm_list(&Caller::ROOT)
            .iter()
            .map(|v| v.phase.as_str())
            .collect::<Vec<_>>(),
        ["registered", "disconnected"]
    );
}

#[test]
fn a_vmm_that_dies_fails_the_step_naming_its_vm() {
    let (mut e, _) = open(RecordStore::new(MemRegion::zeroed(1 << 20)).unwrap());
    let (luod_end, vmm_end) = UnixStream::pair().unwrap();
    let ram = memfd::from_bytes("d", &[1u8; 10]).unwrap();
    e.vm_register(&Caller::ROOT, "dead", &[1], vec![ram], luod_end).unwrap();
    drop(vmm_end);
    let err = e.prepare(&Caller::ROOT, &PrepareArgs::default(), vec![]).unwrap_err();
    assert!(
        err.to_string().starts_with("subsystem kvm failed prepare: VM dead: "),
        "{err}"
    );
    assert_eq!(e.state(), State::Normal);
}

#[test]
fn a_vm_goes_through_the_update_and_its_new_vmm_claims_memory_and_state() {
    let (mut e, _) = open(RecordStore::new(MemRegion::zeroed(1 << 20)).unwrap());
    let (_rx, _t) = register(&mut e, "vm0", ok);
    e.prepare(&Caller::ROOT, &PrepareArgs::default(), vec![]).unwrap();
    e.freeze(&Caller::ROOT).unwrap();
    e.reboot(&Caller::ROOT).unwrap();

    let (mut e, _) = open(e.into_store());
    assert_eq!(e.state(), State::Updated);
    assert_eq!(e.vm_list(&Caller::ROOT)[0].phase, "awaiting-claim");
    let err = e.finish(&Caller::ROOT).unwrap_err();
    assert_eq!(err.to_string(), "1 VM(s) of the update were not restored: vm0");
    let Claimed { tokens, state, fds } = e.vm_claim(&Caller::ROOT, "vm0").unwrap();
    assert_eq!((tokens, state.as_slice()), (vec![1], b"regs".as_slice()));
    let mut ram = vec![0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::from(fds.into_iter().next().unwrap()), &mut ram, 0)
        .unwrap();
    assert!(ram.iter().all(|b| *b == 7), "guest RAM came through");
    assert_eq!(e.vm_list(&Caller::ROOT)[0].phase, "claimed");
    e.finish(&Caller::ROOT).unwrap();
}

#[test]
fn an_unclaimed_vm_can_be_abandoned_so_finish_goes_on() {
    let (mut e, _) = open(RecordStore::new(MemRegion::zeroed(1 << 20)).unwrap());
    let (_rx, _t) = register(&mut e, "gone", ok);
    e.prepare(&Caller::ROOT, &PrepareArgs::default(), vec![]).unwrap();
    e.reboot(&Caller::ROOT).unwrap();
    let (mut e, _) = open(e.into_store());
    assert!(e.finish(&Caller::ROOT).is_err());
    e.vm_abandon(&Caller::ROOT, "gone").unwrap();
    assert_eq!(e.vm_list(&Caller::ROOT)[0].phase, "abandoned");
    e.finish(&Caller::ROOT).unwrap();
}

#[test]
fn a_vm_whose_ram_is_not_a_memfd_is_refused_before_anything_is_paused() {
    let (mut e, vms) = open(RecordStore::new(MemRegion::zeroed(1 << 20)).unwrap());
    let (luod_end, _vmm_end) = UnixStream::pair().unwrap();
    let file = tempfile::tempfile().unwrap();
    let err = e
        .vm_register(&Caller::ROOT, "anon", &[1], vec![file.into()], luod_end)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("only memfds can be preserved"), "{err}");
    assert!(e.record().sessions.is_empty(), "the VM's session was rolled back");
    assert!(vms.lock().unwrap().is_empty());
}

/// A park that outlives one engine, as the holder process outlives luod.
#[derive(Debug, Clone, Default)]
struct SharedPark(Arc<Mutex<crate::holder::MemPark>>);

impl crate::holder::FdPark for SharedPark {
    fn put_shared(&mut self, key: &str, fd: &crate::holder::SharedFd) -> std::io::Result<()> {
        self.0.lock().unwrap().put_shared(key, fd)
    }
    fn remove(&mut self, key: &str) -> std::io::Result<()> {
        self.0.lock().unwrap().remove(key)
    }
    fn fetch_all(&mut self) -> std::io::Result<Vec<(String, OwnedFd)>> {
        self.0.lock().unwrap().fetch_all()
    }
    fn clear(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap().clear()
    }
}

fn open_parked(store: RecordStore<MemRegion>, park: &SharedPark) -> Engine<MemRegion> {
    use crate::kernel::emulated::{Emulated, KexecMode};
    let vms = SharedVms::default();
    let mut registry = Registry::new();
    registry
        .register(Box::new(Kvm::new(vms.clone(), Duration::from_millis(300))))
        .unwrap();
    let kernel = Emulated::new("file", KexecMode::Simulated, Some(Box::new(park.clone())));
    let mut e = Engine::open(Box::new(kernel), registry, store, host()).unwrap();
    e.set_vms(vms);
    e
}

#[test]
fn a_vmm_reconnecting_after_a_luod_restart_is_attached_to_its_vm() {
    let park = SharedPark::default();
    let mut e = open_parked(RecordStore::new(MemRegion::zeroed(1 << 20)).unwrap(), &park);
    let (_rx, _t) = register(&mut e, "vm0", ok);
    e.prepare(&Caller::ROOT, &PrepareArgs::default(), vec![]).unwrap();
    // luod restarts: the table is empty, the record has the VM's session,
    // the park has its memory.
    let mut e = open_parked(e.into_store(), &park);
    assert_eq!(e.state(), State::Prepared);
    let (luod_end, vmm_end) = UnixStream::pair().unwrap();
    let err = e
        .vm_register(&Caller::ROOT, "vm0", &[2], vec![], luod_end.try_clone().unwrap())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "other tokens: not the same VM");
    e.vm_register(&Caller::ROOT, "vm0", &[1], vec![], luod_end).unwrap();
    let (tx, rx) = mpsc::channel();
    let _t = vmm(vmm_end, ok, tx);
    e.freeze(&Caller::ROOT).unwrap();
    assert_eq!(calls(&rx), [VmCall::Freeze]);
}

#[test]
fn a_vmm_whose_connection_closed_is_listed_disconnected_before_any_call() {
    let (mut e, _) = open(RecordStore::new(MemRegion::zeroed(1 << 20)).unwrap());
    let (luod_end, vmm_end) = UnixStream::pair().unwrap();
    let ram = memfd::from_bytes("gone", &[1u8; 10]).unwrap();
    e.vm_register(&Caller::ROOT, "gone", &[1], vec![ram], luod_end).unwrap();
    let (_rx, _t) = register(&mut e, "alive", ok);
    let phases = |e: &Engine<MemRegion>| {
        e.vm_list(&Caller::ROOT)
            .into_iter()
            .map(|v| (v.name, v.phase))
            .collect::<Vec<_>>()
    };
    let both = |a: &str, b: &str| {
        vec![
            ("gone".to_string(), a.to_string()),
            ("alive".to_string(), b.to_string()),
        ]
    };
    assert_eq!(phases(&e), both("registered", "registered"));
    drop(vmm_end);
    assert_eq!(phases(&e), both("disconnected", "registered"));
    assert_eq!(phases(&e), both("disconnected", "registered"), "and it stays so");
}

fn hang_at_freeze(call: VmCall) -> Option<VmAnswer> {
    if call == VmCall::Freeze { None } else { ok(call) }
}

/// The call timeout `open` gives the `kvm` subsystem.
const TIMEOUT: Duration = Duration::from_millis(300);

#[test]
fn a_freeze_with_three_of_eight_vmms_hung_fails_after_one_timeout_and_the_others_resume() {
    let (mut e, _) = open(RecordStore::new(MemRegion::zeroed(1 << 20)).unwrap());
    let hung = ["vm1", "vm4", "vm6"];
    let vmms: Vec<_> = (0..8)
        .map(|k| {
            let name = format!("vm{k}");
            let script: Script = if hung.contains(&name.as_str()) {
                hang_at_freeze
            } else {
                ok
            };
            (name.clone(), register(&mut e, &name, script))
        })
        .collect();
    e.prepare(&Caller::ROOT, &PrepareArgs::default(), vec![]).unwrap();
    let started = std::time::Instant::now();
    let err = e.freeze(&Caller::ROOT).unwrap_err();
    let elapsed = started.elapsed();
    eprintln!("freeze, 8 VMs, 3 hung: failed after {elapsed:?} (VM timeout {TIMEOUT:?})");
    assert!(elapsed >= TIMEOUT, "waited for the deadline: {elapsed:?}");
    assert!(
        elapsed < 2 * TIMEOUT,
        "one timeout for all the hung VMMs, not one each: {elapsed:?}"
    );
    assert_eq!(err.kind(), ErrorKind::SubsystemFailed);
    assert_eq!(
        err.to_string(),
        "subsystem kvm failed freeze: VM vm1: its VMM did not answer freeze within 0.3 s; \
         VM vm4: its VMM did not answer freeze within 0.3 s; VM vm6: its VMM did not answer freeze within 0.3 s"
    );
    assert_eq!(e.state(), State::Prepared);
    std::thread::sleep(Duration::from_millis(50));
    for (name, (rx, _t)) in &vmms {
        let want: &[VmCall] = if hung.contains(&name.as_str()) {
            &[VmCall::Prepare, VmCall::Freeze]
        } else {
            &[VmCall::Prepare, VmCall::Freeze, VmCall::Unfreeze]
        };
        assert_eq!(calls(rx), want, "{name}");
    }
    let phases: Vec<_> = e.vm_list(&Caller::ROOT).into_iter().map(|v| v.phase).collect();
    assert_eq!(
        phases,
        [
            "registered",
            "disconnected",
            "registered",
            "registered",
            "disconnected",
            "registered",
            "disconnected",
            "registered"
        ]
    );
}

/// A VMM that takes `delay` to answer every call.
fn slow_vmm(sock: UnixStream, delay: Duration, seen: mpsc::Sender<VmCall>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        while let Ok((Response::VmCall(call), _)) = frame::recv::<Response>(&sock) {
            let _ = seen.send(call);
            std::thread::sleep(delay);
            if frame::send(&sock, &Request::VmAnswer(ok(call).unwrap()), &[]).is_err() {
                return;
            }
        }
    })
}

#[test]
fn eight_vmms_that_each_take_most_of_the_timeout_are_called_at_once_exactly_once_each() {
    let (mut e, _) = open(RecordStore::new(MemRegion::zeroed(1 << 20)).unwrap());
    // Each answers after 100 ms: one after the other, 8 of them would take
    // 0.8 s, more than twice the timeout.
    let delay = Duration::from_millis(100);
    let vmms: Vec<_> = (0..8)
        .map(|k| {
            let name = format!("vm{k}");
            let (luod_end, vmm_end) = UnixStream::pair().unwrap();
            let ram = memfd::from_bytes(&name, &[7u8; 4096]).unwrap();
            e.vm_register(&Caller::ROOT, &name, &[1], vec![ram], luod_end).unwrap();
            let (tx, rx) = mpsc::channel();
            (rx, slow_vmm(vmm_end, delay, tx))
        })
        .collect();
    for (step, want) in [("prepare", VmCall::Prepare), ("freeze", VmCall::Freeze)] {
        let started = std::time::Instant::now();
        if want == VmCall::Prepare {
            e.prepare(&Caller::ROOT, &PrepareArgs::default(), vec![]).unwrap();
        } else {
            e.freeze(&Caller::ROOT).unwrap();
        }
        let elapsed = started.elapsed();
        eprintln!("{step}, 8 VMs answering after {delay:?} each: {elapsed:?}");
        assert!(elapsed < TIMEOUT, "{step}: the VMs were called at once: {elapsed:?}");
        for (k, (rx, _)) in vmms.iter().enumerate() {
            assert_eq!(calls(rx), [want], "vm{k} got {step} exactly once");
        }
    }
    // Cancel from frozen: unfreeze every VM at once, then cancel every VM at once.
    let started = std::time::Instant::now();
    e.cancel(&Caller::ROOT).unwrap();
    let elapsed = started.elapsed();
    eprintln!("cancel (unfreeze + cancel), 8 VMs answering after {delay:?} each: {elapsed:?}");
    assert!(elapsed < 2 * TIMEOUT, "cancel: {elapsed:?}");
    for (k, (rx, _)) in vmms.iter().enumerate() {
        assert_eq!(calls(rx), [VmCall::Unfreeze, VmCall::Cancel], "vm{k}");
    }
}

#[test]
fn when_one_vmm_vetoes_the_others_are_cancelled_at_once() {
    let (mut e, _) = open(RecordStore::new(MemRegion::zeroed(1 << 20)).unwrap());
    let (veto_rx, _tv) = register(&mut e, "vm0", |c| match c {
        VmCall::Prepare => Some(VmAnswer::Veto("busy".into())),
        _ => ok(c),
    });
    let delay = Duration::from_millis(150);
    let others: Vec<_> = (1..6)
        .map(|k| {
            let name = format!("vm{k}");
            let (luod_end, vmm_end) = UnixStream::pair().unwrap();
            let ram = memfd::from_bytes(&name, &[7u8; 4096]).unwrap();
            e.vm_register(&Caller::ROOT, &name, &[1], vec![ram], luod_end).unwrap();
            let (tx, rx) = mpsc::channel();
            (rx, slow_vmm(vmm_end, delay, tx))
        })
        .collect();
    let started = std::time::Instant::now();
    let err = e.prepare(&Caller::ROOT, &PrepareArgs::default(), vec![]).unwrap_err();
    let elapsed = started.elapsed();
    // prepare (150 ms, in parallel) then cancel of the five (150 ms, in
    // parallel): one after the other it would be 5 x 150 ms for the undo alone.
    assert!(elapsed < Duration::from_millis(600), "{elapsed:?}");
    assert_eq!(err.kind(), ErrorKind::Vetoed);
    assert_eq!(err.to_string(), "subsystem kvm failed prepare: vetoed: VM vm0: busy");
    assert_eq!(e.state(), State::Normal);
    assert_eq!(calls(&veto_rx), [VmCall::Prepare]);
    for (k, (rx, _)) in others.iter().enumerate() {
        assert_eq!(calls(rx), [VmCall::Prepare, VmCall::Cancel], "vm{}", k + 1);
    }
}

#[test]
fn the_progress_report_names_the_vms_not_answered_yet() {
    assert_eq!(super::vms::pending_text(&["vm0".into()], "freeze"), "VM vm0 (freeze)");
    assert_eq!(
        super::vms::pending_text(&["vm0".into(), "vm3".into()], "freeze"),
        "VMs vm0, vm3 (freeze)"
    );
}

#[test]
fn while_a_freeze_waits_the_progress_report_names_only_the_vms_not_answered_yet() {
    let (mut e, _) = open(RecordStore::new(MemRegion::zeroed(1 << 20)).unwrap());
    let _vmms: Vec<_> = (0..4)
        .map(|k| {
            let script: Script = if k % 2 == 1 { hang_at_freeze } else { ok };
            register(&mut e, &format!("vm{k}"), script)
        })
        .collect();
    e.prepare(&Caller::ROOT, &PrepareArgs::default(), vec![]).unwrap();
    let cell = e.progress().clone();
    let _running = cell.clone().begin("freeze");
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (cell, done) = (cell.clone(), done.clone());
        std::thread::spawn(move || {
            let mut seen: Vec<String> = Vec::new();
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                if let Some(w) = cell.get().and_then(|p| p.waiting_for)
                    && seen.last() != Some(&w)
                {
                    seen.push(w);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            seen
        })
    };
    e.freeze(&Caller::ROOT).unwrap_err();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = watcher.join().unwrap();
    assert!(
        seen.iter().any(|w| w == "VMs vm1, vm3 (freeze)"),
        "the two hung VMs shown for most of the timeout: {seen:?}"
    );
    assert!(
        !seen
            .iter()
            .any(|w| w.contains("(freeze)") && w.contains("vm0") && w.contains("vm2") && !w.contains("vm1")),
        "an answered VM is never shown without the hung ones: {seen:?}"
    );
}
