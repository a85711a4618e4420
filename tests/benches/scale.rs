//! How luod's costs per file grow with the number of files (file backend,
//! 4 KiB memfds, one session), as ratios measured in the same run:
//!
//! - `session preserve`: the time of every preserve request, per file, at
//!   10,000 files against 100, and at 100,000 against 10,000 (1.0 = flat);
//! - `prepare` + `freeze` + `reboot` (the simulated kexec, which copies every
//!   file into the region): per file, at the same ratios.
//!
//! The 100-file figures are the median of 5 rounds (each a fresh luod); the
//! others are one round. Run with `cargo bench -p liveupdate-tests --bench
//! scale` (as root). It prints and never fails on a figure; without root, or
//! when a step cannot run, it says why and exits 0. The 100,000-file round
//! needs 100,000 descriptors in luod and in its fd holder: it raises
//! RLIMIT_NOFILE (root may), and its region is about 820 MiB of file.

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
    conn.freeze().map_err(|e| e.message)?;
    conn.reboot().map_err(|e| e.message)?;
    let cycle = start.elapsed();
    luod.expect_kexec_exit();
    Ok((
        preserving.as_secs_f64() / files as f64,
        cycle.as_secs_f64() / files as f64,
    ))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn raise_nofile(files: u64) -> Result<(), String> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| e.to_string())?;
    // luod and its holder (which inherit the limit) hold every file.
    let limit = hard.max(files + 1000);
    setrlimit(Resource::RLIMIT_NOFILE, limit, limit).map_err(|e| format!("cannot raise RLIMIT_NOFILE to {limit}: {e}"))
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("scale: skipped, luod's tests and benches run as root");
        return;
    }
    let mut figures = Vec::new();
    for (files, rounds) in [(100u64, 5), (10_000, 1), (100_000, 1)] {
        let started = Instant::now();
        let measured = raise_nofile(files).and_then(|()| {
            let results = (0..rounds).map(|_| round(files)).collect::<Result<Vec<_>, _>>()?;
            Ok((
                median(results.iter().map(|r| r.0).collect()),
                median(results.iter().map(|r| r.1).collect()),
            ))
        });
        match measured {
            Ok((preserve, cycle)) => {
                println!(
                    "{files:>7} files: preserve {:>8.4} ms per file; prepare+freeze+reboot {:>8.4} ms per file \
                     ({:.1} s for the round{})",
                    preserve * 1e3,
                    cycle * 1e3,
                    started.elapsed().as_secs_f64(),
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
