//! The A/B record store: where records and data go in a region, and the
//! order in which they are written.

use super::codec::{self, Header};
use super::copy;
use super::journal::{self, ENTRY_HEADER_LEN, JournalEntry};
use super::{
    DataSource, Extent, FORMAT_VERSION, HEADER_LEN, HandoverRecord, JournalReport, LAYOUT_ALIGN, LoadReport,
    MAX_RECORD_LEN, RecordError, SlotStatus, WriteReport, error_chain,
};
use crate::region::Region;
use std::ops::Range;
use std::sync::atomic::{Ordering, fence};

/// Where the newest valid record lives.
#[derive(Debug, Clone, Copy)]
struct Newest {
    slot: usize,
    generation: u64,
    /// Data area of its slot: from the end of the payload to the end of the slot.
    data: (u64, u64),
}

/// The journal after the newest record (format 4 on): where the next entry
/// goes. See `journal.rs`.
#[derive(Debug, Clone, Copy)]
struct Tail {
    /// Generation of the record it extends (part of every entry's CRC).
    generation: u64,
    /// Where the journal starts (from the region start).
    start: u64,
    /// Where the end marker is: the next entry goes there.
    end: u64,
    /// End of the slot: the journal and its end marker stay before it.
    limit: u64,
    /// Entries in the journal.
    entries: u64,
    /// Entries it takes before [`RecordStore::append`] asks for a full write.
    fold_after: u64,
}

/// What the newest record takes of its slot ([`RecordStore::slot_use`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotUse {
    /// Bytes of header and payload.
    pub record: u64,
    /// Bytes of journal (entries and end marker).
    pub journal: u64,
    /// Entries in the journal.
    pub journal_entries: u64,
    /// Size of each slot: the next full write (record, journal folded in,
    /// and on a copying backend the data) must fit in one.
    pub slot: u64,
}

/// Reads and writes records in the two slots of a region.
///
/// The region is split in two slots of equal size (half the region, rounded
/// down to [`LAYOUT_ALIGN`]): slot A at offset 0, slot B right after it. Each
/// slot holds `[header | payload | data extents]`. Writes alternate between
/// the slots and never touch the slot holding the newest valid record, so an
/// interrupted write leaves that record readable. See `docs/state-format.md`.
#[derive(Debug)]
pub struct RecordStore<R: Region> {
    region: R,
    slot_len: u64,
    newest: Option<Newest>,
    tail: Option<Tail>,
    trace: Trace,
}

impl<R: Region> RecordStore<R> {
    /// Wraps a region and finds its newest valid record; fails if the region
    /// is too small to hold two slots of [`LAYOUT_ALIGN`] bytes.
    pub fn new(region: R) -> Result<Self, RecordError> {
        let have = region.len() as u64;
        let slot_len = have / 2 / LAYOUT_ALIGN * LAYOUT_ALIGN;
        if slot_len == 0 {
            return Err(RecordError::RegionTooSmall {
                need: 2 * LAYOUT_ALIGN,
                have,
            });
        }
        let mut store = RecordStore {
            region,
            slot_len,
            newest: None,
            tail: None,
            trace: Trace::default(),
        };
        store.load()?;
        Ok(store)
    }

    /// Reads both slots and returns the newest valid record.
    ///
    /// A slot is valid when its header and payload pass their checks and every
    /// extent of the record lies in the slot's data area. The data itself is
    /// checked when it is read ([`data`](Self::data)), not here. Damage in a
    /// slot is reported in [`LoadReport::slots`], not as an error: it only
    /// means that slot is not used.
    pub fn load(&mut self) -> Result<LoadReport, RecordError> {
        let mut slots = [SlotStatus::Empty, SlotStatus::Empty];
        let mut latest: Option<(usize, codec::SlotRecord)> = None;
        for (slot, status) in slots.iter_mut().enumerate() {
            match self.check_slot(slot) {
                Ok(None) => {}
                Ok(Some(found)) => {
                    *status = SlotStatus::Valid {
                        generation: found.generation,
                    };
                    if latest.as_ref().is_none_or(|(_, l)| found.generation > l.generation) {
                        latest = Some((slot, found));
                    }
                }
                Err(RecordError::UnsupportedVersion { found, .. }) if found > FORMAT_VERSION => {
                    *status = SlotStatus::Newer { version: found }
                }
                Err(error) => {
                    *status = SlotStatus::Invalid {
                        reason: error_chain(&error),
                    }
                }
            }
        }
        self.newest = latest.as_ref().map(|(slot, found)| {
            let start = self.slot_start(*slot);
            Newest {
                slot: *slot,
                generation: found.generation,
                data: (start + found.record_len, start + self.slot_len),
            }
        });
        self.tail = None;
        let mut journal = JournalReport::default();
        if let Some((slot, found)) = latest.as_mut()
            && found.version >= 4
        {
            let start = self.slot_start(*slot);
            let used_end = found
                .record
                .extents
                .iter()
                .map(|e| e.offset + e.len)
                .fold(start + found.record_len, u64::max);
            let limit = start + self.slot_len;
            if let Some(j) = journal::start_after(used_end).filter(|&j| j + ENTRY_HEADER_LEN <= limit) {
                let bytes = &self.region.bytes()[range(j, limit - j)];
                let replayed = journal::replay(bytes, found.generation, &mut found.record);
                journal = JournalReport {
                    entries: replayed.entries,
                    stopped: replayed.stopped,
                };
                let files = found.record.sessions.iter().map(|s| s.fds.len() as u64).sum();
                self.tail = Some(Tail {
                    generation: found.generation,
                    start: j,
                    end: j + replayed.end as u64,
                    limit,
                    entries: replayed.entries,
                    fold_after: journal::fold_after(files),
                });
                if journal.stopped.is_some() {
                    // Whatever follows the last good entry is not ours: no
                    // more entries until the next full write starts afresh.
                    self.tail = None;
                }
            }
        }
        Ok(LoadReport {
            latest: latest.map(|(_, found)| (found.generation, found.record)),
            slots,
            journal,
        })
    }

