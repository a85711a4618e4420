//! Records written by released format versions must stay readable.
//!
//! `tests/fixtures/record-v{N}.bin` (at the workspace root) is a 64 KiB
//! region image written by format version N: slot A holds generation 1 (a
//! host in `prepared`), slot B generation 2 (the outgoing image at `reboot`,
//! with two data extents). Each is a contract: every later luod must load it
//! and find exactly the content below (a v1 record converted: no nonce, no
//! events; a v1 or v2 record converted: no previous kernel, rollback links,
//! validation, hook summaries or `booted`). Never regenerate one; a new format version adds the next file
//! beside them (see `docs/state-format.md`, "Compatibility").
//!
//! Each fixture was made once by `image` below while its version was the
//! current one (see `luod_still_writes_the_current_fixture_byte_for_byte`).

use liveupdate::names::SessionName;
use liveupdate::record::{
    Booted, Cycle, Event, FORMAT_VERSION, FdRecord, Handover, HandoverRecord, HookRun, JournalEntry, KernelImage,
    MAGIC, Outcome, RecordStore, Section, SessionRecord, SlotStatus, Timestamps, Update, Validation,
};
use liveupdate::region::{FileRegion, MemRegion};
use liveupdate::state::State;
use std::path::PathBuf;

const REGION_LEN: usize = 64 << 10;

/// Every format version with a fixture, oldest first.
const VERSIONS: [u32; 4] = [1, 2, 3, 4];

fn fixture_path(version: u32) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../tests/fixtures/record-v{version}.bin"))
}

/// The nonce the format 2 fixture carries (format 1 has none).
fn nonce(version: u32) -> Option<String> {
    (version >= 2).then(|| "5e1f0c2a9b7d4e36".to_string())
}

fn name(name: &str) -> SessionName {
    SessionName::new(name).expect("valid session name")
}

/// 2026-01-15T10:00:00Z in nanoseconds, and offsets from it.
const T0: u64 = 1_768_471_200_000_000_000;
const SECOND: u64 = 1_000_000_000;

fn target_kernel() -> KernelImage {
    KernelImage {
        kernel: "/boot/vmlinuz-7.3.0-1-amd64".into(),
        kernel_sha256: *b"\x4f\x1a\x02\xc3\x99\x10\xee\x07\x5b\x6d\x81\x3c\x20\xfa\x44\x9e\x0b\x77\xd2\x61\x13\xa8\x5e\xc0\x3f\x92\x6a\x18\xbd\x05\xe4\x71",
        initrd: Some("/boot/initrd.img-7.3.0-1-amd64".into()),
        initrd_sha256: Some([0x5a; 32]),
        cmdline: "console=ttyS0 liveupdate=on kho=on root=/dev/vda ro".into(),
    }
}

/// The kernel cycle 1 came from (format 3 on).
fn kernel_7_2_0_1() -> KernelImage {
    KernelImage {
        kernel: "/boot/vmlinuz-7.2.0-1-amd64".into(),
        kernel_sha256: [0x21; 32],
        initrd: Some("/boot/initrd.img-7.2.0-1-amd64".into()),
        initrd_sha256: Some([0x22; 32]),
        cmdline: "console=ttyS0 liveupdate=on".into(),
    }
}

fn hook(phase: &str, name: &str, ok: bool, status: &str, ms: u64, last_line: &str) -> HookRun {
    HookRun {
        phase: phase.into(),
        hook: name.into(),
        ok,
        status: status.into(),
        duration_ns: ms * 1_000_000,
        last_line: last_line.into(),
    }
}

