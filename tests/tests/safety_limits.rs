//! Bounded resources, deadlines and replies (issue 7, items 8 and 9):
//! a whole frame must arrive within `--client-timeout`, however slowly its
//! bytes trickle; connections beyond `--max-connections` are refused with
//! the reason (root keeps a reserve); out of descriptors luod backs off and
//! logs once instead of spinning, and recovers once connections close; a
//! `status` too large for one frame is summarised, and a failed send is
//! logged. Every test checks that luod stays up, answers root's `status`
//! promptly and that nothing changed. Runs as root, as CI does.

use liveupdate::names::SessionName;
use liveupdate::protocol::frame::{self, FrameError, MAX_FRAME_LEN};
use liveupdate::protocol::{ErrorKind, PROTOCOL_VERSION, Request, Response, StatusReport};
use liveupdate::record::{HandoverRecord, RecordStore, SessionRecord};
use liveupdate::region::FileRegion;
use liveupdate_tests::attack::{self, NOBODY, Who};
use liveupdate_tests::*;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// luod runs and answers root's `status` within 2 s; the report.
#[track_caller]
fn root_status_promptly(luod: &mut Luod) -> StatusReport {
    assert!(luod.is_running(), "luod is still running");
    let started = Instant::now();
    let status = luod.status();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "root's status took {:?}",
        started.elapsed()
    );
    status
}

/// A raw connection that said hello (so luod has accepted it and a thread
/// serves it).
fn greeted(luod: &Luod) -> UnixStream {
    let sock = UnixStream::connect(luod.socket()).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let hello = Request::Hello {
        version: PROTOCOL_VERSION,
        client: "raw".into(),
    };
    frame::send(&sock, &hello, &[]).expect("send hello");
    match frame::recv::<Response>(&sock).expect("hello answer").0 {
        Response::Hello { .. } => sock,
        other => panic!("hello answered {other:?}"),
    }
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// The CPU time luod used so far (user + system, in clock ticks).
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..].split(' ').collect();
    // Fields 14 (utime) and 15 (stime), counted from 3 after the command name.
    fields[14 - 3].parse::<u64>().expect("utime") + fields[15 - 3].parse::<u64>().expect("stime")
}

fn ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100, |t| t as u64)
}

