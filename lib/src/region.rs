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

use crate::fsutil::{self, FileError};
use memmap2::{Advice, MmapMut, MmapOptions};
use std::fs::File;
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
    /// The backing file is not one luod may use (a symbolic link, not a
    /// regular file, another user's).
    #[error(transparent)]
    File(#[from] FileError),
    /// The file system could not back the region's bytes.
    #[error("cannot allocate {size} bytes ({human}) for region file {path}: {why}", human = human_size(*size as usize))]
    Allocate {
        /// The backing path.
        path: String,
        /// Bytes asked for.
        size: u64,
        /// What the file system said, as a sentence.
        why: String,
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

/// A region whose backing cannot be used as it is (a file too short to hold
/// a record): what luod found, for the engine to decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unusable {
    /// What was found, one clause (`the region file is 40 bytes, ...`).
    pub finding: String,
    /// True when the backing holds any non-zero byte: it may be what is left
    /// of a record, so nothing may be written over it without a decision.
    pub has_data: bool,
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
    /// `Some` when the backing cannot be used as it is and [`bytes`](Self::bytes)
    /// are a zeroed stand-in (nothing written there reaches the backing):
    /// the record is then unreadable until the backing is restored or
    /// [`reinitialize`](Self::reinitialize)d.
    fn unusable(&self) -> Option<Unusable> {
        None
    }
    /// Makes an [`unusable`](Self::unusable) backing usable for a fresh
    /// record, once that is decided (it may replace what the backing holds).
    /// A usable region is left as it is.
    fn reinitialize(&mut self) -> Result<(), RegionError> {
        Ok(())
    }
}

/// A region backed by a file, mapped shared with memmap2.
///
/// Writes land in the page cache: they survive the process (a crash or a
/// restart of luod), not a power loss. That is all the file backend needs; see
/// `docs/state-format.md`, "Durability".
///
/// The file's blocks are allocated when it is opened (`posix_fallocate`),
/// never left sparse: a file system that cannot hold the region fails the
/// open with the numbers, instead of a `SIGBUS` at the first write to a page
/// it cannot back.
#[derive(Debug)]
pub struct FileRegion {
    path: PathBuf,
    file: File,
    backing: Backing,
}

#[derive(Debug)]
enum Backing {
    Mapped(MmapMut),
    /// The file cannot hold a region as it is: `on_disk` are its bytes,
    /// `placeholder` the zeroed stand-in the record store reads, `size` the
    /// size a fresh region gets.
    StandIn {
        on_disk: Vec<u8>,
        placeholder: Vec<u8>,
        size: u64,
    },
}

impl FileRegion {
    /// Opens the file at `path` (without following a symbolic link; it must
    /// be a regular file of luod's uid), creating it (mode 0600) if it is
    /// missing and growing it to `size` bytes if it is smaller, allocates its
    /// blocks, then maps the whole file and prefaults it.
    ///
    /// A file larger than `size` is mapped whole and never shrunk: its bytes
    /// may hold a record, and the record's layout depends on the region size.
    pub fn open(path: &Path, size: u64) -> Result<Self, RegionError> {
        let (file, created) = fsutil::open_or_create("region file", path)?;
        let opened = Self::with_file(path, file, size);
        if opened.is_err() && created {
            let _ = std::fs::remove_file(path);
        }
        opened
    }

    /// Opens an existing file at `path` (as [`open`](Self::open) does) and
    /// maps it whole, without changing its size.
    pub fn open_existing(path: &Path) -> Result<Self, RegionError> {
        let file = fsutil::open_existing("region file", path).map_err(|e| match e {
            FileError::Io { source, .. } => io_error(path, source),
            other => other.into(),
        })?;
        Self::with_file(path, file, 0)
    }

    /// Maps the open file `file` (whose path is `path`), grown to `size`
    /// bytes if it is smaller, with every block allocated.
    pub fn with_file(path: &Path, file: File, size: u64) -> Result<Self, RegionError> {
        let len = file_len(path, &file)?.max(size);
        let map = map_file(path, &file, len)?;
        Ok(FileRegion {
            path: path.to_path_buf(),
            file,
            backing: Backing::Mapped(map),
        })
    }

    /// A region over a file that cannot hold one as it is (too short): the
    /// file is read, not changed; the record store sees `placeholder_len`
    /// zero bytes; [`Region::reinitialize`] keeps the file's bytes aside in
    /// `PATH.truncated` (when it has any) and makes it a fresh region of
    /// `size` bytes.
    pub fn stand_in(path: &Path, file: File, placeholder_len: usize, size: u64) -> Result<Self, RegionError> {
        use std::io::Read;
        let mut on_disk = Vec::new();
        (&file)
            .read_to_end(&mut on_disk)
            .map_err(|source| io_error(path, source))?;
        Ok(FileRegion {
            path: path.to_path_buf(),
            file,
            backing: Backing::StandIn {
                on_disk,
                placeholder: vec![0; placeholder_len],
                size,
            },
        })
    }

    /// The path of the backing file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the bytes of a file too short to be a region are kept when a
    /// fresh region replaces it.
    pub fn aside_path(&self) -> PathBuf {
        self.path.with_extension("truncated")
    }
}

/// Allocates every block of `file` up to `len` bytes (growing it if it is
/// shorter) and maps it.
fn map_file(path: &Path, file: &File, len: u64) -> Result<MmapMut, RegionError> {
    if len == 0 {
        return Err(RegionError::Empty {
            path: path.display().to_string(),
        });
    }
    let map_len = usize::try_from(len).map_err(|_| RegionError::TooLarge {
        path: path.display().to_string(),
        len,
    })?;
    allocate(path, file, len)?;
    // SAFETY: mapping a file is unsafe because the memory changes if the
    // file is written or truncated behind our back. The region file
    // belongs to luod: it lives in luod's state directory, is created with
    // mode 0600 and no other program is meant to open it, and luod itself
    // only touches it through this mapping. `map_len` is the file's size
    // as just allocated through this same descriptor, and every block up to
    // it is allocated, so no page fault needs the file system to find
    // space. If another process truncates the file anyway, accessing the
    // lost pages raises SIGBUS and luod stops, rather than reading or
    // writing wrong bytes; a concurrent writer could corrupt a record,
    // which the record's checksums then detect at load.
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
    Ok(map)
}

/// `posix_fallocate(file, 0, len)`: the file is at least `len` bytes and
/// every block of it exists. Its bytes do not change.
fn allocate(path: &Path, file: &File, len: u64) -> Result<(), RegionError> {
    let fail = |why: String| RegionError::Allocate {
        path: path.display().to_string(),
        size: len,
        why,
    };
    let off = libc::off_t::try_from(len).map_err(|_| fail("the size does not fit in off_t".into()))?;
    match nix::fcntl::posix_fallocate(file, 0, off) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::ENOSPC) => {
            let free = nix::sys::statvfs::fstatvfs(file)
                .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
                .ok();
            Err(fail(match free {
                Some(free) => format!(
                    "the file system has only {free} bytes ({}) free (ENOSPC); free space, give luod a smaller \
                     --region-size, or put the region on another file system",
                    human_size(free as usize)
                ),
                None => "the file system is full (ENOSPC); free space, give luod a smaller --region-size, or put \
                         the region on another file system"
                    .into(),
            }))
        }
        Err(errno) => Err(fail(format!("{} ({errno})", errno.desc()))),
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
        self.bytes().len()
    }
    fn bytes(&self) -> &[u8] {
        match &self.backing {
            Backing::Mapped(map) => map,
            Backing::StandIn { placeholder, .. } => placeholder,
        }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        match &mut self.backing {
            Backing::Mapped(map) => map,
            Backing::StandIn { placeholder, .. } => placeholder,
        }
    }
    fn describe(&self) -> String {
        match &self.backing {
            Backing::Mapped(map) => format!("file {} ({})", self.path.display(), human_size(map.len())),
            Backing::StandIn { on_disk, .. } => {
                format!(
                    "file {} ({} on disk, unusable)",
                    self.path.display(),
                    human_size(on_disk.len())
                )
            }
        }
    }
    fn unusable(&self) -> Option<Unusable> {
        match &self.backing {
            Backing::Mapped(_) => None,
            Backing::StandIn { on_disk, .. } => Some(Unusable {
                finding: format!(
                    "the region file {} is {} bytes, too short for two record slots (truncated?)",
                    self.path.display(),
                    on_disk.len()
                ),
                has_data: on_disk.iter().any(|&b| b != 0),
            }),
        }
    }
    fn reinitialize(&mut self) -> Result<(), RegionError> {
        let Backing::StandIn { on_disk, size, .. } = &self.backing else {
            return Ok(());
        };
        if !on_disk.is_empty() {
            fsutil::write_private("kept-aside region bytes", &self.aside_path(), on_disk)?;
        }
        self.file.set_len(0).map_err(|source| io_error(&self.path, source))?;
        let map = map_file(&self.path, &self.file, *size)?;
        self.backing = Backing::Mapped(map);
        Ok(())
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
        assert!(!path.exists(), "a file created for a region that failed is removed");
        std::fs::write(&path, b"").unwrap();
        let err = FileRegion::open_existing(&path).unwrap_err();
        assert!(matches!(err, RegionError::Empty { .. }));
    }

    #[test]
    fn a_region_file_is_private_and_allocated_not_sparse() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("region");
        let region = FileRegion::open(&path, 1 << 20).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o600);
        assert!(meta.blocks() * 512 >= 1 << 20, "{} blocks of 512 bytes", meta.blocks());
        drop(region);
        // An existing sparse file gets its holes allocated, its bytes kept.
        let sparse = dir.path().join("sparse");
        std::fs::write(&sparse, b"abc").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&sparse)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let region = FileRegion::open_existing(&sparse).unwrap();
        assert_eq!(&region.bytes()[..4], b"abc\0");
        assert!(std::fs::metadata(&sparse).unwrap().blocks() * 512 >= 1 << 20);
    }

    #[test]
    fn a_stand_in_changes_nothing_until_reinitialized() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("region");
        std::fs::write(&path, [7u8; 40]).unwrap();
        let file = fsutil::open_existing("region file", &path).unwrap();
        let mut region = FileRegion::stand_in(&path, file, 8192, 64 << 10).unwrap();
        assert_eq!(region.len(), 8192);
        region.bytes_mut()[0] = 1;
        assert_eq!(
            std::fs::read(&path).unwrap(),
            [7u8; 40],
            "the stand-in never reaches the file"
        );
        let unusable = region.unusable().unwrap();
        assert!(unusable.has_data);
        assert_eq!(
            unusable.finding,
            format!(
                "the region file {} is 40 bytes, too short for two record slots (truncated?)",
                path.display()
            )
        );
        region.reinitialize().unwrap();
        assert_eq!(region.unusable(), None);
        assert_eq!(region.len(), 64 << 10);
        assert!(region.bytes().iter().all(|&b| b == 0));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 << 10);
        assert_eq!(std::fs::read(region.aside_path()).unwrap(), [7u8; 40]);
    }

    #[test]
    fn mem_region_describes_its_size() {
        assert_eq!(MemRegion::zeroed(64 << 20).describe(), "memory (64 MiB)");
        assert_eq!(MemRegion::zeroed(12 << 10).describe(), "memory (12 KiB)");
        assert_eq!(MemRegion::zeroed(100).describe(), "memory (100 bytes)");
        assert!(MemRegion::zeroed(0).is_empty());
    }
}
