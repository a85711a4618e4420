//! Slot header and payload: bytes to values and back.
//!
//! Header layout (little-endian, [`HEADER_LEN`] bytes; the table with the
//! meaning of each field is in `docs/state-format.md`):
//!
//! ```text
//!  0  magic           [u8; 8]   MAGIC
//!  8  format_version  u32       FORMAT_VERSION
//! 12  flags           u32       0 (reserved)
//! 16  generation      u64
//! 24  region_len      u64       size of the region the slot was written in
//! 32  payload_len     u64       bytes of postcard payload after the header
//! 40  payload_crc32c  u32       CRC-32C of the payload
//! 44  reserved        [u8; 16]  0
//! 60  header_crc32c   u32       CRC-32C of bytes 0..60
//! ```
//!
//! Offsets 0..12 (magic and version) are the same in every format version,
//! so a reader can always tell which version it is looking at. Everything
//! here works on untrusted bytes: no indexing that can fail, no arithmetic
//! that can overflow, no allocation sized by the input.

use super::{FORMAT_VERSION, HEADER_LEN, HandoverRecord, MAGIC, MAX_RECORD_LEN, OLDEST_READABLE, RecordError, v1, v2};

const OFF_VERSION: usize = 8;
const OFF_GENERATION: usize = 16;
const OFF_REGION_LEN: usize = 24;
const OFF_PAYLOAD_LEN: usize = 32;
const OFF_PAYLOAD_CRC: usize = 40;
const OFF_HEADER_CRC: usize = 60;

/// The fields of a slot header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    /// Format version of the payload ([`OLDEST_READABLE`]..=[`FORMAT_VERSION`]).
    pub version: u32,
    pub generation: u64,
    pub region_len: u64,
    pub payload_len: u64,
    pub payload_crc32c: u32,
}