    /// Writes `record` with `data` as the next generation into the slot that
    /// does not hold the newest record. Sets `record.extents` to one extent
    /// per data source, in order.
    ///
    /// Order of the writes: the slot's header is cleared, each source is
    /// read straight into the slot's data area (its CRC-32C computed on the
    /// way), the payload follows, the header comes last. A write cut anywhere
    /// leaves the previous generation readable. There is no `msync`: the
    /// region must survive a crash of luod (the page cache keeps the bytes) and
    /// a kexec (reserved memory keeps them), not a power loss.
    ///
    /// Data that does not fit is refused with [`RecordError::RegionTooSmall`]
    /// before the region is touched. When a data source fails, the slot
    /// being written is left empty and `record.extents` is unchanged.
    pub fn write(&mut self, record: &mut HandoverRecord, data: &[&dyn DataSource]) -> Result<WriteReport, RecordError> {
        let slot = self.newest.map_or(0, |newest| 1 - newest.slot);
        let generation = match self.newest {
            None => 1,
            Some(newest) => newest
                .generation
                .checked_add(1)
                .ok_or(RecordError::GenerationOverflow(newest.generation))?,
        };
        let lens: Vec<u64> = data.iter().map(|source| source.data_len()).collect();
        check_fd_extents(record, lens.len())?;

        // The payload is written after the data but sits before it, so
        // reserve room for the largest encoding the extents can take.
        let placeholders = lens
            .iter()
            .map(|&len| Extent {
                offset: u64::MAX,
                len,
                crc32c: u32::MAX,
            })
            .collect();
        let original = std::mem::replace(&mut record.extents, placeholders);
        let bound = postcard::serialize_with_flavor::<_, postcard::ser_flavors::Size, usize>(
            &*record,
            postcard::ser_flavors::Size::default(),
        );
        record.extents = original;
        let bound = bound.map_err(RecordError::Encode)? as u64;
        if bound > MAX_RECORD_LEN {
            return Err(RecordError::TooLarge {
                len: bound,
                max: MAX_RECORD_LEN,
            });
        }
        let slot_start = self.slot_start(slot);
        let mut extents = self.place_extents(slot_start, HEADER_LEN as u64 + bound, &lens)?;

        let bytes = self.region.bytes_mut();

        // 1. Invalidate the slot: from now on it reads as empty.
        let header_range = range(slot_start, HEADER_LEN as u64);
        bytes[header_range.clone()].fill(0);
        self.trace.record(header_range.start, &bytes[header_range.clone()]);
        fence(Ordering::Release);

        // 2. Data, straight from each source into place.
        let mut dsts = Vec::with_capacity(extents.len());
        let mut rest: &mut [u8] = &mut bytes[range(slot_start, self.slot_len)];
        let mut rest_start = slot_start;
        for extent in &extents {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut((extent.offset - rest_start) as usize);
            let (dst, tail) = tail.split_at_mut(extent.len as usize);
            dsts.push(dst);
            rest = tail;
            rest_start = extent.offset + extent.len;
        }
        let crcs = copy::copy_sources(data, dsts)?;
        for (extent, crc) in extents.iter_mut().zip(crcs) {
            extent.crc32c = crc;
            let written = range(extent.offset, extent.len);
            self.trace.record(written.start, &bytes[written]);
        }
        fence(Ordering::Release);

        // 3. The payload, encoded in place.
        let payload_range = range(slot_start + HEADER_LEN as u64, bound);
        let original = std::mem::replace(&mut record.extents, extents);
        let payload = match postcard::to_slice(&*record, &mut bytes[payload_range.clone()]) {
            Ok(payload) => payload,
            Err(error) => {
                record.extents = original;
                return Err(RecordError::Encode(error));
            }
        };
        let payload_len = payload.len() as u64;
        let payload_crc32c = crc32c::crc32c(payload);
        self.trace.record(payload_range.start, payload);

        // 3b. An empty journal after the record and its data: an end marker
        // at its start, so nothing an older generation left there is read.
        let used_end = record
            .extents
            .iter()
            .map(|e| e.offset + e.len)
            .fold(slot_start + HEADER_LEN as u64 + payload_len, u64::max);
        let slot_end = slot_start + self.slot_len;
        let journal_start = journal::start_after(used_end).filter(|&j| j + ENTRY_HEADER_LEN <= slot_end);
        if let Some(j) = journal_start {
            let marker = range(j, ENTRY_HEADER_LEN);
            bytes[marker.clone()].fill(0);
            self.trace.record(marker.start, &bytes[marker]);
        }
        fence(Ordering::Release);

        // 4. The header: the slot becomes valid.
        let header = Header {
            version: FORMAT_VERSION,
            generation,
            region_len: bytes.len() as u64,
            payload_len,
            payload_crc32c,
        };
        bytes[header_range.clone()].copy_from_slice(&header.to_bytes());
        self.trace.record(header_range.start, &bytes[header_range]);

        let record_len = HEADER_LEN as u64 + payload_len;
        self.newest = Some(Newest {
            slot,
            generation,
            data: (slot_start + record_len, slot_start + self.slot_len),
        });
        let files = record.sessions.iter().map(|s| s.fds.len() as u64).sum();
        self.tail = journal_start.map(|start| Tail {
            generation,
            start,
            end: start,
            limit: slot_end,
            entries: 0,
            fold_after: journal::fold_after(files),
        });
        Ok(WriteReport {
            generation,
            slot,
            record_bytes: record_len,
            data_bytes: lens.iter().sum(),
        })
    }

