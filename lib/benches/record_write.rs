//! Writing a handover record that carries 64 MiB of preserved data, against
//! a plain `memcpy` of 64 MiB measured in the same run.
//!
//! Run with `cargo bench -p liveupdate --bench record_write`. It prints the
//! best of several runs of each, the bandwidths, and the ratio
//! `memcpy time / record write time` (1.0 = as fast as a bare copy; the
//! target of issue 8 is at least 0.9).
//!
//! Every figure copies the same 64 MiB once, into pages written before (no
//! page fault is timed), and the runs take turns (memcpy, record write,
//! memcpy, ...): load on a shared machine falls on each alike.
//!
//! - baseline: `copy_from_slice` of 64 MiB between two heap buffers;
//! - record write: [`RecordStore::write`] of a record with 4 memfds of
//!   16 MiB each (the way a VMM hands over guest RAM) into a file-backed
//!   region in a temporary directory on `/dev/shm` (tmpfs, like reserved
//!   memory: no disk under it), falling back to the system temporary
//!   directory when `/dev/shm` is missing. The region is opened (and so
//!   prefaulted) once, before the runs. The store copies in checksummed
//!   chunks (CRC-32C of each chunk while it is still in the cache), on as
//!   many threads as there are CPUs (at most 8). Twice: with memfds sealed
//!   against shrinking (as QEMU's `memory-backend-memfd` makes them), which
//!   luod reads through mappings made when they were preserved
//!   (`SealedMapping`, as luod's file backend does); and the same memfds
//!   unsealed, which luod reads with `pread` (a read through a mapping of a
//!   file its owner may truncate could raise `SIGBUS`; see
//!   `lib/src/record/mapped.rs`).
//!
//! Three more figures, plain copies on one thread without checksums, show
//! the floors: `pread` alone (the kernel's copy out of shmem), and copies
//! out of mappings made once beforehand or made (and populated) per run.

use liveupdate::names::SessionName;
use liveupdate::record::{
    DataSource, FdRecord, HandoverRecord, PreservedSource, RecordStore, SealedMapping, SessionRecord,
};
use liveupdate::region::FileRegion;
use nix::sys::memfd::{MFdFlags, memfd_create};
use std::fs::File;
use std::hint::black_box;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

const TOTAL: usize = 64 << 20;
const FILES: usize = 4;
const FILE_LEN: usize = TOTAL / FILES;
const RUNS: usize = 21;

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Best time of each job, over `RUNS` rounds in which the jobs take turns.
fn best_of_each(jobs: &mut [&mut dyn FnMut()]) -> Vec<Duration> {
    let mut best = vec![Duration::MAX; jobs.len()];
    for _ in 0..RUNS {
        for (job, best) in jobs.iter_mut().zip(&mut best) {
            let start = Instant::now();
            job();
            *best = (*best).min(start.elapsed());
        }
    }
    best
}

fn memfd(index: usize, sealed: bool) -> File {
    let fd = memfd_create(
        format!("guest-ram-{index}").as_str(),
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .expect("memfd_create");
    let mut file = File::from(fd);
    file.write_all(&pattern(FILE_LEN, index as u64 + 2))
        .expect("fill memfd");
    if sealed {
        use std::os::fd::AsRawFd;
        // SAFETY: F_ADD_SEALS with an int of seal flags, on our own memfd.
        let r = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_GROW | libc::F_SEAL_SHRINK,
            )
        };
        assert_eq!(r, 0, "seal memfd");
    }
    file
}

/// A record of one session with one file per memfd, and a region whose
/// two slots each hold the record and all the data.
fn store_and_record(dir: &Path, name: &str) -> (RecordStore<FileRegion>, HandoverRecord) {
    let mut record = HandoverRecord::new("file");
    record.sessions.push(SessionRecord {
        name: SessionName::new("vm-bench").expect("valid name"),
        owner_uid: 0,
        fds: (0..FILES)
            .map(|i| FdRecord {
                token: i as u64,
                size: FILE_LEN as u64,
                data: Some(i as u32),
                retrieved: false,
            })
            .collect(),
        incoming: false,
    });
    let region_len = 2 * (TOTAL as u64 + (1 << 20));
    let region = FileRegion::open(&dir.join(name), region_len).expect("open region");
    let store = RecordStore::new(region).expect("region holds two slots");
    (store, record)
}

/// Checks the last write, outside the timing.
fn verify(store: &mut RecordStore<FileRegion>, record: &HandoverRecord) {
    store.load().expect("load");
    for (i, extent) in record.extents.iter().enumerate() {
        let data = store.data(extent).expect("data verifies");
        assert_eq!(data, pattern(FILE_LEN, i as u64 + 2).as_slice());
    }
}

/// Copies the memfds into `dst` with `pread`.
fn pread_into(files: &[File], dst: &mut [u8]) {
    for (file, part) in files.iter().zip(dst.chunks_mut(FILE_LEN)) {
        file.read_exact_at(part, 0).expect("pread");
    }
}

/// A read-only shared mapping of a memfd, populated.
fn map(file: &File) -> memmap2::Mmap {
    // SAFETY: the memfds are this benchmark's own; nothing truncates or
    // writes them while they are mapped, so every page stays readable.
    let map = unsafe { memmap2::MmapOptions::new().len(FILE_LEN).map(file) }.expect("mmap memfd");
    map.advise(memmap2::Advice::PopulateRead).expect("populate");
    map
}

