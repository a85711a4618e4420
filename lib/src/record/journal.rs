//! The preserve journal: small changes appended after the newest record in
//! its own slot, instead of a whole new record generation each time.
//!
//! A full write costs time in proportion to the record (every session and
//! file is encoded again), so `session preserve` of the n-th file would cost
//! O(n). A preserve is instead written as one [`JournalEntry`] appended after
//! the newest record (format 4 on). The next full write (any other change,
//! or a journal that is full) folds them in: it writes the whole record,
//! entries included, as the next generation in the other slot, and starts an
//! empty journal after it.
//!
//! Layout, from the journal start (the end of the newest record's payload and
//! data extents, rounded up to [`JOURNAL_ALIGN`]) to the end of its slot:
//!
//! ```text
//! entry:  0  len      u32  payload bytes (1..=MAX_ENTRY_LEN)
//!         4  crc32c   u32  CRC-32C of (generation u64, seq u32, len u32, payload), little-endian
//!         8  payload  [u8; len]  postcard JournalEntry
//! end:    8 zero bytes (len 0, crc 0)
//! ```
//!
//! `generation` is the newest record's and `seq` the entry's position
//! (0, 1, ...): an entry left in the slot by an older generation never
//! checks out. An append writes the new end marker after the entry, then the
//! payload, then the entry's `len` and `crc32c` last; a full write puts an
//! end marker at the journal start before it writes the header that makes
//! its slot valid. A reader stops at the first end marker, or at the first
//! entry that does not check out (cut short or damaged: its change was never
//! acknowledged), and never reads past it.

use super::{HandoverRecord, RecordError};
use crate::record::FdRecord;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// Journal entries start at multiples of this many bytes from the region
/// start (the first one; the others follow each other without padding).
pub const JOURNAL_ALIGN: u64 = 64;

/// Bytes of an entry's `len` and `crc32c` (and of the end marker).
pub const ENTRY_HEADER_LEN: u64 = 8;

/// Largest entry payload a reader accepts.
pub const MAX_ENTRY_LEN: u32 = 4096;

/// A journal holds at least this many entries before it asks for a full
/// write (more when the record already holds more files: see
/// [`fold_after`]).
pub const MIN_ENTRIES_BEFORE_FOLD: u64 = 1024;

/// One change, appended to the journal of the newest record.
///
/// Postcard encoding; a new variant is a new format version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JournalEntry {
    /// A file preserved in the session at position `session` of
    /// [`HandoverRecord::sessions`] (sessions are only added or removed by
    /// full writes, so positions are stable within one journal).
    Preserve {
        /// Position of the session in the record.
        session: u32,
        /// The file's token.
        token: u64,
        /// Its size in bytes when preserved.
        size: u64,
    },
}

impl JournalEntry {
    /// Applies the entry to `record`; `tokens` holds (session, token) of
    /// every file `record` has and gets the new one. Refuses (and changes
    /// nothing) an entry that names a session the record does not have or a
    /// token the session holds already: such an entry belongs to another
    /// record.
    pub fn apply(&self, record: &mut HandoverRecord, tokens: &mut HashSet<(u32, u64)>) -> Result<(), String> {
        match *self {
            JournalEntry::Preserve { session, token, size } => {
                let Some(s) = record.sessions.get_mut(session as usize) else {
                    return Err(format!(
                        "it preserves a file in session #{session}, but the record has {} session(s)",
                        record.sessions.len()
                    ));
                };
                if !tokens.insert((session, token)) {
                    return Err(format!("it preserves token {token} again in session {}", s.name));
                }
                s.fds.push(FdRecord {
                    token,
                    size,
                    data: None,
                    retrieved: false,
                });
                Ok(())
            }
        }
    }
}

/// (session position, token) of every file of `record`.
pub fn token_set(record: &HandoverRecord) -> HashSet<(u32, u64)> {
    record
        .sessions
        .iter()
        .enumerate()
        .flat_map(|(i, s)| s.fds.iter().map(move |f| (i as u32, f.token)))
        .collect()
}

