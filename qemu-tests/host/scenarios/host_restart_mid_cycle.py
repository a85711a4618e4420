"""host_restart_mid_cycle: luod restarted by systemd mid-cycle on the Debian
host loses nothing. `systemctl restart luod` in `prepared` and in `frozen`,
and `systemctl kill -s KILL luod` (Restart=on-failure starts it again): each
time luod comes back in the same state (a new MainPID) with the same
sessions from its fd store; the cycle then completes and the client's
memfds come back byte-identical.
"""

import time

import luodhost

TIMEOUT = 1200


def restarted(t, h, how, state):
    before = luodhost.unit(h, "luod.service", "MainPID")["MainPID"]
    sessions = h.check("luoctl --json session list")
    h.check(how, timeout=120)
    deadline = time.monotonic() + 60
    while True:
        u = luodhost.unit(h, "luod.service", "ActiveState", "MainPID", "NRestarts")
        if u["ActiveState"] == "active" and u["MainPID"] not in ("0", before):
            break
        t.expect(time.monotonic() < deadline, f"luod not active again 60 s after `{how}`: {u}")
        time.sleep(1)
    st = luodhost.status(h)
    t.expect(st["state"] == state, f"after `{how}` luod is {st['state']}, want {state}")
    t.expect(h.check("luoctl --json session list") == sessions, f"sessions changed across `{how}`")
    t.info(f"`{how}` in {state}: MainPID {before} -> {u['MainPID']} (restarts {u['NRestarts']}), {state}, same sessions")


def run(t):
    deb = luodhost.build_deb(t)
    h = luodhost.boot_with_luod(t, deb)
    digests = luodhost.preserve(t, h)

    def restarts_before_reboot():
        restarted(t, h, "systemctl restart luod", "frozen")
        restarted(t, h, "systemctl kill -s KILL luod.service", "frozen")

    luodhost.cycle(t, h, after_prepare=lambda: restarted(t, h, "systemctl restart luod", "prepared"),
                   before_reboot=restarts_before_reboot)
    luodhost.restore(t, h, digests)
    h.check("luoctl finish", timeout=300)
    t.info("after the restarts the cycle completed: the client's 3 memfds came back byte-identical")
    h.shutdown()
