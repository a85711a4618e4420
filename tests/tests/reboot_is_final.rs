//! Once luod has answered a `reboot` with success, the kexec is under way:
//! no other request may change the record it handed over.

use liveupdate::protocol::frame::{self, FrameError};
use liveupdate::protocol::{PROTOCOL_VERSION, Request, Response};
use liveupdate::state::State;
use liveupdate_tests::*;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Bytes of the preserved file: copying them into the region at `reboot`
/// keeps luod's engine busy for well over the 15 ms the cancel waits.
const SIZE: usize = 160 << 20;

/// A raw connection that has said hello.
fn greeted(luod: &Luod) -> UnixStream {
    let sock = UnixStream::connect(luod.socket()).expect("connect");
    frame::send(
        &sock,
        &Request::Hello {
            version: PROTOCOL_VERSION,
            client: "other".into(),
        },
        &[],
    )
    .expect("hello");
    frame::recv::<Response>(&sock).expect("hello answer");
    sock
}

/// A frozen luod with one file: sends `reboot`, and `cancel` on a second
/// connection right after it. Returns what the cancel got when it waited
/// (more than 5 ms) for the engine the reboot held; `None` when it was
/// answered at once, as it ran before the reboot (the run says nothing).
fn cancel_during_reboot(luod: &mut Luod, bytes: &[u8]) -> Option<Result<Response, FrameError>> {
    let mut c = luod.client();
    c.create("vm0").expect("create");
    c.preserve("vm0", 1, memfd_with("ram", bytes).as_fd())
        .expect("preserve");
    c.prepare().expect("prepare");
    c.freeze().expect("freeze");
    drop(c);
    // The reboot goes out first, on its own connection; the cancel follows
    // once luod has surely taken it (copying the file takes far longer).
    let rebooter = greeted(luod);
    let other = greeted(luod);
    frame::send(&rebooter, &Request::Reboot, &[]).expect("send reboot");
    let reboot = std::thread::spawn(move || match frame::recv::<Response>(&rebooter) {
        Ok((Response::Transition(_), _)) => Ok(()),
        other => Err(format!("{other:?}")),
    });
    std::thread::sleep(Duration::from_millis(15));
    frame::send(&other, &Request::Cancel, &[]).expect("send cancel");
    other.set_read_timeout(Some(Duration::from_millis(5))).expect("timeout");
    let race = match frame::recv::<Response>(&other) {
        Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
            other.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
            Some(frame::recv::<Response>(&other).map(|(r, _)| r))
        }
        _ => None,
    };
    let rebooted: Result<(), String> = reboot.join().expect("reboot thread");
    if race.is_some() {
        rebooted.expect("the reboot that held the engine succeeds");
    }
    race
}

/// The race is luod's to decide: with a fault, a queued cancel may still
/// lose to luod's exit now and then, so the test needs several runs in which
/// the cancel got behind the reboot, and every one must end in `updated`
/// with the file intact.
const QUEUED_RUNS: usize = 3;

#[test]
fn a_cancel_that_waited_behind_a_successful_reboot_is_refused_and_the_update_goes_through() {
    let bytes = pattern(11, SIZE);
    let mut queued = 0;
    for _attempt in 0..20 {
        let mut luod = Luod::started("512M");
        let Some(cancel) = cancel_during_reboot(&mut luod, &bytes) else {
            continue;
        };
        assert!(
            !matches!(cancel, Ok(Response::Transition(_))),
            "a cancel queued behind a successful reboot must be refused, got {cancel:?}"
        );
        luod.expect_kexec_exit();

        luod.start();
        let mut c = luod.client();
        let status = c.status();
        assert_eq!(status.state, State::Updated, "notes: {:?}", status.notes);
        retrieve_and_compare(
            &mut c,
            &[Preserved {
                session: "vm0".into(),
                token: 1,
                bytes: bytes.clone(),
            }],
        );
        c.finish().expect("finish");
        queued += 1;
        if queued == QUEUED_RUNS {
            return;
        }
    }
    panic!("in 20 attempts the cancel got behind the reboot only {queued} times");
}