    /// Appends `entry` to the journal of the newest record (see
    /// `journal.rs`): true once it is in the region, false when the change
    /// needs a full [`write`](Self::write) instead (no record yet, a record
    /// of an older format, a journal that is full or has taken its share of
    /// entries). Nothing is written when it returns false or fails.
    ///
    /// Order of the writes: a new end marker after the entry, the entry's
    /// payload, its length and CRC last. Cut anywhere, the journal reads as
    /// it was before (the entry fails its CRC, or the old end marker is
    /// still in place).
    pub fn append(&mut self, entry: &JournalEntry) -> Result<bool, RecordError> {
        let Some(tail) = self.tail.as_mut() else {
            return Ok(false);
        };
        let Ok(seq) = u32::try_from(tail.entries) else {
            return Ok(false);
        };
        if tail.entries >= tail.fold_after {
            return Ok(false);
        }
        let entry = journal::encode(entry, tail.generation, seq)?;
        let end = tail.end + entry.len() as u64;
        if end + ENTRY_HEADER_LEN > tail.limit {
            return Ok(false);
        }
        let bytes = self.region.bytes_mut();
        let marker = range(end, ENTRY_HEADER_LEN);
        bytes[marker.clone()].fill(0);
        self.trace.record(marker.start, &bytes[marker]);
        let payload = range(tail.end + ENTRY_HEADER_LEN, entry.len() as u64 - ENTRY_HEADER_LEN);
        bytes[payload.clone()].copy_from_slice(&entry[ENTRY_HEADER_LEN as usize..]);
        self.trace.record(payload.start, &bytes[payload]);
        fence(Ordering::Release);
        let head = range(tail.end, ENTRY_HEADER_LEN);
        bytes[head.clone()].copy_from_slice(&entry[..ENTRY_HEADER_LEN as usize]);
        self.trace.record(head.start, &bytes[head]);
        tail.end = end;
        tail.entries += 1;
        Ok(true)
    }

    /// Entries in the journal of the newest record.
    pub fn journal_entries(&self) -> u64 {
        self.tail.map_or(0, |t| t.entries)
    }

    /// What the newest record takes of its slot (`None` without a record).
    pub fn slot_use(&self) -> Option<SlotUse> {
        let newest = self.newest?;
        let start = self.slot_start(newest.slot);
        Some(SlotUse {
            record: newest.data.0 - start,
            journal: self.tail.map_or(0, |t| t.end + ENTRY_HEADER_LEN - t.start),
            journal_entries: self.journal_entries(),
            slot: self.slot_len,
        })
    }

    /// The bytes of an extent of the newest record, checked against its CRC.
    ///
    /// The extent must lie in the data area of the newest record's slot.
    pub fn data(&self, extent: &Extent) -> Result<&[u8], RecordError> {
        let newest = self.newest.ok_or(RecordError::NoRecord)?;
        check_bounds(extent, newest.data)?;
        let bytes = &self.region.bytes()[range(extent.offset, extent.len)];
        let computed = crc32c::crc32c(bytes);
        if computed != extent.crc32c {
            return Err(RecordError::DataChecksum {
                offset: extent.offset,
                len: extent.len,
                stored: extent.crc32c,
                computed,
            });
        }
        Ok(bytes)
    }

    /// Bytes of data one slot can hold when the record (header and payload)
    /// fits in the slot's first [`LAYOUT_ALIGN`] bytes. A larger record takes
    /// whole [`LAYOUT_ALIGN`] units off this, and each extent starts on a
    /// [`LAYOUT_ALIGN`] boundary.
    pub fn data_capacity(&self) -> u64 {
        self.slot_len - LAYOUT_ALIGN
    }

    /// Generation of the newest valid record, if any.
    pub fn latest_generation(&self) -> Option<u64> {
        self.newest.map(|newest| newest.generation)
    }

    /// The newest valid record as it lies in the region: its slot's header
    /// and payload (not the data extents), e.g. to keep a copy aside.
    pub fn newest_record_bytes(&self) -> Option<&[u8]> {
        let newest = self.newest?;
        let start = self.slot_start(newest.slot);
        Some(&self.region.bytes()[range(start, newest.data.0 - start)])
    }

    /// Size of each slot in bytes.
    pub fn slot_len(&self) -> u64 {
        self.slot_len
    }

    /// The region.
    pub fn region(&self) -> &R {
        &self.region
    }

    /// The region, to [`reinitialize`](crate::region::Region::reinitialize)
    /// it; call [`clear`](Self::clear) afterwards.
    pub fn region_mut(&mut self) -> &mut R {
        &mut self.region
    }

    /// Forgets every record, once the operator decided so: lays the slots
    /// out again for the region as it is now and zeroes both slot headers,
    /// so the region reads as empty and the next write is generation 1.
    pub fn clear(&mut self) -> Result<(), RecordError> {
        let have = self.region.len() as u64;
        let slot_len = have / 2 / LAYOUT_ALIGN * LAYOUT_ALIGN;
        if slot_len == 0 {
            return Err(RecordError::RegionTooSmall {
                need: 2 * LAYOUT_ALIGN,
                have,
            });
        }
        self.slot_len = slot_len;
        for slot in 0..2 {
            let header = range(self.slot_start(slot), HEADER_LEN as u64);
            self.region.bytes_mut()[header.clone()].fill(0);
            self.trace.record(header.start, &self.region.bytes()[header]);
        }
        self.newest = None;
        self.tail = None;
        Ok(())
    }

    /// Gives the region back.
    pub fn into_region(self) -> R {
        self.region
    }

    fn slot_start(&self, slot: usize) -> u64 {
        slot as u64 * self.slot_len
    }

