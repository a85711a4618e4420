//! The vCPU state blob handed over at pause and taken back at restore.
//!
//! Wire format (all integers little-endian):
//!
//! ```text
//! magic      8 bytes  "LUOVMST\0"
//! version    u32      STATE_VERSION (1)
//! length     u32      length of the payload
//! payload    postcard encoding of VmStateV1 (for version 1)
//! crc32c     u32      CRC-32C of everything before it
//! ```
//!
//! The format version is independent of the crate version. A reader refuses a
//! newer version with [`StateError::NewerVersion`] and never guesses.

use serde::{Deserialize, Serialize};

/// Magic at the start of every state blob.
pub const STATE_MAGIC: [u8; 8] = *b"LUOVMST\0";
/// Version written by this build.
pub const STATE_VERSION: u32 = 1;
const HEADER_LEN: usize = 16;

/// Errors decoding a state blob.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// Shorter than header + checksum, or the length field disagrees.
    #[error("VM state blob is truncated or has trailing bytes ({0} bytes)")]
    Truncated(usize),
    /// Not a state blob.
    #[error("VM state blob has a wrong magic (not written by luo-test-vmm)")]
    BadMagic,
    /// Damaged.
    #[error("VM state blob checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// CRC stored in the blob.
        stored: u32,
        /// CRC computed over the blob.
        computed: u32,
    },
    /// Written by a newer build.
    #[error("VM state blob version {0} is newer than this build understands ({STATE_VERSION})")]
    NewerVersion(u32),
    /// Version 0 or otherwise unknown.
    #[error("VM state blob version {0} is unknown")]
    UnknownVersion(u32),
    /// Payload does not decode.
    #[error("VM state blob payload does not decode: {0}")]
    Payload(String),
}

/// A KVM segment register (`struct kvm_segment`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[allow(missing_docs)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: u8,
    pub dpl: u8,
    pub db: u8,
    pub s: u8,
    pub l: u8,
    pub g: u8,
    pub avl: u8,
    pub unusable: u8,
}

/// A descriptor table register (`struct kvm_dtable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[allow(missing_docs)]
pub struct DTable {
    pub base: u64,
    pub limit: u16,
}

/// General-purpose registers (`struct kvm_regs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[allow(missing_docs)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// Special registers (`struct kvm_sregs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[allow(missing_docs)]
pub struct Sregs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DTable,
    pub idt: DTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
    pub interrupt_bitmap: [u64; 4],
}

/// A moment of guest progress: a progress exit seen by the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Stamp {
    /// `CLOCK_REALTIME` in nanoseconds when the VMM saw the exit.
    pub realtime_ns: u64,
    /// The host TSC then (keeps counting across a kexec in the same machine,
    /// unlike `CLOCK_REALTIME` which the new kernel re-reads from the RTC).
    pub tsc: u64,
    /// The guest counter at that exit.
    pub counter: u64,
}

/// Everything a fresh process needs to continue the guest, version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStateV1 {
    /// Size of guest RAM in bytes; the RAM handed over must be this large.
    pub ram_size: u64,
    /// Guest layout version ([`crate::guest::LAYOUT_VERSION`]).
    pub layout_version: u32,
    /// General-purpose registers at pause.
    pub regs: Regs,
    /// Special registers at pause.
    pub sregs: Sregs,
    /// Guest counter at pause.
    pub counter: u64,
    /// SHA-256 of all of RAM at pause, if it was computed.
    pub ram_sha256: Option<[u8; 32]>,
    /// SHA-256 of the RAM the guest never writes, computed at boot.
    pub static_sha256: [u8; 32],
    /// Last progress exit before the pause (None if the guest never reached one).
    pub last_progress: Option<Stamp>,
    /// `CLOCK_REALTIME` in nanoseconds when the vCPU was out of `KVM_RUN` for good.
    pub paused_realtime_ns: u64,
    /// `CLOCK_REALTIME` in nanoseconds when the state was serialized.
    pub saved_realtime_ns: u64,
    /// How many times this guest was restored before (0 for the first save).
    pub generation: u32,
    /// Progress exits since boot, all processes together.
    pub progress_exits: u64,
}

/// Encodes `state` as a version-1 blob.
pub fn encode(state: &VmStateV1) -> Vec<u8> {
    let payload = postcard::to_stdvec(state).expect("serializing plain data to a Vec cannot fail");
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + 4);
    out.extend_from_slice(&STATE_MAGIC);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes a blob written by [`encode`] (any version this build understands).