fn history(version: u32) -> Vec<Cycle> {
    let v3 = version >= 3;
    vec![
        Cycle {
            id: 1,
            outcome: if v3 { Outcome::RolledBack } else { Outcome::Finished },
            target: Some(KernelImage {
                kernel: "/boot/vmlinuz-7.2.0-2-amd64".into(),
                kernel_sha256: [0x11; 32],
                initrd: None,
                initrd_sha256: None,
                cmdline: "console=ttyS0 liveupdate=on".into(),
            }),
            from_release: "7.2.0-1-amd64".into(),
            to_release: "7.2.0-2-amd64".into(),
            timestamps: Timestamps {
                prepared: Some(T0 - 86_400 * SECOND),
                freeze_started: Some(T0 - 86_400 * SECOND + 5 * SECOND),
                frozen: Some(T0 - 86_400 * SECOND + 5 * SECOND + 20_000_000),
                reboot: Some(T0 - 86_400 * SECOND + 5 * SECOND + 30_000_000),
                luod_started: Some(T0 - 86_400 * SECOND + 7 * SECOND),
                updated: Some(T0 - 86_400 * SECOND + 7 * SECOND + 400_000_000),
                finished: Some(T0 - 86_400 * SECOND + 60 * SECOND),
                cancelled: None,
            },
            sessions: 2,
            files: 3,
            bytes: 3 << 30,
            previous: v3.then(kernel_7_2_0_1),
            rollback_of: None,
            rolled_back_by: v3.then_some(3),
            validation: v3.then(|| Validation {
                hook: "50-vms-healthy".into(),
                reason: "vm web-01 does not answer ping".into(),
                accepted_by: Some(0),
                accepted_at: Some(T0 - 86_400 * SECOND + 55 * SECOND),
            }),
            hooks: if v3 {
                vec![
                    hook("pre-prepare", "10-drain", true, "exit 0", 1200, "drained"),
                    hook(
                        "post-update",
                        "50-vms-healthy",
                        false,
                        "exit 1",
                        3000,
                        "vm web-01 does not answer ping",
                    ),
                ]
            } else {
                Vec::new()
            },
        },
        Cycle {
            id: 2,
            outcome: Outcome::Cancelled,
            target: None,
            from_release: "7.2.0-2-amd64".into(),
            to_release: String::new(),
            timestamps: Timestamps {
                prepared: Some(T0 - 3600 * SECOND),
                cancelled: Some(T0 - 3500 * SECOND),
                ..Timestamps::default()
            },
            sessions: 0,
            files: 0,
            bytes: 0,
            previous: None,
            rollback_of: None,
            rolled_back_by: None,
            validation: None,
            hooks: if v3 {
                vec![hook(
                    "pre-freeze",
                    "20-quiesce",
                    false,
                    "timed out after 60s (luod --hook-timeout); killed",
                    60_000,
                    "",
                )]
            } else {
                Vec::new()
            },
        },
    ]
}

/// Generation 1, in slot A: host prepared, files preserved but not copied.
/// As a record of format `version` reads in the current model.
fn prepared_record(version: u32) -> HandoverRecord {
    HandoverRecord {
        state: State::Prepared,
        backend: "file".into(),
        handover: None,
        update: Some(Update {
            id: 3,
            from_release: "7.2.0-2-amd64".into(),
            target: Some(target_kernel()),
            timestamps: Timestamps {
                prepared: Some(T0),
                ..Timestamps::default()
            },
            nonce: nonce(version),
            previous: (version >= 3).then(|| KernelImage {
                kernel: "/boot/vmlinuz-7.2.0-2-amd64".into(),
                ..kernel_7_2_0_1()
            }),
            rollback_of: (version >= 3).then_some(1),
            validation: None,
            hooks: if version >= 3 {
                vec![hook("pre-prepare", "10-drain", true, "exit 0", 800, "drained")]
            } else {
                Vec::new()
            },
        }),
        sessions: vec![
            SessionRecord {
                name: name("vm-web-01"),
                owner_uid: 64055,
                fds: vec![
                    FdRecord {
                        token: 0x1000,
                        size: 3000,
                        data: None,
                        retrieved: false,
                    },
                    FdRecord {
                        token: 0x1001,
                        size: 100,
                        data: None,
                        retrieved: false,
                    },
                ],
                incoming: false,
            },
            SessionRecord {
                name: name("vm-db.02"),
                owner_uid: 64056,
                fds: Vec::new(),
                incoming: false,
            },
        ],
        subsystems: vec![
            Section {
                name: "vmm".into(),
                version: 2,
                blob: b"{\"vms\":[\"web-01\",\"db-02\"]}".to_vec(),
            },
            Section {
                name: "vfio".into(),
                version: 1,
                blob: vec![0, 1, 2, 3, 255],
            },
        ],
        extents: Vec::new(),
        history: history(version),
        live_updates: 1,
        next_cycle_id: 4,
        events: if version >= 2 {
            vec![Event {
                at: T0 - 3600 * SECOND,
                uid: 0,
                action: "session-evicted".into(),
                subject: "vm-old".into(),
                detail: "evicted by root: owner uid 64057 had left it behind".into(),
            }]
        } else {
            Vec::new()
        },
        booted: (version >= 3).then(|| Booted {
            boot_id: "0c9a4f6e-5b21-4d87-9e13-7a2f8b6c4d05".into(),
            cycle: 1,
            image: Some(KernelImage {
                kernel: "/boot/vmlinuz-7.2.0-2-amd64".into(),
                kernel_sha256: [0x11; 32],
                initrd: None,
                initrd_sha256: None,
                cmdline: "console=ttyS0 liveupdate=on".into(),
            }),
        }),
    }
}

