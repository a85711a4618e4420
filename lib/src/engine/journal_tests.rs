//! `session preserve` through the record's journal: each preserve is one
//! entry appended after the newest record (no new generation), readers see
//! it at once, the next full write folds the journal in.

use super::test_support::host;
use super::*;
use crate::kernel::fake::FakeKernel;
use crate::kernel::memfd;
use crate::record::{MIN_ENTRIES_BEFORE_FOLD, RecordStore};
use crate::region::MemRegion;

fn engine() -> Engine<MemRegion> {
    let store = RecordStore::new(MemRegion::zeroed(4 << 20)).unwrap();
    Engine::open(Box::new(FakeKernel::new().0), Registry::new(), store, host()).unwrap()
}

fn preserve(e: &mut Engine<MemRegion>, session: &str, token: u64) -> Result<u64, EngineError> {
    let fd = memfd::from_bytes("t", &token.to_le_bytes()).unwrap();
    e.session_preserve(&Caller::ROOT, session, token, fd)
}

fn tokens(record: &HandoverRecord, session: usize) -> Vec<u64> {
    record.sessions[session].fds.iter().map(|f| f.token).collect()
}

/// The record a luod started on a copy of the region now would load.
fn loaded(e: &Engine<MemRegion>) -> (u64, HandoverRecord) {
    let image = MemRegion(e.store.region().0.clone());
    RecordStore::new(image).unwrap().load().unwrap().latest.unwrap()
}

#[test]
fn preserves_are_journaled_without_a_new_generation_and_are_in_the_region() {
    let mut e = engine();
    e.session_create(&Caller::ROOT, "vm0").unwrap();
    let generation = e.generation();
    for token in 1..=3 {
        assert_eq!(preserve(&mut e, "vm0", token).unwrap(), 8);
    }
    assert_eq!(e.generation(), generation, "no full write");
    assert_eq!(e.store.journal_entries(), 3);
    assert_eq!(tokens(e.record(), 0), [1, 2, 3]);
    let (g, record) = loaded(&e);
    assert_eq!(g, generation);
    assert_eq!(&record, e.record(), "the region holds what the engine holds");
}

#[test]
fn a_snapshot_keeps_what_it_saw_while_later_preserves_show_in_later_ones() {
    let mut e = engine();
    e.session_create(&Caller::ROOT, "vm0").unwrap();
    preserve(&mut e, "vm0", 1).unwrap();
    let first = e.snapshot();
    preserve(&mut e, "vm0", 2).unwrap();
    let second = e.snapshot();
    preserve(&mut e, "vm0", 3).unwrap();
    let files = |s: &Snapshot| -> Vec<u64> { s.session_list(&Caller::ROOT)[0].files.iter().map(|f| f.token).collect() };
    assert_eq!(files(&first), [1]);
    assert_eq!(files(&second), [1, 2]);
    assert_eq!(files(&e.snapshot()), [1, 2, 3]);
    assert_eq!(e.status(&Caller::ROOT).sessions[0].files.len(), 3);
}

#[test]
fn a_token_preserved_through_the_journal_is_refused_again_and_nothing_changes() {
    let mut e = engine();
    e.session_create(&Caller::ROOT, "vm0").unwrap();
    e.session_create(&Caller::ROOT, "vm1").unwrap();
    preserve(&mut e, "vm0", 5).unwrap();
    let region = e.store.region().0.clone();
    let record = e.record().clone();
    let err = preserve(&mut e, "vm0", 5).unwrap_err();
    assert_eq!(err.to_string(), "session vm0 already has a file under token 5");
    assert!(e.store.region().0 == region, "nothing written");
    assert_eq!(e.record(), &record);
    // The same token in another session is another file.
    preserve(&mut e, "vm1", 5).unwrap();
    assert_eq!((tokens(e.record(), 0), tokens(e.record(), 1)), (vec![5], vec![5]));
}