pub fn decode(blob: &[u8]) -> Result<VmStateV1, StateError> {
    if blob.len() < HEADER_LEN + 4 {
        return Err(StateError::Truncated(blob.len()));
    }
    if blob[..8] != STATE_MAGIC {
        return Err(StateError::BadMagic);
    }
    let u32_at = |a: usize| u32::from_le_bytes(blob[a..a + 4].try_into().expect("4 bytes"));
    let len = u32_at(12) as usize;
    if blob.len() != HEADER_LEN + len + 4 {
        return Err(StateError::Truncated(blob.len()));
    }
    let stored = u32_at(HEADER_LEN + len);
    let computed = crc32c::crc32c(&blob[..HEADER_LEN + len]);
    if stored != computed {
        return Err(StateError::Checksum { stored, computed });
    }
    match u32_at(8) {
        1 => {
            let payload = &blob[HEADER_LEN..HEADER_LEN + len];
            let (state, rest) =
                postcard::take_from_bytes::<VmStateV1>(payload).map_err(|e| StateError::Payload(e.to_string()))?;
            if !rest.is_empty() {
                return Err(StateError::Payload(format!("{} trailing bytes", rest.len())));
            }
            Ok(state)
        }
        v if v > STATE_VERSION => Err(StateError::NewerVersion(v)),
        v => Err(StateError::UnknownVersion(v)),
    }
}

impl From<&kvm_bindings::kvm_segment> for Segment {
    fn from(s: &kvm_bindings::kvm_segment) -> Self {
        Segment {
            base: s.base,
            limit: s.limit,
            selector: s.selector,
            type_: s.type_,
            present: s.present,
            dpl: s.dpl,
            db: s.db,
            s: s.s,
            l: s.l,
            g: s.g,
            avl: s.avl,
            unusable: s.unusable,
        }
    }
}

impl From<&Segment> for kvm_bindings::kvm_segment {
    fn from(s: &Segment) -> Self {
        kvm_bindings::kvm_segment {
            base: s.base,
            limit: s.limit,
            selector: s.selector,
            type_: s.type_,
            present: s.present,
            dpl: s.dpl,
            db: s.db,
            s: s.s,
            l: s.l,
            g: s.g,
            avl: s.avl,
            unusable: s.unusable,
            padding: 0,
        }
    }
}

impl From<&kvm_bindings::kvm_dtable> for DTable {
    fn from(d: &kvm_bindings::kvm_dtable) -> Self {
        DTable {
            base: d.base,
            limit: d.limit,
        }
    }
}

impl From<&DTable> for kvm_bindings::kvm_dtable {
    fn from(d: &DTable) -> Self {
        kvm_bindings::kvm_dtable {
            base: d.base,
            limit: d.limit,
            padding: [0; 3],
        }
    }
}

impl From<&kvm_bindings::kvm_regs> for Regs {
    fn from(r: &kvm_bindings::kvm_regs) -> Self {
        Regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        }
    }
}

impl From<&Regs> for kvm_bindings::kvm_regs {
    fn from(r: &Regs) -> Self {
        kvm_bindings::kvm_regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        }
    }
}

impl From<&kvm_bindings::kvm_sregs> for Sregs {
    fn from(s: &kvm_bindings::kvm_sregs) -> Self {
        Sregs {
            cs: (&s.cs).into(),
            ds: (&s.ds).into(),
            es: (&s.es).into(),
            fs: (&s.fs).into(),
            gs: (&s.gs).into(),
            ss: (&s.ss).into(),
            tr: (&s.tr).into(),
            ldt: (&s.ldt).into(),
            gdt: (&s.gdt).into(),
            idt: (&s.idt).into(),
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
            interrupt_bitmap: s.interrupt_bitmap,
        }
    }
}

