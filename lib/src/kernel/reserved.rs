//! Reserved memory: a physical range kept out of the kernel's hands with
//! `memmap=SIZE$ADDR` on the command line of both kernels. kexec leaves it
//! untouched, so what luod writes there before the kexec reads back after it.
//!
//! The range is mapped through `/dev/mem` (it is not System RAM, so
//! `STRICT_DEVMEM` allows it) or, with `memmap=SIZE!ADDR`, through the pmem
//! device the kernel makes of it.

use crate::region::Region;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

/// A physical range and how the kernel was told to keep it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// Start (physical address).
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// `$` (reserved, via `/dev/mem`) or `!` (persistent memory, via `/dev/pmemN`).
    pub kind: RangeKind,
}

/// How a range is reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeKind {
    /// `memmap=SIZE$ADDR`: reserved, mapped through `/dev/mem`.
    Reserved,
    /// `memmap=SIZE!ADDR`: legacy pmem, mapped through `/dev/pmemN`.
    Pmem,
}

impl Range {
    /// The `memmap=` parameter that reserves this range (`memmap=64M$0x100000000`).
    pub fn memmap_param(&self) -> String {
        let sep = match self.kind {
            RangeKind::Reserved => '$',
            RangeKind::Pmem => '!',
        };
        format!("memmap={}{sep}{:#x}", human(self.size), self.addr)
    }
}

fn human(n: u64) -> String {
    for (shift, suffix) in [(30, 'G'), (20, 'M'), (10, 'K')] {
        if n != 0 && n.is_multiple_of(1 << shift) {
            return format!("{}{suffix}", n >> shift);
        }
    }
    n.to_string()
}

/// Why a range could not be found or used.
#[derive(Debug, thiserror::Error)]
pub enum ReservedError {
    /// No `memmap=` reservation on the command line.
    #[error(
        "the kernel command line reserves no memory (no memmap=SIZE$ADDR or memmap=SIZE!ADDR); add one to both kernels' command lines, or pass --region"
    )]
    NoReservation,
    /// A `memmap=` value that does not parse.
    #[error("cannot parse {0:?}: expected memmap=SIZE$ADDR or memmap=SIZE!ADDR, e.g. memmap=64M$0x100000000")]
    Parse(String),
    /// The range is System RAM: writing there would corrupt the kernel.
    #[error("{0:#x}..{1:#x} overlaps System RAM in /proc/iomem ({2}); it is not reserved, refusing to map it")]
    SystemRam(u64, u64, String),
    /// Mapping failed.
    #[error("cannot map {what}: {source}")]
    Map {
        /// What was being mapped.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// `memparse`: a number (decimal, or hex with 0x) with an optional K/M/G/T suffix.
fn memparse(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, mult) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 1u64 << 10),
        'm' | 'M' => (&s[..s.len() - 1], 1 << 20),
        'g' | 'G' => (&s[..s.len() - 1], 1 << 30),
        't' | 'T' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let n = match digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None => digits.parse().ok()?,
    };
    n.checked_mul(mult)
}

/// Parses one `memmap=` value (`64M$0x100000000`, `1G!4G`).
pub fn parse_memmap(value: &str) -> Result<Range, ReservedError> {
    let err = || ReservedError::Parse(format!("memmap={value}"));
    let (size, addr, kind) = if let Some((s, a)) = value.split_once('$') {
        (s, a, RangeKind::Reserved)
    } else if let Some((s, a)) = value.split_once('!') {
        (s, a, RangeKind::Pmem)
    } else {
        return Err(err());
    };
    let size = memparse(size).filter(|s| *s > 0).ok_or_else(err)?;
    let addr = memparse(addr).ok_or_else(err)?;
    addr.checked_add(size).ok_or_else(err)?;
    Ok(Range { addr, size, kind })
}

/// The ranges a command line reserves with `memmap=` (others, like
/// `memmap=nn@ss` or `memmap=exactmap`, are not reservations and are skipped).
pub fn ranges_in_cmdline(cmdline: &str) -> Result<Vec<Range>, ReservedError> {
    let mut out = Vec::new();
    for word in cmdline.split_whitespace() {
        if let Some(value) = word.strip_prefix("memmap=") {
            for part in value.split(',') {
                if part.contains('$') || part.contains('!') {
                    out.push(parse_memmap(part)?);
                }
            }
        }
    }
    Ok(out)
}