/// How many entries the journal of a record with `files` files takes before
/// it asks for a full write: as many as the record has files (at least
/// [`MIN_ENTRIES_BEFORE_FOLD`]), so the cost of the full writes, each in
/// proportion to the record, stays a constant per preserve.
pub fn fold_after(files: u64) -> u64 {
    files.max(MIN_ENTRIES_BEFORE_FOLD)
}

/// Where a journal starts for a record whose bytes (header, payload, data
/// extents) end at `used_end` (from the region start).
pub fn start_after(used_end: u64) -> Option<u64> {
    Some(used_end.checked_add(JOURNAL_ALIGN - 1)? / JOURNAL_ALIGN * JOURNAL_ALIGN)
}

/// The CRC-32C an entry carries.
pub fn entry_crc(generation: u64, seq: u32, payload: &[u8]) -> u32 {
    let mut prefix = [0u8; 16];
    prefix[..8].copy_from_slice(&generation.to_le_bytes());
    prefix[8..12].copy_from_slice(&seq.to_le_bytes());
    prefix[12..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&prefix), payload)
}

/// What a replay found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// Entries applied.
    pub entries: u64,
    /// Offset (in the bytes replayed) of the end marker, or of the entry the
    /// replay stopped at: where the next entry goes.
    pub end: usize,
    /// Why the replay stopped before an end marker, when it did.
    pub stopped: Option<String>,
}

/// Replays the journal in `bytes` (from the journal start to the end of the
/// slot) of the record of `generation` onto `record`. Entries are applied in
/// order up to the end marker; an entry that is cut short, damaged or does
/// not fit the record stops the replay there (it is reported, not an
/// error: its change was never acknowledged), so nothing after it is read.
pub fn replay(bytes: &[u8], generation: u64, record: &mut HandoverRecord) -> Replayed {
    let mut tokens = None;
    let mut at = 0usize;
    let mut seq = 0u32;
    let stop = |at: usize, seq: u32, why: String| Replayed {
        entries: u64::from(seq),
        end: at,
        stopped: Some(format!("journal entry {seq} (at byte {at} of the journal) {why}")),
    };
    loop {
        let Some(head) = bytes.get(at..at + ENTRY_HEADER_LEN as usize) else {
            return stop(at, seq, "has no room for its header before the end of the slot".into());
        };
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len == 0 && crc == 0 {
            return Replayed {
                entries: u64::from(seq),
                end: at,
                stopped: None,
            };
        }
        if len == 0 || len > MAX_ENTRY_LEN {
            return stop(at, seq, format!("claims {len} bytes (1 to {MAX_ENTRY_LEN} expected)"));
        }
        let payload_at = at + ENTRY_HEADER_LEN as usize;
        // The entry and the end marker after it must fit.
        let Some(payload) = bytes
            .get(payload_at..payload_at + len as usize)
            .filter(|_| bytes.len() >= payload_at + len as usize + ENTRY_HEADER_LEN as usize)
        else {
            return stop(at, seq, format!("claims {len} bytes, past the end of the slot"));
        };
        let computed = entry_crc(generation, seq, payload);
        if computed != crc {
            return stop(
                at,
                seq,
                format!(
                    "does not check out (crc32c {computed:#010x}, stored {crc:#010x}): it was cut short or is damaged"
                ),
            );
        }
        let entry: JournalEntry = match postcard::from_bytes(payload) {
            Ok(entry) => entry,
            Err(e) => return stop(at, seq, format!("does not decode: {e}")),
        };
        let tokens = tokens.get_or_insert_with(|| token_set(record));
        if let Err(why) = entry.apply(record, tokens) {
            return stop(at, seq, format!("does not fit the record: {why}"));
        }
        at = payload_at + len as usize;
        seq += 1;
    }
}

