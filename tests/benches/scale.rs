//! How luod's costs per file grow with the number of files (file backend,
//! 4 KiB memfds, one session), as ratios measured in the same run:
//!
//! - `session preserve`: the time of every preserve request, per file, at
//!   10,000 files against 100, and at 100,000 against 10,000 (1.0 = flat);
//! - `prepare` + `freeze` + `reboot` (the simulated kexec, which copies every
//!   file into the region): per file, at the same ratios.
//!
//! The 100-file figures are the median of 5 rounds (each a fresh luod); the
//! larger ones the median of 3 (the machine is shared: one round of a
//! fraction of a second is easily caught by other load). With
//! `LUO_BENCH_STEPS=1` each round prints its prepare, freeze and reboot
//! times. Run with `cargo bench -p liveupdate-tests --bench
//! scale` (as root). It prints and never fails on a figure; without root, or
//! when a step cannot run, it says why and exits 0. The 100,000-file round
//! needs 100,000 descriptors in luod and in its fd holder (each holds every
//! file open once: no design that keeps the files open can do with fewer):
//! it raises RLIMIT_NOFILE (root may; where the hard limit cannot be raised,
//! such as a sandbox capped at 20,000, that round says so and is not
//! measured), and its region is about 820 MiB of file.

use liveupdate::kernel::memfd;
use liveupdate_tests::Luod;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

const FILE_LEN: usize = 4096;

/// Per-file seconds of preserve, and of prepare + freeze + reboot, with
/// `files` files.
fn round(files: u64) -> Result<(f64, f64), String> {
    // Two slots, each holding every file's 4 KiB extent plus the record.
    let region_mib = 2 * (files * FILE_LEN as u64 / (1 << 20) + 8);
    let mut luod = Luod::new(&format!("{region_mib}M")).launched();
    let measured = measure(&mut luod, files);
    if measured.is_err() {
        let log = luod.log();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        println!("luod's log ends with: {:?}", tail.into_iter().rev().collect::<Vec<_>>());
    }
    measured
}

fn measure(luod: &mut Luod, files: u64) -> Result<(f64, f64), String> {
    let mut conn = luod.client();
    conn.create("bench").map_err(|e| e.message)?;
    let bytes = vec![0x5a; FILE_LEN];
    let mut preserving = Duration::ZERO;
    for token in 0..files {
        let fd = memfd::from_bytes("bench", &bytes).map_err(|e| e.to_string())?;
        let start = Instant::now();
        conn.preserve("bench", token, fd.as_fd())
            .map_err(|e| format!("preserve of file {token}: {}", e.message))?;
        preserving += start.elapsed();
    }
    let start = Instant::now();
    conn.prepare().map_err(|e| e.message)?;
    let prepared = start.elapsed();
    conn.freeze().map_err(|e| e.message)?;
    let frozen = start.elapsed();
    conn.reboot().map_err(|e| e.message)?;
    let cycle = start.elapsed();
    if std::env::var_os("LUO_BENCH_STEPS").is_some() {
        println!(
            "  {files} files: prepare {:.2} ms, freeze {:.2} ms, reboot {:.2} ms",
            prepared.as_secs_f64() * 1e3,
            (frozen - prepared).as_secs_f64() * 1e3,
            (cycle - frozen).as_secs_f64() * 1e3
        );
    }
    luod.expect_kexec_exit();
    Ok((
        preserving.as_secs_f64() / files as f64,
        cycle.as_secs_f64() / files as f64,
    ))
}

/// The record's share of a preserve, in process (no luod, no descriptors,
/// so any number of files): per file, persisting `files` preserves one after
/// the other into a record of one session as the engine does (a journal
/// entry, or a full write when the journal asks for one); and, for
/// comparison, a full write per preserve (what every preserve cost before
/// the journal), timed over 200 more preserves at that size.
fn record_round(files: u64) -> Result<(f64, f64), String> {
    use liveupdate::names::SessionName;
    use liveupdate::record::{FdRecord, HandoverRecord, JournalEntry, RecordStore, SessionRecord};
    use liveupdate::region::MemRegion;
    const MORE: u64 = 200;
    let slot = ((files + MORE) * 32 + (1 << 20)).div_ceil(4096) * 4096;
    let mut store = RecordStore::new(MemRegion::zeroed(2 * slot as usize)).map_err(|e| e.to_string())?;
    let mut record = HandoverRecord::new("file");
    record.sessions.push(SessionRecord {
        name: SessionName::new("bench").map_err(|e| e.to_string())?,
        owner_uid: 0,
        fds: Vec::new(),
        incoming: false,
    });
    store.write(&mut record, &[]).map_err(|e| e.to_string())?;
    let file = |token| FdRecord {
        token,
        size: FILE_LEN as u64,
        data: None,
        retrieved: false,
    };
    let start = Instant::now();
    for token in 0..files {
        let entry = JournalEntry::Preserve {
            session: 0,
            token,
            size: FILE_LEN as u64,
        };
        if store.append(&entry).map_err(|e| e.to_string())? {
            record.sessions[0].fds.push(file(token));
        } else {
            let mut next = record.clone();
            next.sessions[0].fds.push(file(token));
            store.write(&mut next, &[]).map_err(|e| e.to_string())?;
            record = next;
        }
    }
    let journaled = start.elapsed().as_secs_f64() / files as f64;
    let start = Instant::now();
    for token in files..files + MORE {
        let mut next = record.clone();
        next.sessions[0].fds.push(file(token));
        store.write(&mut next, &[]).map_err(|e| e.to_string())?;
        record = next;
    }
    Ok((journaled, start.elapsed().as_secs_f64() / MORE as f64))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Descriptors luod needs for `files` preserved files: each is held once
/// (the file backend shares its descriptor with the fd holder's client; the
/// holder, a process of its own, holds one more under its own limit).
fn descriptors(files: u64) -> u64 {
    files + 1000
}

fn raise_nofile(files: u64) -> Result<(), String> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| e.to_string())?;
    // luod and its holder inherit the limit.
    let limit = hard.max(descriptors(files));
    setrlimit(Resource::RLIMIT_NOFILE, limit, limit).map_err(|e| {
        format!(
            "luod needs {} descriptors for {files} files but RLIMIT_NOFILE's hard limit is {hard} and cannot be \
             raised here ({e}: no CAP_SYS_RESOURCE)",
            descriptors(files)
        )
    })
}