    /// Checks one slot: `None` when empty, the record when valid.
    fn check_slot(&self, slot: usize) -> Result<Option<codec::SlotRecord>, RecordError> {
        let start = self.slot_start(slot);
        let bytes = &self.region.bytes()[range(start, self.slot_len)];
        let Some(found) = codec::decode_slot(bytes, self.region.len() as u64)? else {
            return Ok(None);
        };
        let data_area = (start + found.record_len, start + self.slot_len);
        for extent in &found.record.extents {
            check_bounds(extent, data_area)?;
        }
        Ok(Some(found))
    }

    /// Extents for data of `lens` bytes in the slot at `slot_start`, after
    /// `record_len` bytes of header and payload, each on a [`LAYOUT_ALIGN`]
    /// boundary; refused when they do not fit in the slot.
    fn place_extents(&self, slot_start: u64, record_len: u64, lens: &[u64]) -> Result<Vec<Extent>, RecordError> {
        let too_small = |need: Option<u64>| RecordError::RegionTooSmall {
            need: need
                .and_then(align_up)
                .and_then(|slot| slot.checked_mul(2))
                .unwrap_or(u64::MAX),
            have: self.region.len() as u64,
        };
        let mut extents = Vec::with_capacity(lens.len());
        let mut end = Some(record_len);
        let mut cursor = align_up(record_len);
        for &len in lens {
            let Some(offset) = cursor else { break };
            extents.push(Extent {
                offset: slot_start + offset,
                len,
                crc32c: 0,
            });
            end = offset.checked_add(len);
            cursor = end.and_then(align_up);
        }
        if cursor.is_none() || end.is_none_or(|end| end > self.slot_len) {
            return Err(too_small(end));
        }
        Ok(extents)
    }
}

#[cfg(test)]
impl<R: Region> RecordStore<R> {
    /// From now on, keeps a copy of every write (see [`Trace`]).
    pub(crate) fn start_trace(&mut self) {
        self.trace.steps = Some(Vec::new());
    }

    /// The writes made since [`start_trace`](Self::start_trace), in order.
    pub(crate) fn take_trace(&mut self) -> Vec<(usize, Vec<u8>)> {
        self.trace.steps.take().unwrap_or_default()
    }
}

/// Refuses a record whose files point at extents that will not exist.
fn check_fd_extents(record: &HandoverRecord, extents: usize) -> Result<(), RecordError> {
    for session in &record.sessions {
        for fd in &session.fds {
            if let Some(index) = fd.data
                && index as usize >= extents
            {
                return Err(RecordError::DanglingExtent {
                    session: session.name.as_str().to_string(),
                    token: fd.token,
                    index,
                    extents,
                });
            }
        }
    }
    Ok(())
}

/// Checks that `extent` lies within `area` (start, end).
fn check_bounds(extent: &Extent, (start, end): (u64, u64)) -> Result<(), RecordError> {
    let inside = extent.offset >= start && extent.offset.checked_add(extent.len).is_some_and(|e| e <= end);
    if inside {
        Ok(())
    } else {
        Err(RecordError::DataOutOfBounds {
            offset: extent.offset,
            len: extent.len,
            start,
            end,
        })
    }
}

/// `len` bytes from `start`, as an index range. Callers have checked that
/// the range lies within the region, whose length is a `usize`.
fn range(start: u64, len: u64) -> Range<usize> {
    start as usize..(start + len) as usize
}

/// `value` rounded up to a multiple of [`LAYOUT_ALIGN`]; `None` on overflow.
fn align_up(value: u64) -> Option<u64> {
    Some(value.checked_add(LAYOUT_ALIGN - 1)? / LAYOUT_ALIGN * LAYOUT_ALIGN)
}

/// In unit tests, a copy of every write the store makes, in order, so a
/// test can rebuild the region as it was after any prefix of a write. In
/// other builds it is empty and does nothing.
#[derive(Debug, Default)]
struct Trace {
    #[cfg(test)]
    steps: Option<Vec<(usize, Vec<u8>)>>,
}

