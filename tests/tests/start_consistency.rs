//! A request that arrives while luod is starting sees a consistent state:
//! luod binds its socket before it opens its record, so clients that connect
//! during its start wait in the socket's backlog, and the first answer any
//! of them gets is the state luod came up in (after a live update:
//! `updated`, with every session), never a state half taken over. Work
//! luod's start leaves for later (the reboot path's detection under systemd,
//! preserving its record in a new LUO session at the next `prepare`) is
//! covered by the engine's tests; this is the same contract end to end.

use liveupdate::state::State;
use liveupdate_tests::*;
use std::time::{Duration, Instant};

/// Connects as soon as the socket exists and asks for `status` at once.
fn status_as_soon_as_possible(luod: &mut Luod) -> liveupdate::protocol::StatusReport {
    let deadline = Instant::now() + STARTUP_DEADLINE;
    loop {
        if let Ok(client) = liveupdate::protocol::client::Client::connect(&luod.socket(), "start-race") {
            return Conn::new(client).status();
        }
        assert!(
            luod.is_running(),
            "luod exited during its start; its log:\n{}",
            luod.log()
        );
        assert!(
            Instant::now() < deadline,
            "luod did not serve; its log:\n{}",
            luod.log()
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn requests_during_luods_start_after_a_live_update_see_updated_with_every_session() {
    let mut luod = Luod::started("16M");
    let set = preserve_set(&mut luod.client(), &["vm0", "vm1"], &[4096, 65536]);
    let mut c = luod.client();
    c.prepare().expect("prepare");
    c.freeze().expect("freeze");
    c.reboot().expect("reboot");
    drop(c);
    luod.expect_kexec_exit();

    // The first start in the "new kernel" takes the handover; the later
    // ones (luod killed mid-start or right after) resume in `updated`.
    let mut generation = None;
    for round in 0..8 {
        luod.launch_no_wait();
        let status = status_as_soon_as_possible(&mut luod);
        assert_eq!(status.state, State::Updated, "round {round}");
        assert_eq!(sessions_seen(&status.sessions), sessions_of(&set), "round {round}");
        // Taking the handover is written once; a restart changes nothing.
        match generation {
            None => generation = Some(status.generation),
            Some(g) => assert_eq!(status.generation, g, "round {round}: a restart wrote a record"),
        }
        luod.kill();
    }
    luod.start();
    retrieve_and_compare(&mut luod.client(), &set);
    luod.client().finish().expect("finish");
    assert_eq!(luod.status().state, State::Normal);
}
