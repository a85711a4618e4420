//! The start's decision on a handover record written by a real kexec's
//! `freeze` (reserved-memory backend, played by the fake kernel with a real
//! kexec): taken only by a boot whose command line carries the cycle's
//! nonce. A warm reset (same memory, another boot, no nonce) finds a stale
//! record: `normal`, a note, an event, nothing handed out, the record kept
//! aside. A record without a nonce (format 1) keeps the boot id rule.

use super::test_support::bzimage;
use super::*;
use crate::kernel::fake::FakeKernel;
use crate::kernel::memfd;
use crate::protocol::ErrorKind;
use crate::region::MemRegion;
use crate::subsystem::{Blob, PrepareContext, Subsystem, SubsystemError};
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};

/// The descriptors `prepare`/`check` get for a kernel image named as fd 0.
fn image_fds(image: &tempfile::NamedTempFile) -> Vec<std::os::fd::OwnedFd> {
    vec![std::fs::File::open(image.path()).unwrap().into()]
}

type Log = Arc<Mutex<Vec<String>>>;

/// A subsystem that logs its restore.
struct Probe(Log);

impl Subsystem for Probe {
    fn name(&self) -> &str {
        "probe"
    }
    fn prepare(&mut self, _: &PrepareContext) -> Result<Option<Blob>, SubsystemError> {
        Ok(Some(Blob {
            version: 1,
            data: b"prepared".to_vec(),
        }))
    }
    fn freeze(&mut self) -> Result<Option<Blob>, SubsystemError> {
        Ok(Some(Blob {
            version: 1,
            data: b"frozen".to_vec(),
        }))
    }
    fn cancel(&mut self) -> Result<(), SubsystemError> {
        Ok(())
    }
    fn unfreeze(&mut self) -> Result<(), SubsystemError> {
        Ok(())
    }
    fn restore(&mut self, blob: Option<&Blob>) -> Result<(), SubsystemError> {
        let data = blob.map(|b| String::from_utf8_lossy(&b.data).into_owned());
        self.0
            .lock()
            .unwrap()
            .push(format!("restore({})", data.unwrap_or_default()));
        Ok(())
    }
    fn finish(&mut self) -> Result<(), SubsystemError> {
        Ok(())
    }
}

const CMDLINE: &str = "console=ttyS0 memmap=16M$0x30000000";
const DATA: &[u8] = b"guest ram, 24 bytes long";

fn host(boot_id: &str, cmdline: &str) -> HostInfo {
    HostInfo {
        boot_id: boot_id.into(),
        kernel_release: "6.1.0-stock".into(),
        cmdline: cmdline.into(),
        started: now(),
    }
}

/// A luod of the reserved-memory kind (copies at freeze, real kexec) on `store`.
fn start(store: RecordStore<MemRegion>, host: HostInfo, state_dir: &std::path::Path, log: &Log) -> Engine<MemRegion> {
    let mut registry = Registry::new();
    registry.register(Box::new(Probe(log.clone()))).unwrap();
    let options = StartOptions {
        state_dir: Some(state_dir.to_path_buf()),
    };
    Engine::open_with(
        Box::new(FakeKernel::with_real_kexec().0),
        registry,
        store,
        host,
        options,
    )
    .unwrap()
}

/// Boot 1: a session with one file, prepare (`--reuse-cmdline`), freeze:
/// the handover is in the region. Returns the region and the cycle's nonce.
fn frozen_in_boot_1(state_dir: &std::path::Path, log: &Log) -> (RecordStore<MemRegion>, String) {
    let store = RecordStore::new(MemRegion::zeroed(1 << 20)).unwrap();
    let mut e = start(store, host("boot-1", CMDLINE), state_dir, log);
    e.session_create(&Caller::ROOT, "vm0").unwrap();
    let fd = memfd::from_bytes("t", DATA).unwrap();
    e.session_preserve(&Caller::ROOT, "vm0", 1, fd).unwrap();
    let image = bzimage();
    let report = e
        .prepare(
            &Caller::ROOT,
            &PrepareArgs {
                kernel: Some(crate::protocol::ImageFile {
                    fd: 0,
                    name: image.path().display().to_string(),
                }),
                reuse_cmdline: true,
                ..Default::default()
            },
            image_fds(&image),
        )
        .unwrap();
    e.freeze(&Caller::ROOT).unwrap();
    assert_eq!(e.state(), State::Frozen);
    let update = e.record().update.clone().unwrap();
    let nonce = update.nonce.clone().expect("prepare chose a nonce");
    assert_eq!(nonce.len(), 16);
    assert!(nonce.chars().all(|c| c.is_ascii_hexdigit()), "{nonce}");
    assert_eq!(
        update.target.unwrap().cmdline,
        format!("{CMDLINE} luod.handover={nonce}")
    );
    assert!(
        report.notes.contains(&format!(
            "the target command line carries luod.handover={nonce}: only a boot that shows it takes this update's handover"
        )),
        "{:?}",
        report.notes
    );
    let handover = e.record().handover.clone().expect("freeze wrote the handover");
    assert_eq!(handover.nonce.as_deref(), Some(nonce.as_str()));
    assert!(!handover.simulated);
    (e.into_store(), nonce)
}

