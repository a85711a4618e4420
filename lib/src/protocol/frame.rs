//! Length-prefixed frames over a Unix stream socket, with file descriptors
//! passed as `SCM_RIGHTS` ancillary data.
//!
//! A frame is a little-endian `u32` payload length followed by the payload, a
//! postcard encoding of a [`Request`](super::Request) or
//! [`Response`](super::Response). The length is checked against
//! [`MAX_FRAME_LEN`] before anything is allocated. File descriptors ride on
//! the frame's first byte; at most [`MAX_FDS_PER_FRAME`] are accepted and any
//! extra are closed.

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// The kernel's limit on descriptors in one `SCM_RIGHTS` message.
const SCM_MAX_FD: usize = 253;

/// Largest payload accepted, in bytes.
pub const MAX_FRAME_LEN: u32 = 1 << 20;

/// Most file descriptors accepted with one frame.
pub const MAX_FDS_PER_FRAME: usize = 4;

/// Why a frame could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection between frames.
    #[error("connection closed by peer")]
    Closed,
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed in the middle of a frame ({got} of {want} bytes received)")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes the frame announced (including the 4-byte length).
        want: usize,
    },
    /// The announced payload is larger than [`MAX_FRAME_LEN`].
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME_LEN} bytes")]
    TooLarge {
        /// Announced length.
        len: u32,
    },
    /// More file descriptors than [`MAX_FDS_PER_FRAME`] arrived.
    #[error("frame carried {count} file descriptors; at most {MAX_FDS_PER_FRAME} are accepted")]
    TooManyFds {
        /// How many arrived.
        count: usize,
    },
    /// The kernel truncated the ancillary data (descriptors were lost).
    #[error("file descriptors were truncated in transit (ancillary buffer too small)")]
    FdsTruncated,
    /// The payload is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(#[source] postcard::Error),
    /// The payload holds a complete message followed by more bytes.
    #[error("malformed frame: {extra} bytes follow the message")]
    TrailingBytes {
        /// Bytes after the message.
        extra: usize,
    },
    /// The frame was not complete by its deadline.
    #[error("frame not complete within {secs} s ({got} of {want} bytes received)")]
    Deadline {
        /// The time a whole frame may take, in seconds.
        secs: u64,
        /// Bytes received.
        got: usize,
        /// Bytes the frame announced (4 until the length itself arrived).
        want: usize,
    },
    /// The message could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(#[source] postcard::Error),
    /// The socket failed (including a receive timeout).
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
}

/// Sends `msg` with `fds` attached.
pub fn send<T: Serialize>(sock: &UnixStream, msg: &T, fds: &[BorrowedFd<'_>]) -> Result<(), FrameError> {
    let mut buf = vec![0u8; 4];
    let buf = {
        let mut payload = postcard::to_extend(msg, std::mem::take(&mut buf)).map_err(FrameError::Encode)?;
        let len = payload.len() - 4;
        let len32 = u32::try_from(len).ok().filter(|l| *l <= MAX_FRAME_LEN);
        let Some(len32) = len32 else {
            return Err(FrameError::TooLarge {
                len: u32::try_from(len).unwrap_or(u32::MAX),
            });
        };
        payload[..4].copy_from_slice(&len32.to_le_bytes());
        payload
    };
    send_raw(sock, &buf, fds)
}

/// Sends raw bytes with `fds` on the first byte. Tests use it to send
/// malformed frames; [`send`] uses it for well-formed ones.
pub fn send_raw(sock: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), FrameError> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut sent = 0;
    while sent < bytes.len() {
        let iov = [IoSlice::new(&bytes[sent..])];
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if sent == 0 && !raw.is_empty() { &cmsg } else { &[] };
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => sent += n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(FrameError::Io(e.into())),
        }
    }
    Ok(())
}

/// Receives one message and the file descriptors that came with it.
pub fn recv<T: DeserializeOwned>(sock: &UnixStream) -> Result<(T, Vec<OwnedFd>), FrameError> {
    recv_inner(sock, None)
}

/// Like [`recv`], but the whole frame must arrive within `limit` from the
/// call: a peer that trickles bytes is cut off at the deadline
/// ([`FrameError::Deadline`]), whatever the pace of its single reads.
pub fn recv_within<T: DeserializeOwned>(sock: &UnixStream, limit: Duration) -> Result<(T, Vec<OwnedFd>), FrameError> {
    recv_inner(sock, Some((Instant::now(), limit)))
}

