//! Engine tests over the fake kernel and an in-memory region: the logic of
//! transitions, undo and persistence. The same paths run end to end against
//! luod in `tests/`.

use super::test_support::bzimage;
use super::test_support::host;
use super::*;
use crate::kernel::fake::{Failures, FakeKernel, Op};
use crate::kernel::{KernelError, memfd};
use crate::protocol::{ErrorKind, ImageFile};
use crate::record::Outcome;
use crate::region::MemRegion;
use crate::subsystem::{Blob, PrepareContext, Subsystem, SubsystemError};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

type Log = Arc<Mutex<Vec<String>>>;

struct Probe {
    name: &'static str,
    log: Log,
    veto: Option<&'static str>,
    fail_freeze: bool,
}

impl Probe {
    fn push(&self, what: &str) {
        self.log.lock().unwrap().push(format!("{}.{what}", self.name));
    }
}

impl Subsystem for Probe {
    fn name(&self) -> &str {
        self.name
    }
    fn prepare(&mut self, _: &PrepareContext) -> Result<Option<Blob>, SubsystemError> {
        self.push("prepare");
        match self.veto {
            Some(r) => Err(SubsystemError::Veto(r.into())),
            None => Ok(Some(Blob {
                version: 3,
                data: format!("{}-prepared", self.name).into_bytes(),
            })),
        }
    }
    fn freeze(&mut self) -> Result<Option<Blob>, SubsystemError> {
        self.push("freeze");
        if self.fail_freeze {
            return Err(SubsystemError::Failed("device did not quiesce".into()));
        }
        Ok(Some(Blob {
            version: 4,
            data: format!("{}-frozen", self.name).into_bytes(),
        }))
    }
    fn cancel(&mut self) -> Result<(), SubsystemError> {
        self.push("cancel");
        Ok(())
    }
    fn unfreeze(&mut self) -> Result<(), SubsystemError> {
        self.push("unfreeze");
        Ok(())
    }
    fn restore(&mut self, blob: Option<&Blob>) -> Result<(), SubsystemError> {
        let got = blob
            .map(|b| format!("v{}:{}", b.version, String::from_utf8_lossy(&b.data)))
            .unwrap_or_default();
        self.push(&format!("restore({got})"));
        Ok(())
    }
    fn finish(&mut self) -> Result<(), SubsystemError> {
        self.push("finish");
        Ok(())
    }
}

fn registry(log: &Log, veto: Option<&'static str>, fail_freeze: bool) -> Registry {
    let mut r = Registry::new();
    r.register(Box::new(Probe {
        name: "a",
        log: log.clone(),
        veto: None,
        fail_freeze: false,
    }))
    .unwrap();
    r.register(Box::new(Probe {
        name: "b",
        log: log.clone(),
        veto,
        fail_freeze,
    }))
    .unwrap();
    r
}

fn engine_on(
    store: RecordStore<MemRegion>,
    log: &Log,
    veto: Option<&'static str>,
    fail_freeze: bool,
) -> (Engine<MemRegion>, Failures) {
    let (kernel, failures) = FakeKernel::new();
    (
        Engine::open(Box::new(kernel), registry(log, veto, fail_freeze), store, host()).unwrap(),
        failures,
    )
}

fn new_engine(log: &Log) -> (Engine<MemRegion>, Failures) {
    engine_on(RecordStore::new(MemRegion::zeroed(8 << 20)).unwrap(), log, None, false)
}

fn take(log: &Log) -> Vec<String> {
    std::mem::take(&mut *log.lock().unwrap())
}

const USER: Caller = Caller {
    uid: 1000,
    pid: 1,
    privileged: false,
};

fn preserve(e: &mut Engine<MemRegion>, session: &str, token: u64, bytes: &[u8]) {
    let fd = memfd::from_bytes("t", bytes).unwrap();
    e.session_preserve(&Caller::ROOT, session, token, fd).unwrap();
}

