//! luod started on a damaged region never crashes: a damaged newest record
//! falls back to the previous generation; a region with no valid record at
//! all (truncated, random bytes) is left untouched, `status` notes say why,
//! and changes are refused until `discard-record` starts a fresh record
//! (the parked-files side of this is `safety_record.rs`).
//!
//! The region holds two slots (A at offset 0, B at half the region, rounded
//! down to 4096), each `[64-byte header | postcard payload | data]`; the
//! header's `payload_len` is the little-endian u64 at offset 32. See
//! `docs/state-format.md`.

use liveupdate::record::{HEADER_LEN, RecordStore, SlotStatus};
use liveupdate::region::MemRegion;
use liveupdate::state::State;
use liveupdate_tests::*;
use std::os::fd::AsFd;
use std::process::ExitStatus;

const REGION: &str = "1M";

/// A region image whose newest record is generation 4 (`frozen`, sessions
/// `first` and `second`) and whose other slot holds generation 3
/// (`prepared`, the same sessions). luod is stopped.
fn region_at_generation_4() -> Vec<u8> {
    let mut luod = Luod::started(REGION);
    let mut c = luod.client();
    c.create("first").expect("create first"); // generation 1
    c.create("second").expect("create second"); // 2
    c.prepare().expect("prepare"); // 3
    c.freeze().expect("freeze"); // 4
    assert_eq!(c.status().generation, 4);
    drop(c);
    assert!(luod.stop().success());
    std::fs::read(luod.region()).expect("read the region")
}

/// Where the newest record's slot starts, and its payload length.
fn newest_slot(image: &[u8]) -> (usize, usize) {
    let mut store = RecordStore::new(MemRegion(image.to_vec())).expect("a region image");
    let report = store.load().expect("load");
    let generation = |s: &SlotStatus| match s {
        SlotStatus::Valid { generation } => *generation,
        other => panic!("both slots should be valid: {other:?}"),
    };
    let newest = if generation(&report.slots[0]) > generation(&report.slots[1]) {
        0
    } else {
        1
    };
    let start = newest * store.slot_len() as usize;
    let payload_len = u64::from_le_bytes(image[start + 32..start + 40].try_into().unwrap());
    (start, payload_len as usize)
}

/// A stopped luod whose region file is `image`.
fn luod_on(image: &[u8]) -> Luod {
    let luod = Luod::new(REGION);
    std::fs::write(luod.region(), image).expect("write the region");
    luod
}

/// Stops luod and checks that it exits cleanly (it did not crash meanwhile).
#[track_caller]
fn assert_clean_stop(luod: &mut Luod) {
    assert!(luod.is_running(), "luod still runs");
    let status: ExitStatus = luod.stop();
    assert!(status.success(), "luod exit: {status}");
}

#[test]
fn a_newest_record_with_any_byte_flipped_falls_back_to_the_previous_generation() {
    let image = region_at_generation_4();
    let (slot, payload_len) = newest_slot(&image);
    let header = [
        ("magic", 0),
        ("format version", 8),
        ("flags", 12),
        ("generation", 16),
        ("region length", 24),
        ("payload length", 32),
        ("payload checksum", 40),
        ("reserved", 44),
        ("header checksum", 60),
        ("last header byte", HEADER_LEN - 1),
    ];
    let payload = [
        ("first payload byte", HEADER_LEN),
        ("middle of the payload", HEADER_LEN + payload_len / 2),
        ("last payload byte", HEADER_LEN + payload_len - 1),
    ];
    for (what, offset) in header.into_iter().chain(payload) {
        let mut damaged = image.clone();
        damaged[slot + offset] ^= 0x01;
        let mut luod = luod_on(&damaged);
        luod.start();
        let status = luod.status();
        assert_eq!(
            (status.state, status.generation),
            (State::Prepared, 3),
            "{what} (byte {offset} of the newest slot) flipped: state and generation"
        );
        let names: Vec<_> = status.sessions.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["first", "second"], "{what} flipped: sessions");
        // The host can go on from there.
        let mut c = luod.client();
        c.freeze()
            .unwrap_or_else(|e| panic!("{what} flipped: freeze from generation 3: {e}"));
        assert_eq!(
            c.status().generation,
            4,
            "{what} flipped: the next write is generation 4"
        );
        drop(c);
        assert_clean_stop(&mut luod);
    }
}