fn aside_files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn a_boot_whose_command_line_carries_the_nonce_comes_up_updated_with_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::default();
    let (store, nonce) = frozen_in_boot_1(dir.path(), &log);
    let cmdline = format!("{CMDLINE} luod.handover={nonce}");
    let mut e = start(store, host("boot-2", &cmdline), dir.path(), &log);
    assert_eq!(e.state(), State::Updated);
    assert_eq!(*log.lock().unwrap(), ["restore(frozen)"]);
    let (fd, size) = e.session_retrieve(&Caller::ROOT, "vm0", 1).unwrap();
    assert_eq!(size, DATA.len() as u64);
    let mut buf = vec![0u8; DATA.len()];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::from(fd), &mut buf, 0).unwrap();
    assert_eq!(buf, DATA);
    assert!(e.record().events.is_empty());
    assert!(aside_files(dir.path()).is_empty(), "nothing kept aside");
    assert!(e.notes().iter().all(|n| !n.contains("stale")), "{:?}", e.notes());
}

/// Boot 2 after a warm reset: `cmdline` lacks the nonce (`why` says how).
fn stale_start(cmdline: &str, why: &str) {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::default();
    let (store, nonce) = frozen_in_boot_1(dir.path(), &log);
    let stale_bytes = store.newest_record_bytes().unwrap().to_vec();
    let stale_generation = store.latest_generation().unwrap();
    let frozen = {
        let mut s = RecordStore::new(MemRegion(store.region().0.clone())).unwrap();
        let (_, r) = s.load().unwrap().latest.unwrap();
        r.update.unwrap().timestamps.frozen.unwrap()
    };
    let mut e = start(store, host("boot-2", cmdline), dir.path(), &log);

    assert_eq!(e.state(), State::Normal);
    assert!(log.lock().unwrap().is_empty(), "no subsystem restored anything");
    assert!(e.record().sessions.is_empty());
    assert!(e.record().handover.is_none() && e.record().update.is_none());
    assert!(e.record().subsystems.is_empty() && e.record().extents.is_empty());
    let err = e.session_retrieve(&Caller::ROOT, "vm0", 1).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert_eq!(err.to_string(), "no session named vm0");
    assert!(e.status(&Caller::ROOT).sessions.is_empty());

    let aside = dir.path().join("stale-handover-boot-1.record");
    assert_eq!(aside_files(dir.path()), ["stale-handover-boot-1.record"]);
    assert_eq!(std::fs::read(&aside).unwrap(), stale_bytes);
    assert_eq!(std::fs::metadata(&aside).unwrap().permissions().mode() & 0o777, 0o600);

    let why = why.replace("NONCE", &nonce);
    let note = format!(
        "stale handover record not taken: it was written by boot boot-1 (kernel 6.1.0-stock) for update cycle 1, \
         handed over at {}, but this boot did not come from that kexec ({why}): a warm reset, crash or firmware \
         reboot after freeze. Nothing was handed out: the 1 preserved file(s) of its 1 session(s) and its subsystem \
         state were not restored, and luod starts in normal; the stale record is kept in {}",
        super::handover::utc(frozen),
        aside.display()
    );
    assert_eq!(e.notes(), std::slice::from_ref(&note));
    assert_eq!(e.status(&Caller::ROOT).notes, std::slice::from_ref(&note));
    let event = e.record().events.last().unwrap().clone();
    assert_eq!(
        (
            event.uid,
            event.action.as_str(),
            event.subject.as_str(),
            event.detail.as_str()
        ),
        (0, "stale-handover", "boot boot-1", note.as_str())
    );
    assert_eq!(e.generation(), stale_generation + 1);

    // The host goes on: a restart of luod in this boot keeps normal, says
    // nothing more, and the event stays on record; a new cycle works.
    let store = e.into_store();
    let mut e = start(store, host("boot-2", cmdline), dir.path(), &log);
    assert_eq!(e.state(), State::Normal);
    assert!(e.notes().is_empty(), "{:?}", e.notes());
    assert_eq!(e.record().events.len(), 1);
    assert_eq!(
        e.generation(),
        stale_generation + 1,
        "nothing to write on a plain restart"
    );
    e.session_create(&Caller::ROOT, "vm0").unwrap();
    let image = bzimage();
    e.prepare(
        &Caller::ROOT,
        &PrepareArgs {
            kernel: Some(crate::protocol::ImageFile {
                fd: 0,
                name: image.path().display().to_string(),
            }),
            cmdline: Some(cmdline.to_string()),
            ..Default::default()
        },
        image_fds(&image),
    )
    .unwrap();
    let update = e.record().update.clone().unwrap();
    let fresh = update.nonce.unwrap();
    assert_ne!(fresh, nonce);
    let target = update.target.unwrap().cmdline;
    assert!(target.ends_with(&format!(" luod.handover={fresh}")), "{target}");
    assert_eq!(target.matches("luod.handover=").count(), 1, "{target}");
}

#[test]
fn a_warm_reset_after_freeze_is_not_an_update_nothing_is_handed_out() {
    stale_start(CMDLINE, "this boot's command line has no luod.handover=NONCE");
}