fn gib_per_s(bytes: usize, time: Duration) -> f64 {
    bytes as f64 / time.as_secs_f64() / f64::from(1u32 << 30)
}

fn main() {
    use std::os::fd::AsFd;
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .expect("temporary directory");

    let src = pattern(TOTAL, 1);
    let mut dst = vec![0xa5u8; TOTAL];
    let files: Vec<File> = (0..FILES).map(|i| memfd(i, false)).collect();
    let sealed: Vec<File> = (0..FILES).map(|i| memfd(i, true)).collect();
    let kept: Vec<memmap2::Mmap> = files.iter().map(map).collect();
    // What luod's file backend makes when a file is preserved.
    let maps: Vec<Option<SealedMapping>> = sealed.iter().map(|f| SealedMapping::of(f.as_fd())).collect();
    assert!(maps.iter().all(Option::is_some), "sealed memfds of 16 MiB are mapped");
    let mapped_sources: Vec<PreservedSource<'_>> = sealed
        .iter()
        .zip(&maps)
        .map(|(f, map)| PreservedSource {
            fd: f.as_fd(),
            map: map.as_ref(),
        })
        .collect();
    let pread_sources: Vec<PreservedSource<'_>> = files
        .iter()
        .map(|f| PreservedSource {
            fd: f.as_fd(),
            map: None,
        })
        .collect();
    let (mut store_mapped, mut record_mapped) = store_and_record(dir.path(), "region-sealed");
    let (mut store_pread, mut record_pread) = store_and_record(dir.path(), "region-unsealed");
    // One destination each, written once so no page fault is timed.
    let (mut pread_dst, mut kept_dst, mut fresh_dst) = (vec![0x5au8; TOTAL], vec![0x5au8; TOTAL], vec![0x5au8; TOTAL]);

    let best = {
        let mapped: Vec<&dyn DataSource> = mapped_sources.iter().map(|s| s as &dyn DataSource).collect();
        let preads: Vec<&dyn DataSource> = pread_sources.iter().map(|s| s as &dyn DataSource).collect();
        best_of_each(&mut [
            &mut || {
                dst.copy_from_slice(black_box(&src));
                black_box(&mut dst);
            },
            &mut || {
                store_mapped.write(&mut record_mapped, &mapped).expect("write record");
            },
            &mut || {
                store_pread.write(&mut record_pread, &preads).expect("write record");
            },
            &mut || {
                pread_into(&files, &mut pread_dst);
                black_box(&mut pread_dst);
            },
            &mut || {
                for (map, part) in kept.iter().zip(kept_dst.chunks_mut(FILE_LEN)) {
                    part.copy_from_slice(map);
                }
                black_box(&mut kept_dst);
            },
            &mut || {
                // As the store checksums: 128 KiB at a time, cache-hot.
                let hot = &src[..128 << 10];
                let mut crc = 0;
                for _ in 0..TOTAL / hot.len() {
                    crc = crc32c::crc32c_append(crc, black_box(hot));
                }
                black_box(crc);
            },
            &mut || {
                for (file, part) in files.iter().zip(fresh_dst.chunks_mut(FILE_LEN)) {
                    part.copy_from_slice(&map(file));
                }
                black_box(&mut fresh_dst);
            },
        ])
    };
    verify(&mut store_mapped, &record_mapped);
    verify(&mut store_pread, &record_pread);
    let [memcpy, write, write_pread, pread, mapped_kept, crc, mapped_fresh] = best[..] else {
        unreachable!("seven jobs")
    };
    println!(
        "record_write: 64 MiB, best of {RUNS} runs taking turns, region in {}",
        dir.path().display()
    );
    let line = |what: &str, time: Duration, note: &str| {
        println!(
            "  {what:<16}: {:>8.2} ms  {:>6.2} GiB/s  {note}",
            time.as_secs_f64() * 1e3,
            gib_per_s(TOTAL, time)
        );
    };
    line("memcpy baseline", memcpy, "");
    line(
        "record write",
        write,
        &format!(
            "({FILES} memfds of {} MiB sealed against shrinking, as QEMU's: read through the mappings made at \
             preserve)",
            FILE_LEN >> 20
        ),
    );
    line(
        "record write",
        write_pread,
        "(the same memfds unsealed: read with pread)",
    );
    line("pread alone", pread, "(1 thread, no checksum: the kernel's copy)");
    line(
        "mapping, kept",
        mapped_kept,
        "(1 thread, no checksum, mappings made beforehand)",
    );
    line(
        "mapping, fresh",
        mapped_fresh,
        "(the same, mapped and populated in each run)",
    );
    line(
        "CRC-32C alone",
        crc,
        "(1 thread, 64 MiB as 128 KiB pieces in the cache: the store's checksum)",
    );
    println!(
        "  ratio memcpy/write: {:.2} sealed (target >= 0.90), {:.2} unsealed",
        memcpy.as_secs_f64() / write.as_secs_f64(),
        memcpy.as_secs_f64() / write_pread.as_secs_f64()
    );
    println!(
        "  ratio memcpy/mapping: {:.2} kept, {:.2} fresh",
        memcpy.as_secs_f64() / mapped_kept.as_secs_f64(),
        memcpy.as_secs_f64() / mapped_fresh.as_secs_f64()
    );
}