/// luod started on `image` is in `normal` with nothing, says why, refuses
/// changes and writes nothing; `discard-record` starts a fresh record that
/// works. Returns the luod, running.
#[track_caller]
fn assert_kept_until_discarded(image: &[u8], finding: &str) -> Luod {
    let mut luod = luod_on(image);
    luod.start();
    let status = luod.status();
    assert_eq!(status.state, State::Normal);
    assert_eq!(status.generation, 0);
    assert!(status.sessions.is_empty(), "nothing visible: {:?}", status.sessions);
    assert_eq!(status.last_cycle, None);
    let note = status
        .notes
        .iter()
        .find_map(|n| n.strip_prefix("the handover record cannot be read: "))
        .unwrap_or_else(|| panic!("a note says the record cannot be read: {:?}", status.notes));
    assert!(note.contains(finding), "note: {note}");
    let mut c = luod.client();
    let e = c.create("fresh").expect_err("changes are refused");
    assert_eq!(e.kind, liveupdate::protocol::ErrorKind::Record);
    assert_eq!(std::fs::read(luod.region()).unwrap(), image, "the region is untouched");
    // The operator gives it up; the region is usable from there.
    match c.call(&liveupdate::protocol::Request::DiscardRecord) {
        Ok(liveupdate::protocol::Response::RecordDiscarded(r)) => assert_eq!((r.files, r.generation), (0, 1)),
        other => panic!("discard-record answered {other:?}"),
    }
    c.create("fresh").expect("a session on the fresh region");
    c.preserve("fresh", 1, memfd_with("fresh", b"fresh").as_fd())
        .expect("preserve");
    assert_eq!(
        c.status().generation,
        2,
        "discarded at 1, the session at 2; the file is a journal entry"
    );
    drop(c);
    luod
}

#[test]
fn a_region_full_of_random_bytes_is_kept_until_discarded() {
    let mut luod = assert_kept_until_discarded(
        &pattern(99, 1 << 20),
        "holds data but no readable record (slot A: slot does not start with the record magic",
    );
    assert_clean_stop(&mut luod);
}

#[test]
fn a_region_truncated_to_half_is_kept_until_discarded() {
    let image = region_at_generation_4();
    let mut luod = assert_kept_until_discarded(
        &image[..image.len() / 2],
        "record was written for a region of 1048576 bytes but the region is now 524288 bytes",
    );
    assert_clean_stop(&mut luod);
}

/// A region file too short for two slots: untouched until discarded; the
/// discard keeps its bytes aside in `region.truncated` and makes a fresh
/// region.
#[track_caller]
fn assert_truncated_is_kept_aside_when_discarded(image: &[u8]) {
    let was = image.len();
    let mut luod = assert_kept_until_discarded(
        image,
        &format!("is {was} bytes, too short for two record slots (truncated?)"),
    );
    let aside = std::fs::read(luod.region().with_extension("truncated")).expect("the truncated bytes are kept");
    assert_eq!(aside, image, "kept byte for byte");
    assert_eq!(
        std::fs::metadata(luod.region()).unwrap().len(),
        1 << 20,
        "a fresh region"
    );
    assert_clean_stop(&mut luod);
}

#[test]
fn a_region_truncated_inside_its_first_header_is_kept_aside_when_discarded() {
    let image = region_at_generation_4();
    assert_truncated_is_kept_aside_when_discarded(&image[..40]);
}

#[test]
fn a_region_truncated_below_two_slots_is_kept_aside_when_discarded() {
    // Only slot A's first page is left: the newest record (slot B) is gone.
    // An older record may survive in it, but reviving it would roll the
    // host back without anyone deciding to.
    let image = region_at_generation_4();
    assert_truncated_is_kept_aside_when_discarded(&image[..4096]);
}

#[test]
fn a_preserved_file_damaged_in_the_region_is_reported_lost_and_the_others_come_back() {
    let mut luod = Luod::started("8M");
    let mut c = luod.client();
    let set = preserve_set(&mut c, &["vm0"], &[4096, 8192]);
    c.prepare().expect("prepare");
    c.reboot().expect("reboot");
    drop(c);
    luod.expect_kexec_exit();

    // Damage the first byte of vm0/2's contents in the region (extents
    // start on 4096-byte boundaries).
    let mut image = std::fs::read(luod.region()).expect("read the region");
    let wanted = &set[1].bytes;
    let at = (0..image.len())
        .step_by(4096)
        .find(|&offset| image[offset..].starts_with(wanted))
        .expect("vm0/2's bytes are in the region, on a 4096-byte boundary");
    image[at] ^= 0xff;
    std::fs::write(luod.region(), &image).expect("write the region");

    luod.start();
    let mut c = luod.client();
    let status = c.status();
    assert_eq!(status.state, State::Updated);
    assert_eq!(
        sessions_seen(&status.sessions),
        [("vm0".to_string(), vec![(1, 4096)])],
        "vm0/2 is gone"
    );
    assert!(
        status
            .notes
            .iter()
            .any(|n| n.starts_with("preserved file lost in the handover: session vm0 token 2: ")),
        "a note names the lost file: {:?}",
        status.notes
    );
    retrieve_and_compare(&mut c, &set[..1]);
    c.finish().expect("finish");
}