impl From<&Sregs> for kvm_bindings::kvm_sregs {
    fn from(s: &Sregs) -> Self {
        kvm_bindings::kvm_sregs {
            cs: (&s.cs).into(),
            ds: (&s.ds).into(),
            es: (&s.es).into(),
            fs: (&s.fs).into(),
            gs: (&s.gs).into(),
            ss: (&s.ss).into(),
            tr: (&s.tr).into(),
            ldt: (&s.ldt).into(),
            gdt: (&s.gdt).into(),
            idt: (&s.idt).into(),
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
            interrupt_bitmap: s.interrupt_bitmap,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmStateV1 {
        let seg = Segment {
            base: 0,
            limit: 0xffff,
            selector: 0,
            type_: 3,
            present: 1,
            s: 1,
            ..Default::default()
        };
        VmStateV1 {
            ram_size: 2 << 20,
            layout_version: 1,
            regs: Regs {
                rax: 0x1234,
                rip: 0x1036,
                rflags: 0x2,
                rsp: 0xf00,
                rdx: 0x400,
                ..Default::default()
            },
            sregs: Sregs {
                cs: Segment { type_: 0xb, ..seg },
                ds: seg,
                es: seg,
                fs: seg,
                gs: seg,
                ss: seg,
                tr: Segment { type_: 0xb, ..seg },
                ldt: Segment { type_: 2, ..seg },
                gdt: DTable { base: 0, limit: 0xffff },
                idt: DTable { base: 0, limit: 0xffff },
                cr0: 0x6000_0010,
                apic_base: 0xfee0_0900,
                ..Default::default()
            },
            counter: 0x1_0000_0005,
            ram_sha256: Some([7; 32]),
            static_sha256: [9; 32],
            last_progress: Some(Stamp {
                realtime_ns: 1_700_000_000_000_000_000,
                tsc: 0x0123_4567_89ab_cdef,
                counter: 0x1_0000_0000,
            }),
            paused_realtime_ns: 1_700_000_000_100_000_000,
            saved_realtime_ns: 1_700_000_000_200_000_000,
            generation: 2,
            progress_exits: 99,
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        let blob = encode(&s);
        assert_eq!(&blob[..8], b"LUOVMST\0");
        assert_eq!(u32::from_le_bytes(blob[8..12].try_into().unwrap()), 1);
        assert_eq!(decode(&blob), Ok(s));
    }

    #[test]
    fn kvm_structs_round_trip() {
        let s = sample();
        let k: kvm_bindings::kvm_sregs = (&s.sregs).into();
        assert_eq!(Sregs::from(&k), s.sregs);
        let r: kvm_bindings::kvm_regs = (&s.regs).into();
        assert_eq!(Regs::from(&r), s.regs);
    }

    #[test]
    fn damaged_blobs_are_refused() {
        let blob = encode(&sample());
        assert_eq!(decode(&blob[..10]), Err(StateError::Truncated(10)));
        assert_eq!(
            decode(&blob[..blob.len() - 1]),
            Err(StateError::Truncated(blob.len() - 1))
        );
        let mut longer = blob.clone();
        longer.push(0);
        assert!(matches!(decode(&longer), Err(StateError::Truncated(_))));
        let mut bad = blob.clone();
        bad[0] = b'X';
        assert_eq!(decode(&bad), Err(StateError::BadMagic));
        let mut flipped = blob.clone();
        flipped[20] ^= 0x40;
        assert!(matches!(decode(&flipped), Err(StateError::Checksum { .. })));
    }

    fn with_version(blob: &[u8], v: u32) -> Vec<u8> {
        let mut b = blob[..blob.len() - 4].to_vec();
        b[8..12].copy_from_slice(&v.to_le_bytes());
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn versions_are_checked() {
        let blob = encode(&sample());
        assert_eq!(decode(&with_version(&blob, 2)), Err(StateError::NewerVersion(2)));
        assert_eq!(decode(&with_version(&blob, 0)), Err(StateError::UnknownVersion(0)));
    }

    #[test]
    fn garbage_payload_with_valid_crc_is_refused() {
        let mut b = STATE_MAGIC.to_vec();
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&[0xff, 0xff, 0xff]);
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        assert!(matches!(decode(&b), Err(StateError::Payload(_))));
    }

    /// The v1 encoding is pinned: a change to VmStateV1 that alters the bytes
    /// needs a new version (and a reader for v1).
    #[test]
    fn v1_encoding_is_stable() {
        let blob = encode(&sample());
        let hex: String = blob.iter().map(|b| format!("{b:02x}")).collect();
        let fixture_hex = include_str!("../fixtures/state-v1-sample.hex").trim();
        assert_eq!(hex, fixture_hex);
        // And the stored fixture decodes to the sample.
        let fixture: Vec<u8> = (0..fixture_hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&fixture_hex[i..i + 2], 16).unwrap())
            .collect();
        assert_eq!(decode(&fixture), Ok(sample()));
    }
}