#[test]
fn a_client_sending_one_byte_per_100_ms_is_cut_off_at_the_whole_frame_deadline() {
    let mut luod = Luod::new("8M").arg("--client-timeout").arg("1").launched();
    let mut c = luod.client();
    c.create("vm0").expect("create");
    c.preserve("vm0", 1, memfd_with("vm0", &pattern(1, 4096)).as_fd())
        .expect("preserve");
    drop(c);
    let before = root_status_promptly(&mut luod);

    let sock = UnixStream::connect(luod.socket()).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let mut writer = sock.try_clone().expect("clone");
    let started = Instant::now();
    let trickle = std::thread::spawn(move || {
        // A hello of 200 bytes announced, then one byte every 100 ms: every
        // single read is quick, the frame never completes.
        let _ = writer.write_all(&200u32.to_le_bytes());
        for _ in 0..40 {
            if writer.write_all(&[1]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_unchanged(&before, &root_status_promptly(&mut luod));

    let reply = frame::recv::<Response>(&sock).expect("luod's reply").0;
    let took = started.elapsed();
    let Response::Error(e) = reply else {
        panic!("expected a protocol error, got {reply:?}")
    };
    assert_eq!(e.kind, ErrorKind::Protocol);
    let got = e
        .message
        .strip_prefix("frame not complete within 1 s (")
        .and_then(|m| m.strip_suffix(" of 204 bytes received); closing the connection"))
        .unwrap_or_else(|| panic!("message: {}", e.message));
    let got: usize = got.parse().expect("bytes received");
    assert!((1..=20).contains(&got), "{got} bytes arrived in about a second");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "cut off after {took:?}"
    );
    match frame::recv::<Response>(&sock) {
        Err(FrameError::Closed) => {}
        Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the connection closed, got {other:?}"),
    }
    trickle.join().expect("trickle thread");
    assert_unchanged(&before, &root_status_promptly(&mut luod));
}

#[test]
fn connections_beyond_the_cap_are_refused_with_the_reason_and_logged_once() {
    let mut luod = Luod::new("8M")
        .arg("--max-connections")
        .arg("4")
        .arg("--socket-group")
        .arg(NOBODY.to_string())
        .launched();
    attack::share(&luod);
    let before = root_status_promptly(&mut luod);
    let mut held: Vec<UnixStream> = (0..4).map(|_| greeted(&luod)).collect();

    let refusal = "luod serves at most 4 connections at once (--max-connections) and all are in use; try again later";
    for _ in 0..5 {
        let out = attack::luoctl_as(Who::Nobody, luod.dir(), &luod.socket(), &["status"]);
        assert_eq!(out.status.code(), Some(5), "{}", attack::stderr(&out));
        assert_eq!(attack::stderr(&out), format!("luoctl: status: {refusal}\n"));
    }
    // Root has a reserve of 8 beyond the cap: status still answers.
    assert_unchanged(&before, &root_status_promptly(&mut luod));
    held.extend((0..8).map(|_| greeted(&luod)));
    // Now the reserve is used up too, once luod has let go of the status
    // connection above.
    let refused = poll(
        Duration::from_secs(5),
        || match liveupdate::protocol::client::Client::connect(&luod.socket(), "root") {
            Err(liveupdate::protocol::client::ClientError::Server(e)) => Some(*e),
            Ok(c) => {
                drop(c);
                None
            }
            Err(e) => panic!("unexpected {e}"),
        },
    )
    .expect("a 13th connection of root is refused");
    assert_eq!((refused.kind, refused.message.as_str()), (ErrorKind::Protocol, refusal));

    let log = luod.log();
    assert_eq!(
        count(&log, "connection(s): "),
        1,
        "one log line for all refusals within 10 s:\n{log}"
    );
    assert!(
        log.contains("(--max-connections 4, --max-connections-per-uid 64)"),
        "{log}"
    );

    drop(held);
    let out = poll(Duration::from_secs(5), || {
        let out = attack::luoctl_as(Who::Nobody, luod.dir(), &luod.socket(), &["status"]);
        out.status.success().then_some(out)
    })
    .expect("nobody gets in once connections closed");
    assert!(String::from_utf8_lossy(&out.stdout).contains("state"));
    assert_unchanged(&before, &root_status_promptly(&mut luod));
}

/// The descriptors luod has open.
fn open_fds(pid: i32) -> Vec<i32> {
    let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .map(|e| {
            e.expect("entry")
                .file_name()
                .to_string_lossy()
                .parse()
                .expect("fd number")
        })
        .collect();
    fds.sort_unstable();
    fds
}

#[test]
fn out_of_descriptors_luod_backs_off_logs_once_and_recovers_when_connections_close() {
    let mut luod = Luod::started("8M");
    let before = root_status_promptly(&mut luod);
    let pid = luod.pid();
    // Connections that hold descriptors in luod, then a limit at the lowest
    // free descriptor number: luod cannot open anything more until one of
    // those connections closes.
    let held: Vec<UnixStream> = (0..16).map(|_| greeted(&luod)).collect();
    // Once luod's descriptors settle (the status connection above may still
    // be closing on luod's side: a number freed after the limit is set would
    // let one accept through, and the log would flap).
    let mut fds = open_fds(pid);
    let settle = Instant::now() + Duration::from_secs(5);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = open_fds(pid);
        if now == fds || Instant::now() > settle {
            break;
        }
        fds = now;
    }
    let lowest_free = (0..).find(|n| !fds.contains(n)).expect("a free number");
    let limit = format!("--nofile={lowest_free}:{lowest_free}");
    let set = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &limit])
        .status()
        .expect("run prlimit");
    assert!(set.success(), "prlimit {limit}");

    // Clients that luod cannot accept: they wait in the backlog.
    let waiting: Vec<UnixStream> = (0..20)
        .map(|_| UnixStream::connect(luod.socket()).expect("connect into the backlog"))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let cpu_before = cpu_ticks(pid);
    let window = Duration::from_secs(3);
    std::thread::sleep(window);
    let used = cpu_ticks(pid) - cpu_before;
    let share = used as f64 / (window.as_secs_f64() * ticks_per_second() as f64);
    eprintln!(
        "luod used {:.2} % of a core in {window:?} while out of descriptors",
        share * 100.0
    );
    assert!(
        share < 0.05,
        "luod used {:.1} % of a core while out of descriptors",
        share * 100.0
    );
    let log = luod.log();
    assert_eq!(
        count(&log, "accept failed"),
        1,
        "one log line for the failed accepts within 10 s:\n{log}"
    );
    assert!(
        log.contains("Too many open files") && log.contains("luod is out of file descriptors or memory"),
        "{log}"
    );
    assert!(luod.is_running());

    // Connections close: luod gets descriptors back and serves again.
    drop(held);
    drop(waiting);
    let status = poll(Duration::from_secs(5), || {
        liveupdate::protocol::client::Client::connect(&luod.socket(), "root")
            .ok()
            .map(|c| Conn::new(c).status())
    })
    .expect("luod serves again once connections closed");
    assert_unchanged(&before, &status);
    assert!(
        poll(Duration::from_secs(2), || luod
            .log()
            .contains("accepting connections again")
            .then_some(()))
        .is_some(),
        "{}",
        luod.log()
    );
    assert_unchanged(&before, &root_status_promptly(&mut luod));
}