/// Generation 2, in slot B: the outgoing image written at `reboot`, with the
/// two files copied into the region. `extents` is what the store set.
fn reboot_record(version: u32) -> HandoverRecord {
    let mut record = prepared_record(version);
    record.state = State::Frozen;
    record.handover = Some(Handover {
        boot_id: "2f6d3b1e-8c4a-4e9b-a1f0-5d7c9e3b2a18".into(),
        simulated: true,
        kernel_release: "7.2.0-2-amd64".into(),
        nonce: nonce(version),
    });
    if let Some(update) = record.update.as_mut() {
        update.timestamps.freeze_started = Some(T0 + 30 * SECOND);
        update.timestamps.frozen = Some(T0 + 30 * SECOND + 15_000_000);
        update.timestamps.reboot = Some(T0 + 30 * SECOND + 25_000_000);
    }
    record.sessions[0].fds[0].data = Some(0);
    record.sessions[0].fds[1].data = Some(1);
    record.subsystems[0].blob = b"{\"vms\":[\"web-01\",\"db-02\"],\"paused\":true}".to_vec();
    if version >= 4 {
        // The file the journal after generation 2 adds (`journal_entries`).
        record.sessions[1].fds.push(FdRecord {
            token: 7,
            size: 65536,
            data: None,
            retrieved: false,
        });
    }
    record
}

/// The journal appended after generation 2 in the format 4 fixture (format
/// 4 added the journal; the store does not judge whether a preserve fits the
/// record's state, so a fixture may carry one after a handover record).
fn journal_entries() -> [JournalEntry; 1] {
    [JournalEntry::Preserve {
        session: 1,
        token: 7,
        size: 65536,
    }]
}