#[test]
fn a_cycle_through_a_simulated_kexec_restores_files_and_sections() {
    let log = Log::default();
    let (mut e, _) = new_engine(&log);
    e.session_create(&Caller::ROOT, "vm0").unwrap();
    preserve(&mut e, "vm0", 1, b"guest ram");
    preserve(&mut e, "vm0", 2, b"");
    e.prepare(&Caller::ROOT, &PrepareArgs::default(), vec![]).unwrap();
    e.freeze(&Caller::ROOT).unwrap();
    let Rebooted::Simulated(report) = e.reboot(&Caller::ROOT).unwrap() else {
        panic!("a simulated kexec");
    };
    assert_eq!(
        (report.from, report.to, report.files, report.bytes),
        (State::Frozen, State::Updated, 2, 9)
    );
    assert_eq!(take(&log), ["a.prepare", "b.prepare", "a.freeze", "b.freeze"]);

    let (mut e, _) = engine_on(e.into_store(), &log, None, false);
    assert_eq!(e.state(), State::Updated);
    assert_eq!(take(&log), ["a.restore(v4:a-frozen)", "b.restore(v4:b-frozen)"]);
    let (fd, size) = e.session_retrieve(&Caller::ROOT, "vm0", 1).unwrap();
    assert_eq!(size, 9);
    let mut buf = vec![0u8; 9];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::from(fd), &mut buf, 0).unwrap();
    assert_eq!(buf, b"guest ram");
    let (_, size) = e.session_retrieve(&Caller::ROOT, "vm0", 2).unwrap();
    assert_eq!(size, 0);
    let u = e.record().update.clone().unwrap();
    assert!(blackout(&u.timestamps).is_some());
    e.finish(&Caller::ROOT).unwrap();
    assert_eq!(e.state(), State::Normal);
    assert!(e.record().sessions.is_empty());
    assert_eq!(e.record().live_updates, 1);
    let cycle = e.history().pop().unwrap();
    assert_eq!((cycle.outcome, cycle.files, cycle.bytes), (Outcome::Finished, 2, 9));
    assert_eq!(take(&log), ["a.finish", "b.finish"]);
}

#[test]
fn a_restart_in_updated_does_not_take_the_record_as_incoming_again() {
    let log = Log::default();
    let (mut e, _) = new_engine(&log);
    e.prepare(&Caller::ROOT, &PrepareArgs::default(), vec![]).unwrap();
    e.reboot(&Caller::ROOT).unwrap();
    let (e, _) = engine_on(e.into_store(), &log, None, false);
    let generation = e.generation();
    let (e, _) = engine_on(e.into_store(), &log, None, false);
    assert_eq!(e.state(), State::Updated);
    assert_eq!(e.generation(), generation, "nothing to write on a plain restart");
}

#[test]
fn a_veto_reaches_the_caller_and_leaves_the_host_in_normal() {
    let log = Log::default();
    let (mut e, _) = engine_on(
        RecordStore::new(MemRegion::zeroed(1 << 20)).unwrap(),
        &log,
        Some("VM vm7 is migrating"),
        false,
    );
    let generation = e.generation();
    let err = e.prepare(&Caller::ROOT, &PrepareArgs::default(), vec![]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Vetoed);
    assert_eq!(
        err.to_string(),
        "subsystem b failed prepare: vetoed: VM vm7 is migrating"
    );
    assert_eq!(take(&log), ["a.prepare", "b.prepare", "a.cancel"]);
    assert_eq!((e.state(), e.generation()), (State::Normal, generation));
}

#[test]
fn a_failing_freeze_unfreezes_the_earlier_subsystems_and_stays_prepared() {
    let log = Log::default();
    let (mut e, _) = engine_on(RecordStore::new(MemRegion::zeroed(1 << 20)).unwrap(), &log, None, true);
    e.prepare(&Caller::ROOT, &PrepareArgs::default(), vec![]).unwrap();
    take(&log);
    let generation = e.generation();
    let err = e.freeze(&Caller::ROOT).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::SubsystemFailed);
    assert_eq!(take(&log), ["a.freeze", "b.freeze", "a.unfreeze"]);
    assert_eq!((e.state(), e.generation()), (State::Prepared, generation));
}

#[test]
fn a_failing_reboot_unfreezes_back_to_prepared() {
    let log = Log::default();
    let (mut e, failures) = new_engine(&log);
    e.prepare(&Caller::ROOT, &PrepareArgs::default(), vec![]).unwrap();
    e.freeze(&Caller::ROOT).unwrap();
    take(&log);
    failures
        .lock()
        .unwrap()
        .insert(Op::Reboot, KernelError::Reboot("kexec image vanished".into()));
    let err = e.reboot(&Caller::ROOT).unwrap_err();
    assert_eq!(
        err.to_string(),
        "reboot failed, unfroze back to prepared: reboot failed: kexec image vanished"
    );
    assert_eq!(take(&log), ["b.unfreeze", "a.unfreeze"]);
    assert_eq!(e.state(), State::Prepared);
    assert!(e.record().handover.is_none());
    // A luod restarted now is still in prepared, not updated.
    let (e, _) = engine_on(e.into_store(), &log, None, false);
    assert_eq!(e.state(), State::Prepared);
}

