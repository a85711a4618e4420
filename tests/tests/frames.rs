//! Clients that break the frame protocol get one Protocol error reply and
//! their connection is closed; luod keeps serving everyone else and nothing
//! changes.
//!
//! A frame is a little-endian u32 payload length and a postcard payload (see
//! `liveupdate::protocol::frame`); these tests write raw bytes to the socket.

use liveupdate::protocol::frame::{self, FrameError, MAX_FRAME_LEN};
use liveupdate::protocol::{ErrorKind, PROTOCOL_VERSION, Request, Response, StatusReport};
use liveupdate_tests::*;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// A luod with a session holding one file, and its status.
fn luod_with_a_session(luod: Luod) -> (Luod, StatusReport) {
    let mut c = luod.client();
    c.create("vm0").expect("create vm0");
    c.preserve("vm0", 1, memfd_with("vm0-1", &pattern(1, 4096)).as_fd())
        .expect("preserve vm0/1");
    let status = c.status();
    (luod, status)
}

/// A raw connection, with a bound on every read.
fn connect(luod: &Luod) -> UnixStream {
    let sock = UnixStream::connect(luod.socket()).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    sock
}

/// A raw connection that has said hello.
fn greeted(luod: &Luod) -> UnixStream {
    let sock = connect(luod);
    let hello = Request::Hello {
        version: PROTOCOL_VERSION,
        client: "raw".into(),
    };
    frame::send(&sock, &hello, &[]).expect("send hello");
    match frame::recv::<Response>(&sock).expect("hello answer").0 {
        Response::Hello { version, .. } => assert_eq!(version, PROTOCOL_VERSION),
        other => panic!("hello answered {other:?}"),
    }
    sock
}

/// The next frame is a Protocol error with `message`, then the connection closes.
#[track_caller]
fn assert_protocol_error_then_closed(sock: &UnixStream, message: &str) {
    match frame::recv::<Response>(sock).expect("an error reply").0 {
        Response::Error(e) => assert_eq!((e.kind, e.message.as_str()), (ErrorKind::Protocol, message)),
        other => panic!("expected a Protocol error, got {other:?}"),
    }
    assert_closed(sock);
}

#[track_caller]
fn assert_closed(sock: &UnixStream) {
    match frame::recv::<Response>(sock) {
        Err(FrameError::Closed) => {}
        other => panic!("expected luod to close the connection, got {other:?}"),
    }
}

/// luod still runs, serves a new client, and its status is `before`.
#[track_caller]
fn assert_still_serving_unchanged(luod: &mut Luod, before: &StatusReport) {
    assert!(luod.is_running(), "luod is still running");
    assert_unchanged(before, &luod.status());
}

#[test]
fn a_frame_whose_payload_is_garbage_gets_a_protocol_error_and_the_connection_is_closed() {
    let (mut luod, before) = luod_with_a_session(Luod::started("8M"));
    let garbage = [0xff_u8, 0xff, 0xff];
    let why = postcard::from_bytes::<Request>(&garbage).expect_err("the payload must not decode");
    let message = format!("{}; closing the connection", FrameError::Malformed(why));
    let mut bytes = (garbage.len() as u32).to_le_bytes().to_vec();
    bytes.extend_from_slice(&garbage);

    // Before and after hello.
    let sock = connect(&luod);
    frame::send_raw(&sock, &bytes, &[]).expect("send garbage");
    assert_protocol_error_then_closed(&sock, &message);
    let sock = greeted(&luod);
    frame::send_raw(&sock, &bytes, &[]).expect("send garbage");
    assert_protocol_error_then_closed(&sock, &message);

    assert_still_serving_unchanged(&mut luod, &before);
}

#[test]
fn a_frame_longer_than_one_mib_is_refused_before_it_is_read() {
    let (mut luod, before) = luod_with_a_session(Luod::started("8M"));
    let sock = greeted(&luod);
    // Only the length goes out: luod must not wait for (or allocate) the payload.
    frame::send_raw(&sock, &(MAX_FRAME_LEN + 1).to_le_bytes(), &[]).expect("send the length");
    assert_protocol_error_then_closed(
        &sock,
        "frame of 1048577 bytes exceeds the limit of 1048576 bytes; closing the connection",
    );
    let sock = greeted(&luod);
    frame::send_raw(&sock, &u32::MAX.to_le_bytes(), &[]).expect("send the length");
    assert_protocol_error_then_closed(
        &sock,
        "frame of 4294967295 bytes exceeds the limit of 1048576 bytes; closing the connection",
    );
    assert_still_serving_unchanged(&mut luod, &before);
}

