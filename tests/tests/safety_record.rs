//! An unreadable record never destroys parked files (issue 7, item 6).
//!
//! luod runs with two sessions of preserved files and stops (SIGTERM): the
//! fd holder keeps the files. The region is then damaged in each way a
//! record becomes unreadable: both slot headers zeroed, the file cut to 0
//! bytes, the file at another size. luod started on it stays `normal` with
//! nothing visible, says in `status` what it found and what to do, refuses
//! every change with that hint, and writes nothing to the region. Put the
//! region back and start luod again: every session and every byte comes
//! back through a full cycle. Or discard explicitly (`luoctl discard-record
//! --yes`): the parked files go, a fresh record starts, and its events say
//! who decided what.

use liveupdate::protocol::{ErrorKind, Request, Response};
use liveupdate::record::RecordStore;
use liveupdate::region::FileRegion;
use liveupdate::state::State;
use liveupdate_tests::*;
use std::os::unix::fs::MetadataExt;

const SIZE: u64 = 8 << 20;

/// A stopped luod whose holder keeps vm0/1, vm0/2, vm1/1, vm1/2, and its
/// region's bytes as luod left them.
fn parked() -> (Luod, Vec<Preserved>, Vec<u8>) {
    let mut luod = Luod::started("8M");
    let set = preserve_set(&mut luod.client(), &["vm0", "vm1"], &[4096, 100_000]);
    assert!(luod.stop().success());
    let image = std::fs::read(luod.region()).expect("read the region");
    (luod, set, image)
}

const PARKED: &str = "the fd park still holds 4 preserved file(s) (vm0/1, vm0/2, vm1/1, vm1/2)";

/// luod on the damaged region: nothing visible, the note, every change
/// refused with the hint, the region untouched. Returns the finding.
#[track_caller]
fn assert_kept_and_refused(luod: &mut Luod, finding_starts: &str) -> String {
    let damaged = std::fs::read(luod.region()).expect("read the region");
    luod.start();
    let mut c = luod.client();
    let status = c.status();
    assert_eq!((status.state, status.generation), (State::Normal, 0));
    assert!(status.sessions.is_empty(), "{:?}", status.sessions);
    let note = status
        .notes
        .iter()
        .find_map(|n| n.strip_prefix("the handover record cannot be read: "))
        .unwrap_or_else(|| panic!("a note says the record cannot be read: {:?}", status.notes));
    let (finding, rest) = note.split_once(". luod keeps").expect("the note's first sentence ends");
    assert!(finding.starts_with(finding_starts), "finding: {finding}");
    assert!(finding.ends_with(PARKED), "finding: {finding}");
    assert!(
        rest.contains("restore the region") && rest.contains("`luoctl discard-record --yes`"),
        "the note says what to do: {note}"
    );
    let message = format!(
        "the handover record cannot be read ({finding}); luod changes nothing until the region is restored or the record discarded"
    );
    let hint = "restore the region and start luod again (everything comes back), or give the record and the parked \
                files up with `luoctl discard-record --yes`";
    let e = assert_refused(c.prepare(), ErrorKind::Record, &message);
    assert_eq!(e.hint, hint);
    assert_refused(c.create("new"), ErrorKind::Record, &message);
    assert_refused(c.session_finish("vm0"), ErrorKind::Record, &message);
    assert_refused(c.retrieve("vm0", 1), ErrorKind::Record, &message);
    let out = luod.luoctl(&["prepare"]);
    assert_eq!(out.status.code(), Some(18), "luoctl prepare exits with the record code");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        format!("luoctl: prepare: {message}; {hint}")
    );
    drop(c);
    assert!(luod.is_running());
    assert_eq!(luod.status(), status, "nothing changed");
    assert!(luod.stop().success());
    assert!(
        std::fs::read(luod.region()).expect("read the region") == damaged,
        "the region is untouched"
    );
    finding.to_string()
}

