//! The handover record: encoding, checksums and the A/B store.
//!
//! The record is luod's memory across a kexec (or a restart): its state, the
//! update in flight, the sessions and their tokens, subsystem sections and
//! the history, plus the contents of preserved files when the backend copies
//! them. [`RecordStore`] keeps it in a [`Region`](crate::region::Region) split into two slots, A and
//! B. Each write goes to the slot that does not hold the newest record and
//! writes its header last, so a write cut at any byte leaves the previous
//! generation readable.
//!
//! The byte layout, the write protocol and the compatibility policy are in
//! `docs/state-format.md`; this module is its implementation.

mod codec;
mod copy;
mod journal;
mod mapped;
mod model;
mod store;
mod v1;
mod v2;

pub use journal::{JournalEntry, MIN_ENTRIES_BEFORE_FOLD, token_set};
pub use mapped::{MAP_MIN, PreservedSource, SealedMapping, shrink_sealed};
pub use model::*;
pub use store::{RecordStore, SlotUse};

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// Format version of the record (independent of the crate version).
pub const FORMAT_VERSION: u32 = 4;

/// Oldest format version this luod still reads (and converts).
pub const OLDEST_READABLE: u32 = 1;

/// The first 8 bytes of every slot header.
pub const MAGIC: [u8; 8] = *b"LUODREC\0";

/// Size of a slot header in bytes.
pub const HEADER_LEN: usize = 64;

/// Largest record payload (the encoded [`HandoverRecord`], not the data) in
/// bytes. Checked before anything is allocated or written.
pub const MAX_RECORD_LEN: u64 = 16 << 20;

/// Alignment unit of the layout: slots and data extents start at multiples
/// of this many bytes from the start of the region. Fixed by the format (it is
/// not the page size of the running system, although it matches x86-64's).
pub const LAYOUT_ALIGN: u64 = 4096;