/// Contents of the two preserved files.
fn guest_ram() -> Vec<u8> {
    (0..3000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect()
}

fn device_state() -> Vec<u8> {
    (0..100u8).map(|i| i ^ 0xa5).collect()
}

/// The extents as written into slot B of the fixture: slot B starts at
/// 32768, the record fits in its first 4096 bytes, each extent starts on a
/// 4096-byte boundary.
fn expected_extents() -> [(u64, u64, u32); 2] {
    [
        (32768 + 4096, 3000, crc32c::crc32c(&guest_ram())),
        (32768 + 8192, 100, crc32c::crc32c(&device_state())),
    ]
}

fn load_fixture(version: u32) -> Vec<u8> {
    std::fs::read(fixture_path(version))
        .unwrap_or_else(|e| panic!("tests/fixtures/record-v{version}.bin is in the repository: {e}"))
}

#[test]
fn every_fixture_loads_with_its_exact_content_and_data() {
    for version in VERSIONS {
        let image = load_fixture(version);
        assert_eq!(image.len(), REGION_LEN);
        let mut store = RecordStore::new(MemRegion(image)).unwrap();
        let report = store.load().unwrap();
        assert_eq!(
            report.slots,
            [SlotStatus::Valid { generation: 1 }, SlotStatus::Valid { generation: 2 }],
            "format {version}"
        );
        let (generation, record) = report.latest.expect("the fixture holds a record");
        assert_eq!(generation, 2);

        let mut expected = reboot_record(version);
        let extents: Vec<(u64, u64, u32)> = record.extents.iter().map(|e| (e.offset, e.len, e.crc32c)).collect();
        assert_eq!(extents, expected_extents(), "format {version}");
        expected.extents = record.extents.clone();
        assert_eq!(record, expected, "format {version}");

        assert_eq!(store.data(&record.extents[0]).unwrap(), guest_ram().as_slice());
        assert_eq!(store.data(&record.extents[1]).unwrap(), device_state().as_slice());
    }
}

#[test]
fn every_fixture_slot_a_holds_the_older_generation() {
    for version in VERSIONS {
        let mut image = load_fixture(version);
        // Damage slot B's header: the store falls back to slot A.
        image[REGION_LEN / 2 + 20] ^= 0xff;
        let mut store = RecordStore::new(MemRegion(image)).unwrap();
        let report = store.load().unwrap();
        assert_eq!(report.latest, Some((1, prepared_record(version))), "format {version}");
        assert!(
            matches!(&report.slots[1], SlotStatus::Invalid { reason } if reason.starts_with("record header checksum mismatch"))
        );
    }
}

#[test]
fn every_fixture_header_starts_with_magic_and_its_version() {
    for version in VERSIONS {
        let image = load_fixture(version);
        for start in [0, REGION_LEN / 2] {
            assert_eq!(image[start..start + 8], MAGIC);
            assert_eq!(image[start + 8..start + 12], version.to_le_bytes());
        }
    }
    // The newest fixture is the current format; FORMAT_VERSION may only grow.
    assert_eq!(VERSIONS.last(), Some(&FORMAT_VERSION));
}

#[test]
fn every_fixture_loads_from_a_file_region() {
    for version in VERSIONS {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("region");
        std::fs::copy(fixture_path(version), &path).unwrap();
        let mut store = RecordStore::new(FileRegion::open_existing(&path).unwrap()).unwrap();
        let (generation, record) = store.load().unwrap().latest.unwrap();
        assert_eq!(generation, 2);
        assert_eq!(store.data(&record.extents[1]).unwrap(), device_state().as_slice());
    }
}

#[test]
fn a_v1_record_rewritten_by_this_luod_becomes_the_current_format() {
    let mut store = RecordStore::new(MemRegion(load_fixture(1))).unwrap();
    let (_, mut record) = store.load().unwrap().latest.unwrap();
    record.state = State::Prepared;
    // Back to prepared: the files are no longer copied into the region.
    for fd in record.sessions.iter_mut().flat_map(|s| s.fds.iter_mut()) {
        fd.data = None;
    }
    store.write(&mut record, &[]).unwrap();
    let image = store.into_region().0;
    // Generation 3 went to slot A (slot B held the newest).
    assert_eq!(image[8..12], FORMAT_VERSION.to_le_bytes());
    let mut store = RecordStore::new(MemRegion(image)).unwrap();
    let (generation, reread) = store.load().unwrap().latest.unwrap();
    assert_eq!(generation, 3);
    assert_eq!(reread.state, State::Prepared);
    assert_eq!(reread.handover.as_ref().and_then(|h| h.nonce.clone()), None);
}

/// The image this version of luod writes for the fixture's records.
fn image(version: u32) -> Vec<u8> {
    let mut store = RecordStore::new(MemRegion::zeroed(REGION_LEN)).unwrap();
    store.write(&mut prepared_record(version), &[]).unwrap();
    let mut record = reboot_record(version);
    if version >= 4 {
        // Written without the file the journal adds after it.
        record.sessions[1].fds.pop();
    }
    store.write(&mut record, &[&guest_ram(), &device_state()]).unwrap();
    if version >= 4 {
        for entry in journal_entries() {
            assert!(store.append(&entry).unwrap(), "the journal takes the entry");
        }
    }
    store.into_region().0
}

/// luod still writes the current format's fixture byte for byte: an
/// encoding change that forgot to bump `FORMAT_VERSION` fails here. A new
/// format's fixture is made by this same function, once, with
/// `LUO_WRITE_FIXTURE=1 cargo test -p liveupdate --test record_compat`
/// (it refuses to overwrite an existing file: a released fixture never changes).
#[test]
fn luod_still_writes_the_current_fixture_byte_for_byte() {
    let path = fixture_path(FORMAT_VERSION);
    if !path.exists() && std::env::var_os("LUO_WRITE_FIXTURE").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, image(FORMAT_VERSION)).unwrap();
    }
    let committed = std::fs::read(&path).expect("the current format's fixture is committed");
    assert!(
        committed == image(FORMAT_VERSION),
        "format {FORMAT_VERSION} encoding changed without a FORMAT_VERSION bump"
    );
}

/// A record of format 3 or older has no journal: bytes after it were never
/// an end marker, so luod appends nothing after it and the first preserve is
/// a full write (in format 4), after which the journal is in use.
#[test]
fn a_record_of_an_older_format_takes_no_journal_until_rewritten() {
    for version in [1, 2, 3] {
        let mut store = RecordStore::new(MemRegion(load_fixture(version))).unwrap();
        let (_, mut record) = store.load().unwrap().latest.unwrap();
        let entry = JournalEntry::Preserve {
            session: 1,
            token: 7,
            size: 1,
        };
        let before = store.region().0.clone();
        assert!(!store.append(&entry).unwrap(), "format {version}");
        assert!(store.region().0 == before, "format {version}: nothing written");
        for fd in record.sessions.iter_mut().flat_map(|s| s.fds.iter_mut()) {
            fd.data = None;
        }
        store.write(&mut record, &[]).unwrap();
        assert!(
            store.append(&entry).unwrap(),
            "format {version} rewritten as {FORMAT_VERSION}"
        );
    }
}
