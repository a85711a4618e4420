//! The guest: its RAM layout and its code (16-bit real mode, hand-assembled).
//!
//! Guest-physical memory is one slot at address 0, backed by the memfd:
//!
//! | guest address        | what                                   | written by                  |
//! |----------------------|----------------------------------------|-----------------------------|
//! | `0x0000..0x0008`     | magic `LUOVMMG1`                        | VMM at boot                 |
//! | `0x0008..0x000c`     | layout version (u32 LE, [`LAYOUT_VERSION`]) | VMM at boot             |
//! | `0x000c..0x0010`     | progress mask (u32 LE)                 | VMM at boot, read by guest  |
//! | `0x0100..0x0108`     | counter (u64 LE)                       | guest, every iteration      |
//! | `0x1000..`           | code ([`code`])                        | VMM at boot                 |
//! | `0x2000..0x6000`     | ring: 4096 u32 slots                   | guest, every iteration      |
//! | `0x6000..ram_size`   | filler pattern ([`filler_word`])       | VMM at boot, never touched  |
//!
//! Each iteration the guest adds 1 to the counter, then writes the counter's
//! low 32 bits into ring slot `counter % 4096`. When `counter & mask == 0` it
//! executes `out dx, eax` on [`PROGRESS_PORT`] with the counter's low 32 bits:
//! a `KVM_EXIT_IO` that the VMM timestamps (guest progress) and at which it can
//! stop the vCPU.

/// Guest address of the header magic.
pub const MAGIC_ADDR: u64 = 0x0000;
/// Header magic.
pub const MAGIC: [u8; 8] = *b"LUOVMMG1";
/// Guest address of the layout version.
pub const LAYOUT_VERSION_ADDR: u64 = 0x0008;
/// Version of this layout and code. Bump when either changes.
pub const LAYOUT_VERSION: u32 = 1;
/// Guest address of the progress mask (u32).
pub const MASK_ADDR: u64 = 0x000c;
/// Guest address of the counter (u64).
pub const COUNTER_ADDR: u64 = 0x0100;
/// Guest address where the code is loaded; the vCPU starts here.
pub const CODE_ADDR: u64 = 0x1000;
/// Guest address of the ring of slots.
pub const RING_ADDR: u64 = 0x2000;
/// Number of u32 slots in the ring (a power of two).
pub const RING_SLOTS: u64 = 4096;
/// End of the ring; the filler starts here.
pub const FILLER_ADDR: u64 = RING_ADDR + RING_SLOTS * 4;
/// I/O port of the progress `out`.
pub const PROGRESS_PORT: u16 = 0x0400;
/// Smallest RAM the layout fits in (one page of filler).
pub const MIN_RAM_SIZE: usize = FILLER_ADDR as usize + 0x1000;
/// Initial stack pointer (the code pushes nothing; set for hygiene).
pub const INITIAL_SP: u16 = 0x0f00;

/// The guest-written ranges `[start, end)`: everything else in RAM stays as
/// the VMM wrote it at boot.
pub const GUEST_WRITTEN: [(u64, u64); 2] = [(COUNTER_ADDR, COUNTER_ADDR + 8), (RING_ADDR, FILLER_ADDR)];

/// Offset of the loop label inside [`code`].
pub const LOOP_OFFSET: usize = 0x0f;

/// The guest code, to be loaded at [`CODE_ADDR`] and run in real mode with
/// CS base 0. Disassembly (origin 0x1000):
///
/// ```text
/// 00  fa                 cli
/// 01  31 c0              xor ax, ax
/// 03  8e d8              mov ds, ax
/// 05  8e c0              mov es, ax
/// 07  8e d0              mov ss, ax
/// 09  bc 00 0f           mov sp, 0x0f00
/// 0c  ba 00 04           mov dx, 0x0400          ; PROGRESS_PORT
/// 0f  66 83 06 00 01 01  loop: add dword [0x0100], 1
/// 15  66 83 16 04 01 00  adc dword [0x0104], 0   ; 64-bit counter
/// 1b  66 a1 00 01        mov eax, [0x0100]
/// 1f  89 c3              mov bx, ax
/// 21  81 e3 ff 0f        and bx, 0x0fff          ; RING_SLOTS - 1
/// 25  c1 e3 02           shl bx, 2
/// 28  66 89 87 00 20     mov [bx+0x2000], eax    ; ring[counter % 4096] = counter
/// 2d  66 85 06 0c 00     test [0x000c], eax      ; counter & mask
/// 32  75 db              jnz loop
/// 34  66 ef              out dx, eax             ; progress: KVM_EXIT_IO
/// 36  eb d7              jmp loop
/// ```
pub fn code() -> Vec<u8> {
    let [port_lo, port_hi] = PROGRESS_PORT.to_le_bytes();
    let [sp_lo, sp_hi] = INITIAL_SP.to_le_bytes();
    let [c_lo, c_hi] = (COUNTER_ADDR as u16).to_le_bytes();
    let [ch_lo, ch_hi] = (COUNTER_ADDR as u16 + 4).to_le_bytes();
    let [r_lo, r_hi] = (RING_ADDR as u16).to_le_bytes();
    let [m_lo, m_hi] = (MASK_ADDR as u16).to_le_bytes();
    let [s_lo, s_hi] = (RING_SLOTS as u16 - 1).to_le_bytes();
    let mut c = vec![
        0xfa, // cli
        0x31, 0xc0, // xor ax, ax
        0x8e, 0xd8, // mov ds, ax
        0x8e, 0xc0, // mov es, ax
        0x8e, 0xd0, // mov ss, ax
        0xbc, sp_lo, sp_hi, // mov sp, imm16
        0xba, port_lo, port_hi, // mov dx, imm16
    ];
    debug_assert_eq!(c.len(), LOOP_OFFSET);
    c.extend_from_slice(&[
        0x66, 0x83, 0x06, c_lo, c_hi, 0x01, // add dword [counter], 1
        0x66, 0x83, 0x16, ch_lo, ch_hi, 0x00, // adc dword [counter+4], 0
        0x66, 0xa1, c_lo, c_hi, // mov eax, [counter]
        0x89, 0xc3, // mov bx, ax
        0x81, 0xe3, s_lo, s_hi, // and bx, RING_SLOTS-1
        0xc1, 0xe3, 0x02, // shl bx, 2
        0x66, 0x89, 0x87, r_lo, r_hi, // mov [bx+ring], eax
        0x66, 0x85, 0x06, m_lo, m_hi, // test [mask], eax
    ]);
    push_jump(&mut c, 0x75); // jnz loop
    c.extend_from_slice(&[0x66, 0xef]); // out dx, eax
    push_jump(&mut c, 0xeb); // jmp loop
    c
}