/// Session names of 63 bytes: 16,000 of them make a `status` larger than a frame.
fn long_name(i: usize) -> String {
    format!("s{i:0>62}")
}

/// Stops `luod`, writes a record with `n` empty sessions of root into its
/// region, and starts it again on it.
fn luod_with_sessions(luod: &mut Luod, n: usize) {
    luod.stop();
    let region = FileRegion::open_existing(&luod.region()).expect("open the region");
    let mut store = RecordStore::new(region).expect("the region's records");
    let mut record = HandoverRecord::new("file");
    record.sessions = (0..n)
        .map(|i| SessionRecord {
            name: SessionName::new(long_name(i)).expect("valid name"),
            owner_uid: 0,
            fds: Vec::new(),
            incoming: false,
        })
        .collect();
    store.write(&mut record, &[]).expect("write the record");
    drop(store);
    luod.start();
}

#[test]
fn status_with_16000_sessions_is_summarised_to_fit_one_frame() {
    const SESSIONS: usize = 16_000;
    let mut luod = Luod::started("64M");
    luod_with_sessions(&mut luod, SESSIONS);

    let full = Response::Sessions(
        (0..SESSIONS)
            .map(|i| liveupdate::protocol::SessionInfo {
                name: long_name(i),
                owner_uid: 0,
                files: Vec::new(),
                incoming: false,
            })
            .collect(),
    );
    let full_len = frame::encoded_len(&full).expect("encode");
    assert!(
        full_len > MAX_FRAME_LEN as usize,
        "the whole list does not fit: {full_len}"
    );

    let status = root_status_promptly(&mut luod);
    let shown = status.sessions.len();
    assert!((14_000..SESSIONS).contains(&shown), "{shown} sessions shown");
    let names: Vec<String> = status.sessions.iter().map(|s| s.name.clone()).collect();
    assert_eq!(
        names,
        (0..shown).map(long_name).collect::<Vec<_>>(),
        "the first ones, in order"
    );
    assert_eq!(
        status.notes.last().map(String::as_str),
        Some(
            format!(
                "showing {shown} of {SESSIONS} sessions: the whole list does not fit in one answer \
                 ({MAX_FRAME_LEN} bytes at most); each owner sees its own with `luoctl session list`"
            )
            .as_str()
        )
    );
    let out = luod.luoctl(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("showing {shown} of {SESSIONS} sessions")));

    // A list that cannot be summarised says so instead of breaking the connection.
    let mut c = luod.client();
    let refused = assert_refused(
        c.call(&Request::SessionList),
        ErrorKind::Internal,
        &format!(
            "the answer to session-list would be {full_len} bytes, more than one frame holds ({MAX_FRAME_LEN} bytes)"
        ),
    );
    assert_eq!(
        refused.hint,
        "ask page by page with session-list-from, as `luoctl session list` does"
    );
    assert_eq!(c.status().sessions.len(), shown, "the connection still serves");
    assert!(
        luod.log()
            .contains(&format!("the answer to session-list would be {full_len} bytes"))
    );

    // Page by page, every session comes, in order, each page within a frame.
    let mut names = Vec::new();
    let mut pages = 0;
    loop {
        let req = Request::SessionListFrom {
            start: names.len() as u64,
        };
        let Ok(Response::Sessions(page)) = c.call(&req) else {
            panic!("session-list-from refused")
        };
        if page.is_empty() {
            break;
        }
        pages += 1;
        assert!(frame::encoded_len(&Response::Sessions(page.clone())).expect("encode") <= MAX_FRAME_LEN as usize);
        names.extend(page.into_iter().map(|s| s.name));
    }
    assert_eq!(pages, 2);
    assert_eq!(names, (0..SESSIONS).map(long_name).collect::<Vec<_>>());
    let out = luod.luoctl(&["--json", "session", "list"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["sessions"].as_array().expect("sessions").len(), SESSIONS);
    assert_eq!(json["sessions"][SESSIONS - 1]["name"], long_name(SESSIONS - 1));
}

