//! Byte regions that hold the handover record and preserved data.
//!
//! STUB: the record/region helper implements this module.

use std::path::Path;

/// Why a region could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// An I/O error on the backing file.
    #[error("cannot use region {path}: {source}")]
    Io {
        /// The backing path.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// A contiguous byte range that survives what luod must survive.
pub trait Region: Send + std::fmt::Debug {
    /// Length in bytes.
    fn len(&self) -> usize;
    /// True when the region has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The bytes.
    fn bytes(&self) -> &[u8];
    /// The bytes, writable.
    fn bytes_mut(&mut self) -> &mut [u8];
    /// Human description for messages (`file /var/lib/luod/region (64 MiB)`).
    fn describe(&self) -> String;
}

/// A region backed by a file, mapped with memmap2.
#[derive(Debug)]
pub struct FileRegion {
    _p: (),
}

impl FileRegion {
    /// Opens (creating or growing to `size` bytes) the file at `path`.
    pub fn open(_path: &Path, _size: u64) -> Result<Self, RegionError> {
        unimplemented!("stub")
    }
}

/// A region in process memory.
#[derive(Debug)]
pub struct MemRegion(pub Vec<u8>);