/// Appends a 2-byte short jump (`opcode rel8`) back to [`LOOP_OFFSET`].
fn push_jump(code: &mut Vec<u8>, opcode: u8) {
    let next_ip = code.len() + 2;
    let rel = i8::try_from(LOOP_OFFSET as isize - next_ip as isize).expect("loop within a short jump");
    code.push(opcode);
    code.push(rel as u8);
}

/// The progress mask for one progress exit every `every` iterations.
/// `every` must be a power of two (1 means every iteration).
pub fn progress_mask(every: u64) -> Option<u32> {
    if every == 0 || !every.is_power_of_two() || every > 1 << 32 {
        return None;
    }
    Some((every - 1) as u32)
}

/// The filler's 64-bit word at byte offset `offset` (a multiple of 8) of RAM:
/// splitmix64 of the offset, so any corruption or shift shows in a checksum.
pub fn filler_word(offset: u64) -> u64 {
    let mut z = offset.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Writes the whole initial image (header, zeroed counter and ring, code,
/// filler) into `ram`, which is guest-physical memory from address 0.
pub fn write_image(ram: &mut [u8], mask: u32) {
    assert!(ram.len() >= MIN_RAM_SIZE, "RAM smaller than the layout");
    ram[..FILLER_ADDR as usize].fill(0);
    let at = |a: u64| a as usize;
    ram[at(MAGIC_ADDR)..at(MAGIC_ADDR) + 8].copy_from_slice(&MAGIC);
    ram[at(LAYOUT_VERSION_ADDR)..at(LAYOUT_VERSION_ADDR) + 4].copy_from_slice(&LAYOUT_VERSION.to_le_bytes());
    ram[at(MASK_ADDR)..at(MASK_ADDR) + 4].copy_from_slice(&mask.to_le_bytes());
    let code = code();
    ram[at(CODE_ADDR)..at(CODE_ADDR) + code.len()].copy_from_slice(&code);
    let filler = &mut ram[at(FILLER_ADDR)..];
    let mut chunks = filler.chunks_exact_mut(8);
    let mut off = FILLER_ADDR;
    for chunk in &mut chunks {
        chunk.copy_from_slice(&filler_word(off).to_le_bytes());
        off += 8;
    }
    let rest = chunks.into_remainder();
    let len = rest.len();
    rest.copy_from_slice(&filler_word(off).to_le_bytes()[..len]);
}

/// The header as found in RAM: `(magic ok, layout version, mask)`.
pub fn read_header(ram: &[u8]) -> (bool, u32, u32) {
    let u32_at = |a: u64| u32::from_le_bytes(ram[a as usize..a as usize + 4].try_into().expect("4 bytes"));
    (
        ram[MAGIC_ADDR as usize..MAGIC_ADDR as usize + 8] == MAGIC,
        u32_at(LAYOUT_VERSION_ADDR),
        u32_at(MASK_ADDR),
    )
}

/// The counter as found in RAM.
pub fn read_counter(ram: &[u8]) -> u64 {
    let a = COUNTER_ADDR as usize;
    u64::from_le_bytes(ram[a..a + 8].try_into().expect("8 bytes"))
}

/// Checks the ring against the counter: the slots of the last
/// `min(counter - 1, RING_SLOTS - 1)` completed iterations hold their counter
/// value (the current iteration's slot may not be written yet when the vCPU
/// was interrupted mid-iteration). Returns the first bad `(value, slot content)`.
pub fn check_ring(ram: &[u8], counter: u64) -> Result<(), (u64, u32)> {
    let first = counter.saturating_sub(RING_SLOTS - 1).max(1);
    for v in first..counter {
        let a = (RING_ADDR + (v % RING_SLOTS) * 4) as usize;
        let got = u32::from_le_bytes(ram[a..a + 4].try_into().expect("4 bytes"));
        if got != v as u32 {
            return Err((v, got));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_bytes_match_the_listing() {
        let expected: &[u8] = &[
            0xfa, 0x31, 0xc0, 0x8e, 0xd8, 0x8e, 0xc0, 0x8e, 0xd0, 0xbc, 0x00, 0x0f, 0xba, 0x00, 0x04, // prologue
            0x66, 0x83, 0x06, 0x00, 0x01, 0x01, // add
            0x66, 0x83, 0x16, 0x04, 0x01, 0x00, // adc
            0x66, 0xa1, 0x00, 0x01, // mov eax
            0x89, 0xc3, 0x81, 0xe3, 0xff, 0x0f, 0xc1, 0xe3, 0x02, // slot index
            0x66, 0x89, 0x87, 0x00, 0x20, // ring store
            0x66, 0x85, 0x06, 0x0c, 0x00, // test mask
            0x75, 0xdb, 0x66, 0xef, 0xeb, 0xd7, // jnz, out, jmp
        ];
        assert_eq!(code(), expected);
    }

    #[test]
    fn jumps_land_on_the_loop() {
        let c = code();
        for (at, op) in [(0x32usize, 0x75u8), (0x36, 0xeb)] {
            assert_eq!(c[at], op);
            let target = (at as isize + 2) + (c[at + 1] as i8) as isize;
            assert_eq!(target as usize, LOOP_OFFSET);
        }
    }

    /// Cross-checks the hand assembly with objdump when it is installed.
    #[test]
    fn objdump_agrees_when_available() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("guest.bin");
        std::fs::write(&bin, code()).unwrap();
        let out = std::process::Command::new("objdump")
            .args([
                "-D",
                "-b",
                "binary",
                "-m",
                "i8086",
                "-M",
                "intel",
                "--adjust-vma=0x1000",
            ])
            .arg(&bin)
            .output();
        let Ok(out) = out else { return };
        if !out.status.success() {
            return;
        }
        let text = String::from_utf8_lossy(&out.stdout).replace(char::is_whitespace, "");
        for needle in [
            "adddwordptrds:0x100,0x1",
            "adcdwordptrds:0x104,0x0",
            "moveax,ds:0x100",
            "movDWORDPTR[bx+0x2000],eax",
            "testDWORDPTRds:0xc,eax",
            "jne0x100f",
            "movdx,0x400",
            "outdx,eax",
            "jmp0x100f",
        ] {
            assert!(
                text.to_lowercase().contains(&needle.to_lowercase()),
                "objdump output lacks {needle}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }

    #[test]
    fn mask_from_power_of_two() {
        assert_eq!(progress_mask(1), Some(0));
        assert_eq!(progress_mask(1 << 16), Some(0xffff));
        assert_eq!(progress_mask(1 << 32), Some(u32::MAX));
        assert_eq!(progress_mask(0), None);
        assert_eq!(progress_mask(3), None);
        assert_eq!(progress_mask(1 << 33), None);
    }

    #[test]
    fn image_layout() {
        let mut ram = vec![0xaau8; MIN_RAM_SIZE + 5];
        write_image(&mut ram, 0xff);
        assert_eq!(read_header(&ram), (true, LAYOUT_VERSION, 0xff));
        assert_eq!(read_counter(&ram), 0);
        assert_eq!(
            &ram[CODE_ADDR as usize..CODE_ADDR as usize + code().len()],
            code().as_slice()
        );
        let f = FILLER_ADDR as usize;
        assert_eq!(ram[f..f + 8], filler_word(FILLER_ADDR).to_le_bytes());
        let last = ram.len() - 5;
        assert_eq!(ram[last..], filler_word(last as u64).to_le_bytes()[..5]);
        assert!(check_ring(&ram, 0).is_ok());
        assert!(check_ring(&ram, 1).is_ok());
        assert_eq!(check_ring(&ram, 2), Err((1, 0)));
    }

    #[test]
    fn ring_check_follows_the_guest() {
        let mut ram = vec![0u8; MIN_RAM_SIZE];
        write_image(&mut ram, 0);
        // Simulate 10_000 iterations of the guest loop.
        for v in 1..=10_000u64 {
            let a = (RING_ADDR + (v % RING_SLOTS) * 4) as usize;
            ram[a..a + 4].copy_from_slice(&(v as u32).to_le_bytes());
        }
        assert!(check_ring(&ram, 10_000).is_ok());
        // Interrupted after the increment, before the store: still fine.
        assert!(check_ring(&ram, 10_001).is_ok());
        // A counter that went backwards or jumped shows.
        assert!(check_ring(&ram, 10_002).is_err());
        let a = (RING_ADDR + (9_990 % RING_SLOTS) * 4) as usize;
        ram[a] ^= 1;
        assert!(matches!(check_ring(&ram, 10_000), Err((9_990, _))));
    }
}