/// With the original region back, luod finds everything, and a full cycle
/// carries every byte.
#[track_caller]
fn assert_everything_comes_back(luod: &mut Luod, set: &[Preserved], image: &[u8]) {
    std::fs::write(luod.region(), image).expect("restore the region");
    luod.start();
    let status = luod.status();
    assert_eq!(status.state, State::Normal);
    assert_eq!(sessions_seen(&status.sessions), sessions_of(set));
    assert!(status.notes.is_empty(), "{:?}", status.notes);
    let mut c = luod.client();
    c.prepare().expect("prepare");
    c.reboot().expect("reboot");
    drop(c);
    luod.expect_kexec_exit();
    luod.start();
    retrieve_and_compare(&mut luod.client(), set);
}

#[test]
fn zeroed_headers_keep_the_parked_files_until_the_region_is_restored() {
    let (mut luod, set, image) = parked();
    let mut damaged = image.clone();
    let slot = (SIZE / 2) as usize;
    damaged[..64].fill(0);
    damaged[slot..slot + 64].fill(0);
    std::fs::write(luod.region(), &damaged).expect("zero both headers");
    let finding = assert_kept_and_refused(&mut luod, "");
    assert_eq!(
        finding,
        format!(
            "file {} (8 MiB) holds data but no readable record (slot A: empty; slot B: empty); {PARKED}",
            luod.region().display()
        )
    );
    assert_everything_comes_back(&mut luod, &set, &image);
}

#[test]
fn a_region_cut_to_zero_bytes_keeps_the_parked_files_until_restored() {
    let (mut luod, set, image) = parked();
    std::fs::write(luod.region(), b"").expect("cut the region to 0 bytes");
    let finding = assert_kept_and_refused(&mut luod, "");
    assert_eq!(
        finding,
        format!(
            "the region file {} is 0 bytes, too short for two record slots (truncated?); {PARKED}",
            luod.region().display()
        )
    );
    assert_eq!(std::fs::metadata(luod.region()).unwrap().len(), 0, "still 0 bytes");
    assert_everything_comes_back(&mut luod, &set, &image);
}

#[test]
fn a_region_of_another_size_keeps_the_parked_files_until_reopened_with_its_size() {
    let (mut luod, set, image) = parked();
    // As if the region had been made again with another --region-size (an
    // existing file region keeps the size it has, whatever --region-size says).
    std::fs::File::options()
        .write(true)
        .open(luod.region())
        .unwrap()
        .set_len(2 * SIZE)
        .unwrap();
    let finding = assert_kept_and_refused(&mut luod, "");
    let changed = format!(
        "record was written for a region of {SIZE} bytes but the region is now {} bytes: open the region with its original size",
        2 * SIZE
    );
    assert!(
        finding.starts_with(&format!(
            "file {} (16 MiB) holds data but no readable record (slot A: {changed}; slot B: ",
            luod.region().display()
        )),
        "{finding}"
    );
    // What the note says: back to the original size, and everything is there.
    assert_everything_comes_back(&mut luod, &set, &image);
}

/// `discard-record` over the protocol.
#[allow(clippy::result_large_err)] // a refusal is compared whole, as in the harness
fn discard(luod: &Luod) -> Reply<Response> {
    luod.client().call(&Request::DiscardRecord)
}

