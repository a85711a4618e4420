//! `luo-qemu-tool`: the guest-side helper of the QEMU scenarios
//! (`qemu-tests/scenarios.py`). It runs inside the test guest, statically
//! linked, next to `luod` and `luoctl`.
//!
//! - `fill`: creates many sessions with many memfds in one process through
//!   luod's socket ([`Client`]), with deterministic contents, and writes a
//!   manifest (`session token size sha256` per file). Used where one
//!   `luoctl` process per file would be too slow under TCG (500 sessions,
//!   1,000 files).
//! - `check`: after the kexec, retrieves every file of a manifest, hashes it
//!   and compares size and SHA-256 with the manifest.
//! - `gen`: writes a file of deterministic pseudo-random bytes and prints its
//!   SHA-256 (faster than `/dev/urandom` under TCG).
//! - `probe`: asks `/dev/liveupdate` for sessions of the previous kernel by
//!   name (`RETRIEVE_SESSION`) and reports what the kernel says.
//! - `kexec`: a bare `kexec_file_load` + `reboot(LINUX_REBOOT_CMD_KEXEC)`,
//!   without luod (the baseline of the blackout benchmark, and the "kexec
//!   anyway" of the cancel scenario).
//! - `fake-pid1`: plays a LUO-aware systemd's part around luod (its fd
//!   store, `systemctl kexec`, the fd store back in the new kernel) where
//!   the guest has no systemd; see `fake_pid1.rs`.
//! - `bench-copy`: the reserved-memory copy benchmark: `RecordStore::write`
//!   of a memfd into the mapped `memmap=` range against a plain copy of the
//!   same number of bytes.
//!
//! Markers for the host (`@@LUO ...`) are printed on stdout, which the
//! scenario's `/init` sends to the serial console.

mod fake_pid1;
mod json;

use liveupdate::kernel::{kexec, memfd, uapi};
use liveupdate::protocol::client::Client;
use liveupdate::protocol::{Request, Response};
use liveupdate::record::{
    DataSource, FdRecord, HandoverRecord, PreservedSource, RecordStore, SealedMapping, SessionRecord,
};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

type Result<T> = std::result::Result<T, String>;

const USAGE: &str = "usage: luo-qemu-tool COMMAND [OPTIONS]
  fill  --prefix P --sessions N --files F [--sizes 0,4096,...] [--seed S] --manifest PATH
        [--socket PATH] [--marker PHASE] [--print-each]
  check --manifest PATH [--socket PATH] [--marker PHASE] [--print-each] [--finish-sessions]
  gen   --size SIZE --out PATH [--seed S]
  probe [--dev /dev/liveupdate] [--expect absent|present] NAME...
  kexec --kernel K [--initrd I] --cmdline C [--mark NAME] [--load-only]
        (--load-only: kexec_file_load and return, for a `luoctl prepare` without --kernel)
  now   (CLOCK_REALTIME in ns)
  json [--count] PATH   (JSON on stdin, e.g. `luoctl --json status`: prints each value at PATH, keys
        and array indexes joined by '.', '*' for every element; strings bare; --count: how many)
  luod-times --exec-ns NS --log PATH   (luod's log lines, in ms after NS)
  luo-start-cost [--dev /dev/liveupdate]   (times the kernel calls of luod's LUO start,
        taking luod's incoming record session: run it instead of luod)
  fake-pid1 --notify PATH --control FIFO --exec 'luod ARGS' [--restore] [--expect 'S sessions, P fds, dropped D']
        (plays a LUO-aware systemd around luod: fd store, systemctl kexec, restore)
  bench-copy (--region SIZE$ADDR | --file PATH [--file-size SIZE]) [--size 64M] [--reps 3]";

/// Parsed `--key value` options and bare words.
#[derive(Debug, Default)]
struct Opts {
    kv: BTreeMap<String, String>,
    flags: Vec<String>,
    words: Vec<String>,
}

const FLAGS: &[&str] = &["print-each", "finish-sessions", "restore", "load-only", "count"];

impl Opts {
    fn parse(args: &[String]) -> Result<Opts> {
        let mut o = Opts::default();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if let Some(key) = a.strip_prefix("--") {
                if FLAGS.contains(&key) {
                    o.flags.push(key.to_string());
                } else {
                    let v = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
                    o.kv.insert(key.to_string(), v.clone());
                }
            } else {
                o.words.push(a.clone());
            }
        }
        Ok(o)
    }
    fn get(&self, key: &str) -> Option<&str> {
        self.kv.get(key).map(String::as_str)
    }
    fn req(&self, key: &str) -> Result<&str> {
        self.get(key).ok_or_else(|| format!("--{key} is required"))
    }
    fn num(&self, key: &str, default: u64) -> Result<u64> {
        self.get(key).map_or(Ok(default), parse_size)
    }
    fn flag(&self, key: &str) -> bool {
        self.flags.iter().any(|f| f == key)
    }
    fn socket(&self) -> PathBuf {
        PathBuf::from(self.get("socket").unwrap_or(liveupdate::protocol::DEFAULT_SOCKET))
    }
}

/// `4096`, `64K`, `3M`, `1G`, or hex `0x...`.
fn parse_size(s: &str) -> Result<u64> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n = match num.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => num.parse(),
    }
    .map_err(|_| format!("{s:?} is not a size"))?;
    n.checked_mul(mult).ok_or_else(|| format!("{s} is too large"))
}