#[test]
fn a_reply_luod_cannot_send_is_logged() {
    let mut luod = Luod::started("64M");
    luod_with_sessions(&mut luod, 16_000);
    // The summarised status is about 1 MiB, more than the socket buffers
    // hold: luod is still sending when the client goes away without reading.
    let sock = greeted(&luod);
    frame::send(&sock, &Request::Status, &[]).expect("send status");
    std::thread::sleep(Duration::from_millis(200));
    drop(sock);
    let line = poll(Duration::from_secs(5), || {
        luod.log()
            .lines()
            .find(|l| l.contains("cannot send the answer to status to client pid"))
            .map(str::to_string)
    })
    .unwrap_or_else(|| panic!("no log line for the failed send:\n{}", luod.log()));
    assert!(line.contains(&format!("pid {} uid 0: ", std::process::id())), "{line}");
    assert!(
        line.contains("Broken pipe") || line.contains("Connection reset"),
        "{line}"
    );
    root_status_promptly(&mut luod);
}

/// A connection held open by the test client running as `who`; closed when
/// dropped (its stdin closes and it exits).
struct Held(std::process::Child);

impl Held {
    fn open(who: Who, luod: &Luod) -> Held {
        use std::io::BufRead;
        let socket = luod.socket();
        let mut child = attack::command_as(
            who,
            &attack::test_client(luod.dir()),
            &[socket.to_str().expect("UTF-8"), "--hold"],
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the test client");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("the client's answer");
        assert_eq!(line, "[]\n", "connected and greeted");
        Held(child)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

#[test]
fn one_uid_cannot_take_every_connection() {
    let mut luod = Luod::new("8M")
        .arg("--max-connections")
        .arg("8")
        .arg("--max-connections-per-uid")
        .arg("2")
        .arg("--socket-group")
        .arg(NOBODY.to_string())
        .launched();
    attack::share(&luod);
    let before = root_status_promptly(&mut luod);
    let held = [
        Held::open(Who::Nobody, &luod),
        Held::open(Who::NobodyInOwnUserns, &luod),
    ];
    let out = attack::luoctl_as(Who::Nobody, luod.dir(), &luod.socket(), &["status"]);
    assert_eq!(out.status.code(), Some(5), "{}", attack::stderr(&out));
    assert_eq!(
        attack::stderr(&out),
        format!(
            "luoctl: status: uid {NOBODY} has 2 connections to luod open, the most one user may have \
             (--max-connections-per-uid); close one and try again\n"
        )
    );
    // Root is not counted per uid, and the overall cap has room.
    let roots: Vec<UnixStream> = (0..4).map(|_| greeted(&luod)).collect();
    assert_unchanged(&before, &root_status_promptly(&mut luod));
    drop(held);
    let out = poll(Duration::from_secs(5), || {
        let out = attack::luoctl_as(Who::Nobody, luod.dir(), &luod.socket(), &["status"]);
        out.status.success().then_some(out)
    });
    assert!(out.is_some(), "nobody gets in once its connections closed");
    drop(roots);
    assert_unchanged(&before, &root_status_promptly(&mut luod));
}

#[test]
fn a_connection_that_never_says_hello_is_closed_after_the_client_timeout() {
    let mut luod = Luod::new("8M").arg("--client-timeout").arg("1").launched();
    let before = root_status_promptly(&mut luod);
    let started = Instant::now();
    let silent = UnixStream::connect(luod.socket()).expect("connect");
    silent.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    assert_unchanged(&before, &root_status_promptly(&mut luod));
    match frame::recv::<Response>(&silent).expect("luod's reply").0 {
        Response::Error(e) => assert_eq!(
            (e.kind, e.message.as_str()),
            (
                ErrorKind::Protocol,
                "nothing received within 1 s of connecting; a client says hello first"
            )
        ),
        other => panic!("expected a protocol error, got {other:?}"),
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    assert!(matches!(frame::recv::<Response>(&silent), Err(FrameError::Closed)));
    assert_unchanged(&before, &root_status_promptly(&mut luod));
}