#[test]
fn a_frame_with_more_than_four_file_descriptors_is_refused() {
    let (mut luod, before) = luod_with_a_session(Luod::started("8M"));
    let sock = greeted(&luod);
    let files: Vec<_> = (0..5).map(|i| memfd_with(&format!("extra{i}"), b"x")).collect();
    let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
    frame::send(
        &sock,
        &Request::SessionPreserve {
            name: "vm0".into(),
            token: 2,
        },
        &fds,
    )
    .expect("send");
    assert_protocol_error_then_closed(
        &sock,
        "frame carried 5 file descriptors; at most 4 are accepted; closing the connection",
    );
    assert_still_serving_unchanged(&mut luod, &before);
}

#[test]
fn a_client_that_disconnects_in_the_middle_of_a_frame_does_not_disturb_luod() {
    let (mut luod, before) = luod_with_a_session(Luod::started("8M"));
    for greet in [false, true] {
        let sock = if greet { greeted(&luod) } else { connect(&luod) };
        let mut half = 100u32.to_le_bytes().to_vec();
        half.extend_from_slice(&[0u8; 10]);
        frame::send_raw(&sock, &half, &[]).expect("send half a frame");
        drop(sock);
        // And one that stops inside the length itself.
        let sock = connect(&luod);
        frame::send_raw(&sock, &[1, 0], &[]).expect("send half a length");
        drop(sock);
    }
    assert_still_serving_unchanged(&mut luod, &before);
}

#[test]
fn a_client_that_stalls_in_the_middle_of_a_frame_is_dropped_after_the_client_timeout() {
    let (mut luod, before) = luod_with_a_session(Luod::new("8M").arg("--client-timeout").arg("1").launched());
    let stalled = greeted(&luod);
    let mut half = 100u32.to_le_bytes().to_vec();
    half.extend_from_slice(&[0u8; 10]);
    frame::send_raw(&stalled, &half, &[]).expect("send half a frame");
    let stalled_at = Instant::now();

    // Others are served while the stalled client holds its connection.
    let mut c = luod.client();
    let asked = Instant::now();
    assert_unchanged(&before, &c.status());
    assert!(
        asked.elapsed() < Duration::from_millis(500),
        "status took {:?}",
        asked.elapsed()
    );

    match frame::recv::<Response>(&stalled)
        .expect("luod's answer to the stalled client")
        .0
    {
        Response::Error(e) => {
            assert_eq!(e.kind, ErrorKind::Protocol, "{e:?}");
            assert!(e.message.ends_with("; closing the connection"), "{e:?}");
        }
        other => panic!("expected a Protocol error, got {other:?}"),
    }
    let waited = stalled_at.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "dropped after {waited:?}, the client timeout is 1 s"
    );
    assert_closed(&stalled);
    assert_still_serving_unchanged(&mut luod, &before);
}

#[test]
fn a_client_idle_between_requests_is_not_dropped() {
    // --client-timeout bounds how long a client may take to send the rest of
    // a frame it started, not how long it may stay connected.
    let (mut luod, before) = luod_with_a_session(Luod::new("8M").arg("--client-timeout").arg("1").launched());
    let mut c = luod.client();
    std::thread::sleep(Duration::from_millis(1500));
    assert_unchanged(&before, &c.status());
    assert_still_serving_unchanged(&mut luod, &before);
}

#[test]
fn a_first_request_other_than_hello_is_refused() {
    let (mut luod, before) = luod_with_a_session(Luod::started("8M"));
    let sock = connect(&luod);
    frame::send(&sock, &Request::Status, &[]).expect("send status");
    assert_protocol_error_then_closed(&sock, "the first request must be hello, not status");
    let sock = connect(&luod);
    frame::send(&sock, &Request::Cancel, &[]).expect("send cancel");
    assert_protocol_error_then_closed(&sock, "the first request must be hello, not cancel");
    assert_still_serving_unchanged(&mut luod, &before);
}

#[test]
fn a_client_of_another_protocol_version_is_refused() {
    let (mut luod, before) = luod_with_a_session(Luod::started("8M"));
    for version in [0, PROTOCOL_VERSION + 1] {
        let sock = connect(&luod);
        frame::send(
            &sock,
            &Request::Hello {
                version,
                client: "old".into(),
            },
            &[],
        )
        .expect("send hello");
        assert_protocol_error_then_closed(
            &sock,
            &format!(
                "luod speaks protocol version {PROTOCOL_VERSION}, the client {version}; use matching luod and client versions"
            ),
        );
    }
    assert_still_serving_unchanged(&mut luod, &before);
}
