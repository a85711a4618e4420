//! Copying data sources into the region.
//!
//! Sources that can read at an offset are copied in cache-sized chunks, each
//! checksummed right after it lands, while it is still in the CPU cache: the
//! data crosses memory once. Large data is cut into pieces that several
//! threads copy at once; the pieces' CRCs are combined per source. Sources
//! that cannot read at an offset are read whole, then checksummed.

use super::{DataSource, RecordError};
use std::sync::Mutex;

/// Bytes copied and checksummed at a time: fits the L2 cache.
const CHUNK: usize = 128 << 10;
/// Bytes handed to a thread at a time.
const PIECE: usize = 4 << 20;
/// Below this many bytes in all, everything is copied on the calling thread.
const PARALLEL_MIN: usize = 8 << 20;
/// Most threads used (the calling one included).
const MAX_THREADS: usize = 8;

/// Part of a source and where it goes.
struct Piece<'a> {
    source: usize,
    offset: u64,
    dst: &'a mut [u8],
}

/// What copying a piece gave: its place and its CRC.
struct Copied {
    source: usize,
    offset: u64,
    len: usize,
    crc: std::io::Result<u32>,
}

/// Fills `dsts[i]` from `sources[i]` and returns the CRC-32C of each.
/// `dsts[i].len()` is `sources[i].data_len()`. On failure, the error names
/// the first failing source in order.
pub(crate) fn copy_sources(sources: &[&dyn DataSource], dsts: Vec<&mut [u8]>) -> Result<Vec<u32>, RecordError> {
    let total: usize = dsts.iter().map(|dst| dst.len()).sum();
    let mut pieces = Vec::new();
    for (source, (src, dst)) in sources.iter().zip(dsts).enumerate() {
        if src.can_read_at() && !dst.is_empty() {
            let mut offset = 0u64;
            for part in dst.chunks_mut(PIECE) {
                let len = part.len() as u64;
                pieces.push(Piece {
                    source,
                    offset,
                    dst: part,
                });
                offset += len;
            }
        } else {
            pieces.push(Piece { source, offset: 0, dst });
        }
    }

    let threads = if total < PARALLEL_MIN {
        1
    } else {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_THREADS)
            .min(pieces.len())
    };
    let queue = Mutex::new(pieces.into_iter());
    let mut results = if threads <= 1 {
        drain(&queue, sources)
    } else {
        std::thread::scope(|scope| {
            let workers: Vec<_> = (1..threads).map(|_| scope.spawn(|| drain(&queue, sources))).collect();
            let mut results = drain(&queue, sources);
            for worker in workers {
                match worker.join() {
                    Ok(more) => results.extend(more),
                    // A data source panicked: carry on panicking, as if it
                    // had been called on this thread.
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            results
        })
    };

    results.sort_by_key(|copied| (copied.source, copied.offset));
    let mut crcs = vec![0u32; sources.len()];
    for copied in results {
        let crc = copied.crc.map_err(|source| RecordError::DataSource {
            index: copied.source,
            source,
        })?;
        let slot = &mut crcs[copied.source];
        *slot = if copied.offset == 0 {
            crc
        } else {
            crc32c::crc32c_combine(*slot, crc, copied.len)
        };
    }
    Ok(crcs)
}

/// Copies pieces from the queue until it is empty.
fn drain(queue: &Mutex<std::vec::IntoIter<Piece<'_>>>, sources: &[&dyn DataSource]) -> Vec<Copied> {
    let mut done = Vec::new();
    loop {
        // A poisoned lock means another worker panicked; the panic is
        // re-raised by the caller, so stop here.
        let next = match queue.lock() {
            Ok(mut queue) => queue.next(),
            Err(_) => None,
        };
        let Some(piece) = next else { return done };
        done.push(Copied {
            source: piece.source,
            offset: piece.offset,
            len: piece.dst.len(),
            crc: copy_piece(sources[piece.source], piece.offset, piece.dst),
        });
    }
}

fn copy_piece(source: &dyn DataSource, offset: u64, dst: &mut [u8]) -> std::io::Result<u32> {
    if !source.can_read_at() || dst.is_empty() {
        source.read_into(dst)?;
        return Ok(crc32c::crc32c(dst));
    }
    let mut crc = 0;
    let mut at = offset;
    for chunk in dst.chunks_mut(CHUNK) {
        source.read_at(at, chunk)?;
        crc = crc32c::crc32c_append(crc, chunk);
        at += chunk.len() as u64;
    }
    Ok(crc)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads whole only.
    struct Whole(Vec<u8>);
    impl DataSource for Whole {
        fn data_len(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_into(&self, dst: &mut [u8]) -> std::io::Result<()> {
            self.0.read_into(dst)
        }
    }

    /// Fails reading at `bad` offset.
    struct FailsAt(Vec<u8>, u64);
    impl DataSource for FailsAt {
        fn data_len(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_into(&self, _: &mut [u8]) -> std::io::Result<()> {
            unreachable!("read at offsets")
        }
        fn can_read_at(&self) -> bool {
            true
        }
        fn read_at(&self, offset: u64, dst: &mut [u8]) -> std::io::Result<()> {
            if (offset..offset + dst.len() as u64).contains(&self.1) {
                return Err(std::io::Error::other("bad sector"));
            }
            self.0.read_at(offset, dst)
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(13) ^ seed ^ (i >> 12) as u8)
            .collect()
    }

    #[test]
    fn large_sources_are_copied_in_pieces_with_the_crc_of_the_whole() {
        // Big enough for several threads and pieces, with uneven tails.
        let a = pattern(PIECE * 2 + 12345, 1);
        let b = Whole(pattern(PARALLEL_MIN + 7, 2));
        let c = pattern(0, 3);
        let d = pattern(CHUNK + 1, 4);
        let sources: [&dyn DataSource; 4] = [&a, &b, &c, &d];
        let mut bufs: Vec<Vec<u8>> = sources.iter().map(|s| vec![0; s.data_len() as usize]).collect();
        let crcs = copy_sources(&sources, bufs.iter_mut().map(|b| b.as_mut_slice()).collect()).unwrap();
        assert_eq!(bufs[0], a);
        assert_eq!(bufs[1], b.0);
        assert_eq!(bufs[3], d);
        let expected: Vec<u32> = bufs.iter().map(|b| crc32c::crc32c(b)).collect();
        assert_eq!(crcs, expected);
    }

    #[test]
    fn failing_piece_names_its_source() {
        let ok = pattern(PIECE, 1);
        let bad = FailsAt(pattern(PIECE * 3, 2), PIECE as u64 * 2 + 5);
        let sources: [&dyn DataSource; 2] = [&ok, &bad];
        let mut bufs: Vec<Vec<u8>> = sources.iter().map(|s| vec![0; s.data_len() as usize]).collect();
        let err = copy_sources(&sources, bufs.iter_mut().map(|b| b.as_mut_slice()).collect()).unwrap_err();
        assert!(matches!(err, RecordError::DataSource { index: 1, .. }), "{err:?}");
    }
}
