//! Pokes at luod's fd holder socket, for tests/safety_holder.rs (which runs
//! it as root and as uid 65534).
//!
//! Usage: `luo-holder-probe SOCKET put|fetch`. Prints one line per result on
//! stdout and exits 0 when the holder answered, 1 when it did not:
//!
//! - `put`: connects and asks the holder to park a fresh memfd under the key
//!   `probe`: `answered: REPLY`, `connect: ERROR` or `closed unanswered`.
//! - `fetch`: connects as luod does ([`HolderClient::connect`]) and prints
//!   the key of every parked file (`{:?}`), or `error: ERROR`.

use liveupdate::holder::{FdPark, HolderClient, HolderReply, HolderRequest};
use liveupdate::protocol::frame::{self, FrameError};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;

fn put(path: &Path) -> ExitCode {
    let sock = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) => {
            println!("connect: {e}");
            return ExitCode::FAILURE;
        }
    };
    let fd = liveupdate::kernel::memfd::from_bytes("luo-holder-probe", b"probe").expect("memfd");
    // The holder may close before or after the request arrives: a refused
    // send and a closed or reset connection are the same answer.
    let sent = frame::send(&sock, &HolderRequest::Put { key: "probe".into() }, &[fd.as_fd()]);
    let answer = sent.and_then(|()| frame::recv::<HolderReply>(&sock));
    match answer {
        Ok((reply, _)) => {
            println!("answered: {reply:?}");
            ExitCode::SUCCESS
        }
        Err(FrameError::Closed | FrameError::Truncated { .. }) => {
            println!("closed unanswered");
            ExitCode::FAILURE
        }
        Err(FrameError::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ) =>
        {
            println!("closed unanswered");
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn fetch(path: &Path) -> ExitCode {
    let mut client = match HolderClient::connect(path) {
        Ok(c) => c,
        Err(e) => {
            println!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    for (key, _) in client.fetch_all().expect("fetch_all from the client's copy") {
        println!("{key:?}");
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [socket, mode] if mode == "put" => put(Path::new(socket)),
        [socket, mode] if mode == "fetch" => fetch(Path::new(socket)),
        _ => {
            eprintln!("usage: luo-holder-probe SOCKET put|fetch");
            ExitCode::from(2)
        }
    }
}