#[test]
fn a_kernel_that_does_not_load_fails_prepare_and_changes_nothing() {
    let log = Log::default();
    let (mut e, failures) = new_engine(&log);
    let image = tempfile::NamedTempFile::new().unwrap();
    let mut bz = vec![0u8; 0x400];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    std::fs::write(image.path(), &bz).unwrap();
    failures.lock().unwrap().insert(
        Op::LoadKernel,
        KernelError::Load {
            path: "k".into(),
            reason: "Exec format error".into(),
        },
    );
    let args = kernel_args("/boot/vmlinuz-next", Some("quiet"));
    let generation = e.generation();
    let err = e.prepare(&Caller::ROOT, &args, open(image.path())).unwrap_err();
    assert_eq!(err.to_string(), "cannot load kernel k: Exec format error");
    assert!(take(&log).is_empty(), "no subsystem ran");
    assert_eq!((e.state(), e.generation()), (State::Normal, generation));

    failures.lock().unwrap().clear();
    e.prepare(&Caller::ROOT, &args, open(image.path())).unwrap();
    let update = e.record().update.clone().unwrap();
    let target = update.target.unwrap();
    assert_eq!(target.cmdline, format!("quiet luod.handover={}", update.nonce.unwrap()));
    assert_eq!(hex(&target.kernel_sha256).len(), 64);
}

#[test]
fn prepare_refuses_a_file_that_is_not_a_kernel_and_inconsistent_arguments() {
    let log = Log::default();
    let (mut e, _) = new_engine(&log);
    let not_kernel = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(not_kernel.path(), vec![0u8; 4096]).unwrap();
    let cases = [
        (kernel_args("k", Some("x")), 1, "not a bzImage"),
        (
            kernel_args("k", None),
            1,
            "--kernel needs --cmdline S or --reuse-cmdline",
        ),
        (
            PrepareArgs {
                reuse_cmdline: true,
                ..kernel_args("k", Some("x"))
            },
            1,
            "not both",
        ),
        (
            PrepareArgs {
                cmdline: Some("x".into()),
                ..Default::default()
            },
            0,
            "need --kernel",
        ),
    ];
    for (args, fds, want) in cases {
        let fds = if fds == 1 { open(not_kernel.path()) } else { vec![] };
        let err = e.prepare(&Caller::ROOT, &args, fds).unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert_eq!(e.state(), State::Normal);
    }
}

#[test]
fn cancel_from_frozen_unfreezes_then_cancels_in_reverse_order() {
    let log = Log::default();
    let (mut e, _) = new_engine(&log);
    e.session_create(&Caller::ROOT, "s").unwrap();
    preserve(&mut e, "s", 9, b"kept");
    e.prepare(&Caller::ROOT, &PrepareArgs::default(), vec![]).unwrap();
    e.freeze(&Caller::ROOT).unwrap();
    take(&log);
    e.cancel(&Caller::ROOT).unwrap();
    assert_eq!(take(&log), ["b.unfreeze", "a.unfreeze", "b.cancel", "a.cancel"]);
    assert_eq!(e.state(), State::Normal);
    assert_eq!(e.record().sessions[0].fds.len(), 1, "sessions stay preserved");
    assert_eq!(e.history().last().unwrap().outcome, Outcome::Cancelled);
    assert!(e.record().subsystems.is_empty());
}

#[test]
fn transitions_need_privilege_and_users_see_only_their_sessions() {
    let log = Log::default();
    let (mut e, _) = new_engine(&log);
    e.session_create(&Caller::ROOT, "root-s").unwrap();
    e.session_create(&USER, "user-s").unwrap();
    let err = e.prepare(&USER, &PrepareArgs::default(), vec![]).unwrap_err();
    assert_eq!(err.to_string(), "prepare needs root or CAP_SYS_BOOT");
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
    let names = |v: Vec<crate::protocol::SessionInfo>| v.into_iter().map(|s| s.name).collect::<Vec<_>>();
    assert_eq!(names(e.session_list(&USER)), ["user-s"]);
    assert_eq!(names(e.session_list(&Caller::ROOT)), ["root-s"]);
    assert_eq!(names(e.status(&USER).sessions), ["user-s"]);
    assert_eq!(names(e.status(&Caller::ROOT).sessions), ["root-s", "user-s"]);
    let err = e.session_finish(&USER, "root-s").unwrap_err();
    assert_eq!(err.to_string(), "no session named root-s");
    let err = e.session_create(&USER, "root-s").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
}

