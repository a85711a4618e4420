//! luod answers reads while a change waits: `status`, `history`,
//! `session list` and `vm list` come from the snapshot of the last committed
//! state, and `status` shows the change in progress (step, since when, what
//! it waits for).

use liveupdate::kernel::memfd;
use liveupdate::protocol::client::Client;
use liveupdate::protocol::{VmAnswer, VmCall};
use liveupdate::state::State;
use liveupdate_tests::Luod;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

/// Registers VM `name` whose VMM answers `prepare` and then never answers
/// again (it hangs at `freeze`), until the returned sender is dropped.
fn hung_at_freeze(luod: &Luod, name: &str) -> std::sync::mpsc::Sender<()> {
    let ram = memfd::from_bytes(name, &[7; 4096]).expect("memfd");
    let client = Client::connect(&luod.socket(), "hung-vmm").expect("connect");
    let mut conn = client.register_vm(name, &[(1, ram.as_fd())]).expect("register");
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let _ram = ram;
        while let Ok(Some(call)) = conn.next_call() {
            if call == VmCall::Freeze {
                // Hang: keep the connection open, answer nothing.
                let _ = rx.recv();
                return;
            }
            if conn.answer(VmAnswer::Ok { state: None }).is_err() {
                return;
            }
        }
    });
    tx
}

#[test]
fn status_answers_promptly_while_a_freeze_waits_on_a_hung_vmm_and_shows_it() {
    let luod = Luod::new("8M").arg("--vm-timeout").arg("5").launched();
    let _hang = hung_at_freeze(&luod, "vm0");
    let out = luod.luoctl(&["prepare"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));

    let socket = luod.socket();
    let started = Instant::now();
    let freeze = std::thread::spawn(move || {
        let mut c = liveupdate_tests::Conn::new(Client::connect(&socket, "freeze").expect("connect"));
        c.freeze().map_err(|e| e.message)
    });

    // Within the 5 s the freeze waits, status shows it waiting for vm0.
    let mut seen = None;
    while started.elapsed() < Duration::from_secs(4) {
        let asked = Instant::now();
        let status = luod.status();
        let took = asked.elapsed();
        assert!(took < Duration::from_secs(1), "status took {took:?} during the freeze");
        if let Some(p) = status.in_progress.clone()
            && p.waiting_for.as_deref() == Some("VM vm0 (freeze)")
        {
            seen = Some((status, p));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, p) = seen.expect("status showed the freeze waiting for vm0");
    assert_eq!(p.step, "freeze");
    assert_eq!(status.state, State::Prepared, "the last committed state");
    assert!(p.since <= liveupdate::engine::now(), "since {} is in the past", p.since);

    // The other reads answer promptly too.
    for args in [&["history"][..], &["session", "list"], &["vm", "list"]] {
        let asked = Instant::now();
        let out = luod.luoctl(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "{args:?} took {:?}",
            asked.elapsed()
        );
    }
    let human = luod.luoctl(&["status"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("in progress   freeze since ") && text.contains(", waiting for VM vm0 (freeze)"),
        "{text}"
    );

    // The freeze fails after the VM timeout; the state stays prepared and
    // nothing shows in progress any more.
    let reply = freeze.join().expect("freeze thread");
    let err = reply.expect_err("the hung VMM fails the freeze");
    assert!(
        err.contains("VM vm0: its VMM did not answer freeze within 5 s"),
        "{}",
        err
    );
    assert!(started.elapsed() >= Duration::from_secs(5));
    let after = luod.status();
    assert_eq!(after.state, State::Prepared);
    assert_eq!(after.in_progress, None);
}

/// Threads of process `pid` (`Threads:` of /proc/PID/status).
fn threads(pid: i32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("a Threads: line")
}

/// A connection that said hello (luod accepted it), then stays idle.
fn greeted(luod: &Luod) -> std::os::unix::net::UnixStream {
    use liveupdate::protocol::frame;
    use liveupdate::protocol::{PROTOCOL_VERSION, Request, Response};
    let sock = std::os::unix::net::UnixStream::connect(luod.socket()).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let hello = Request::Hello {
        version: PROTOCOL_VERSION,
        client: "idle".into(),
    };
    frame::send(&sock, &hello, &[]).expect("send hello");
    match frame::recv::<Response>(&sock).expect("hello answer").0 {
        Response::Hello { .. } => sock,
        other => panic!("hello answered {other:?}"),
    }
}

#[test]
fn a_thousand_idle_connections_cost_no_thread() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    // This process and luod (which inherits it) need a descriptor for each.
    // Root may raise the hard limit too (CAP_SYS_RESOURCE).
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    let limit = hard.max(4096);
    setrlimit(Resource::RLIMIT_NOFILE, limit, limit).expect("raise RLIMIT_NOFILE to 4096 at least");
    let luod = Luod::new("8M").arg("--max-connections").arg("2000").launched();
    let pid = luod.pid();
    let first = greeted(&luod);
    luod.status();
    let before = threads(pid);

    let idle: Vec<_> = (0..1000).map(|_| greeted(&luod)).collect();
    let after = threads(pid);
    assert!(
        after <= before,
        "luod had {before} threads with one connection and {after} with 1001 idle ones"
    );
    // Its threads: main (the event loop), signals, 4 workers, the engine, and
    // the few the backend starts; none per connection.
    assert!(after < 16, "luod runs {after} threads");
    let asked = Instant::now();
    let status = luod.status();
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "status took {:?}",
        asked.elapsed()
    );
    assert_eq!(status.state, State::Normal);
    drop((first, idle));
}