/// Encodes `msg` as a frame's payload and returns its length in bytes,
/// without sending it (to check it fits in [`MAX_FRAME_LEN`]).
pub fn encoded_len<T: Serialize>(msg: &T) -> Result<usize, FrameError> {
    postcard::serialize_with_flavor(msg, postcard::ser_flavors::Size::default()).map_err(FrameError::Encode)
}

fn recv_inner<T: DeserializeOwned>(
    sock: &UnixStream,
    deadline: Option<(Instant, Duration)>,
) -> Result<(T, Vec<OwnedFd>), FrameError> {
    let mut fds = Vec::new();
    let mut header = [0u8; 4];
    fill(sock, &mut header, 0, 4, &mut fds, deadline)?;
    let len = u32::from_le_bytes(header);
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len });
    }
    // Bounded by MAX_FRAME_LEN above, so the allocation is at most 1 MiB.
    let mut payload = vec![0u8; len as usize];
    fill(sock, &mut payload, 4, 4 + len as usize, &mut fds, deadline)?;
    if fds.len() > MAX_FDS_PER_FRAME {
        return Err(FrameError::TooManyFds { count: fds.len() });
    }
    let (msg, rest) = postcard::take_from_bytes(&payload).map_err(FrameError::Malformed)?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes { extra: rest.len() });
    }
    Ok((msg, fds))
}

/// Fills `buf` from the socket, collecting descriptors. `before` and `total`
/// place `buf` within the frame, for the truncation message.
fn fill(
    sock: &UnixStream,
    buf: &mut [u8],
    before: usize,
    total: usize,
    fds: &mut Vec<OwnedFd>,
    deadline: Option<(Instant, Duration)>,
) -> Result<(), FrameError> {
    let mut got = 0;
    while got < buf.len() {
        if let Some((start, limit)) = deadline {
            let late = FrameError::Deadline {
                secs: limit.as_secs(),
                got: before + got,
                want: total,
            };
            let left = limit.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(late);
            }
            sock.set_read_timeout(Some(left))?;
            // The read below may time out: that is the deadline too.
            match wait_readable(sock, left) {
                Ok(true) => {}
                Ok(false) => return Err(late),
                Err(e) => return Err(FrameError::Io(e)),
            }
        }
        let bytes = match recv_chunk(sock, &mut buf[got..], fds, MsgFlags::empty())? {
            Some(n) => n,
            None => continue,
        };
        if bytes == 0 {
            if before == 0 && got == 0 {
                return Err(FrameError::Closed);
            }
            return Err(FrameError::Truncated {
                got: before + got,
                want: total,
            });
        }
        got += bytes;
    }
    Ok(())
}

