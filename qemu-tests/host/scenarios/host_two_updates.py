"""host_two_updates: two live updates in a row on the Debian host, both on
the systemd reboot path: after the first, luod's fd store is its new session
and record; the client preserves again; the second kexec carries them the
same way; live_updates is 2 and the history holds two finished cycles.
"""

import luodhost

TIMEOUT = 1500


def run(t):
    deb = luodhost.build_deb(t)
    h = luodhost.boot_with_luod(t, deb)
    luodhost.expect_systemd_path(t, h)
    for n in (1, 2):
        digests = luodhost.preserve(t, h)
        k, _ = luodhost.cycle(t, h)
        luodhost.restore(t, h, digests)
        h.check("luoctl finish", timeout=300)
        st = luodhost.status(h)
        t.expect(st["state"] == "normal" and st["live_updates"] == n, f"after update {n}: {st['state']}, "
                 f"live_updates {st['live_updates']}")
        line = h.wait_serial(r"liveupdate number: (\d+)", timeout=10, since=k["mark"])
        t.expect(line.group(1) == str(n), f"the kernel logged {line.group(0)!r} after update {n}")
        t.info(f"update {n}: 3 memfds back byte-identical, live_updates {n}, kernel: {line.group(0)}")
        t.measure(f"update {n}: luoctl reboot -> ssh", k["ssh"])
    cycles = h.json("luoctl --json history")["cycles"]
    t.expect([c["outcome"] for c in cycles] == ["finished", "finished"], f"history: {cycles}")
    h.shutdown()
