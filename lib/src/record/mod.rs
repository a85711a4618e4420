//! The handover record: encoding, checksums and the A/B store.
//!
//! STUB: the record/region helper implements this module.

mod model;
pub use model::*;

use crate::region::Region;

/// Format version of the record (independent of the crate version).
pub const FORMAT_VERSION: u32 = 1;

/// Why a record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Placeholder.
    #[error("stub")]
    Stub,
}

/// Where bytes of a preserved file come from when they are copied into the region.
pub trait DataSource {
    /// Number of bytes.
    fn data_len(&self) -> u64;
    /// Fills `dst` (exactly `data_len()` bytes) with the contents.
    fn read_into(&self, dst: &mut [u8]) -> std::io::Result<()>;
}

/// What a slot of the region held at load time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotStatus {
    /// Never written (no magic).
    Empty,
    /// A valid record of this generation.
    Valid {
        /// Its generation.
        generation: u64,
    },
    /// Something is there but it is not a valid record.
    Invalid {
        /// Why (one sentence).
        reason: String,
    },
}

/// What [`RecordStore::load`] found.
#[derive(Debug)]
pub struct LoadReport {
    /// The newest valid record and its generation.
    pub latest: Option<(u64, HandoverRecord)>,
    /// Status of slot A and slot B.
    pub slots: [SlotStatus; 2],
}

/// What a write did.
#[derive(Debug, Clone, Copy)]
pub struct WriteReport {
    /// Generation written.
    pub generation: u64,
    /// Slot written (0 = A, 1 = B).
    pub slot: usize,
    /// Bytes of record written.
    pub record_bytes: u64,
    /// Bytes of data written.
    pub data_bytes: u64,
}

/// Reads and writes records in the two slots of a region.
#[derive(Debug)]
pub struct RecordStore<R: Region> {
    region: R,
}

impl<R: Region> RecordStore<R> {
    /// Wraps a region; fails if it is too small to hold two slots.
    pub fn new(region: R) -> Result<Self, RecordError> {
        Ok(RecordStore { region })
    }
    /// Reads both slots and returns the newest valid record.
    pub fn load(&mut self) -> Result<LoadReport, RecordError> {
        unimplemented!("stub")
    }
    /// Writes `record` with `data` as the next generation into the slot that
    /// does not hold the newest record. Sets `record.extents`.
    pub fn write(
        &mut self,
        _record: &mut HandoverRecord,
        _data: &[&dyn DataSource],
    ) -> Result<WriteReport, RecordError> {
        unimplemented!("stub")
    }
    /// The bytes of an extent of the newest record, checked against its CRC.
    pub fn data(&self, _extent: &Extent) -> Result<&[u8], RecordError> {
        unimplemented!("stub")
    }
    /// Bytes of data one slot can hold next to a record of `record_len` bytes.
    pub fn data_capacity(&self) -> u64 {
        unimplemented!("stub")
    }
    /// The region.
    pub fn region(&self) -> &R {
        &self.region
    }
}