/// The bytes of an entry (header and payload) for position `seq` of the
/// journal of the record of `generation`.
pub fn encode(entry: &JournalEntry, generation: u64, seq: u32) -> Result<Vec<u8>, RecordError> {
    let payload = postcard::to_stdvec(entry).map_err(RecordError::Encode)?;
    let mut bytes = Vec::with_capacity(ENTRY_HEADER_LEN as usize + payload.len());
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&entry_crc(generation, seq, &payload).to_le_bytes());
    bytes.extend_from_slice(&payload);
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::SessionName;
    use crate::record::{RecordStore, SessionRecord};
    use crate::region::MemRegion;
    use proptest::prelude::*;

    const REGION: usize = 64 << 10;

    fn session(name: &str, tokens: &[u64]) -> SessionRecord {
        SessionRecord {
            name: SessionName::new(name).unwrap(),
            owner_uid: 1000,
            fds: tokens
                .iter()
                .map(|&token| FdRecord {
                    token,
                    size: 4096,
                    data: None,
                    retrieved: false,
                })
                .collect(),
            incoming: false,
        }
    }

    /// A record with sessions vm0 (token 1) and vm1 (none).
    fn base() -> HandoverRecord {
        let mut record = HandoverRecord::new("file");
        record.sessions = vec![session("vm0", &[1]), session("vm1", &[])];
        record
    }

    fn preserve(session: u32, token: u64) -> JournalEntry {
        JournalEntry::Preserve {
            session,
            token,
            size: 4096 + token % 4096,
        }
    }

    fn with(mut record: HandoverRecord, entries: &[JournalEntry]) -> HandoverRecord {
        let mut tokens = token_set(&record);
        for e in entries {
            e.apply(&mut record, &mut tokens).unwrap();
        }
        record
    }

    /// A store whose newest record (generation 2, slot B) is `base()`.
    fn store() -> RecordStore<MemRegion> {
        let mut store = RecordStore::new(MemRegion::zeroed(REGION)).unwrap();
        store.write(&mut base(), &[]).unwrap();
        store.write(&mut base(), &[]).unwrap();
        store
    }

    fn reload(image: Vec<u8>) -> (RecordStore<MemRegion>, crate::record::LoadReport) {
        let mut store = RecordStore::new(MemRegion(image)).unwrap();
        let report = store.load().unwrap();
        (store, report)
    }

    #[test]
    fn appended_preserves_are_in_the_record_a_new_store_loads() {
        let mut store = store();
        let entries = [preserve(0, 2), preserve(1, 7), preserve(0, 3)];
        for e in &entries {
            assert!(store.append(e).unwrap());
        }
        assert_eq!(store.journal_entries(), 3);
        let (store, report) = reload(store.into_region().0);
        assert_eq!(report.latest, Some((2, with(base(), &entries))));
        assert_eq!(
            report.journal,
            crate::record::JournalReport {
                entries: 3,
                stopped: None
            }
        );
        assert_eq!(store.journal_entries(), 3, "the next entry goes after them");
    }

    #[test]
    fn appends_continue_after_a_reload() {
        let mut store = store();
        assert!(store.append(&preserve(0, 2)).unwrap());
        let (mut store, _) = reload(store.into_region().0);
        assert!(store.append(&preserve(0, 3)).unwrap());
        let (_, report) = reload(store.into_region().0);
        assert_eq!(
            report.latest,
            Some((2, with(base(), &[preserve(0, 2), preserve(0, 3)])))
        );
    }

    #[test]
    fn a_full_write_folds_the_journal_in_and_starts_an_empty_one() {
        let mut store = store();
        let entries = [preserve(0, 2), preserve(1, 7)];
        for e in &entries {
            assert!(store.append(e).unwrap());
        }
        let mut record = with(base(), &entries);
        store.write(&mut record, &[]).unwrap();
        assert_eq!(store.journal_entries(), 0);
        let (mut store, report) = reload(store.into_region().0);
        assert_eq!(report.latest, Some((3, record.clone())));
        assert_eq!(report.journal.entries, 0);
        // Generation 3 went to slot A, whose old journal (none) and record
        // are gone; the next append extends generation 3.
        assert!(store.append(&preserve(1, 8)).unwrap());
        let (_, report) = reload(store.into_region().0);
        assert_eq!(report.latest, Some((3, with(record, &[preserve(1, 8)]))));
    }

    #[test]
    fn an_older_generations_journal_in_the_same_slot_is_never_read() {
        let mut store = store();
        // Generation 2's journal in slot B: three entries.
        for t in 2..5 {
            assert!(store.append(&preserve(0, t)).unwrap());
        }
        // Generations 3 (slot A) and 4 (slot B again), each a record just
        // like base(): generation 4's journal starts where generation 2's did.
        store.write(&mut base(), &[]).unwrap();
        store.write(&mut base(), &[]).unwrap();
        let (_, report) = reload(store.into_region().0);
        assert_eq!(report.latest, Some((4, base())));
        assert_eq!(report.journal.entries, 0);
    }

    #[test]
    fn entries_left_by_a_cleared_region_are_never_read() {
        let mut store = store();
        assert!(store.append(&preserve(0, 2)).unwrap());
        store.clear().unwrap();
        // Generation 1 again, slot A, then 2 in slot B: the same generation
        // and place as the entry above; the end marker written with the
        // record hides it.
        store.write(&mut base(), &[]).unwrap();
        store.write(&mut base(), &[]).unwrap();
        let (_, report) = reload(store.into_region().0);
        assert_eq!(report.latest, Some((2, base())));
        assert_eq!(report.journal.entries, 0);
    }

    /// Where generation 2's journal starts in `store()`'s image.
    fn journal_start(store: &RecordStore<MemRegion>) -> usize {
        let use_ = store.slot_use().unwrap();
        REGION / 2 + start_after(use_.record).unwrap() as usize
    }

    #[test]
    fn a_damaged_entry_ends_the_replay_with_the_entries_before_it() {
        let mut store = store();
        let start = journal_start(&store);
        let entries: Vec<JournalEntry> = (2..6).map(|t| preserve(0, t)).collect();
        let mut offsets = Vec::new();
        for e in &entries {
            offsets.push(start + store.slot_use().unwrap().journal as usize - ENTRY_HEADER_LEN as usize);
            assert!(store.append(e).unwrap());
        }
        for (k, &at) in offsets.iter().enumerate() {
            for byte in [0, 4, 8] {
                let mut image = store.region().0.clone();
                image[at + byte] ^= 0x40;
                let (mut reloaded, report) = reload(image);
                assert_eq!(
                    report.latest,
                    Some((2, with(base(), &entries[..k]))),
                    "entry {k} byte {byte}"
                );
                assert_eq!(report.journal.entries, k as u64);
                let stopped = report.journal.stopped.unwrap();
                assert!(stopped.starts_with(&format!("journal entry {k} ")), "{stopped}");
                // Nothing goes after a damaged entry: the next change is a
                // full write.
                assert!(!reloaded.append(&preserve(1, 9)).unwrap());
            }
        }
    }

    #[test]
    fn an_entry_that_does_not_fit_the_record_ends_the_replay() {
        for (bad, why) in [
            (
                preserve(5, 2),
                "does not fit the record: it preserves a file in session #5, but the record has 2 session(s)",
            ),
            (
                preserve(0, 1),
                "does not fit the record: it preserves token 1 again in session vm0",
            ),
        ] {
            let mut store = store();
            assert!(store.append(&preserve(1, 3)).unwrap());
            assert!(store.append(&bad).unwrap());
            assert!(store.append(&preserve(1, 4)).unwrap());
            let (_, report) = reload(store.into_region().0);
            assert_eq!(report.latest, Some((2, with(base(), &[preserve(1, 3)]))));
            let stopped = report.journal.stopped.unwrap();
            assert!(stopped.starts_with("journal entry 1 (at byte "), "{stopped}");
            assert!(stopped.ends_with(why), "{stopped}");
        }
    }

    #[test]
    fn a_journal_that_took_its_share_asks_for_a_full_write() {
        let mut store = store();
        for t in 0..MIN_ENTRIES_BEFORE_FOLD {
            assert!(store.append(&preserve(1, t)).unwrap(), "entry {t}");
        }
        let before = store.region().0.clone();
        assert!(!store.append(&preserve(1, u64::MAX)).unwrap());
        assert!(store.region().0 == before, "nothing written");
        assert_eq!(fold_after(10), MIN_ENTRIES_BEFORE_FOLD);
        assert_eq!(fold_after(50_000), 50_000);
    }

    #[test]
    fn a_full_slot_asks_for_a_full_write_and_writes_nothing() {
        // Slots of 4096 bytes: room for a few hundred small entries.
        let mut store = RecordStore::new(MemRegion::zeroed(8192)).unwrap();
        store.write(&mut base(), &[]).unwrap();
        let mut n = 0;
        while store.append(&preserve(1, n)).unwrap() {
            n += 1;
        }
        assert!(n > 100 && n < 4096 / 8, "{n} entries fit");
        let use_ = store.slot_use().unwrap();
        assert!(use_.record + use_.journal <= 4096 + JOURNAL_ALIGN);
        let (_, report) = reload(store.into_region().0);
        assert_eq!(report.journal.entries, n);
    }

    #[test]
    fn a_store_without_a_record_takes_no_entry() {
        let mut store = RecordStore::new(MemRegion::zeroed(REGION)).unwrap();
        assert!(!store.append(&preserve(0, 1)).unwrap());
        assert!(store.region().0.iter().all(|&b| b == 0));
    }

    /// An append cut at every byte (a crash of luod between the first write
    /// of an entry and the answer to the client): a new store finds the
    /// files before it, or those and the new one once the whole entry is
    /// written, never anything else.
    #[test]
    fn an_append_cut_at_any_byte_loads_the_journal_before_or_after_it() {
        let mut store = store();
        let before_entries = [preserve(0, 2), preserve(1, 3)];
        for e in &before_entries {
            assert!(store.append(e).unwrap());
        }
        let before = store.region().0.clone();
        store.start_trace();
        let new = preserve(1, 99);
        assert!(store.append(&new).unwrap());
        let steps = store.take_trace();
        let after = store.region().0.clone();
        let total: usize = steps.iter().map(|(_, b)| b.len()).sum();
        for cut in 0..=total {
            let mut image = before.clone();
            let mut left = cut;
            for (offset, bytes) in &steps {
                let n = left.min(bytes.len());
                image[*offset..*offset + n].copy_from_slice(&bytes[..n]);
                left -= n;
            }
            let complete = image == after;
            let (_, report) = reload(image);
            let expected = if complete {
                with(
                    base(),
                    &[before_entries[0].clone(), before_entries[1].clone(), new.clone()],
                )
            } else {
                with(base(), &before_entries)
            };
            assert_eq!(report.latest, Some((2, expected)), "cut at {cut} of {total}");
        }
        assert_eq!(steps.len(), 3, "end marker, payload, header");
    }

    proptest! {
        /// Whatever bytes follow the record in its slot, a replay never
        /// panics, and every file it adds is one an entry in those bytes
        /// named with a valid checksum: with random bytes, none.
        #[test]
        fn random_bytes_after_a_record_add_no_file(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut record = base();
            let replayed = replay(&bytes, 2, &mut record);
            prop_assert_eq!(replayed.entries, 0);
            prop_assert_eq!(record, base());
        }

        /// Appends, then damage anywhere in the journal (a flipped byte or
        /// the rest zeroed or filled with junk): the replay yields exactly a
        /// prefix of the appended entries, never a file that was not
        /// appended, and the prefix is whole up to the first damaged entry.
        #[test]
        fn damage_leaves_a_prefix_of_the_appended_entries(
            tokens in proptest::collection::vec((0u32..2, 2u64..1_000_000), 1..40),
            at in 0usize..1200,
            how in 0u8..3,
        ) {
            let mut store = store();
            let start = journal_start(&store);
            let mut appended = Vec::new();
            let mut seen = token_set(&base());
            for (s, t) in tokens {
                if seen.insert((s, t)) {
                    let e = preserve(s, t);
                    prop_assert!(store.append(&e).unwrap());
                    appended.push(e);
                }
            }
            let journal_len = store.slot_use().unwrap().journal as usize;
            let at = start + at % journal_len;
            let mut image = store.into_region().0;
            match how {
                0 => image[at] ^= 0x01,
                1 => image[at..REGION].fill(0),
                _ => image[at..REGION].iter_mut().enumerate().for_each(|(i, b)| *b = (i * 131 % 251) as u8),
            }
            let (_, report) = reload(image);
            let (generation, record) = report.latest.unwrap();
            prop_assert_eq!(generation, 2);
            let k = report.journal.entries as usize;
            prop_assert!(k <= appended.len());
            prop_assert_eq!(record, with(base(), &appended[..k]));
        }
    }
}