/// Why a record could not be read or written.
///
/// Messages say what was found and what it means; the source (if any) holds
/// the lower-level cause.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The slot does not start with [`MAGIC`].
    #[error(
        "slot does not start with the record magic (found {found:02x?}): it never held a luod record or was overwritten"
    )]
    BadMagic {
        /// The 8 bytes found instead.
        found: [u8; 8],
    },
    /// The record was written in a format version this luod cannot read.
    #[error(
        "record has format version {found} but this luod reads format versions 1 to {supported}: use a luod built for format version {found}"
    )]
    UnsupportedVersion {
        /// Version in the header.
        found: u32,
        /// Newest version this build reads ([`FORMAT_VERSION`]).
        supported: u32,
    },
    /// The header's own checksum does not match: the header is damaged or
    /// was being written when the writer stopped.
    #[error(
        "record header checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the header is damaged or its write was cut short"
    )]
    HeaderChecksum {
        /// CRC-32C stored in the header.
        stored: u32,
        /// CRC-32C of the header bytes as found.
        computed: u32,
    },
    /// The record was written for a region of another size, so the slots
    /// are not where the record expects them.
    #[error(
        "record was written for a region of {written} bytes but the region is now {now} bytes: open the region with its original size"
    )]
    RegionSizeChanged {
        /// Region size in the header.
        written: u64,
        /// Region size now.
        now: u64,
    },
    /// The record payload is larger than [`MAX_RECORD_LEN`].
    #[error("record payload is {len} bytes, more than the limit of {max} bytes")]
    TooLarge {
        /// Payload length (found in a header, or needed to encode a record).
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The bytes end before the record does.
    #[error("record needs {need} bytes but only {have} are there: it was cut short")]
    Truncated {
        /// Bytes the record claims.
        need: u64,
        /// Bytes available.
        have: u64,
    },
    /// The payload does not match the checksum in the header.
    #[error(
        "record payload checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the record is damaged or its write was cut short"
    )]
    PayloadChecksum {
        /// CRC-32C stored in the header.
        stored: u32,
        /// CRC-32C of the payload as found.
        computed: u32,
    },
    /// The payload passed its checksum but is not a valid record of this
    /// format version (a writer bug, or a version mix-up).
    #[error(
        "record payload passed its checksum but does not decode as a record of the format version its header names"
    )]
    Decode(#[source] postcard::Error),
    /// The payload decoded but left bytes over.
    #[error("record payload has {count} bytes after the end of the record")]
    TrailingBytes {
        /// Bytes left over.
        count: u64,
    },
    /// The record could not be encoded.
    #[error("cannot encode the record")]
    Encode(#[source] postcard::Error),
    /// The region cannot hold two slots, or a slot cannot hold the record and
    /// its data.
    #[error("the region must be at least {need} bytes for this, but it is {have} bytes: give luod a larger region")]
    RegionTooSmall {
        /// Smallest region size that would do.
        need: u64,
        /// Size of the region.
        have: u64,
    },
    /// A preserved file points at an extent the record does not have.
    #[error(
        "file with token {token} of session {session} points at data extent {index}, but the record has {extents} extents: pass one data source per copied file"
    )]
    DanglingExtent {
        /// Session name.
        session: String,
        /// The file's token.
        token: u64,
        /// The extent index in [`FdRecord::data`].
        index: u32,
        /// Number of extents (data sources).
        extents: usize,
    },
    /// An extent lies outside the data area of the newest record's slot.
    #[error(
        "data extent at offset {offset} ({len} bytes) lies outside the data area {start}..{end} of the record's slot"
    )]
    DataOutOfBounds {
        /// Extent offset from the region start.
        offset: u64,
        /// Extent length.
        len: u64,
        /// Start of the data area.
        start: u64,
        /// End of the data area (end of the slot).
        end: u64,
    },
    /// The bytes of an extent do not match its checksum.
    #[error(
        "data extent at offset {offset} ({len} bytes) is damaged: checksum {computed:#010x}, expected {stored:#010x}"
    )]
    DataChecksum {
        /// Extent offset from the region start.
        offset: u64,
        /// Extent length.
        len: u64,
        /// CRC-32C recorded in the extent.
        stored: u32,
        /// CRC-32C of the bytes found.
        computed: u32,
    },
    /// Data was asked for while the region holds no valid record.
    #[error("the region holds no valid record, so it has no data to read")]
    NoRecord,
    /// A data source could not be read into the region.
    #[error("cannot read data source {index} into the region")]
    DataSource {
        /// Position of the source in the list given to [`RecordStore::write`].
        index: usize,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The generation counter reached its maximum.
    #[error("the newest record has generation {0}, the last one possible: the region must be reinitialised")]
    GenerationOverflow(u64),
}

/// Where bytes of a preserved file come from when they are copied into the region.
///
/// [`RecordStore::write`] hands the source the region's own bytes, so the data
/// is copied once, straight into place. A source that can also read at an
/// offset ([`can_read_at`](DataSource::can_read_at)) is copied in
/// cache-sized chunks, each checksummed while it is still in the CPU cache,
/// and large data is spread over several threads; so sources are `Sync`.
pub trait DataSource: Sync {
    /// Number of bytes.
    fn data_len(&self) -> u64;
    /// Fills `dst` (exactly `data_len()` bytes) with the contents.
    fn read_into(&self, dst: &mut [u8]) -> std::io::Result<()>;
    /// True when [`read_at`](DataSource::read_at) works. The default is
    /// false: the store then calls [`read_into`](DataSource::read_into) once
    /// and checksums the bytes afterwards, a second pass over memory.
    fn can_read_at(&self) -> bool {
        false
    }
    /// Fills `dst` with the bytes at `offset..offset + dst.len()` (within
    /// `data_len()`). Only called when [`can_read_at`](DataSource::can_read_at)
    /// is true.
    fn read_at(&self, offset: u64, dst: &mut [u8]) -> std::io::Result<()> {
        let _ = (offset, dst);
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "this data source cannot read at an offset",
        ))
    }
}