#[test]
fn the_next_full_write_folds_the_journal_in() {
    let mut e = engine();
    e.session_create(&Caller::ROOT, "vm0").unwrap();
    preserve(&mut e, "vm0", 1).unwrap();
    preserve(&mut e, "vm0", 2).unwrap();
    let generation = e.generation();
    e.session_create(&Caller::ROOT, "vm1").unwrap();
    assert_eq!(e.generation(), generation + 1);
    assert_eq!(e.store.journal_entries(), 0);
    let (g, record) = loaded(&e);
    assert_eq!(g, generation + 1);
    assert_eq!(tokens(&record, 0), [1, 2]);
    // Session positions changed with the full write; entries after it name
    // the new ones.
    e.session_finish(&Caller::ROOT, "vm0").unwrap();
    preserve(&mut e, "vm1", 9).unwrap();
    let (_, record) = loaded(&e);
    assert_eq!(record.sessions.len(), 1);
    assert_eq!((record.sessions[0].name.as_str(), tokens(&record, 0)), ("vm1", vec![9]));
}

#[test]
fn a_journal_that_took_its_share_is_folded_by_the_next_preserve() {
    let mut e = engine();
    e.session_create(&Caller::ROOT, "vm0").unwrap();
    let generation = e.generation();
    for token in 0..MIN_ENTRIES_BEFORE_FOLD {
        preserve(&mut e, "vm0", token).unwrap();
    }
    assert_eq!(e.generation(), generation);
    preserve(&mut e, "vm0", MIN_ENTRIES_BEFORE_FOLD).unwrap();
    assert_eq!(e.generation(), generation + 1, "a full write");
    assert_eq!(e.store.journal_entries(), 0);
    preserve(&mut e, "vm0", MIN_ENTRIES_BEFORE_FOLD + 1).unwrap();
    assert_eq!(e.store.journal_entries(), 1);
    let (_, record) = loaded(&e);
    assert_eq!(record.sessions[0].fds.len() as u64, MIN_ENTRIES_BEFORE_FOLD + 2);
    assert_eq!(&record, e.record());
}

#[test]
fn check_names_what_caps_the_number_of_files() {
    let mut e = engine();
    e.session_create(&Caller::ROOT, "vm0").unwrap();
    preserve(&mut e, "vm0", 1).unwrap();
    let report = e.check(&Caller::ROOT, &Default::default(), vec![]);
    let item = report.items.iter().find(|i| i.name == "record room").unwrap();
    assert!(item.ok, "{}", item.detail);
    let slot = e.store.slot_len();
    assert!(
        item.detail.starts_with(&format!(
            "the record takes {} bytes of payload (at most {slot}: the {slot}-byte slot, the 16 MiB payload limit) \
             and ",
            e.store.slot_use().unwrap().record - crate::record::HEADER_LEN as u64
        )),
        "{}",
        item.detail
    );
    assert!(
        item.detail.contains(" bytes of journal (1 entr(ies)); at "),
        "{}",
        item.detail
    );
    assert!(item.detail.contains("more file(s) fit (--region-size (for a new region)); luod holds each of the 1 preserved file(s) open once (1 descriptor(s)), of its limit of "), "{}", item.detail);
}

#[test]
fn check_is_not_ok_once_the_record_nears_its_slot() {
    // Slots of 4 KiB: a few hundred files fill one.
    let store = RecordStore::new(MemRegion::zeroed(8192)).unwrap();
    let mut e = Engine::open(Box::new(FakeKernel::new().0), Registry::new(), store, host()).unwrap();
    e.session_create(&Caller::ROOT, "vm0").unwrap();
    let mut token = 0;
    loop {
        let report = e.check(&Caller::ROOT, &Default::default(), vec![]);
        let item = report.items.iter().find(|i| i.name == "record room").unwrap().clone();
        match preserve(&mut e, "vm0", token) {
            Ok(_) => token += 1,
            Err(err) => {
                assert!(!item.ok, "check warned before the cap was hit: {}", item.detail);
                assert!(
                    err.to_string()
                        .starts_with("handover record: the region must be at least "),
                    "{err}"
                );
                assert_eq!(
                    e.record().sessions[0].fds.len() as u64,
                    token,
                    "the refused file is not recorded"
                );
                break;
            }
        }
    }
}