/// A server on a socket of its own that accepts connections and, when
/// `hello` is set, answers the hello, then never answers anything.
fn silent_server(hello: bool) -> (tempfile::TempDir, std::path::PathBuf) {
    use liveupdate::protocol::frame;
    use liveupdate::protocol::{PROTOCOL_VERSION, Request, Response};
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("luod.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            if hello && matches!(frame::recv::<Request>(&conn), Ok((Request::Hello { .. }, _))) {
                let reply = Response::Hello {
                    version: PROTOCOL_VERSION,
                    server: "silent".into(),
                };
                let _ = frame::send(&conn, &reply, &[]);
            }
            held.push(conn);
        }
    });
    (dir, path)
}

#[test]
fn luoctl_gives_up_on_a_read_luod_never_answers_after_the_short_timeout() {
    let (_dir, socket) = silent_server(true);
    let started = Instant::now();
    let out = liveupdate_tests::luoctl_command(&socket)
        .arg("status")
        .output()
        .expect("run luoctl");
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(8), "the timeout exit code");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "luoctl: status: luod did not answer status within 10 s; luod may be stuck or overloaded: see its log \
         and `luoctl status`; --timeout SECS waits longer\n"
    );
    assert!(
        took >= Duration::from_secs(10) && took < Duration::from_secs(14),
        "gave up after {took:?}"
    );
}

#[test]
fn luoctl_timeout_sets_the_wait_for_every_answer_and_json_names_it() {
    let (_dir, socket) = silent_server(false);
    let started = Instant::now();
    let out = liveupdate_tests::luoctl_command(&socket)
        .args(["--json", "--timeout", "1", "freeze"])
        .output()
        .expect("run luoctl");
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(8));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(json["error"]["kind"], "timeout");
    assert_eq!(json["error"]["code"], 8);
    assert_eq!(json["error"]["message"], "luod did not answer hello within 1 s");
    assert!(took < Duration::from_secs(4), "gave up after {took:?}");
}

#[test]
fn clients_trickling_frames_hold_no_worker_and_status_stays_prompt() {
    use std::io::Write;
    let luod = Luod::new("8M").arg("--client-timeout").arg("3").launched();
    let pid = luod.pid();
    // Five times as many tricklers as luod has workers, each sending its
    // hello's 4-byte length and then one byte every 100 ms.
    let tricklers: Vec<_> = (0..20)
        .map(|_| {
            let mut sock = std::os::unix::net::UnixStream::connect(luod.socket()).expect("connect");
            std::thread::spawn(move || {
                let _ = sock.write_all(&200u32.to_le_bytes());
                for _ in 0..15 {
                    if sock.write_all(&[1]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let threads_then = threads(pid);
    for _ in 0..10 {
        let asked = Instant::now();
        assert_eq!(luod.status().state, State::Normal);
        assert!(
            asked.elapsed() < Duration::from_millis(500),
            "status took {:?} among 20 tricklers",
            asked.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(threads_then < 16, "luod runs {threads_then} threads with 20 tricklers");
    for t in tricklers {
        t.join().expect("trickler");
    }
}