#[test]
fn discard_record_drops_the_parked_files_and_is_recorded() {
    let (mut luod, _set, image) = parked();
    let mut damaged = image.clone();
    damaged[..64].fill(0);
    damaged[(SIZE / 2) as usize..(SIZE / 2) as usize + 64].fill(0);
    std::fs::write(luod.region(), &damaged).unwrap();
    let finding = assert_kept_and_refused(&mut luod, "file ");
    luod.start();

    let out = luod.luoctl(&["discard-record"]);
    assert_eq!(out.status.code(), Some(2), "without --yes: a usage error");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        "luoctl: discard-record: discard-record drops the files luod keeps for an unreadable record, for good; \
         nothing was done; restore the region instead if you can; otherwise run `luoctl discard-record --yes`"
    );
    assert!(luod.status().notes[0].starts_with("the handover record cannot be read: "));

    let out = luod.luoctl(&["--json", "discard-record", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        json,
        serde_json::json!({"ok": true, "finding": finding, "files": 4, "generation": 1})
    );
    let status = luod.status();
    assert_eq!((status.state, status.generation), (State::Normal, 1));
    assert_eq!(
        status.notes,
        [
            "uid 0 discarded the unreadable record (4 parked file(s) dropped (vm0/1, vm0/2, vm1/1, vm1/2)); \
          a fresh record started at generation 1"
        ]
    );
    assert_refused(
        discard(&luod),
        ErrorKind::WrongState,
        "the handover record is readable (generation 1): there is nothing to discard",
    );
    luod.client().create("after").expect("changes are allowed again");
    assert!(luod.stop().success());

    // The decision is in the record; the parked files are gone for good.
    let store = RecordStore::new(FileRegion::open_existing(&luod.region()).unwrap()).unwrap();
    let mut store = store;
    let (_, record) = store.load().unwrap().latest.expect("a record");
    assert_eq!(record.events.len(), 1);
    let event = &record.events[0];
    assert_eq!((event.action.as_str(), event.uid), ("record-discarded", 0));
    assert_eq!(event.subject, format!("file {} (8 MiB)", luod.region().display()));
    assert_eq!(
        event.detail,
        format!("an unreadable record was discarded: {finding}; 4 parked file(s) dropped (vm0/1, vm0/2, vm1/1, vm1/2)")
    );
    drop(store);
    luod.start();
    let status = luod.status();
    assert_eq!(status.sessions.len(), 1, "only the session made after the discard");
    assert!(
        status.notes.is_empty(),
        "no file was parked any more: {:?}",
        status.notes
    );
}

#[test]
fn a_region_too_short_is_kept_aside_only_when_discarded_and_never_through_a_symlink() {
    let (mut luod, _set, image) = parked();
    std::fs::write(luod.region(), &image[..4096]).unwrap();
    let finding = assert_kept_and_refused(&mut luod, "the region file ");
    assert!(
        finding.contains(" is 4096 bytes, too short for two record slots (truncated?)"),
        "{finding}"
    );
    luod.start();
    let aside = luod.region().with_extension("truncated");
    let target = luod.dir().join("precious");
    std::fs::write(&target, b"not luod's").unwrap();
    std::os::unix::fs::symlink(&target, &aside).unwrap();
    assert_refused(
        discard(&luod),
        ErrorKind::Record,
        &format!(
            "kept-aside region bytes {} is a symbolic link (to {t}); luod does not follow links for the files it \
             writes: pass the resolved path {t} instead, or remove the link",
            aside.display(),
            t = target.display()
        ),
    );
    assert_eq!(
        std::fs::read(&target).unwrap(),
        b"not luod's",
        "the link's target is untouched"
    );
    assert_eq!(
        std::fs::read(luod.region()).unwrap(),
        &image[..4096],
        "the region is untouched"
    );
    assert!(luod.status().notes[0].starts_with("the handover record cannot be read: "));

    std::fs::remove_file(&aside).unwrap();
    match discard(&luod) {
        Ok(Response::RecordDiscarded(r)) => assert_eq!((r.files, r.generation), (4, 1)),
        other => panic!("discard-record answered {other:?}"),
    }
    assert_eq!(
        std::fs::read(&aside).unwrap(),
        &image[..4096],
        "the short region's bytes are kept aside"
    );
    assert_eq!(std::fs::metadata(&aside).unwrap().mode() & 0o7777, 0o600);
    assert_eq!(
        std::fs::metadata(luod.region()).unwrap().len(),
        SIZE,
        "a fresh region of --region-size"
    );
    luod.client().create("fresh").expect("the fresh region works");
}
