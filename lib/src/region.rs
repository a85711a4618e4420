//! Byte regions that hold the handover record and preserved data.
//!
//! A [`Region`] is a plain, contiguous run of bytes that outlives what luod
//! must outlive: a file mapped into memory ([`FileRegion`], for the file
//! backend and tests that simulate a kexec), memory reserved across kexec, or
//! a vector in the process ([`MemRegion`], for unit tests). The record store
//! ([`crate::record::RecordStore`]) lays its two slots out in a region.
//!
//! A file region is prefaulted when it is opened, so writing the handover
//! record later (inside the blackout) does not pay a page fault per page.

use memmap2::{Advice, MmapMut, MmapOptions};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why a region could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// The backing file could not be opened or inspected.
    #[error("cannot open region file {path}")]
    Io {
        /// The backing path.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The backing file could not be grown to the requested size.
    #[error("cannot grow region file {path} from {from} to {to} bytes (is the file system full?)")]
    Resize {
        /// The backing path.
        path: String,
        /// Size of the file before.
        from: u64,
        /// Size asked for.
        to: u64,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The backing file could not be mapped into memory.
    #[error("cannot map region file {path} ({len} bytes) into memory")]
    Map {
        /// The backing path.
        path: String,
        /// Bytes that were to be mapped.
        len: u64,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The region would have no bytes.
    #[error("region file {path} is empty: give a size when creating it")]
    Empty {
        /// The backing path.
        path: String,
    },
    /// The region is larger than this process can address.
    #[error("region file {path} is {len} bytes, more than this process can map")]
    TooLarge {
        /// The backing path.
        path: String,
        /// Size of the file.
        len: u64,
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

/// A region backed by a file, mapped shared with memmap2.
///
/// Writes land in the page cache: they survive the process (a crash or a
/// restart of luod), not a power loss. That is all the file backend needs; see
/// `docs/state-format.md`, "Durability".
#[derive(Debug)]
pub struct FileRegion {
    path: PathBuf,
    map: MmapMut,
}

impl FileRegion {
    /// Opens the file at `path`, creating it (mode 0600) if it is missing and
    /// growing it to `size` bytes if it is smaller, then maps the whole file
    /// and prefaults it.
    ///
    /// A file larger than `size` is mapped whole and never shrunk: its bytes
    /// may hold a record, and the record's layout depends on the region size.
    pub fn open(path: &Path, size: u64) -> Result<Self, RegionError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|source| io_error(path, source))?;
        let current = file_len(path, &file)?;
        if current < size {
            file.set_len(size).map_err(|source| RegionError::Resize {
                path: path.display().to_string(),
                from: current,
                to: size,
                source,
            })?;
        }
        Self::map(path, &file, current.max(size))
    }

    /// Opens an existing file at `path` and maps it whole, without changing
    /// its size.
    pub fn open_existing(path: &Path) -> Result<Self, RegionError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| io_error(path, source))?;
        let len = file_len(path, &file)?;
        Self::map(path, &file, len)
    }

    /// The path of the backing file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn map(path: &Path, file: &File, len: u64) -> Result<Self, RegionError> {
        if len == 0 {
            return Err(RegionError::Empty {
                path: path.display().to_string(),
            });
        }
        let map_len = usize::try_from(len).map_err(|_| RegionError::TooLarge {
            path: path.display().to_string(),
            len,
        })?;
        // SAFETY: mapping a file is unsafe because the memory changes if the
        // file is written or truncated behind our back. The region file
        // belongs to luod: it lives in luod's state directory, is created with
        // mode 0600 and no other program is meant to open it, and luod itself
        // only touches it through this mapping. `map_len` is the file's size
        // as just read (or set) through this same descriptor. If another
        // process truncates the file anyway, accessing the lost pages raises
        // SIGBUS and luod stops, rather than reading or writing wrong bytes;
        // a concurrent writer could corrupt a record, which the record's
        // checksums then detect at load.
        let map =
            unsafe { MmapOptions::new().len(map_len).populate().map_mut(file) }.map_err(|source| RegionError::Map {
                path: path.display().to_string(),
                len,
                source,
            })?;
        // MAP_POPULATE only faults pages in for reading on a shared mapping;
        // MADV_POPULATE_WRITE (Linux 5.14+) also takes the write faults now,
        // so the record write later runs without any. Older kernels refuse
        // the advice with EINVAL: the region then still works, just with a
        // first-write fault per page.
        if let Err(error) = map.advise(Advice::PopulateWrite) {
            tracing::debug!(path = %path.display(), %error, "cannot prefault region for writing");
        }
        Ok(FileRegion {
            path: path.to_path_buf(),
            map,
        })
    }
}