#[test]
fn a_boot_with_another_cycles_nonce_is_not_this_update() {
    stale_start(
        &format!("{CMDLINE} luod.handover=0123456789abcdef"),
        "this boot's command line carries luod.handover=0123456789abcdef, not the record's NONCE",
    );
}

/// A handover without a nonce, as every format 1 record reads: the record
/// of boot 1 rewritten with `nonce: None` (same data).
fn frozen_without_nonce(state_dir: &std::path::Path, log: &Log) -> RecordStore<MemRegion> {
    let (mut store, _) = frozen_in_boot_1(state_dir, log);
    let (_, mut record) = store.load().unwrap().latest.unwrap();
    record.handover.as_mut().unwrap().nonce = None;
    record.update.as_mut().unwrap().nonce = None;
    let data = store.data(&record.extents[0]).unwrap().to_vec();
    store.write(&mut record, &[&data]).unwrap();
    store
}

#[test]
fn a_record_without_a_nonce_keeps_the_boot_id_rule() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::default();
    // Another boot, whatever its command line: the new kernel.
    let store = frozen_without_nonce(dir.path(), &log);
    let mut e = start(store, host("boot-2", CMDLINE), dir.path(), &log);
    assert_eq!(e.state(), State::Updated);
    assert_eq!(*log.lock().unwrap(), ["restore(frozen)"]);
    let (_, size) = e.session_retrieve(&Caller::ROOT, "vm0", 1).unwrap();
    assert_eq!(size, DATA.len() as u64);
    assert!(aside_files(dir.path()).is_empty());

    // The same boot: luod restarted while frozen, the kexec never happened.
    let log = Log::default();
    let store = frozen_without_nonce(dir.path(), &log);
    let e = start(store, host("boot-1", CMDLINE), dir.path(), &log);
    assert_eq!(e.state(), State::Frozen);
    assert!(log.lock().unwrap().is_empty());
    // (The fake kernel parks nothing, so its files are reported lost too.)
    assert_eq!(
        e.notes()[0],
        "a handover record was written but the kexec did not happen; still frozen"
    );
    assert!(e.record().events.is_empty());
    assert!(aside_files(dir.path()).is_empty());
}

#[test]
fn a_restart_in_the_boot_that_froze_stays_frozen_whatever_the_nonce() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::default();
    let (store, _) = frozen_in_boot_1(dir.path(), &log);
    let e = start(store, host("boot-1", CMDLINE), dir.path(), &log);
    assert_eq!(e.state(), State::Frozen);
    assert!(log.lock().unwrap().is_empty());
    assert!(e.record().events.is_empty());
    assert!(aside_files(dir.path()).is_empty());
}

#[test]
fn a_backend_that_copies_at_freeze_loads_the_target_itself() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::default();
    let store = RecordStore::new(MemRegion::zeroed(1 << 20)).unwrap();
    let mut e = start(store, host("boot-1", CMDLINE), dir.path(), &log);
    let generation = e.generation();
    let err = e
        .prepare(&Caller::ROOT, &PrepareArgs::default(), Vec::new())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert_eq!(
        err.to_string(),
        "the fake backend loads the target kernel itself, so that its command line carries this update's \
         luod.handover= nonce (an image loaded beforehand cannot prove that the next boot came from its kexec): \
         give --kernel K (--cmdline S | --reuse-cmdline)"
    );
    assert_eq!((e.state(), e.generation()), (State::Normal, generation));
    let check = e.check(&Caller::ROOT, &PrepareArgs::default(), Vec::new());
    let item = check.items.iter().find(|i| i.name == "target kernel").unwrap();
    assert!(!item.ok && item.detail == err.to_string(), "{item:?}");
}

#[test]
fn check_shows_where_the_nonce_goes_and_an_older_one_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::default();
    let store = RecordStore::new(MemRegion::zeroed(1 << 20)).unwrap();
    // This boot came from an earlier update: its command line has a nonce.
    let running = format!("{CMDLINE} luod.handover=00000000000000aa");
    let mut e = start(store, host("boot-1", &running), dir.path(), &log);
    let image = bzimage();
    let args = PrepareArgs {
        kernel: Some(crate::protocol::ImageFile {
            fd: 0,
            name: image.path().display().to_string(),
        }),
        reuse_cmdline: true,
        ..Default::default()
    };
    let check = e.check(&Caller::ROOT, &args, image_fds(&image));
    let item = check.items.iter().find(|i| i.name == "target kernel").unwrap();
    assert!(item.ok, "{item:?}");
    assert!(
        item.detail.ends_with(&format!(
            "cmdline \"{CMDLINE} luod.handover=<nonce>\" (prepare chooses the nonce: a boot whose command line lacks \
             it never takes the update's handover)"
        )),
        "{}",
        item.detail
    );
    e.prepare(&Caller::ROOT, &args, image_fds(&image)).unwrap();
    let update = e.record().update.clone().unwrap();
    assert_eq!(
        update.target.unwrap().cmdline,
        format!("{CMDLINE} luod.handover={}", update.nonce.unwrap())
    );
}
