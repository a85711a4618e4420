//! Copying file contents, with progress on stderr when stderr is a terminal.
//!
//! Scripts (stderr redirected or piped) see nothing; a person sees one line
//! that updates in place, only when the copy takes long enough to notice.

use crate::output;
use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::time::{Duration, Instant};

/// Bytes copied between two progress updates at most.
const CHUNK: u64 = 16 << 20;
/// A copy shorter than this shows no progress at all.
const QUIET_FOR: Duration = Duration::from_millis(300);
/// Time between two redraws.
const REDRAW: Duration = Duration::from_millis(100);

/// A progress line on stderr.
#[derive(Debug)]
pub struct Progress {
    label: String,
    total: Option<u64>,
    done: u64,
    enabled: bool,
    started: Instant,
    drawn: Option<Instant>,
}

impl Progress {
    /// A progress line for `label`; shown only when stderr is a terminal.
    pub fn new(label: impl Into<String>, total: Option<u64>) -> Progress {
        Progress {
            label: label.into(),
            total,
            done: 0,
            enabled: std::io::stderr().is_terminal(),
            started: Instant::now(),
            drawn: None,
        }
    }

    /// Records `n` more bytes done and redraws when due.
    pub fn advance(&mut self, n: u64) {
        self.done += n;
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        let due = match self.drawn {
            None => now.duration_since(self.started) >= QUIET_FOR,
            Some(t) => now.duration_since(t) >= REDRAW,
        };
        if due {
            self.drawn = Some(now);
            let line = self.render(now.duration_since(self.started));
            let _ = write!(std::io::stderr().lock(), "\r{line}\x1b[K");
        }
    }

    fn render(&self, elapsed: Duration) -> String {
        let mut s = format!("{}: {}", self.label, output::bytes(self.done));
        if let Some(total) = self.total.filter(|t| *t > 0) {
            let pct = self.done.saturating_mul(100) / total;
            s.push_str(&format!(" of {} ({pct}%)", output::bytes(total)));
        }
        let secs = elapsed.as_secs_f64();
        if secs > 0.0 {
            s.push_str(&format!(", {}/s", output::bytes((self.done as f64 / secs) as u64)));
        }
        s
    }

    /// Erases the line, if one was drawn.
    pub fn finish(&mut self) {
        if self.drawn.take().is_some() {
            let _ = write!(std::io::stderr().lock(), "\r\x1b[K");
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Copies everything `src` holds from its current offset to `dst`, reporting
/// progress as `label`. Returns the bytes copied.
///
/// Uses the kernel's fast paths (`copy_file_range`, `sendfile`) where the
/// standard library can, one chunk at a time so progress moves.
pub fn copy(src: &File, dst: &File, total: Option<u64>, label: &str) -> std::io::Result<u64> {
    let mut progress = Progress::new(label, total);
    let mut copied = 0;
    loop {
        let mut reader = Read::take(src, CHUNK);
        let mut writer = dst;
        let n = std::io::copy(&mut reader, &mut writer)?;
        if n == 0 {
            break;
        }
        copied += n;
        progress.advance(n);
    }
    progress.finish();
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom};

    #[test]
    fn copy_moves_every_byte_across_chunks() {
        let mut src = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..(CHUNK as usize + 4096)).map(|i| (i % 251) as u8).collect();
        src.write_all(&data).unwrap();
        src.seek(SeekFrom::Start(0)).unwrap();
        let mut dst = tempfile::tempfile().unwrap();
        assert_eq!(
            copy(&src, &dst, Some(data.len() as u64), "test").unwrap(),
            data.len() as u64
        );
        dst.seek(SeekFrom::Start(0)).unwrap();
        let mut back = Vec::new();
        dst.read_to_end(&mut back).unwrap();
        assert!(back == data);
    }

    #[test]
    fn progress_renders_size_share_and_rate() {
        let mut p = Progress::new("preserving vm0/1", Some(4 << 20));
        p.enabled = false;
        p.advance(1 << 20);
        assert_eq!(
            p.render(Duration::from_secs(1)),
            "preserving vm0/1: 1.00 MiB of 4.00 MiB (25%), 1.00 MiB/s"
        );
    }
}