/// Checks `/proc/iomem`-formatted `iomem` for a System RAM entry overlapping `range`.
pub fn check_not_system_ram(range: &Range, iomem: &str) -> Result<(), ReservedError> {
    let end = range.addr + range.size - 1;
    for line in iomem.lines() {
        // Top-level and nested entries: "  00100000-bfffffff : System RAM"
        let Some((span, name)) = line.trim_start().split_once(" : ") else {
            continue;
        };
        if name.trim() != "System RAM" {
            continue;
        }
        let Some((a, b)) = span.split_once('-') else { continue };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        if a == 0 && b == 0 {
            // Addresses are hidden to non-root readers.
            continue;
        }
        if a <= end && range.addr <= b {
            return Err(ReservedError::SystemRam(range.addr, end + 1, line.trim().to_string()));
        }
    }
    Ok(())
}

/// A reserved range, mapped.
#[derive(Debug)]
pub struct ReservedRegion {
    map: memmap2::MmapMut,
    range: Range,
    device: PathBuf,
}

impl ReservedRegion {
    /// Maps `range` through `/dev/mem` (or the pmem device `pmem` for `!`
    /// ranges), after checking `/proc/iomem` does not call it System RAM.
    pub fn open(range: Range, pmem: Option<&Path>) -> Result<Self, ReservedError> {
        let iomem = std::fs::read_to_string("/proc/iomem").unwrap_or_default();
        check_not_system_ram(&range, &iomem)?;
        let (device, offset) = match (range.kind, pmem) {
            (RangeKind::Pmem, Some(dev)) => (dev.to_path_buf(), 0),
            (RangeKind::Pmem, None) => (PathBuf::from("/dev/pmem0"), 0),
            (RangeKind::Reserved, _) => (PathBuf::from("/dev/mem"), range.addr),
        };
        let map_err = |source| ReservedError::Map {
            what: format!("{} at {:#x} ({} bytes)", device.display(), offset, range.size),
            source,
        };
        // Without O_SYNC: on x86 that flag maps /dev/mem uncached, and the
        // copy at freeze (inside the blackout) would run at uncached speed.
        // The caches stay coherent across a kexec (no power is lost), and
        // every byte is checked by its CRC after it.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&device)
            .map_err(map_err)?;
        let len = usize::try_from(range.size)
            .map_err(|_| map_err(std::io::Error::other("range larger than the address space")))?;
        // SAFETY: the range is reserved from the kernel (memmap=, checked
        // against /proc/iomem above), so no kernel or process memory lives
        // there; luod is its only user (the engine holds the region's only
        // mapping), and the mapping is of a device that cannot be truncated.
        let map = unsafe { memmap2::MmapOptions::new().offset(offset).len(len).map_mut(&file) }.map_err(map_err)?;
        Ok(ReservedRegion { map, range, device })
    }
}

impl Region for ReservedRegion {
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
        format!(
            "reserved memory {} via {}",
            self.range.memmap_param(),
            self.device.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memmap_values_parse_like_the_kernel() {
        assert_eq!(
            parse_memmap("64M$0x100000000").unwrap(),
            Range {
                addr: 0x1_0000_0000,
                size: 64 << 20,
                kind: RangeKind::Reserved
            }
        );
        assert_eq!(
            parse_memmap("1G!4G").unwrap(),
            Range {
                addr: 4 << 30,
                size: 1 << 30,
                kind: RangeKind::Pmem
            }
        );
        assert!(parse_memmap("64M@0x1000").is_err());
        assert!(parse_memmap("0$0x1000").is_err());
        assert!(parse_memmap("xM$0x1000").is_err());
    }

    #[test]
    fn ranges_are_found_among_other_parameters() {
        let r = ranges_in_cmdline("console=ttyS0 memmap=64M$0x30000000 quiet memmap=exactmap").unwrap();
        assert_eq!(
            r,
            [Range {
                addr: 0x3000_0000,
                size: 64 << 20,
                kind: RangeKind::Reserved
            }]
        );
        assert_eq!(r[0].memmap_param(), "memmap=64M$0x30000000");
        assert!(ranges_in_cmdline("console=ttyS0").unwrap().is_empty());
    }

    #[test]
    fn a_range_in_system_ram_is_refused() {
        let iomem = "00000000-00000fff : Reserved\n00100000-2fffffff : System RAM\n  01000000-01ffffff : Kernel code\n30000000-33ffffff : Reserved\n";
        let ok = Range {
            addr: 0x3000_0000,
            size: 64 << 20,
            kind: RangeKind::Reserved,
        };
        assert!(check_not_system_ram(&ok, iomem).is_ok());
        let bad = Range {
            addr: 0x2ff0_0000,
            size: 64 << 20,
            kind: RangeKind::Reserved,
        };
        let e = check_not_system_ram(&bad, iomem).unwrap_err();
        assert!(e.to_string().contains("overlaps System RAM"), "{e}");
        let hidden = "00000000-00000000 : System RAM\n";
        assert!(check_not_system_ram(&bad, hidden).is_ok());
    }
}