/// The largest round number of files luod can hold under the hard limit.
fn largest_that_fits() -> u64 {
    use nix::sys::resource::{Resource, getrlimit};
    let hard = getrlimit(Resource::RLIMIT_NOFILE).map_or(0, |(_, hard)| hard);
    hard.saturating_sub(1000) / 1000 * 1000
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("scale: skipped, luod's tests and benches run as root");
        return;
    }
    println!("== the record's share of a preserve (in process), per file");
    let mut record_figures = Vec::new();
    for files in [100u64, 10_000, 100_000] {
        let rounds = if files == 100 { 5 } else { 1 };
        match (0..rounds).map(|_| record_round(files)).collect::<Result<Vec<_>, _>>() {
            Ok(results) => {
                let journaled = median(results.iter().map(|r| r.0).collect());
                let full = median(results.iter().map(|r| r.1).collect());
                println!(
                    "{files:>7} files: journal {:>8.5} ms per preserve; a full write per preserve (before) {:>8.5} ms",
                    journaled * 1e3,
                    full * 1e3
                );
                record_figures.push((files, journaled, full));
            }
            Err(e) => println!("{files:>7} files: not measured: {e}"),
        }
    }
    for pair in record_figures.windows(2) {
        let ((n0, j0, f0), (n1, j1, f1)) = (pair[0], pair[1]);
        println!(
            "ratio per preserve at {n1}/at {n0}: journal {:.2}, a full write per preserve {:.2}  (1.0 = flat)",
            j1 / j0,
            f1 / f0
        );
    }
    println!("== luod end to end (file backend, 4 KiB memfds, one session), per file");
    let mut figures = Vec::new();
    // LUO_BENCH_FILES=100,10000 measures only those.
    let only: Option<Vec<u64>> = std::env::var("LUO_BENCH_FILES")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect());
    let mut sizes = vec![(100u64, 5), (10_000, 3), (100_000, 3)];
    let fits = largest_that_fits();
    if fits < 10_000 && fits > 100 && raise_nofile(10_000).is_err() {
        // Where 10,000 files cannot be held (a hard limit under 11,000 that
        // cannot be raised), the largest number that can stands in.
        println!("(10,000 files need more descriptors than this host allows: measuring {fits} as well)");
        sizes.insert(1, (fits, 3));
    }
    sizes.retain(|(files, _)| only.as_ref().is_none_or(|only| only.contains(files)));
    // The rounds of every size take turns (100, 10,000, 100,000, 100, ...):
    // load that comes and goes on a shared machine then falls on every size
    // alike, instead of on whichever size ran while it lasted.
    let mut results: Vec<Result<Vec<(f64, f64)>, String>> = sizes
        .iter()
        .map(|&(files, _)| raise_nofile(files).map(|()| Vec::new()))
        .collect();
    let mut spent = vec![Duration::ZERO; sizes.len()];
    let most = sizes.iter().map(|&(_, rounds)| rounds).max().unwrap_or(0);
    for turn in 0..most {
        for (i, &(files, rounds)) in sizes.iter().enumerate() {
            if turn >= rounds {
                continue;
            }
            if let Ok(done) = &mut results[i] {
                let started = Instant::now();
                match round(files) {
                    Ok(r) => done.push(r),
                    Err(e) => results[i] = Err(e),
                }
                spent[i] += started.elapsed();
            }
        }
    }
    for ((&(files, rounds), result), spent) in sizes.iter().zip(results).zip(spent) {
        match result {
            Ok(results) => {
                let preserve = median(results.iter().map(|r| r.0).collect());
                let cycle = median(results.iter().map(|r| r.1).collect());
                println!(
                    "{files:>7} files: preserve {:>8.4} ms per file; prepare+freeze+reboot {:>8.4} ms per file \
                     ({:.1} s for the round{})",
                    preserve * 1e3,
                    cycle * 1e3,
                    spent.as_secs_f64(),
                    if rounds > 1 { "s, medians" } else { "" }
                );
                figures.push((files, preserve, cycle));
            }
            Err(e) => println!("{files:>7} files: not measured: {e}"),
        }
    }
    for pair in figures.windows(2) {
        let ((n0, p0, c0), (n1, p1, c1)) = (pair[0], pair[1]);
        println!(
            "ratio per file at {n1}/at {n0}: preserve {:.2}, prepare+freeze+reboot {:.2}  (1.0 = flat; target <= 1.2)",
            p1 / p0,
            c1 / c0
        );
    }
}
