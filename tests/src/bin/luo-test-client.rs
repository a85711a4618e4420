//! A minimal luod client for tests that need a client running as another
//! user (tests/ownership.rs spawns it with another uid and gid).
//!
//! Usage: `luo-test-client SOCKET [--hold] REQUEST_JSON...`. Each argument is a
//! `liveupdate::protocol::Request` in serde_json form; a `SessionPreserve` is
//! sent with a fresh 4096-byte memfd, or, when `LUO_TEST_CLIENT_FD=N` is
//! set, with the inherited descriptor N (so the test keeps the memfd and can
//! change it afterwards). A `VmRegister` is sent with a fresh 4096-byte
//! memfd per token (the connection then belongs to luod's calls: make it
//! the last request). Prints one JSON array on stdout: for
//! each request `{"Ok": RESPONSE}` or `{"Err": ERROR_REPLY}`. Exits 2 when it
//! cannot connect or a request is not valid JSON, 3 when the connection breaks.
//! With `--hold` it keeps the connection open after printing, until its
//! stdin closes (tests/safety_limits.rs holds connections as another user).

use liveupdate::protocol::client::{Client, ClientError};
use liveupdate::protocol::{ErrorReply, Request, Response};
use std::os::fd::AsFd;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(socket) = args.next() else {
        eprintln!("usage: luo-test-client SOCKET REQUEST_JSON...");
        return ExitCode::from(2);
    };
    let mut args = args.peekable();
    let hold = args.next_if(|a| a == "--hold").is_some();
    let mut client = match Client::connect(socket.as_ref(), "luo-test-client") {
        Ok(c) => c,
        Err(e) => {
            eprintln!("luo-test-client: {e}");
            return ExitCode::from(2);
        }
    };
    let mut results: Vec<Result<Response, ErrorReply>> = Vec::new();
    for arg in args {
        let req: Request = match serde_json::from_str(&arg) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("luo-test-client: {arg}: {e}");
                return ExitCode::from(2);
            }
        };
        let reply = if matches!(req, Request::SessionPreserve { .. }) {
            let fd = match std::env::var("LUO_TEST_CLIENT_FD") {
                Ok(n) => {
                    let n: i32 = n.parse().expect("LUO_TEST_CLIENT_FD is a descriptor number");
                    // SAFETY: the test that spawned this client put an open
                    // descriptor at number n (documented above); it is only
                    // borrowed here, for the duration of this call.
                    let inherited = unsafe { std::os::fd::BorrowedFd::borrow_raw(n) };
                    inherited.try_clone_to_owned().expect("the inherited descriptor")
                }
                Err(_) => liveupdate::kernel::memfd::from_bytes("luo-test-client", &[0u8; 4096]).expect("memfd"),
            };
            client.call_fds(&req, &[fd.as_fd()]).map(|(r, _)| r)
        } else if let Request::VmRegister { tokens, .. } = &req {
            let ram: Vec<_> = tokens
                .iter()
                .map(|_| liveupdate::kernel::memfd::from_bytes("luo-test-client-vm", &[0u8; 4096]).expect("memfd"))
                .collect();
            let fds: Vec<_> = ram.iter().map(|f| f.as_fd()).collect();
            client.call_fds(&req, &fds).map(|(r, _)| r)
        } else {
            client.call(&req)
        };
        match reply {
            Ok(r) => results.push(Ok(r)),
            Err(ClientError::Server(e)) => results.push(Err(*e)),
            Err(e) => {
                eprintln!("luo-test-client: {}: {e}", req.kind());
                return ExitCode::from(3);
            }
        }
    }
    println!("{}", serde_json::to_string(&results).expect("results are serializable"));
    if hold {
        use std::io::Read;
        let _ = std::io::Write::flush(&mut std::io::stdout());
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        drop(client);
    }
    ExitCode::SUCCESS
}
