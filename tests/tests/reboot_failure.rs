//! A reboot that fails unfreezes: the host is back in `prepared`, luod keeps
//! running, and a later reboot goes through.

use liveupdate::protocol::ErrorKind;
use liveupdate::state::State;
use liveupdate_tests::*;
use std::os::fd::AsFd;

const PAGE: usize = 4096;

#[test]
fn a_reboot_whose_data_does_not_fit_unfreezes_back_to_prepared_and_a_later_reboot_works() {
    // 8 MiB: two slots of 4 MiB, so a little under 4 MiB of data fits.
    let mut luod = Luod::started("8M");
    let mut c = luod.client();
    c.create("vm0").expect("create");
    let bytes = pattern(7, PAGE);
    let ram = memfd_with("vm0-ram", &bytes);
    c.preserve("vm0", 1, ram.as_fd()).expect("preserve one page");
    c.prepare().expect("prepare: one page fits");

    // The workload grows its memory after prepare checked the capacity.
    set_len(ram.as_fd(), 6 << 20);
    let failed = c.reboot().expect_err("reboot with 6 MiB of data in a 8 MiB region");
    assert_eq!(failed.kind, ErrorKind::Kernel, "{failed:?}");
    assert!(
        failed.message.starts_with("reboot failed, unfroze back to prepared"),
        "message: {:?}",
        failed.message
    );

    assert!(luod.is_running(), "luod keeps running after a failed reboot");
    let status = c.status();
    assert_eq!(status.state, State::Prepared);
    assert_eq!(
        sessions_seen(&status.sessions),
        [("vm0".to_string(), vec![(1, 6 << 20)])]
    );
    let cycle = status.last_cycle.expect("the cycle is still in flight");
    assert_eq!(cycle.outcome, "in-progress");
    let t = &cycle.timestamps;
    assert!(t.prepared.is_some(), "{t:?}");
    assert_eq!(
        (t.freeze_started, t.frozen, t.reboot),
        (None, None, None),
        "the freeze was undone: {t:?}"
    );

    // Back to its original size, the reboot goes through.
    set_len(ram.as_fd(), PAGE as u64);
    drop(ram);
    let rebooted = c.reboot().expect("reboot after the file shrank");
    assert_eq!((rebooted.from, rebooted.to), (State::Prepared, State::Updated));
    drop(c);
    luod.expect_kexec_exit();

    luod.start();
    let mut c = luod.client();
    assert_eq!(c.status().state, State::Updated);
    retrieve_and_compare(
        &mut c,
        &[Preserved {
            session: "vm0".into(),
            token: 1,
            bytes,
        }],
    );
    c.finish().expect("finish");
    assert_eq!(c.status().live_updates, 1);
}