impl Trace {
    #[inline(always)]
    fn record(&mut self, _offset: usize, _bytes: &[u8]) {
        #[cfg(test)]
        if let Some(steps) = &mut self.steps {
            steps.push((_offset, _bytes.to_vec()));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::names::SessionName;
    use crate::record::{Cycle, FdRecord, Handover, KernelImage, Outcome, Section, SessionRecord, Timestamps, Update};
    use crate::region::{FileRegion, MemRegion};
    use crate::state::State;

    /// A record with something in every field.
    pub(crate) fn rich_record() -> HandoverRecord {
        let target = KernelImage {
            kernel: "/boot/vmlinuz-7.3.0".into(),
            kernel_sha256: [0xab; 32],
            initrd: Some("/boot/initrd.img-7.3.0".into()),
            initrd_sha256: Some([0xcd; 32]),
            cmdline: "console=ttyS0 liveupdate=on".into(),
        };
        HandoverRecord {
            state: State::Frozen,
            backend: "file".into(),
            handover: Some(Handover {
                boot_id: "4b0e7d2c-1111-2222-3333-444455556666".into(),
                simulated: true,
                kernel_release: "7.2.0".into(),
                nonce: Some("c0ffee".into()),
            }),
            update: Some(Update {
                id: 9,
                from_release: "7.2.0".into(),
                target: Some(target.clone()),
                timestamps: Timestamps {
                    prepared: Some(1_700_000_000_000_000_000),
                    freeze_started: Some(1_700_000_001_000_000_000),
                    frozen: Some(1_700_000_001_500_000_000),
                    ..Timestamps::default()
                },
                nonce: Some("c0ffee".into()),
                previous: Some(KernelImage {
                    kernel: "/boot/vmlinuz-7.2.0".into(),
                    kernel_sha256: [0x12; 32],
                    initrd: None,
                    initrd_sha256: None,
                    cmdline: "console=ttyS0".into(),
                }),
                rollback_of: None,
                validation: None,
                hooks: vec![crate::record::HookRun {
                    phase: "pre-prepare".into(),
                    hook: "10-check".into(),
                    ok: true,
                    status: "exit 0".into(),
                    duration_ns: 1_000_000,
                    last_line: "ok".into(),
                }],
            }),
            sessions: vec![SessionRecord {
                name: SessionName::new("vm-1").unwrap(),
                owner_uid: 1000,
                fds: vec![
                    FdRecord {
                        token: 1,
                        size: 5000,
                        data: Some(0),
                        retrieved: false,
                    },
                    FdRecord {
                        token: 2,
                        size: 3000,
                        data: Some(1),
                        retrieved: false,
                    },
                ],
                incoming: false,
            }],
            subsystems: vec![Section {
                name: "vmm".into(),
                version: 3,
                blob: b"paused".to_vec(),
            }],
            extents: Vec::new(),
            history: vec![Cycle {
                id: 8,
                outcome: Outcome::Finished,
                target: Some(target),
                from_release: "7.1.0".into(),
                to_release: "7.2.0".into(),
                timestamps: Timestamps::default(),
                sessions: 1,
                files: 2,
                bytes: 8000,
                previous: None,
                rollback_of: Some(7),
                rolled_back_by: None,
                validation: Some(crate::record::Validation {
                    hook: "50-vms".into(),
                    reason: "vm0 did not answer".into(),
                    accepted_by: Some(0),
                    accepted_at: Some(1_700_000_000_000_000_000),
                }),
                hooks: Vec::new(),
            }],
            live_updates: 8,
            next_cycle_id: 10,
            events: Vec::new(),
            booted: None,
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn store(len: usize) -> RecordStore<MemRegion> {
        RecordStore::new(MemRegion::zeroed(len)).unwrap()
    }

    /// Deterministic pseudo-random bytes (xorshift64).
    fn noise(len: usize, mut state: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    #[test]
    fn region_smaller_than_two_slots_is_refused() {
        let err = RecordStore::new(MemRegion::zeroed(8191)).unwrap_err();
        assert!(matches!(err, RecordError::RegionTooSmall { need: 8192, have: 8191 }));
        assert_eq!(
            err.to_string(),
            "the region must be at least 8192 bytes for this, but it is 8191 bytes: give luod a larger region"
        );
    }

    #[test]
    fn fresh_region_has_two_empty_slots_and_no_record() {
        let mut store = store(16 << 10);
        let report = store.load().unwrap();
        assert_eq!(report.latest, None);
        assert_eq!(report.slots, [SlotStatus::Empty, SlotStatus::Empty]);
        assert!(matches!(
            store.data(&Extent {
                offset: 0,
                len: 0,
                crc32c: 0
            }),
            Err(RecordError::NoRecord)
        ));
        assert_eq!(store.slot_len(), 8 << 10);
        assert_eq!(store.data_capacity(), 4 << 10);
    }

    #[test]
    fn record_without_data_round_trips() {
        let mut store = store(16 << 10);
        let mut record = HandoverRecord::new("file");
        let report = store.write(&mut record, &[]).unwrap();
        assert_eq!((report.generation, report.slot, report.data_bytes), (1, 0, 0));
        assert_eq!(
            report.record_bytes,
            HEADER_LEN as u64 + postcard::to_stdvec(&record).unwrap().len() as u64
        );
        let loaded = store.load().unwrap();
        assert_eq!(loaded.latest, Some((1, record)));
        assert_eq!(loaded.slots, [SlotStatus::Valid { generation: 1 }, SlotStatus::Empty]);
    }

    #[test]
    fn newest_record_bytes_are_the_newest_slots_header_and_payload() {
        let mut store = store(64 << 10);
        assert_eq!(store.newest_record_bytes(), None);
        store.write(&mut HandoverRecord::new("file"), &[]).unwrap();
        let mut record = rich_record();
        let data = [pattern(5000, 1), pattern(3000, 2)];
        let report = store.write(&mut record, &[&data[0], &data[1]]).unwrap();
        assert_eq!(report.slot, 1);
        let bytes = store.newest_record_bytes().unwrap().to_vec();
        assert_eq!(bytes.len() as u64, report.record_bytes);
        assert_eq!(bytes[..8], crate::record::MAGIC);
        assert_eq!(bytes, store.region().bytes()[32 << 10..(32 << 10) + bytes.len()]);
        // The bytes alone, put where they were in an empty region of the
        // same size, read back as the record (its data is not in them).
        let mut copy = MemRegion::zeroed(64 << 10);
        copy.bytes_mut()[32 << 10..(32 << 10) + bytes.len()].copy_from_slice(&bytes);
        let mut reread = RecordStore::new(copy).unwrap();
        assert_eq!(reread.load().unwrap().latest, Some((2, record)));
    }

    #[test]
    fn record_with_data_round_trips_and_sets_extents() {
        let mut store = store(64 << 10);
        let mut record = rich_record();
        let first = pattern(5000, 1);
        let second = pattern(3000, 2);
        let report = store.write(&mut record, &[&first, &second.as_slice()]).unwrap();
        assert_eq!(report.data_bytes, 8000);
        assert_eq!(record.extents.len(), 2);
        // Data starts on the first boundary after the record, each extent on its own.
        assert_eq!(record.extents[0].offset, 4096);
        assert_eq!(record.extents[0].len, 5000);
        assert_eq!(record.extents[0].crc32c, crc32c::crc32c(&first));
        assert_eq!(record.extents[1].offset, 12288);
        assert_eq!(record.extents[1].crc32c, crc32c::crc32c(&second));

        let loaded = store.load().unwrap();
        assert_eq!(loaded.latest, Some((1, record.clone())));
        assert_eq!(store.data(&record.extents[0]).unwrap(), first.as_slice());
        assert_eq!(store.data(&record.extents[1]).unwrap(), second.as_slice());
    }

    #[test]
    fn file_sources_are_copied_into_a_file_region_that_reopens() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("region");
        let mut source = tempfile::tempfile().unwrap();
        let contents = pattern(10_000, 7);
        source.write_all(&contents).unwrap();

        let mut store = RecordStore::new(FileRegion::open(&path, 64 << 10).unwrap()).unwrap();
        let mut record = rich_record();
        record.sessions[0].fds.truncate(1);
        store.write(&mut record, &[&source]).unwrap();
        drop(store);

        let mut store = RecordStore::new(FileRegion::open_existing(&path).unwrap()).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.latest, Some((1, record.clone())));
        assert_eq!(store.data(&record.extents[0]).unwrap(), contents.as_slice());
    }

    #[test]
    fn generations_increase_and_slots_alternate() {
        let mut store = store(16 << 10);
        for generation in 1..=5u64 {
            let mut record = HandoverRecord::new("file");
            record.next_cycle_id = generation;
            let report = store.write(&mut record, &[]).unwrap();
            assert_eq!(report.generation, generation);
            assert_eq!(report.slot, ((generation - 1) % 2) as usize);
            let loaded = store.load().unwrap();
            assert_eq!(loaded.latest, Some((generation, record)));
            let older = SlotStatus::Valid {
                generation: generation - 1,
            };
            let newer = SlotStatus::Valid { generation };
            let expected = match (generation, report.slot) {
                (1, _) => [newer, SlotStatus::Empty],
                (_, 0) => [newer, older],
                _ => [older, newer],
            };
            assert_eq!(loaded.slots, expected);
        }
    }

    #[test]
    fn a_new_store_continues_from_the_newest_generation() {
        let mut store = store(16 << 10);
        store.write(&mut HandoverRecord::new("file"), &[]).unwrap();
        store.write(&mut HandoverRecord::new("file"), &[]).unwrap();
        let mut store = RecordStore::new(store.into_region()).unwrap();
        assert_eq!(store.latest_generation(), Some(2));
        let report = store.write(&mut HandoverRecord::new("file"), &[]).unwrap();
        assert_eq!((report.generation, report.slot), (3, 0));
    }

    #[test]
    fn data_that_does_not_fit_is_refused_before_touching_the_region() {
        let mut store = store(16 << 10);
        store.write(&mut HandoverRecord::new("file"), &[]).unwrap();
        let before = store.region().0.clone();
        let mut record = HandoverRecord::new("file");
        let big = vec![1u8; 4097];
        let err = store.write(&mut record, &[&big]).unwrap_err();
        // 4096 for the record, 4097 of data: a slot of 12 KiB, a region of 24 KiB.
        assert!(
            matches!(
                err,
                RecordError::RegionTooSmall {
                    need: 24576,
                    have: 16384
                }
            ),
            "{err:?}"
        );
        assert_eq!(store.region().0, before);
        assert!(record.extents.is_empty());
        // Exactly the capacity fits.
        let exact = vec![1u8; store.data_capacity() as usize];
        store.write(&mut record, &[&exact]).unwrap();
    }

    #[test]
    fn absurd_data_length_is_refused_without_overflow() {
        struct Huge;
        impl DataSource for Huge {
            fn data_len(&self) -> u64 {
                u64::MAX - 10
            }
            fn read_into(&self, _: &mut [u8]) -> std::io::Result<()> {
                unreachable!("must be refused before reading")
            }
        }
        let mut store = store(16 << 10);
        let err = store
            .write(&mut HandoverRecord::new("file"), &[&Huge, &Huge])
            .unwrap_err();
        assert!(
            matches!(
                err,
                RecordError::RegionTooSmall {
                    need: u64::MAX,
                    have: 16384
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn oversized_record_is_refused_before_touching_the_region() {
        let mut store = store(16 << 10);
        let before = store.region().0.clone();
        let mut record = HandoverRecord::new("file");
        record.subsystems.push(Section {
            name: "big".into(),
            version: 1,
            blob: vec![0; MAX_RECORD_LEN as usize],
        });
        let err = store.write(&mut record, &[]).unwrap_err();
        assert!(
            matches!(err, RecordError::TooLarge { len, max } if len > MAX_RECORD_LEN && max == MAX_RECORD_LEN),
            "{err:?}"
        );
        assert_eq!(store.region().0, before);
    }

    #[test]
    fn file_pointing_at_a_missing_extent_is_refused() {
        let mut store = store(64 << 10);
        let mut record = rich_record();
        let only = pattern(10, 0);
        let err = store.write(&mut record, &[&only]).unwrap_err();
        assert!(
            matches!(&err, RecordError::DanglingExtent { session, token: 2, index: 1, extents: 1 } if session == "vm-1"),
            "{err:?}"
        );
        assert_eq!(store.load().unwrap().slots, [SlotStatus::Empty, SlotStatus::Empty]);
    }

    #[test]
    fn failing_data_source_keeps_the_previous_generation() {
        struct Broken;
        impl DataSource for Broken {
            fn data_len(&self) -> u64 {
                10
            }
            fn read_into(&self, _: &mut [u8]) -> std::io::Result<()> {
                Err(std::io::Error::other("device gone"))
            }
        }
        let mut store = store(64 << 10);
        let mut first = HandoverRecord::new("file");
        store.write(&mut first, &[]).unwrap();
        let good = pattern(10, 0);
        let mut second = HandoverRecord::new("file");
        let err = store.write(&mut second, &[&good, &Broken]).unwrap_err();
        assert!(matches!(err, RecordError::DataSource { index: 1, .. }));
        assert!(second.extents.is_empty());
        let loaded = store.load().unwrap();
        assert_eq!(loaded.latest, Some((1, first)));
        assert_eq!(loaded.slots, [SlotStatus::Valid { generation: 1 }, SlotStatus::Empty]);
    }

    #[test]
    fn data_is_only_served_from_the_newest_slot_and_checked() {
        let mut store = store(64 << 10);
        let mut record = rich_record();
        let (a, b) = (pattern(5000, 1), pattern(3000, 2));
        store.write(&mut record, &[&a, &b]).unwrap();
        let extent = record.extents[0];
        let slot_end = store.slot_len();
        let data_start = HEADER_LEN as u64 + postcard::to_stdvec(&record).unwrap().len() as u64;

        // In the header or payload, past the slot, wrapping around.
        for bad in [
            Extent { offset: 0, ..extent },
            Extent {
                offset: slot_end - 10,
                len: 11,
                ..extent
            },
            Extent {
                offset: slot_end,
                ..extent
            },
            Extent {
                offset: u64::MAX,
                len: 2,
                ..extent
            },
        ] {
            let err = store.data(&bad).unwrap_err();
            assert!(
                matches!(err, RecordError::DataOutOfBounds { offset, len, start, end }
                    if offset == bad.offset && len == bad.len && start == data_start && end == slot_end),
                "{bad:?}: {err:?}"
            );
        }
        let wrong_crc = Extent {
            crc32c: extent.crc32c ^ 1,
            ..extent
        };
        let err = store.data(&wrong_crc).unwrap_err();
        assert!(
            matches!(err, RecordError::DataChecksum { offset: 4096, len: 5000, stored, computed }
            if stored == extent.crc32c ^ 1 && computed == extent.crc32c)
        );
    }

    #[test]
    fn damaged_data_is_detected_when_read() {
        let mut store = store(64 << 10);
        let mut record = rich_record();
        let (a, b) = (pattern(5000, 1), pattern(3000, 2));
        store.write(&mut record, &[&a, &b]).unwrap();
        let mut image = store.into_region();
        image.0[4096 + 100] ^= 0x40;
        let mut store = RecordStore::new(image).unwrap();
        // The record itself is intact: the slot stays valid...
        assert_eq!(store.load().unwrap().slots[0], SlotStatus::Valid { generation: 1 });
        // ...and reading the damaged extent says so.
        let err = store.data(&record.extents[0]).unwrap_err();
        assert!(matches!(
            err,
            RecordError::DataChecksum {
                offset: 4096,
                len: 5000,
                ..
            }
        ));
        assert_eq!(store.data(&record.extents[1]).unwrap(), b.as_slice());
    }

    /// The error kind a flipped byte at `index` of a record must produce.
    fn expected_kind(index: usize, err: &RecordError) -> bool {
        match index {
            0..8 => matches!(err, RecordError::BadMagic { .. }),
            // A damaged version is damage, not another format: the header
            // checksum is checked before the version.
            8..HEADER_LEN => matches!(err, RecordError::HeaderChecksum { .. }),
            _ => matches!(err, RecordError::PayloadChecksum { .. }),
        }
    }

    /// Flips, one at a time, each byte of header and payload of the record in
    /// slot `slot` of `image`, and checks the outcome with `check`.
    fn for_each_flip(image: &[u8], slot: usize, record_len: usize, check: impl Fn(usize, RecordStore<MemRegion>)) {
        let start = slot * image.len() / 2;
        for index in 0..record_len {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut damaged = image.to_vec();
                damaged[start + index] ^= mask;
                let store = RecordStore::new(MemRegion(damaged)).unwrap();
                let err = store.check_slot(slot).unwrap_err();
                assert!(expected_kind(index, &err), "byte {index} ^ {mask:#x}: {err:?}");
                check(index, store);
            }
        }
    }

    #[test]
    fn any_flipped_byte_of_the_only_record_makes_its_slot_invalid() {
        let mut store = store(16 << 10);
        let mut record = rich_record();
        record.sessions.clear();
        let report = store.write(&mut record, &[]).unwrap();
        let image = store.into_region().0;
        for_each_flip(&image, 0, report.record_bytes as usize, |index, mut store| {
            let err = store.check_slot(0).unwrap_err();
            let loaded = store.load().unwrap();
            assert_eq!(loaded.latest, None, "byte {index}");
            assert_eq!(
                loaded.slots,
                [
                    SlotStatus::Invalid {
                        reason: error_chain(&err)
                    },
                    SlotStatus::Empty
                ]
            );
        });
    }

    #[test]
    fn any_flipped_byte_of_the_newest_record_falls_back_to_the_older_one() {
        let mut store = store(64 << 10);
        let mut older = rich_record();
        let (a, b) = (pattern(5000, 1), pattern(3000, 2));
        store.write(&mut older, &[&a, &b]).unwrap();
        let mut newer = rich_record();
        newer.state = State::Updated;
        let report = store.write(&mut newer, &[&b, &a]).unwrap();
        assert_eq!(report.slot, 1);
        let image = store.into_region().0;
        for_each_flip(&image, 1, report.record_bytes as usize, |index, mut store| {
            let loaded = store.load().unwrap();
            assert_eq!(loaded.latest, Some((1, older.clone())), "byte {index}");
            assert_eq!(loaded.slots[0], SlotStatus::Valid { generation: 1 });
            assert!(matches!(loaded.slots[1], SlotStatus::Invalid { .. }));
            assert_eq!(store.data(&older.extents[0]).unwrap(), a.as_slice());
        });
    }

    /// Puts a slot image with a valid header around `record` in `slot`.
    fn forge(image: &mut [u8], slot: usize, generation: u64, record: &HandoverRecord) {
        let payload = postcard::to_stdvec(record).unwrap();
        let header = Header {
            version: FORMAT_VERSION,
            generation,
            region_len: image.len() as u64,
            payload_len: payload.len() as u64,
            payload_crc32c: crc32c::crc32c(&payload),
        };
        let start = slot * image.len() / 2;
        image[start..start + HEADER_LEN].copy_from_slice(&header.to_bytes());
        image[start + HEADER_LEN..start + HEADER_LEN + payload.len()].copy_from_slice(&payload);
    }

    #[test]
    fn record_with_an_extent_outside_its_slot_is_invalid() {
        let mut image = vec![0u8; 16 << 10];
        let mut record = HandoverRecord::new("file");
        // Points into slot B while the record sits in slot A.
        record.extents.push(Extent {
            offset: 8192,
            len: 16,
            crc32c: 0,
        });
        forge(&mut image, 0, 1, &record);
        let mut store = RecordStore::new(MemRegion(image)).unwrap();
        let record_len = HEADER_LEN as u64 + postcard::to_stdvec(&record).unwrap().len() as u64;
        let err = store.check_slot(0).unwrap_err();
        assert!(
            matches!(err, RecordError::DataOutOfBounds { offset: 8192, len: 16, start, end: 8192 } if start == record_len),
            "{err:?}"
        );
        assert_eq!(store.load().unwrap().latest, None);
    }

    #[test]
    fn newest_generation_at_the_maximum_refuses_to_write() {
        let mut image = vec![0u8; 16 << 10];
        forge(&mut image, 1, u64::MAX, &HandoverRecord::new("file"));
        let mut store = RecordStore::new(MemRegion(image)).unwrap();
        let err = store.write(&mut HandoverRecord::new("file"), &[]).unwrap_err();
        assert!(matches!(err, RecordError::GenerationOverflow(u64::MAX)));
    }

    #[test]
    fn region_full_of_random_bytes_has_no_record() {
        for seed in 1..=20 {
            let mut store = RecordStore::new(MemRegion(noise(64 << 10, seed))).unwrap();
            let loaded = store.load().unwrap();
            assert_eq!(loaded.latest, None);
            for status in &loaded.slots {
                assert!(
                    matches!(status, SlotStatus::Invalid { reason } if reason.starts_with("slot does not start with the record magic")),
                    "{status:?}"
                );
            }
            assert!(matches!(
                store.data(&Extent {
                    offset: 0,
                    len: 1,
                    crc32c: 0
                }),
                Err(RecordError::NoRecord)
            ));
            // And a write over the garbage works.
            store.write(&mut HandoverRecord::new("file"), &[]).unwrap();
            assert_eq!(store.load().unwrap().latest.map(|(g, _)| g), Some(1));
        }
    }

    #[test]
    fn region_that_changed_size_is_reported() {
        let mut store = store(16 << 10);
        store.write(&mut HandoverRecord::new("file"), &[]).unwrap();
        let mut image = store.into_region();
        image.0.resize(32 << 10, 0);
        let mut store = RecordStore::new(image).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.latest, None);
        assert_eq!(
            loaded.slots[0],
            SlotStatus::Invalid {
                reason: "record was written for a region of 16384 bytes but the region is now 32768 bytes: open the region with its original size".into()
            }
        );
    }

    /// Writes generation 3 (slot A, over generation 1) after generation 2
    /// (slot B), and rebuilds the region as a crash would leave it after every
    /// 64-byte boundary of the write (and after every byte of the final
    /// header): generation 2 and its data must stay readable until the write
    /// is complete.
    #[test]
    fn write_cut_at_any_point_leaves_the_previous_generation_readable() {
        let mut store = store(64 << 10);
        let (a, b) = (pattern(5000, 1), pattern(3000, 2));
        store.write(&mut rich_record(), &[&a, &b]).unwrap();
        let mut previous = rich_record();
        previous.state = State::Prepared;
        store.write(&mut previous, &[&b, &a]).unwrap();
        let before = store.region().0.clone();

        store.trace.steps = Some(Vec::new());
        let mut next = rich_record();
        next.state = State::Updated;
        let (c, d) = (pattern(6000, 3), pattern(2500, 4));
        let report = store.write(&mut next, &[&c, &d]).unwrap();
        assert_eq!((report.generation, report.slot), (3, 0));
        let steps = store.trace.steps.take().unwrap();
        let after = store.region().0.clone();

        let replay = |cut: usize| {
            let mut image = before.clone();
            let mut left = cut;
            for (offset, bytes) in &steps {
                let n = left.min(bytes.len());
                image[*offset..*offset + n].copy_from_slice(&bytes[..n]);
                left -= n;
            }
            image
        };
        let total: usize = steps.iter().map(|(_, bytes)| bytes.len()).sum();
        // The trace holds every byte the write changed.
        assert_eq!(replay(total), after);

        let mut cuts: Vec<usize> = (0..=total).step_by(64).collect();
        cuts.extend(total - HEADER_LEN..=total);
        for cut in cuts {
            let image = replay(cut);
            let complete = image == after;
            let mut store = RecordStore::new(MemRegion(image)).unwrap();
            let loaded = store.load().unwrap();
            if complete {
                assert_eq!(loaded.latest, Some((3, next.clone())), "cut at {cut}");
                assert_eq!(store.data(&next.extents[0]).unwrap(), c.as_slice());
                assert_eq!(store.data(&next.extents[1]).unwrap(), d.as_slice());
            } else {
                assert_eq!(loaded.latest, Some((2, previous.clone())), "cut at {cut} of {total}");
                assert_eq!(store.data(&previous.extents[0]).unwrap(), b.as_slice());
                assert_eq!(store.data(&previous.extents[1]).unwrap(), a.as_slice());
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn loading_a_random_region_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 8192..9000)) {
            let mut store = RecordStore::new(MemRegion(bytes)).unwrap();
            let _ = store.load().unwrap();
        }
    }
}