impl Header {
    /// The header's bytes, checksum included.
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..OFF_VERSION].copy_from_slice(&MAGIC);
        h[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&self.version.to_le_bytes());
        h[OFF_GENERATION..OFF_GENERATION + 8].copy_from_slice(&self.generation.to_le_bytes());
        h[OFF_REGION_LEN..OFF_REGION_LEN + 8].copy_from_slice(&self.region_len.to_le_bytes());
        h[OFF_PAYLOAD_LEN..OFF_PAYLOAD_LEN + 8].copy_from_slice(&self.payload_len.to_le_bytes());
        h[OFF_PAYLOAD_CRC..OFF_PAYLOAD_CRC + 4].copy_from_slice(&self.payload_crc32c.to_le_bytes());
        let crc = crc32c::crc32c(&h[..OFF_HEADER_CRC]);
        h[OFF_HEADER_CRC..].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Parses the header at the start of `slot`: `None` when its bytes are
    /// all zero (an empty slot). Checks, in this order: length, magic,
    /// header checksum, version.
    pub fn parse(slot: &[u8]) -> Result<Option<Header>, RecordError> {
        let h: &[u8; HEADER_LEN] =
            slot.get(..HEADER_LEN)
                .and_then(|bytes| bytes.try_into().ok())
                .ok_or(RecordError::Truncated {
                    need: HEADER_LEN as u64,
                    have: slot.len() as u64,
                })?;
        if h.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        let magic = array::<8>(h, 0);
        if magic != MAGIC {
            return Err(RecordError::BadMagic { found: magic });
        }
        // The checksum before the version: a damaged version field is
        // damage, not a record of another format. Magic, version and header
        // checksum keep their places in every format version.
        let stored = u32::from_le_bytes(array(h, OFF_HEADER_CRC));
        let computed = crc32c::crc32c(&h[..OFF_HEADER_CRC]);
        if stored != computed {
            return Err(RecordError::HeaderChecksum { stored, computed });
        }
        let version = u32::from_le_bytes(array(h, OFF_VERSION));
        if !(OLDEST_READABLE..=FORMAT_VERSION).contains(&version) {
            // Older versions are converted by `decode_payload` (see
            // docs/state-format.md, Compatibility).
            return Err(RecordError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        Ok(Some(Header {
            version,
            generation: u64::from_le_bytes(array(h, OFF_GENERATION)),
            region_len: u64::from_le_bytes(array(h, OFF_REGION_LEN)),
            payload_len: u64::from_le_bytes(array(h, OFF_PAYLOAD_LEN)),
            payload_crc32c: u32::from_le_bytes(array(h, OFF_PAYLOAD_CRC)),
        }))
    }
}

/// `N` bytes of the header from `at`. Every caller passes a constant offset
/// inside the header; `get` keeps this panic-free regardless.
fn array<const N: usize>(h: &[u8; HEADER_LEN], at: usize) -> [u8; N] {
    h.get(at..)
        .and_then(|rest| rest.get(..N))
        .and_then(|bytes| bytes.try_into().ok())
        .unwrap_or([0; N])
}

/// A valid record found in a slot.
#[derive(Debug)]
pub(crate) struct SlotRecord {
    /// Format version in the header.
    pub version: u32,
    pub generation: u64,
    /// Header plus payload, in bytes from the slot start: data starts after.
    pub record_len: u64,
    pub record: HandoverRecord,
}

/// Decodes the record at the start of `slot` (the slot's bytes, up to the
/// end of the slot) in a region of `region_len` bytes. `None` for an empty
/// slot. Data extents are not checked here (see the store).
pub(crate) fn decode_slot(slot: &[u8], region_len: u64) -> Result<Option<SlotRecord>, RecordError> {
    let Some(header) = Header::parse(slot)? else {
        return Ok(None);
    };
    if header.region_len != region_len {
        return Err(RecordError::RegionSizeChanged {
            written: header.region_len,
            now: region_len,
        });
    }
    if header.payload_len > MAX_RECORD_LEN {
        return Err(RecordError::TooLarge {
            len: header.payload_len,
            max: MAX_RECORD_LEN,
        });
    }
    // Cannot overflow: payload_len <= MAX_RECORD_LEN.
    let record_len = HEADER_LEN as u64 + header.payload_len;
    let payload = usize::try_from(record_len)
        .ok()
        .and_then(|end| slot.get(HEADER_LEN..end))
        .ok_or(RecordError::Truncated {
            need: record_len,
            have: slot.len() as u64,
        })?;
    let computed = crc32c::crc32c(payload);
    if computed != header.payload_crc32c {
        return Err(RecordError::PayloadChecksum {
            stored: header.payload_crc32c,
            computed,
        });
    }
    Ok(Some(SlotRecord {
        version: header.version,
        generation: header.generation,
        record_len,
        record: decode_payload(header.version, payload)?,
    }))
}

/// Decodes a payload of format `version`, which must be exactly one record,
/// into the current model (a format 1 or 2 record is converted).
pub(crate) fn decode_payload(version: u32, payload: &[u8]) -> Result<HandoverRecord, RecordError> {
    match version {
        1 => decode_exact::<v1::HandoverRecord>(payload).map(|v1| HandoverRecord::from(v2::HandoverRecord::from(v1))),
        2 => decode_exact::<v2::HandoverRecord>(payload).map(HandoverRecord::from),
        // Format 4 has the payload of format 3 (it added the journal after it).
        _ => decode_exact::<HandoverRecord>(payload),
    }
}

fn decode_exact<'a, T: serde::Deserialize<'a>>(payload: &'a [u8]) -> Result<T, RecordError> {
    let (record, rest) = postcard::take_from_bytes(payload).map_err(RecordError::Decode)?;
    if !rest.is_empty() {
        return Err(RecordError::TrailingBytes {
            count: rest.len() as u64,
        });
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A slot image: header for `record`, payload, `extra` bytes of zeros.
    fn slot_image(record: &HandoverRecord, generation: u64, region_len: u64, extra: usize) -> Vec<u8> {
        let payload = postcard::to_stdvec(record).unwrap();
        let header = Header {
            version: FORMAT_VERSION,
            generation,
            region_len,
            payload_len: payload.len() as u64,
            payload_crc32c: crc32c::crc32c(&payload),
        };
        let mut image = header.to_bytes().to_vec();
        image.extend_from_slice(&payload);
        image.resize(image.len() + extra, 0);
        image
    }

    fn sample() -> HandoverRecord {
        let mut record = HandoverRecord::new("file");
        record.live_updates = 3;
        record.subsystems.push(crate::record::Section {
            name: "vmm".into(),
            version: 2,
            blob: vec![1, 2, 3, 4],
        });
        record
    }

    #[test]
    fn header_round_trips() {
        let header = Header {
            version: FORMAT_VERSION,
            generation: 7,
            region_len: 1 << 20,
            payload_len: 300,
            payload_crc32c: 0xdead_beef,
        };
        let bytes = header.to_bytes();
        assert_eq!(&bytes[..8], b"LUODREC\0");
        assert_eq!(&bytes[8..12], &FORMAT_VERSION.to_le_bytes());
        assert_eq!(Header::parse(&bytes).unwrap(), Some(header));
    }

    #[test]
    fn checksum_is_crc32c_castagnoli() {
        // The check value quoted in docs/state-format.md.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn all_zero_header_is_an_empty_slot() {
        assert_eq!(Header::parse(&[0; 100]).unwrap(), None);
    }

    #[test]
    fn slot_round_trips() {
        let image = slot_image(&sample(), 5, 4096, 10);
        let found = decode_slot(&image, 4096).unwrap().unwrap();
        assert_eq!(found.generation, 5);
        assert_eq!(found.record, sample());
        assert_eq!(found.record_len, image.len() as u64 - 10);
    }

    #[test]
    fn every_prefix_shorter_than_the_record_is_truncated() {
        let image = slot_image(&sample(), 1, 4096, 0);
        let total = image.len() as u64;
        for cut in 0..image.len() {
            let err = decode_slot(&image[..cut], 4096).unwrap_err();
            let expected_need = if cut < HEADER_LEN { HEADER_LEN as u64 } else { total };
            assert!(
                matches!(err, RecordError::Truncated { need, have } if need == expected_need && have == cut as u64),
                "cut at {cut}: {err:?}"
            );
        }
    }

    #[test]
    fn future_version_is_refused_by_number() {
        let mut image = slot_image(&sample(), 1, 4096, 0);
        image[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let crc = crc32c::crc32c(&image[..OFF_HEADER_CRC]);
        image[OFF_HEADER_CRC..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        let err = decode_slot(&image, 4096).unwrap_err();
        assert!(matches!(
            err,
            RecordError::UnsupportedVersion { found, supported } if found == FORMAT_VERSION + 1 && supported == FORMAT_VERSION
        ));
        assert_eq!(
            err.to_string(),
            "record has format version 5 but this luod reads format versions 1 to 4: use a luod built for format version 5"
        );
    }

    #[test]
    fn region_of_another_size_is_refused() {
        let image = slot_image(&sample(), 1, 8192, 0);
        let err = decode_slot(&image, 16384).unwrap_err();
        assert!(matches!(
            err,
            RecordError::RegionSizeChanged {
                written: 8192,
                now: 16384
            }
        ));
    }

    /// A header with a valid checksum around any payload length.
    fn header_with_payload_len(payload_len: u64) -> [u8; HEADER_LEN] {
        Header {
            version: FORMAT_VERSION,
            generation: 1,
            region_len: 4096,
            payload_len,
            payload_crc32c: 0,
        }
        .to_bytes()
    }

    #[test]
    fn oversized_payload_length_is_refused_before_reading() {
        let header = header_with_payload_len(MAX_RECORD_LEN + 1);
        let err = decode_slot(&header, 4096).unwrap_err();
        assert!(
            matches!(err, RecordError::TooLarge { len, max } if len == MAX_RECORD_LEN + 1 && max == MAX_RECORD_LEN)
        );
        let header = header_with_payload_len(u64::MAX);
        assert!(matches!(decode_slot(&header, 4096), Err(RecordError::TooLarge { .. })));
    }

    #[test]
    fn payload_length_past_the_slot_is_truncated() {
        let header = header_with_payload_len(5000);
        let mut slot = header.to_vec();
        slot.resize(4096, 0);
        let err = decode_slot(&slot, 4096).unwrap_err();
        assert!(matches!(err, RecordError::Truncated { need: 5064, have: 4096 }));
    }

    #[test]
    fn payload_with_valid_checksum_but_garbage_is_a_decode_error() {
        let payload = [0xffu8; 16];
        let header = Header {
            version: FORMAT_VERSION,
            generation: 1,
            region_len: 4096,
            payload_len: 16,
            payload_crc32c: crc32c::crc32c(&payload),
        };
        let mut slot = header.to_bytes().to_vec();
        slot.extend_from_slice(&payload);
        assert!(matches!(decode_slot(&slot, 4096), Err(RecordError::Decode(_))));
    }

    #[test]
    fn payload_with_bytes_after_the_record_is_refused() {
        let mut payload = postcard::to_stdvec(&sample()).unwrap();
        payload.extend_from_slice(&[0, 0, 0]);
        let err = decode_payload(FORMAT_VERSION, &payload).unwrap_err();
        assert!(matches!(err, RecordError::TrailingBytes { count: 3 }));
    }

    proptest! {
        #[test]
        fn decoding_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_slot(&bytes, 4096);
            let _ = decode_payload(1, &bytes);
            let _ = decode_payload(2, &bytes);
            let _ = decode_payload(3, &bytes);
        }

        #[test]
        fn decoding_random_bytes_behind_a_valid_magic_never_panics(
            tail in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
            bytes.extend_from_slice(&tail);
            let _ = decode_slot(&bytes, 4096);
        }

        /// Mutates a valid record's payload, then fixes the checksums so the
        /// mutation reaches the postcard decoder.
        #[test]
        fn mutated_payload_with_valid_checksums_never_panics(
            mutations in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut payload = postcard::to_stdvec(&crate::record::store::tests::rich_record()).unwrap();
            for (index, value) in &mutations {
                let i = index.index(payload.len());
                payload[i] = *value;
            }
            payload.truncate(cut.index(payload.len() + 1));
            let header = Header {
                version: FORMAT_VERSION,
                generation: 1,
                region_len: 4096,
                payload_len: payload.len() as u64,
                payload_crc32c: crc32c::crc32c(&payload),
            };
            let mut slot = header.to_bytes().to_vec();
            slot.extend_from_slice(&payload);
            match decode_slot(&slot, 4096) {
                Ok(_) | Err(RecordError::Decode(_)) | Err(RecordError::TrailingBytes { .. }) => {}
                Err(other) => prop_assert!(false, "unexpected error {other:?}"),
            }
        }

        /// Mutates any byte of a valid slot image (header and payload).
        #[test]
        fn mutated_slot_never_panics(
            mutations in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut image = slot_image(&crate::record::store::tests::rich_record(), 3, 4096, 0);
            for (index, value) in &mutations {
                let i = index.index(image.len());
                image[i] = *value;
            }
            let _ = decode_slot(&image, 4096);
        }
    }
}