impl DataSource for [u8] {
    fn data_len(&self) -> u64 {
        self.len() as u64
    }
    fn read_into(&self, dst: &mut [u8]) -> std::io::Result<()> {
        if dst.len() != self.len() {
            return Err(size_changed(self.len() as u64, dst.len()));
        }
        dst.copy_from_slice(self);
        Ok(())
    }
    fn can_read_at(&self) -> bool {
        true
    }
    fn read_at(&self, offset: u64, dst: &mut [u8]) -> std::io::Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|start| self.get(start..)?.get(..dst.len()))
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "{} bytes at offset {offset} are past the end of a {}-byte source",
                        dst.len(),
                        self.len()
                    ),
                )
            })?;
        dst.copy_from_slice(src);
        Ok(())
    }
}

impl DataSource for Vec<u8> {
    fn data_len(&self) -> u64 {
        self.as_slice().data_len()
    }
    fn read_into(&self, dst: &mut [u8]) -> std::io::Result<()> {
        self.as_slice().read_into(dst)
    }
    fn can_read_at(&self) -> bool {
        true
    }
    fn read_at(&self, offset: u64, dst: &mut [u8]) -> std::io::Result<()> {
        self.as_slice().read_at(offset, dst)
    }
}

impl<T: DataSource + ?Sized> DataSource for &T {
    fn data_len(&self) -> u64 {
        (**self).data_len()
    }
    fn read_into(&self, dst: &mut [u8]) -> std::io::Result<()> {
        (**self).read_into(dst)
    }
    fn can_read_at(&self) -> bool {
        (**self).can_read_at()
    }
    fn read_at(&self, offset: u64, dst: &mut [u8]) -> std::io::Result<()> {
        (**self).read_at(offset, dst)
    }
}

/// A file (typically a memfd holding guest RAM), read with `pread` straight
/// into the region.
///
/// `data_len` is the file size at the time of the call (0 if `fstat` fails);
/// `read_into` checks the size again and fails if the file changed size in
/// between, and `read_at` fails if the file shrank, so a file is never
/// recorded short.
impl DataSource for File {
    fn data_len(&self) -> u64 {
        self.as_fd().data_len()
    }
    fn read_into(&self, dst: &mut [u8]) -> std::io::Result<()> {
        self.as_fd().read_into(dst)
    }
    fn can_read_at(&self) -> bool {
        true
    }
    fn read_at(&self, offset: u64, dst: &mut [u8]) -> std::io::Result<()> {
        self.as_fd().read_at(offset, dst)
    }
}

/// A file descriptor of a regular file or memfd; see the [`File`] impl.
impl DataSource for BorrowedFd<'_> {
    fn data_len(&self) -> u64 {
        nix::sys::stat::fstat(self).map_or(0, |stat| stat.st_size as u64)
    }
    fn read_into(&self, dst: &mut [u8]) -> std::io::Result<()> {
        let len = nix::sys::stat::fstat(self)?.st_size as u64;
        if len != dst.len() as u64 {
            return Err(size_changed(len, dst.len()));
        }
        self.read_at(0, dst)
    }
    fn can_read_at(&self) -> bool {
        true
    }
    fn read_at(&self, offset: u64, mut dst: &mut [u8]) -> std::io::Result<()> {
        let mut at = offset;
        while !dst.is_empty() {
            let pos = i64::try_from(at).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
            match nix::sys::uio::pread(self, dst, pos) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!(
                            "the file ends before offset {}: it shrank during the write",
                            at + dst.len() as u64
                        ),
                    ));
                }
                Ok(n) => {
                    dst = &mut dst[n..];
                    at += n as u64;
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(errno) => return Err(errno.into()),
            }
        }
        Ok(())
    }
}

/// An owned file descriptor; see the [`File`] impl.
impl DataSource for OwnedFd {
    fn data_len(&self) -> u64 {
        self.as_fd().data_len()
    }
    fn read_into(&self, dst: &mut [u8]) -> std::io::Result<()> {
        self.as_fd().read_into(dst)
    }
    fn can_read_at(&self) -> bool {
        true
    }
    fn read_at(&self, offset: u64, dst: &mut [u8]) -> std::io::Result<()> {
        self.as_fd().read_at(offset, dst)
    }
}

