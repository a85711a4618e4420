//! `session preserve` goes to the record's journal (format 4): a real luod
//! killed while files are being preserved comes back with every file it
//! acknowledged, and at most the one in flight besides (never a file it was
//! not sent); a journal entry damaged in the region is ignored with a note,
//! with everything after it; files carried through the journal survive the
//! simulated kexec with their contents.

use liveupdate_tests::{Luod, assert_file_holds, memfd_with, pattern};
use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::time::Duration;

const LEN: usize = 4096;

fn tokens_of(luod: &Luod, session: &str) -> BTreeSet<u64> {
    luod.client()
        .list()
        .into_iter()
        .find(|s| s.name == session)
        .map(|s| s.files.iter().map(|f| f.token).collect())
        .unwrap_or_default()
}

/// Preserves tokens `from..` into `session` until luod stops answering;
/// sends each token before it is asked for and each one acknowledged.
fn preserve_until_refused(luod: &Luod, session: &'static str, from: u64) -> mpsc::Receiver<(u64, bool)> {
    let mut conn = luod.client();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for token in from.. {
            let fd = memfd_with("f", &pattern(token, LEN));
            if tx.send((token, false)).is_err() {
                return;
            }
            if conn.preserve(session, token, fd.as_fd()).is_err() || tx.send((token, true)).is_err() {
                return;
            }
        }
    });
    rx
}

/// Kills luod once `kill_after` more preserves were acknowledged; returns
/// (sent, acknowledged) once the preserving thread stopped.
fn kill_during_preserves(
    luod: &mut Luod,
    rx: &mpsc::Receiver<(u64, bool)>,
    kill_after: usize,
) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let (mut sent, mut acked) = (BTreeSet::new(), BTreeSet::new());
    while acked.len() < kill_after {
        let (token, ack) = rx.recv_timeout(Duration::from_secs(30)).expect("preserves go on");
        if ack {
            acked.insert(token)
        } else {
            sent.insert(token)
        };
    }
    luod.kill();
    while let Ok((token, ack)) = rx.recv_timeout(Duration::from_secs(30)) {
        if ack {
            acked.insert(token)
        } else {
            sent.insert(token)
        };
    }
    (sent, acked)
}

#[test]
fn a_luod_killed_while_preserving_keeps_every_acknowledged_file_and_invents_none() {
    let mut luod = Luod::started("64M");
    luod.client().create("vm0").unwrap();
    let mut expected = BTreeSet::new();
    let mut next = 0;
    // Kills early in a journal, and past the 1,024 entries after which a
    // preserve is a full write that folds the journal in.
    for kill_after in [3, 1100, 40] {
        let rx = preserve_until_refused(&luod, "vm0", next);
        let (sent, acked) = kill_during_preserves(&mut luod, &rx, kill_after);
        luod.start();
        let found = tokens_of(&luod, "vm0");
        let new: BTreeSet<u64> = found.difference(&expected).copied().collect();
        assert!(acked.is_subset(&new), "every acknowledged preserve survived the kill");
        assert!(new.is_subset(&sent), "no file that was not sent");
        assert!(
            new.len() <= acked.len() + 1,
            "at most the one in flight besides: {new:?} vs {acked:?}"
        );
        expected.extend(new);
        next = sent.last().unwrap() + 1;
    }
    // The files went through the journal and the full writes alike: the
    // cycle carries each with its contents.
    let mut conn = luod.client();
    conn.prepare().unwrap();
    conn.freeze().unwrap();
    conn.reboot().unwrap();
    luod.expect_kexec_exit();
    luod.start();
    let mut conn = luod.client();
    assert_eq!(tokens_of(&luod, "vm0"), expected);
    for &token in expected.iter().step_by(97).chain(expected.last()) {
        let (fd, size) = conn.retrieve("vm0", token).unwrap();
        assert_eq!(size, LEN as u64);
        assert_file_holds(&format!("token {token}"), &fd, &pattern(token, LEN));
    }
}

/// Where the journal after the newest record starts in a region image (the
/// layout of docs/state-format.md: slots of half the region rounded down to
/// 4096, a 64-byte header with the generation at 16 and the payload length at
/// 32; no data extents in `normal`; the journal on the next 64-byte boundary).
fn journal_start(image: &[u8]) -> usize {
    let slot_len = image.len() / 2 / 4096 * 4096;
    let u64_at = |at: usize| u64::from_le_bytes(image[at..at + 8].try_into().unwrap());
    let newest = (0..2).max_by_key(|&s| u64_at(s * slot_len + 16)).unwrap();
    let end = newest * slot_len + 64 + u64_at(newest * slot_len + 32) as usize;
    end.div_ceil(64) * 64
}

/// Offsets of the entries of the journal starting at `at`.
fn entries(image: &[u8], mut at: usize) -> Vec<usize> {
    let mut found = Vec::new();
    loop {
        let len = u32::from_le_bytes(image[at..at + 4].try_into().unwrap()) as usize;
        if len == 0 {
            return found;
        }
        found.push(at);
        at += 8 + len;
    }
}

#[test]
fn a_damaged_journal_entry_is_ignored_with_what_follows_and_said_at_start() {
    let mut luod = Luod::started("8M");
    let mut conn = luod.client();
    conn.create("vm0").unwrap();
    for token in 1..=5 {
        conn.preserve("vm0", token, memfd_with("f", &pattern(token, LEN)).as_fd())
            .unwrap();
    }
    let generation = luod.status().generation;
    luod.kill();
    let mut image = std::fs::read(luod.region()).unwrap();
    let at = entries(&image, journal_start(&image));
    assert_eq!(at.len(), 5, "the five preserves are journal entries");
    // Damage the payload of the fourth: the fourth and fifth are ignored.
    image[at[3] + 9] ^= 0x10;
    std::fs::write(luod.region(), &image).unwrap();
    luod.start();
    assert_eq!(tokens_of(&luod, "vm0"), BTreeSet::from([1, 2, 3]));
    let status = luod.status();
    let note = status
        .notes
        .iter()
        .find(|n| n.starts_with("the preserve journal after record generation"))
        .unwrap_or_else(|| panic!("a note on the damaged entry: {:?}", status.notes));
    assert!(
        note.starts_with(&format!(
            "the preserve journal after record generation {generation} ends in an entry that was cut short or is \
             damaged, ignored with anything after it (journal entry 3 (at byte "
        )),
        "{note}"
    );
    assert!(note.contains(" of the journal) does not check out (crc32c "), "{note}");
    assert!(
        note.ends_with(
            "it was cut short or is damaged): the preserve it held was never acknowledged; 3 entr(ies) before it \
             were applied"
        ),
        "{note}"
    );
    // The files of the ignored entries were dropped from the park; the
    // tokens are free again, and the next preserve starts a new journal.
    let mut conn = luod.client();
    conn.preserve("vm0", 4, memfd_with("f", &pattern(40, LEN)).as_fd())
        .unwrap();
    luod.restart();
    assert_eq!(tokens_of(&luod, "vm0"), BTreeSet::from([1, 2, 3, 4]));
}