#[test]
fn finish_refuses_while_files_wait_to_be_retrieved() {
    let log = Log::default();
    let (mut e, _) = new_engine(&log);
    e.session_create(&Caller::ROOT, "s").unwrap();
    preserve(&mut e, "s", 1, b"a");
    preserve(&mut e, "s", 2, b"b");
    e.prepare(&Caller::ROOT, &PrepareArgs::default(), vec![]).unwrap();
    e.reboot(&Caller::ROOT).unwrap();
    let (mut e, _) = engine_on(e.into_store(), &log, None, false);
    e.session_retrieve(&Caller::ROOT, "s", 1).unwrap();
    let err = e.finish(&Caller::ROOT).unwrap_err();
    assert_eq!(err.to_string(), "1 preserved file(s) were not retrieved: s/2");
    assert_eq!(e.state(), State::Updated);
    let err = e.session_retrieve(&Caller::ROOT, "s", 1).unwrap_err();
    assert_eq!(err.to_string(), "session s token 1 was already retrieved");
    e.session_finish(&Caller::ROOT, "s").unwrap();
    e.finish(&Caller::ROOT).unwrap();
}

#[test]
fn session_requests_are_refused_while_a_cycle_is_in_flight() {
    let log = Log::default();
    let (mut e, _) = new_engine(&log);
    e.session_create(&Caller::ROOT, "s").unwrap();
    e.prepare(&Caller::ROOT, &PrepareArgs::default(), vec![]).unwrap();
    let generation = e.generation();
    let err = e.session_create(&Caller::ROOT, "t").unwrap_err();
    assert_eq!(err.to_string(), "creating a session is not allowed in state prepared");
    let fd = memfd::from_bytes("x", b"x").unwrap();
    let err = e.session_preserve(&Caller::ROOT, "s", 1, fd).unwrap_err();
    assert_eq!(err.to_string(), "preserving a file is not allowed in state prepared");
    let err = e.session_finish(&Caller::ROOT, "s").unwrap_err();
    assert_eq!(err.to_string(), "finishing a session is not allowed in state prepared");
    assert_eq!(e.generation(), generation);
}

#[test]
fn a_region_too_small_for_the_data_fails_the_reboot_not_the_host() {
    let log = Log::default();
    let (mut e, _) = engine_on(
        RecordStore::new(MemRegion::zeroed(256 << 10)).unwrap(),
        &log,
        None,
        false,
    );
    e.session_create(&Caller::ROOT, "s").unwrap();
    let fd = memfd::from_bytes("big", b"x").unwrap();
    let keep = fd.as_fd().try_clone_to_owned().unwrap();
    e.session_preserve(&Caller::ROOT, "s", 1, fd).unwrap();
    e.prepare(&Caller::ROOT, &PrepareArgs::default(), vec![]).unwrap();
    std::fs::File::from(keep).set_len(1 << 20).unwrap();
    let err = e.reboot(&Caller::ROOT).unwrap_err();
    assert!(
        err.to_string().starts_with("reboot failed, unfroze back to prepared: "),
        "{err}"
    );
    assert_eq!(e.state(), State::Prepared);
}

#[test]
fn a_record_of_a_newer_format_is_refused_and_never_overwritten() {
    let mut store = RecordStore::new(MemRegion::zeroed(1 << 20)).unwrap();
    store
        .write(&mut crate::record::HandoverRecord::new("fake"), &[])
        .unwrap();
    let mut bytes = store.into_region().0;
    // A next-format header: version at offset 8, header CRC-32C at 60 over 0..60.
    let newer = crate::record::FORMAT_VERSION + 1;
    bytes[8..12].copy_from_slice(&newer.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[..60]);
    bytes[60..64].copy_from_slice(&crc.to_le_bytes());
    let (kernel, _) = FakeKernel::new();
    let store = RecordStore::new(MemRegion(bytes)).unwrap();
    let err = Engine::open(Box::new(kernel), Registry::new(), store, host()).unwrap_err();
    assert!(matches!(err, EngineError::NewerRecord(v) if v == newer), "{err}");
    assert!(err.to_string().contains("starting would overwrite it"), "{err}");
}