fn hex(bytes: &[u8]) -> String {
    liveupdate::engine::hex(bytes)
}

/// Deterministic pseudo-random bytes (xorshift64*), seeded per file.
fn fill_bytes(seed: u64, buf: &mut [u8]) {
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    if x == 0 {
        x = 1;
    }
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        c.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    let rest = chunks.into_remainder();
    let tail = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
    let n = rest.len();
    rest.copy_from_slice(&tail[..n]);
}

fn file_seed(seed: u64, session: u64, token: u64) -> u64 {
    seed.wrapping_mul(0x100_0000_01B3)
        ^ session.wrapping_mul(0xA24B_AED4_963E_E407)
        ^ token.wrapping_mul(0x9FB2_1C65_1E98_DF25)
}

/// SHA-256 of a file descriptor's contents, read with pread in 1 MiB chunks.
fn sha256_fd(fd: BorrowedFd<'_>) -> Result<(u64, String)> {
    let file = File::from(fd.try_clone_to_owned().map_err(|e| e.to_string())?);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = FileExt::read_at(&file, &mut buf, off).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok((off, hex(&h.finalize())))
}

fn marker(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "@@LUO {line}");
    let _ = out.flush();
}

/// One preserved file of a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    session: String,
    token: u64,
    size: u64,
    sha256: String,
}

impl Entry {
    fn line(&self) -> String {
        format!("{} {} {} {}", self.session, self.token, self.size, self.sha256)
    }
}

/// SHA-256 of the manifest text: one digest for every file's size and hash.
fn manifest_digest(entries: &[Entry]) -> String {
    let mut h = Sha256::new();
    for e in entries {
        h.update(e.line().as_bytes());
        h.update(b"\n");
    }
    hex(&h.finalize())
}

fn connect(o: &Opts) -> Result<Client> {
    Client::connect(&o.socket(), "luo-qemu-tool").map_err(|e| e.to_string())
}