fn size_changed(now: u64, expected: usize) -> std::io::Error {
    std::io::Error::other(format!(
        "the source is {now} bytes but {expected} were expected: it changed size during the write"
    ))
}

/// What a slot of the region held at load time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotStatus {
    /// Never written (its header bytes are all zero), or its write was cut
    /// right after the header was cleared.
    Empty,
    /// A valid record of this generation.
    Valid {
        /// Its generation.
        generation: u64,
    },
    /// A record of a newer format version than this luod reads (a luod was
    /// downgraded): it must not be overwritten.
    Newer {
        /// Its format version.
        version: u32,
    },
    /// Something is there but it is not a valid record.
    Invalid {
        /// Why (the [`RecordError`] message and its causes).
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
    /// The journal after the newest record, already applied to `latest`.
    pub journal: JournalReport,
}

/// What the journal after the newest record held (see [`RecordStore::append`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JournalReport {
    /// Entries applied to the record.
    pub entries: u64,
    /// Why the replay stopped before the journal's end marker: an entry cut
    /// short or damaged (a change that was never acknowledged), ignored with
    /// everything after it.
    pub stopped: Option<String>,
}

/// What a write did.
#[derive(Debug, Clone, Copy)]
pub struct WriteReport {
    /// Generation written.
    pub generation: u64,
    /// Slot written (0 = A, 1 = B).
    pub slot: usize,
    /// Bytes of record written (header and payload).
    pub record_bytes: u64,
    /// Bytes of data written.
    pub data_bytes: u64,
}

/// The message of `error` followed by its causes, `: `-separated.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn slice_source_refuses_a_destination_of_another_size() {
        let src: &[u8] = &[1, 2, 3];
        let mut dst = [0u8; 2];
        let err = src.read_into(&mut dst).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the source is 3 bytes but 2 were expected: it changed size during the write"
        );
    }

    #[test]
    fn file_source_reads_the_whole_file_from_offset_zero() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"hello region").unwrap();
        assert_eq!(file.data_len(), 12);
        let mut dst = [0u8; 12];
        file.read_into(&mut dst).unwrap();
        assert_eq!(&dst, b"hello region");
    }

    #[test]
    fn file_source_fails_when_the_file_changed_size() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"abc").unwrap();
        let mut dst = [0u8; 5];
        let err = file.read_into(&mut dst).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the source is 3 bytes but 5 were expected: it changed size during the write"
        );
    }

    #[test]
    fn file_source_reads_at_an_offset_and_reports_a_shrunk_file() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"0123456789").unwrap();
        assert!(file.can_read_at());
        let mut dst = [0u8; 4];
        file.read_at(3, &mut dst).unwrap();
        assert_eq!(&dst, b"3456");
        let mut dst = [0u8; 8];
        let err = file.read_at(5, &mut dst).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        assert_eq!(
            err.to_string(),
            "the file ends before offset 13: it shrank during the write"
        );
    }

    #[test]
    fn slice_source_refuses_to_read_past_its_end() {
        let src = vec![1u8, 2, 3];
        let mut dst = [0u8; 2];
        src.read_at(1, &mut dst).unwrap();
        assert_eq!(dst, [2, 3]);
        let err = src.read_at(2, &mut dst).unwrap_err();
        assert_eq!(
            err.to_string(),
            "2 bytes at offset 2 are past the end of a 3-byte source"
        );
        assert!(src.read_at(u64::MAX, &mut dst).is_err());
    }

    #[test]
    fn error_chain_lists_causes_once() {
        let err = RecordError::DataSource {
            index: 2,
            source: std::io::Error::other("disk on fire"),
        };
        assert_eq!(
            error_chain(&err),
            "cannot read data source 2 into the region: disk on fire"
        );
    }
}