#[test]
fn nothing_changes_once_the_handover_is_written() {
    let log = Log::default();
    let (mut e, _) = new_engine(&log);
    e.session_create(&Caller::ROOT, "s").unwrap();
    e.prepare(&Caller::ROOT, &PrepareArgs::default(), vec![]).unwrap();
    e.reboot(&Caller::ROOT).unwrap();
    assert!(e.handed_over());
    let generation = e.generation();
    let err = e.cancel(&Caller::ROOT).unwrap_err();
    assert_eq!(
        err.to_string(),
        "luod has handed over to the next kernel and is exiting; nothing can change now"
    );
    assert!(e.session_create(&Caller::ROOT, "t").is_err());
    assert!(e.session_finish(&Caller::ROOT, "s").is_err());
    assert_eq!(e.generation(), generation);
}

/// `prepare` arguments naming a kernel image sent as descriptor 0.
fn kernel_args(name: &str, cmdline: Option<&str>) -> PrepareArgs {
    PrepareArgs {
        kernel: Some(ImageFile {
            fd: 0,
            name: name.into(),
        }),
        cmdline: cmdline.map(Into::into),
        ..Default::default()
    }
}

/// `path` opened for reading, as the one descriptor of a request.
fn open(path: &std::path::Path) -> Vec<std::os::fd::OwnedFd> {
    vec![std::fs::File::open(path).unwrap().into()]
}

#[test]
fn the_target_command_line_must_carry_what_the_backend_needs() {
    let log = Log::default();
    let (mut e, _) = new_engine(&log);
    e.set_cmdline_needs(vec!["liveupdate=on".into(), "memmap=64M$0x30000000".into()]);
    // Any spelling of the same range will do.
    assert_eq!(
        e.missing_in_cmdline("liveupdate=on memmap=0x4000000$805306368"),
        Vec::<String>::new()
    );
    assert_eq!(
        e.missing_in_cmdline("console=ttyS0 memmap=64M$0x30000000"),
        ["liveupdate=on"]
    );

    let image = bzimage();
    let args = kernel_args("vmlinuz", Some("console=ttyS0"));
    let report = e.check(&Caller::ROOT, &args, open(image.path()));
    assert!(!report.ok);
    let cmdline = report.items.iter().find(|i| i.name == "command line").unwrap();
    assert!(
        !cmdline.ok && cmdline.detail.contains("liveupdate=on memmap=64M$0x30000000"),
        "{cmdline:?}"
    );
    let err = e.prepare(&Caller::ROOT, &args, open(image.path())).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("the target command line lacks liveupdate=on memmap=64M$0x30000000"),
        "{err}"
    );
    assert_eq!(e.state(), State::Normal);

    // --reuse-cmdline adds what is missing to the running command line.
    let reuse = PrepareArgs {
        kernel: args.kernel.clone(),
        reuse_cmdline: true,
        ..Default::default()
    };
    e.prepare(&Caller::ROOT, &reuse, open(image.path())).unwrap();
    let update = e.record().update.clone().unwrap();
    assert_eq!(
        update.target.unwrap().cmdline,
        format!(
            "console=ttyS0 liveupdate=on memmap=64M$0x30000000 luod.handover={}",
            update.nonce.unwrap()
        )
    );
}

#[test]
fn state_of_a_subsystem_the_new_luod_does_not_run_is_reported_not_dropped() {
    let log = Log::default();
    let (mut e, _) = new_engine(&log);
    e.prepare(&Caller::ROOT, &PrepareArgs::default(), vec![]).unwrap();
    e.reboot(&Caller::ROOT).unwrap();
    // The new luod runs only subsystem "a" (no "b").
    let mut registry = Registry::new();
    registry
        .register(Box::new(Probe {
            name: "a",
            log: log.clone(),
            veto: None,
            fail_freeze: false,
        }))
        .unwrap();
    let e = Engine::open(Box::new(FakeKernel::new().0), registry, e.into_store(), host()).unwrap();
    assert!(
        e.notes()
            .iter()
            .any(|n| n.starts_with("the record holds state of subsystem b, which this luod does not run")),
        "{:?}",
        e.notes()
    );
}