fn cmd_fill(o: &Opts) -> Result<()> {
    let prefix = o.req("prefix")?;
    let sessions = o.num("sessions", 1)?;
    let files = o.num("files", 1)?;
    let seed = o.num("seed", 1)?;
    let sizes: Vec<u64> = o
        .get("sizes")
        .unwrap_or("4096")
        .split(',')
        .map(parse_size)
        .collect::<Result<_>>()?;
    if sizes.is_empty() {
        return Err("--sizes is empty".into());
    }
    let manifest = PathBuf::from(o.req("manifest")?);
    let mut client = connect(o)?;
    let started = Instant::now();
    let mut entries = Vec::new();
    let mut bytes = 0u64;
    let mut buf = Vec::new();
    for s in 0..sessions {
        let name = format!("{prefix}{s:04}");
        client
            .call(&Request::SessionCreate { name: name.clone() })
            .map_err(|e| format!("session create {name}: {e}"))?;
        for f in 0..files {
            // Tokens are spread over the u64 range, not just 1..n.
            let token = match f {
                0 => 1,
                1 => u64::MAX,
                _ => f.wrapping_mul(0x0001_0000_0001) + 7,
            };
            let size = sizes[((s * files + f) % sizes.len() as u64) as usize];
            buf.resize(size as usize, 0);
            fill_bytes(file_seed(seed, s, token), &mut buf);
            let fd = memfd::from_bytes(&format!("{name}/{token}"), &buf).map_err(|e| format!("memfd: {e}"))?;
            let (len, sha256) = sha256_fd(fd.as_fd())?;
            client
                .call_fds(
                    &Request::SessionPreserve {
                        name: name.clone(),
                        token,
                    },
                    &[fd.as_fd()],
                )
                .map_err(|e| format!("session preserve {name} token {token}: {e}"))?;
            drop(fd);
            bytes += len;
            entries.push(Entry {
                session: name.clone(),
                token,
                size: len,
                sha256,
            });
        }
    }
    let mut text = String::new();
    for e in &entries {
        text.push_str(&e.line());
        text.push('\n');
    }
    std::fs::write(&manifest, text).map_err(|e| format!("{}: {e}", manifest.display()))?;
    let digest = manifest_digest(&entries);
    println!(
        "fill: {sessions} session(s), {} file(s), {bytes} bytes preserved in {:.2} s; manifest {} sha256 {digest}",
        entries.len(),
        started.elapsed().as_secs_f64(),
        manifest.display()
    );
    if let Some(phase) = o.get("marker") {
        if o.flag("print-each") {
            for e in &entries {
                marker(&format!(
                    "hash {phase} {}/{} {} {}",
                    e.session, e.token, e.sha256, e.size
                ));
            }
        }
        marker(&format!("hash {phase} manifest:{prefix} {digest} {}", entries.len()));
    }
    Ok(())
}

fn read_manifest(path: &Path) -> Result<Vec<Entry>> {
    let f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for line in std::io::BufReader::new(f).lines() {
        let line = line.map_err(|e| e.to_string())?;
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.len() != 4 {
            return Err(format!("bad manifest line {line:?}"));
        }
        out.push(Entry {
            session: w[0].to_string(),
            token: w[1].parse().map_err(|_| format!("bad token in {line:?}"))?,
            size: w[2].parse().map_err(|_| format!("bad size in {line:?}"))?,
            sha256: w[3].to_string(),
        });
    }
    Ok(out)
}

fn cmd_check(o: &Opts) -> Result<()> {
    let path = PathBuf::from(o.req("manifest")?);
    let expected = read_manifest(&path)?;
    let prefix = expected
        .first()
        .map(|e| e.session.trim_end_matches(|c: char| c.is_ascii_digit()).to_string());
    let mut client = connect(o)?;
    let started = Instant::now();
    let mut got = Vec::new();
    let mut bad = 0;
    let mut bytes = 0;
    for e in &expected {
        let req = Request::SessionRetrieve {
            name: e.session.clone(),
            token: e.token,
        };
        let (resp, fds) = client
            .call_fds(&req, &[])
            .map_err(|err| format!("session retrieve {} token {}: {err}", e.session, e.token))?;
        let Response::Fd { size } = resp else {
            return Err(format!(
                "session retrieve {} token {}: unexpected answer {resp:?}",
                e.session, e.token
            ));
        };
        let fd = fds
            .into_iter()
            .next()
            .ok_or_else(|| format!("session retrieve {} token {}: no fd came back", e.session, e.token))?;
        let (len, sha256) = sha256_fd(fd.as_fd())?;
        if len != size || len != e.size || sha256 != e.sha256 {
            bad += 1;
            println!(
                "MISMATCH {}/{}: expected {} bytes sha256 {}, got {len} bytes (luod said {size}) sha256 {sha256}",
                e.session, e.token, e.size, e.sha256
            );
        }
        bytes += len;
        got.push(Entry {
            session: e.session.clone(),
            token: e.token,
            size: len,
            sha256,
        });
    }
    if o.flag("finish-sessions") {
        let mut names: Vec<&str> = expected.iter().map(|e| e.session.as_str()).collect();
        names.dedup();
        for name in names {
            client
                .call(&Request::SessionFinish { name: name.to_string() })
                .map_err(|e| format!("session finish {name}: {e}"))?;
        }
    }
    let digest = manifest_digest(&got);
    println!(
        "check: {} file(s), {bytes} bytes retrieved in {:.2} s: {} identical, {bad} different; sha256 of the retrieved manifest {digest}",
        got.len(),
        started.elapsed().as_secs_f64(),
        got.len() - bad
    );
    if let Some(phase) = o.get("marker") {
        if o.flag("print-each") {
            for e in &got {
                marker(&format!(
                    "hash {phase} {}/{} {} {}",
                    e.session, e.token, e.sha256, e.size
                ));
            }
        }
        marker(&format!(
            "hash {phase} manifest:{} {digest} {}",
            prefix.unwrap_or_default(),
            got.len()
        ));
    }
    if bad > 0 {
        return Err(format!("{bad} of {} file(s) differ from the manifest", got.len()));
    }
    Ok(())
}