/// One `recvmsg` into `buf`, its descriptors appended to `fds`: the bytes
/// received (0 at the end of the stream), or `None` when interrupted.
fn recv_chunk(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    flags: MsgFlags,
) -> Result<Option<usize>, FrameError> {
    // Room for the kernel's most (SCM_MAX_FD): never truncated, so every
    // descriptor that arrives gets an owner, and extra ones are closed.
    let mut cmsg_space = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = match recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg_space),
        MsgFlags::MSG_CMSG_CLOEXEC | flags,
    ) {
        Ok(m) => m,
        Err(nix::errno::Errno::EINTR) => return Ok(None),
        Err(e) => return Err(FrameError::Io(e.into())),
    };
    let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    for c in msg.cmsgs().map_err(|e| FrameError::Io(e.into()))? {
        if let ControlMessageOwned::ScmRights(received) = c {
            for raw in received {
                // SAFETY: the kernel just installed `raw` in our fd table
                // for this SCM_RIGHTS message; nothing else owns it, so
                // wrapping it gives it exactly one owner that closes it.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
    }
    if truncated {
        return Err(FrameError::FdsTruncated);
    }
    Ok(Some(msg.bytes))
}

/// Assembles one frame at a time from whatever has arrived on a socket,
/// without ever waiting: an event loop reads a connection when it is
/// readable and keeps the partial frame here meanwhile, so a client that
/// trickles bytes holds no thread. The caller enforces the frame's deadline
/// ([`FrameReader::late`]).
#[derive(Debug, Default)]
pub struct FrameReader {
    header: [u8; 4],
    /// Allocated once the length arrived (and was checked).
    payload: Option<Vec<u8>>,
    /// Bytes of the frame received, its length included.
    got: usize,
    fds: Vec<OwnedFd>,
}

impl FrameReader {
    /// True once a frame has begun to arrive.
    pub fn started(&self) -> bool {
        self.got > 0 || !self.fds.is_empty()
    }

    /// The error for a frame still incomplete after `limit`.
    pub fn late(&self, limit: Duration) -> FrameError {
        FrameError::Deadline {
            secs: limit.as_secs(),
            got: self.got,
            want: self.payload.as_ref().map_or(4, |p| 4 + p.len()),
        }
    }

    /// Reads what has arrived (`MSG_DONTWAIT`): a whole frame's message and
    /// descriptors, or `None` when more must come. The same errors as
    /// [`recv`]; afterwards the reader is ready for the next frame.
    pub fn read<T: DeserializeOwned>(&mut self, sock: &UnixStream) -> Result<Option<(T, Vec<OwnedFd>)>, FrameError> {
        loop {
            if self.got >= 4 && self.payload.is_none() {
                let len = u32::from_le_bytes(self.header);
                if len > MAX_FRAME_LEN {
                    return Err(FrameError::TooLarge { len });
                }
                // Bounded by MAX_FRAME_LEN above, so the allocation is at most 1 MiB.
                self.payload = Some(vec![0u8; len as usize]);
            }
            if let Some(p) = &self.payload
                && self.got == 4 + p.len()
            {
                let fds = std::mem::take(&mut self.fds);
                let payload = self.payload.take().unwrap_or_default();
                self.got = 0;
                if fds.len() > MAX_FDS_PER_FRAME {
                    return Err(FrameError::TooManyFds { count: fds.len() });
                }
                let (msg, rest) = postcard::take_from_bytes(&payload).map_err(FrameError::Malformed)?;
                if !rest.is_empty() {
                    return Err(FrameError::TrailingBytes { extra: rest.len() });
                }
                return Ok(Some((msg, fds)));
            }
            let (buf, want) = match &mut self.payload {
                Some(p) => {
                    let want = 4 + p.len();
                    (&mut p[self.got - 4..], want)
                }
                None => (&mut self.header[self.got..], 4),
            };
            let bytes = match recv_chunk(sock, buf, &mut self.fds, MsgFlags::MSG_DONTWAIT) {
                Ok(Some(n)) => n,
                Ok(None) => continue,
                Err(FrameError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            };
            if bytes == 0 {
                if !self.started() {
                    return Err(FrameError::Closed);
                }
                return Err(FrameError::Truncated { got: self.got, want });
            }
            self.got += bytes;
        }
    }
}

/// Waits at most `left` for `sock` to have something to read (or to be
/// closed). False when the time ran out.
fn wait_readable(sock: &UnixStream, left: Duration) -> io::Result<bool> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
    loop {
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Request, Response};
    use std::io::Write;
    use std::os::fd::AsFd;

    #[test]
    fn a_frame_reader_assembles_a_trickled_frame_and_reports_how_far_it_got() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut bytes = Vec::new();
        let mut w = &a;
        let req = Request::SessionCreate { name: "vm0".into() };
        let payload = postcard::to_allocvec(&req).unwrap();
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&payload);
        let mut reader = FrameReader::default();
        assert!(reader.read::<Request>(&b).unwrap().is_none(), "nothing arrived yet");
        assert!(!reader.started());
        for (i, byte) in bytes.iter().enumerate() {
            w.write_all(&[*byte]).unwrap();
            let got = reader.read::<Request>(&b).unwrap();
            if i + 1 < bytes.len() {
                assert!(got.is_none(), "after {} bytes", i + 1);
                assert!(reader.started());
                if i >= 3 {
                    assert_eq!(
                        reader.late(Duration::from_secs(1)).to_string(),
                        format!(
                            "frame not complete within 1 s ({} of {} bytes received)",
                            i + 1,
                            bytes.len()
                        )
                    );
                }
            } else {
                let (msg, fds) = got.expect("the whole frame");
                assert_eq!(msg, req);
                assert!(fds.is_empty());
            }
        }
        assert!(!reader.started(), "ready for the next frame");
        drop(a);
        assert!(matches!(reader.read::<Request>(&b), Err(FrameError::Closed)));
    }

    #[test]
    fn a_request_and_its_fd_cross_the_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        let req = Request::SessionPreserve {
            name: "vm0".into(),
            token: 7,
        };
        send(&a, &req, &[file.as_fd()]).unwrap();
        let (got, fds): (Request, _) = recv(&b).unwrap();
        assert_eq!(got, req);
        assert_eq!(fds.len(), 1);
    }

    #[test]
    fn clean_close_between_frames_is_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(matches!(recv::<Request>(&b), Err(FrameError::Closed)));
    }

    #[test]
    fn close_in_the_middle_of_a_frame_is_truncated() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&10u32.to_le_bytes()).unwrap();
        a.write_all(&[1, 2, 3]).unwrap();
        drop(a);
        match recv::<Request>(&b) {
            Err(FrameError::Truncated { got, want }) => assert_eq!((got, want), (7, 14)),
            other => panic!("unexpected {other:?}"),
        }
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[1, 0]).unwrap();
        drop(a);
        assert!(matches!(
            recv::<Request>(&b),
            Err(FrameError::Truncated { got: 2, want: 4 })
        ));
    }

    #[test]
    fn oversized_frames_are_refused_before_allocating() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&u32::MAX.to_le_bytes()).unwrap();
        assert!(matches!(
            recv::<Request>(&b),
            Err(FrameError::TooLarge { len: u32::MAX })
        ));
    }

    #[test]
    fn garbage_payload_is_malformed() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&3u32.to_le_bytes()).unwrap();
        a.write_all(&[0xff, 0xff, 0xff]).unwrap();
        assert!(matches!(recv::<Request>(&b), Err(FrameError::Malformed(_))));
    }

    #[test]
    fn too_many_fds_are_refused_and_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        let files: Vec<_> = (0..MAX_FDS_PER_FRAME + 1)
            .map(|_| tempfile::tempfile().unwrap())
            .collect();
        let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
        send(&a, &Response::Done, &fds).unwrap();
        let r = recv::<Response>(&b);
        assert!(matches!(r, Err(FrameError::TooManyFds { count: 5 })), "{r:?}");
    }

    #[test]
    fn bytes_after_a_complete_message_are_refused() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut payload = postcard::to_allocvec(&Request::Status).unwrap();
        payload.extend_from_slice(&[0, 0, 7]);
        a.write_all(&(payload.len() as u32).to_le_bytes()).unwrap();
        a.write_all(&payload).unwrap();
        let r = recv::<Request>(&b);
        assert!(matches!(r, Err(FrameError::TrailingBytes { extra: 3 })), "{r:?}");
        assert_eq!(
            r.unwrap_err().to_string(),
            "malformed frame: 3 bytes follow the message"
        );
    }

    #[test]
    fn a_trickled_frame_is_cut_off_at_the_whole_frame_deadline() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            // 100 bytes announced, one byte every 50 ms: each read is quick,
            // the frame as a whole is not.
            let _ = a.write_all(&100u32.to_le_bytes());
            for _ in 0..100 {
                if a.write_all(&[0]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let start = Instant::now();
        let r = recv_within::<Request>(&b, Duration::from_millis(500));
        let took = start.elapsed();
        match r {
            Err(FrameError::Deadline {
                secs: 0,
                got,
                want: 104,
            }) => assert!((4..=20).contains(&got), "{got}"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_millis(1500),
            "{took:?}"
        );
        drop(b);
        writer.join().unwrap();
    }

    #[test]
    fn a_frame_in_time_is_received_within_the_deadline() {
        let (a, b) = UnixStream::pair().unwrap();
        send(&a, &Request::Status, &[]).unwrap();
        let (got, _) = recv_within::<Request>(&b, Duration::from_secs(5)).unwrap();
        assert_eq!(got, Request::Status);
        assert_eq!(
            encoded_len(&Request::Status).unwrap(),
            postcard::to_allocvec(&Request::Status).unwrap().len()
        );
    }
}
