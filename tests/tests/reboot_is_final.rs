//! Once luod has answered a `reboot` with success, the kexec is under way:
//! no other request may change the record it handed over.

use liveupdate::protocol::client::{Client, ClientError};
use liveupdate::protocol::{ErrorKind, Request, Response};
use liveupdate::state::State;
use liveupdate_tests::*;
use std::os::fd::AsFd;
use std::time::Duration;

/// Bytes of the preserved file: enough that copying it into the region at
/// `reboot` takes luod tens of milliseconds.
const SIZE: usize = 48 << 20;

/// What happened to a `cancel` sent while a `reboot` was running.
enum Race {
    /// The reboot took the engine first, as intended.
    CancelAfterReboot(Result<Response, ClientError>),
    /// The cancel won the race: the run says nothing; try again.
    CancelFirst,
}

/// A frozen luod with one file; sends `reboot`, and `cancel` on a second
/// connection 10 ms later, so that the cancel waits for the engine while the
/// reboot copies the file into the region.
fn reboot_then_cancel(luod: &mut Luod, bytes: &[u8]) -> Race {
    let mut c = luod.client();
    c.create("vm0").expect("create");
    c.preserve("vm0", 1, memfd_with("ram", bytes).as_fd())
        .expect("preserve");
    c.prepare().expect("prepare");
    c.freeze().expect("freeze");
    let mut other = Client::connect(&luod.socket(), "other").expect("second client");
    let reboot = std::thread::spawn(move || c.reboot());
    std::thread::sleep(Duration::from_millis(10));
    let cancel = other.call(&Request::Cancel);
    match reboot.join().expect("reboot thread") {
        Ok(_) => Race::CancelAfterReboot(cancel),
        Err(e) => {
            assert_eq!(
                (e.kind, e.message.as_str()),
                (
                    ErrorKind::WrongState,
                    "cannot reboot in state normal: reboot is allowed only in frozen"
                )
            );
            assert!(cancel.is_ok(), "the cancel that ran first succeeded: {cancel:?}");
            Race::CancelFirst
        }
    }
}

#[test]
fn a_cancel_that_waited_behind_a_successful_reboot_is_refused_and_the_update_goes_through() {
    let bytes = pattern(11, SIZE);
    for _attempt in 0..3 {
        let mut luod = Luod::started("128M");
        let cancel = match reboot_then_cancel(&mut luod, &bytes) {
            Race::CancelFirst => continue,
            Race::CancelAfterReboot(cancel) => cancel,
        };
        assert!(
            cancel.is_err(),
            "a cancel after the reboot was answered must be refused, got {cancel:?}"
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
                bytes,
            }],
        );
        c.finish().expect("finish");
        return;
    }
    panic!("in 3 attempts the cancel never waited behind the reboot (the machine is too loaded?)");
}