fn io_error(path: &Path, source: std::io::Error) -> RegionError {
    RegionError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn file_len(path: &Path, file: &File) -> Result<u64, RegionError> {
    Ok(file.metadata().map_err(|source| io_error(path, source))?.len())
}

impl Region for FileRegion {
    fn len(&self) -> usize {
        self.map.len()
    }
    fn bytes(&self) -> &[u8] {
        &self.map
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.map
    }
    fn describe(&self) -> String {
        format!("file {} ({})", self.path.display(), human_size(self.map.len()))
    }
}

/// A region in process memory, for tests and tools that work on a copy of a
/// region image.
#[derive(Debug)]
pub struct MemRegion(pub Vec<u8>);

impl MemRegion {
    /// A region of `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        MemRegion(vec![0; len])
    }
}

impl Region for MemRegion {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn bytes(&self) -> &[u8] {
        &self.0
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
    fn describe(&self) -> String {
        format!("memory ({})", human_size(self.0.len()))
    }
}

/// `64 MiB`, `12 KiB`, `100 bytes`: exact binary units when they fit.
fn human_size(len: usize) -> String {
    const UNITS: [(usize, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (unit, name) in UNITS {
        if len >= unit && len.is_multiple_of(unit) {
            return format!("{} {name}", len / unit);
        }
    }
    format!("{len} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_creates_missing_file_with_the_size_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("region");
        let mut region = FileRegion::open(&path, 64 << 10).unwrap();
        assert_eq!(region.len(), 64 << 10);
        assert!(region.bytes().iter().all(|&b| b == 0));
        region.bytes_mut()[100] = 7;
        drop(region);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 << 10);
        assert_eq!(std::fs::read(&path).unwrap()[100], 7);
    }

    #[test]
    fn open_grows_a_smaller_file_and_keeps_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("region");
        std::fs::write(&path, [1, 2, 3]).unwrap();
        let region = FileRegion::open(&path, 8192).unwrap();
        assert_eq!(region.len(), 8192);
        assert_eq!(&region.bytes()[..4], &[1, 2, 3, 0]);
    }

    #[test]
    fn open_never_shrinks_a_larger_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("region");
        std::fs::write(&path, vec![5; 10_000]).unwrap();
        let region = FileRegion::open(&path, 4096).unwrap();
        assert_eq!(region.len(), 10_000);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 10_000);
    }

    #[test]
    fn open_existing_maps_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("region");
        std::fs::write(&path, vec![9; 5000]).unwrap();
        let region = FileRegion::open_existing(&path).unwrap();
        assert_eq!(region.len(), 5000);
        assert!(region.bytes().iter().all(|&b| b == 9));
        assert_eq!(region.path(), path);
        assert_eq!(region.describe(), format!("file {} (5000 bytes)", path.display()));
    }

    #[test]
    fn open_existing_of_a_missing_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing");
        let err = FileRegion::open_existing(&path).unwrap_err();
        assert!(matches!(&err, RegionError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound));
        assert!(err.to_string().contains(&*path.display().to_string()));
    }

    #[test]
    fn empty_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("region");
        let err = FileRegion::open(&path, 0).unwrap_err();
        assert!(matches!(err, RegionError::Empty { .. }));
        let err = FileRegion::open_existing(&path).unwrap_err();
        assert!(matches!(err, RegionError::Empty { .. }));
    }

    #[test]
    fn mem_region_describes_its_size() {
        assert_eq!(MemRegion::zeroed(64 << 20).describe(), "memory (64 MiB)");
        assert_eq!(MemRegion::zeroed(12 << 10).describe(), "memory (12 KiB)");
        assert_eq!(MemRegion::zeroed(100).describe(), "memory (100 bytes)");
        assert!(MemRegion::zeroed(0).is_empty());
    }
}