fn cmd_gen(o: &Opts) -> Result<()> {
    let size = o.num("size", 0)?;
    let seed = o.num("seed", 1)?;
    let out = o.req("out")?;
    let file = File::create(out).map_err(|e| format!("{out}: {e}"))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    let mut chunk = 0u64;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        fill_bytes(file_seed(seed, chunk, 0), &mut buf[..n]);
        file.write_all_at(&buf[..n], off).map_err(|e| format!("{out}: {e}"))?;
        h.update(&buf[..n]);
        off += n as u64;
        chunk += 1;
    }
    println!("{}  {out}", hex(&h.finalize()));
    Ok(())
}

fn cmd_probe(o: &Opts) -> Result<()> {
    let dev = o.get("dev").unwrap_or("/dev/liveupdate");
    let expect = o.get("expect");
    let fd = nix::fcntl::open(
        dev,
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("open {dev}: {e}"))?;
    let mut wrong = 0;
    for name in &o.words {
        let found = match uapi::retrieve_session(fd.as_fd(), name) {
            Ok(session) => {
                let files: Vec<String> = (0..8u64)
                    .chain([u64::MAX])
                    .filter(|t| uapi::retrieve_fd(session.as_fd(), *t).is_ok())
                    .map(|t| t.to_string())
                    .collect();
                println!("probe: RETRIEVE_SESSION {name}: present (tokens found among 0..7,MAX: {files:?})");
                "present"
            }
            Err(e) => {
                println!("probe: RETRIEVE_SESSION {name}: {e} ({})", e.desc());
                if e == nix::errno::Errno::ENOENT {
                    "absent"
                } else {
                    "error"
                }
            }
        };
        if expect.is_some_and(|x| x != found) {
            wrong += 1;
        }
    }
    if wrong > 0 {
        return Err(format!("{wrong} session(s) not {}", expect.unwrap_or_default()));
    }
    Ok(())
}

fn cmd_kexec(o: &Opts) -> Result<()> {
    let kernel = PathBuf::from(o.req("kernel")?);
    let initrd = o.get("initrd").map(PathBuf::from);
    let open = |p: &PathBuf| std::fs::File::open(p).map_err(|e| format!("cannot open {}: {e}", p.display()));
    let kfile = open(&kernel)?;
    let ifile = initrd.as_ref().map(open).transpose()?;
    let started = Instant::now();
    let name = kernel.display().to_string();
    let load = liveupdate::kernel::KernelLoad {
        kernel: kfile.as_fd(),
        kernel_name: &name,
        initrd: ifile.as_ref().map(|f| f.as_fd()),
        cmdline: o.req("cmdline")?,
    };
    kexec::load(&load).map_err(|e| e.to_string())?;
    println!(
        "kexec: kexec_file_load took {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    if o.flag("load-only") {
        return Ok(());
    }
    if let Some(name) = o.get("mark") {
        marker(&format!("mark {name}"));
    }
    // Wait until the console has sent every byte: the marker must leave the
    // guest before the kexec does.
    // SAFETY: tcdrain only waits on the descriptor, which stays open.
    let _ = unsafe { libc::tcdrain(1) };
    Err(kexec::reboot_into_loaded().to_string())
}

