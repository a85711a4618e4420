//! A raw luod client that breaks the framing, for tests that do it as
//! another user (tests/safety_userns.rs runs it as uid 65534, with and
//! without a user namespace of its own: luod must treat both alike).
//!
//! Usage: `luo-raw-client SOCKET MODE`, MODE one of:
//!
//! - `trickle`: announces a frame of 200 bytes, then sends one byte every
//!   100 ms (40 at most): every read of luod is quick, the frame never
//!   completes;
//! - `trailing-hello`: a hello whose frame carries 3 bytes after the message;
//! - `trailing-status`: a proper hello, then a status whose frame carries 3
//!   bytes after the message;
//! - `silent`: connects and sends nothing.
//!
//! Prints one JSON object on stdout: `{"reply": RESPONSE, "ms": N, "then":
//! AFTER}`, where RESPONSE is luod's answer to the broken frame, N the
//! milliseconds from sending the broken frame's first byte (`silent`: from
//! connecting) to that answer, and AFTER
//! what the next read found (`"closed"`, `"reset"`, or what else came).
//! Exits 2 on a usage error or when it cannot connect, 3 when no answer came.

use liveupdate::protocol::frame::{self, FrameError};
use liveupdate::protocol::{PROTOCOL_VERSION, Request, Response};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn hello() -> Request {
    Request::Hello {
        version: PROTOCOL_VERSION,
        client: "luo-raw-client".into(),
    }
}

/// A frame holding `req` followed by 3 bytes that are not part of it.
fn with_trailing_bytes(req: &Request) -> Vec<u8> {
    let mut payload = postcard::to_allocvec(req).expect("encode the request");
    payload.extend_from_slice(&[0, 1, 2]);
    let mut bytes = (payload.len() as u32).to_le_bytes().to_vec();
    bytes.extend_from_slice(&payload);
    bytes
}

/// What the read after luod's answer found.
fn then(sock: &UnixStream) -> String {
    match frame::recv::<Response>(sock) {
        Err(FrameError::Closed) => "closed".into(),
        Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset".into(),
        Err(e) => format!("error: {e}"),
        Ok((r, _)) => format!("another answer: {r:?}"),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, mode] = args.as_slice() else {
        eprintln!("usage: luo-raw-client SOCKET trickle|trailing-hello|trailing-status|silent");
        return ExitCode::from(2);
    };
    let sock = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("luo-raw-client: connect {socket}: {e}");
            return ExitCode::from(2);
        }
    };
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("set a read timeout");
    let started;
    let mut trickle = None;
    match mode.as_str() {
        "trickle" => {
            let mut writer = sock.try_clone().expect("clone the socket");
            started = Instant::now();
            trickle = Some(std::thread::spawn(move || {
                let _ = writer.write_all(&200u32.to_le_bytes());
                for _ in 0..40 {
                    if writer.write_all(&[1]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }));
        }
        "silent" => started = Instant::now(),
        "trailing-hello" => {
            started = Instant::now();
            frame::send_raw(&sock, &with_trailing_bytes(&hello()), &[]).expect("send");
        }
        "trailing-status" => {
            frame::send(&sock, &hello(), &[]).expect("send hello");
            match frame::recv::<Response>(&sock) {
                Ok((Response::Hello { .. }, _)) => {}
                other => {
                    eprintln!("luo-raw-client: hello answered {other:?}");
                    return ExitCode::from(3);
                }
            }
            started = Instant::now();
            frame::send_raw(&sock, &with_trailing_bytes(&Request::Status), &[]).expect("send");
        }
        _ => {
            eprintln!("luo-raw-client: unknown mode {mode}");
            return ExitCode::from(2);
        }
    }
    let reply = match frame::recv::<Response>(&sock) {
        Ok((r, _)) => r,
        Err(e) => {
            eprintln!("luo-raw-client: no answer: {e}");
            return ExitCode::from(3);
        }
    };
    let ms = started.elapsed().as_millis() as u64;
    let then = then(&sock);
    if let Some(t) = trickle {
        let _ = t.join();
    }
    let out = serde_json::json!({ "reply": reply, "ms": ms, "then": then });
    println!("{out}");
    ExitCode::SUCCESS
}