/// Nanoseconds since the epoch of a log timestamp `2026-11-22T04:42:32.417609Z`.
fn parse_rfc3339(ts: &str) -> Option<u64> {
    let (date, time) = ts.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>());
    let (hh, mm, ss) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    let mut frac = frac.to_string();
    frac.truncate(9);
    while frac.len() < 9 {
        frac.push('0');
    }
    Some(secs as u64 * 1_000_000_000 + frac.parse::<u64>().ok()?)
}

/// luod's log lines with their time after `--exec-ns` (the moment the
/// guest's shell started luod), to split luod's startup into its parts.
fn cmd_luod_times(o: &Opts) -> Result<()> {
    let exec: u64 = o
        .req("exec-ns")?
        .parse()
        .map_err(|_| "--exec-ns is not a number".to_string())?;
    let log = std::fs::read_to_string(o.req("log")?).map_err(|e| e.to_string())?;
    for line in log.lines() {
        let Some(ts) = line.split_whitespace().next().and_then(parse_rfc3339) else {
            continue;
        };
        if ts < exec {
            continue;
        }
        let msg = line.split_once(": ").map_or(line, |(_, m)| m);
        println!("luod +{:.1} ms after exec: {msg}", (ts - exec) as f64 / 1e6);
    }
    Ok(())
}

/// Times, one by one, the kernel calls luod makes when it starts after a
/// live update (liveupdate::kernel::luo::Luo::start): open /dev/liveupdate,
/// RETRIEVE_SESSION luod, RETRIEVE_FD of the record, copying it into a new
/// memfd, CREATE_SESSION + PRESERVE_FD of the copy, FINISH of the old one.
fn cmd_luo_start_cost(o: &Opts) -> Result<()> {
    let dev = o.get("dev").unwrap_or("/dev/liveupdate");
    let mut t = Instant::now();
    let mut lap = |what: &str| {
        println!("luo-start-cost: {what}: {:.2} ms", t.elapsed().as_secs_f64() * 1e3);
        t = Instant::now();
    };
    let fd = nix::fcntl::open(
        dev,
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("open {dev}: {e}"))?;
    lap("open /dev/liveupdate");
    let old = uapi::retrieve_session(fd.as_fd(), "luod").map_err(|e| format!("RETRIEVE_SESSION luod: {e}"))?;
    lap("RETRIEVE_SESSION luod");
    let rec = uapi::retrieve_fd(old.as_fd(), 0).map_err(|e| format!("RETRIEVE_FD 0: {e}"))?;
    lap("RETRIEVE_FD (record memfd)");
    let len = memfd::size(rec.as_fd()).map_err(|e| e.to_string())?;
    let (_, sha) = sha256_fd(rec.as_fd())?;
    lap(&format!(
        "sha256 of the {len}-byte record (reads every page once; not something luod does)"
    ));
    let copy = memfd::create("copy").map_err(|e| e.to_string())?;
    let dst = File::from(copy.try_clone().map_err(|e| e.to_string())?);
    dst.set_len(len).map_err(|e| e.to_string())?;
    let src = File::from(rec.try_clone().map_err(|e| e.to_string())?);
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], off).map_err(|e| e.to_string())?;
        dst.write_all_at(&buf[..n], off).map_err(|e| e.to_string())?;
        off += n as u64;
    }
    lap(&format!("copy into a new memfd ({len} bytes; record sha256 {sha})"));
    let session = uapi::create_session(fd.as_fd(), "luod").map_err(|e| format!("CREATE_SESSION luod: {e}"))?;
    lap("CREATE_SESSION luod");
    uapi::preserve_fd(session.as_fd(), copy.as_fd(), 0).map_err(|e| format!("PRESERVE_FD: {e}"))?;
    lap("PRESERVE_FD (the copy)");
    uapi::finish(old.as_fd()).map_err(|e| format!("FINISH: {e}"))?;
    lap("FINISH (the incoming luod session)");
    Ok(())
}

/// Runs `f` and returns its duration in seconds with its value.
fn time<T>(f: impl FnOnce() -> Result<T>) -> Result<(f64, T)> {
    let t = Instant::now();
    let v = f()?;
    Ok((t.elapsed().as_secs_f64(), v))
}

fn cmd_bench_copy(o: &Opts) -> Result<()> {
    use liveupdate::kernel::reserved::{ReservedRegion, parse_memmap};
    let size = o.num("size", 64 << 20)?;
    let reps = o.num("reps", 3)?.max(1);
    if let Some(path) = o.get("file") {
        // A file region (tmpfs on the host: the same code without /dev/mem),
        // for a native reference next to the guest's figures.
        let region_size = o.num("file-size", 2 * size + (16 << 20))?;
        let region = liveupdate::region::FileRegion::open(Path::new(path), region_size).map_err(|e| e.to_string())?;
        let store = RecordStore::new(region).map_err(|e| e.to_string())?;
        let r = bench_copy(store, size, reps);
        let _ = std::fs::remove_file(path);
        return r;
    }
    let spec = o.req("region")?;
    let range = parse_memmap(spec.trim_start_matches("memmap=")).map_err(|e| e.to_string())?;
    let region = ReservedRegion::open(range, None).map_err(|e| e.to_string())?;
    let store = RecordStore::new(region).map_err(|e| e.to_string())?;
    bench_copy(store, size, reps)
}

fn bench_copy<R: liveupdate::region::Region>(mut store: RecordStore<R>, size: u64, reps: u64) -> Result<()> {
    if store.data_capacity() < size {
        return Err(format!(
            "the region holds {} bytes of data, less than {size}",
            store.data_capacity()
        ));
    }
    // The memfd a client would have preserved, filled with pseudo-random
    // bytes, then sealed against growing and shrinking as QEMU's
    // memory-backend-memfd seals guest RAM.
    let fd: std::os::fd::OwnedFd = nix::sys::memfd::memfd_create(
        "bench",
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(|e| format!("memfd_create: {e}"))?;
    {
        let f = File::from(fd.try_clone().map_err(|e| e.to_string())?);
        f.set_len(size).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < size {
            let n = (size - off).min(buf.len() as u64) as usize;
            fill_bytes(off, &mut buf[..n]);
            f.write_all_at(&buf[..n], off).map_err(|e| e.to_string())?;
            off += n as u64;
        }
    }
    {
        use std::os::fd::AsRawFd;
        // SAFETY: F_ADD_SEALS with an int of seal flags, on this process's own memfd.
        let r = unsafe {
            libc::fcntl(
                fd.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_GROW | libc::F_SEAL_SHRINK,
            )
        };
        if r != 0 {
            return Err(format!("sealing the memfd: {}", std::io::Error::last_os_error()));
        }
    }
    // What luod's backend makes when a sealed memfd is preserved.
    let sealed_map = SealedMapping::of(fd.as_fd()).ok_or("the sealed memfd could not be mapped")?;
    let src_map = {
        let f = File::from(fd.try_clone().map_err(|e| e.to_string())?);
        // SAFETY: the memfd was created above and is private to this
        // process; nothing truncates it while the mapping lives.
        unsafe { memmap2::Mmap::map(&f) }.map_err(|e| e.to_string())?
    };
    let name = liveupdate::names::SessionName::new("bench").map_err(|e| e.to_string())?;
    let mut record = HandoverRecord::new("reserved-memory");
    record.sessions.push(SessionRecord {
        name,
        owner_uid: 0,
        fds: vec![FdRecord {
            token: 1,
            size,
            data: Some(0),
            retrieved: false,
        }],
        incoming: false,
    });
    let mut ram_dst = vec![0u8; size as usize];
    ram_dst.iter_mut().step_by(4096).for_each(|b| *b = 1);
    let mib = size as f64 / (1 << 20) as f64;
    let mut best = [f64::MAX; 6];
    for rep in 0..reps {
        // 1. memcpy RAM -> RAM (the baseline of the issue).
        let (t_memcpy, ()) = time(|| {
            ram_dst.copy_from_slice(&src_map);
            Ok(())
        })?;
        std::hint::black_box(&ram_dst);
        // 2. luod's copy: RecordStore::write of the memfd into the region,
        // through the mapping made at preserve (a sealed memfd)...
        let src = fd.as_fd();
        let mapped = PreservedSource {
            fd: src,
            map: Some(&sealed_map),
        };
        let (t_record, report) = time(|| {
            store
                .write(&mut record, &[&mapped as &dyn DataSource])
                .map_err(|e| e.to_string())
        })?;
        // ... and with pread (what an unsealed memfd gets).
        let (t_record_pread, _) = time(|| {
            store
                .write(&mut record, &[&src as &dyn DataSource])
                .map_err(|e| e.to_string())
        })?;
        // 3. Read the memfd with pread into RAM (what the store's copy does).
        let (t_pread, ()) = time(|| src.read_into(&mut ram_dst).map_err(|e| e.to_string()))?;
        // 4. CRC-32C of 64 MiB in RAM (the checksum the record store adds).
        let (t_crc, crc) = time(|| Ok(crc32c::crc32c(&ram_dst)))?;
        std::hint::black_box(crc);
        println!(
            "bench-copy rep {}: memcpy RAM->RAM {:.1} ms ({:.0} MiB/s); RecordStore::write gen {} {:.1} ms ({:.0} MiB/s), with pread {:.1} ms ({:.0} MiB/s); pread memfd->RAM {:.1} ms ({:.0} MiB/s); crc32c {:.1} ms ({:.0} MiB/s)",
            rep + 1,
            t_memcpy * 1e3,
            mib / t_memcpy,
            report.generation,
            t_record * 1e3,
            mib / t_record,
            t_record_pread * 1e3,
            mib / t_record_pread,
            t_pread * 1e3,
            mib / t_pread,
            t_crc * 1e3,
            mib / t_crc,
        );
        best[0] = best[0].min(t_memcpy);
        best[1] = best[1].min(t_record);
        best[3] = best[3].min(t_pread);
        best[4] = best[4].min(t_crc);
        best[5] = best[5].min(t_record_pread);
    }
    // 4. memcpy from the memfd's mapping into the region mapping (the same
    // destination as the record store, without checksums or layout).
    let mut region = store.into_region();
    let dst = liveupdate::region::Region::bytes_mut(&mut region);
    let off = dst.len() / 2;
    let dst = dst
        .get_mut(off..off + size as usize)
        .ok_or("region too small for the plain copy")?;
    for rep in 0..reps {
        let (t_region, ()) = time(|| {
            dst.copy_from_slice(&src_map);
            Ok(())
        })?;
        println!(
            "bench-copy rep {}: memcpy memfd->region {:.1} ms ({:.0} MiB/s)",
            rep + 1,
            t_region * 1e3,
            mib / t_region
        );
        best[2] = best[2].min(t_region);
    }
    let [memcpy, record_t, region_t, pread, crc, record_pread] = best;
    marker(&format!("bench copy_bytes {size}"));
    marker(&format!("bench memcpy_ram_ms {:.3}", memcpy * 1e3));
    marker(&format!("bench record_write_ms {:.3}", record_t * 1e3));
    marker(&format!("bench memcpy_region_ms {:.3}", region_t * 1e3));
    marker(&format!("bench pread_ms {:.3}", pread * 1e3));
    marker(&format!("bench crc32c_ms {:.3}", crc * 1e3));
    marker(&format!("bench record_write_pread_ms {:.3}", record_pread * 1e3));
    marker(&format!("bench copy_ratio {:.3}", memcpy / record_t));
    marker(&format!("bench copy_ratio_pread {:.3}", memcpy / record_pread));
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let run = || -> Result<()> {
        let o = Opts::parse(rest)?;
        match cmd.as_str() {
            "fill" => cmd_fill(&o),
            "check" => cmd_check(&o),
            "gen" => cmd_gen(&o),
            "probe" => cmd_probe(&o),
            "kexec" => cmd_kexec(&o),
            "bench-copy" => cmd_bench_copy(&o),
            "now" => {
                println!("{}", liveupdate::engine::now());
                Ok(())
            }
            "luod-times" => cmd_luod_times(&o),
            "json" => json::cmd(&o.words, o.flag("count")),
            "luo-start-cost" => cmd_luo_start_cost(&o),
            "fake-pid1" => fake_pid1::run(
                o.req("notify")?,
                o.req("control")?,
                o.req("exec")?,
                o.flag("restore"),
                o.get("expect"),
            ),
            _ => Err(format!("unknown command {cmd:?}\n{USAGE}")),
        }
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("luo-qemu-tool {cmd}: {e}");
            let _ = std::io::stderr().flush();
            let _ = std::io::stdout().flush();
            ExitCode::FAILURE
        }
    }
}
