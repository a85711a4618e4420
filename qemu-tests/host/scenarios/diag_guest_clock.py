"""diag_guest_clock: two hosts (LUO_DIAG_HOSTS: up to three, as in the
fleet), one VM each (the fleet's guest, console in a file on its host);
the hosts named in LUO_DIAG_UPDATE (default "b"; "" for none) each
live-update once, at once, the others never do; then every guest is
watched for WATCH_S seconds, every 5 s: its last tick and uptime against
this machine's clock. Prints the guest clock's
rate (guest seconds per real second) per host, over the first and the last
half of the watch, every gap of more than 20 s without a new tick, and the
guest's clocksource, and for an updated host every sample and the guest's
console (kept in the log directory). LUO_DIAG_APPEND_<HOST> adds to that
host's guest kernel command line after qemuvm.GUEST_CLOCK:
`clocksource=kvm-clock` brings back the guest clock that stalled. A
diagnosis of the fleet's stalled guests, in no group.

Found with it (2026-11-30, three hosts, b and c updated at once): b's guest
on kvm-clock went from uptime 27.8 s to 34.2 s over 100 real seconds
around its restore (a blackout of about 60 s, then about 40 s nearly still)
and on at 0.999 after; c's guest on the TSC went from 35.1 s to 100.5 s over
60 real seconds (its clock counted the blackout) and on at 1.000 at once."""

import os
import threading
import time

import luodhost
from qemuvm import TICK, define_vm, install_launcher, stall_report, wait_launcher

DIAG = True
CPUS = 2  # three with LUO_DIAG_HOSTS=3 (runner.py gives the hosts -smp 1 each)
TIMEOUT = 2400
WATCH_S = float(os.environ.get("LUO_DIAG_WATCH_S", "720"))
HOSTS = "abc"[:max(1, min(3, int(os.environ.get("LUO_DIAG_HOSTS", "2"))))]
UPDATE = os.environ.get("LUO_DIAG_UPDATE", "b")
VM = "web"


def last_tick(h):
    out = h.ssh(f"tail -n 3 /var/lib/luo-vm/{VM}.serial", timeout=60).stdout
    ticks = [m for m in map(TICK.search, out.splitlines()) if m]
    return (int(ticks[-1].group(1)), float(ticks[-1].group(3))) if ticks else None


def setup(t, deb, name, out):
    h = luodhost.boot_with_luod(t, deb, name=name, mem=1536)
    install_launcher(t, h)
    define_vm(h, VM, None, append=("loglevel=7 " + os.environ.get(f"LUO_DIAG_APPEND_{name.upper()}", "")).strip())
    h.check(f"systemctl daemon-reload && systemctl enable --now luo-qemu@{VM}", timeout=120)
    wait_launcher(t, h, VM, f"VM {VM} registered with luod", 300)
    deadline = time.monotonic() + 600
    while not (last_tick(h) or (0, 0))[0] > 20:
        t.expect(time.monotonic() < deadline, f"{name}: the guest does not tick")
        time.sleep(2)
    out[name] = h


def run(t):
    deb = luodhost.build_deb(t)
    hosts, errors = {}, []

    def one(name):
        try:
            setup(t, deb, name, hosts)
        except BaseException as e:  # noqa: BLE001
            errors.append(f"{name}: {e}")

    ths = [threading.Thread(target=one, args=(n,)) for n in HOSTS]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    t.expect(not errors, "; ".join(errors))
    series = {n: [] for n in HOSTS}
    stop = threading.Event()

    def watch(name):
        h = hosts[name]
        while not stop.is_set():
            try:
                lt = last_tick(h)
            except Exception as e:  # noqa: BLE001
                t.log(f"{name}: {e}")
                lt = None
            if lt:
                series[name].append((time.monotonic(), *lt))
            stop.wait(5)

    watchers = [threading.Thread(target=watch, args=(n,)) for n in series]
    for w in watchers:
        w.start()
    try:
        def update(name):
            hb = hosts[name]
            try:
                k, _ = luodhost.cycle(t, hb)
                wait_launcher(t, hb, VM, "restored", 300)
                hb.check("luoctl finish", timeout=300)
                t.log(f"{name}: live update done ({k['release']})")
            except BaseException as e:  # noqa: BLE001
                errors.append(f"{name}: {e}")

        ups = [threading.Thread(target=update, args=(n,)) for n in UPDATE if n in hosts]
        for u in ups:
            u.start()
        for u in ups:
            u.join()
        t.expect(not errors, "; ".join(errors))
        t_end = time.monotonic() + WATCH_S
        while time.monotonic() < t_end:
            time.sleep(10)
    finally:
        stop.set()
        for w in watchers:
            w.join()
    for name, s in series.items():
        h = hosts[name]
        gaps = []
        changes = [(ts, n, up) for i, (ts, n, up) in enumerate(s) if i == 0 or n != s[i - 1][1]]
        for (t0, n0, _), (t1, n1, _) in zip(changes, changes[1:]):
            if t1 - t0 > 20:
                gaps.append(f"{t1 - t0:.0f} s before n={n1} (after n={n0})")
        tail = s[-1][0] - changes[-1][0] if changes else 0
        if tail > 20:
            gaps.append(f"none for the last {tail:.0f} s after n={changes[-1][1]}")
        # Rates over the first and the last half of the watch (the last:
        # after the updates).

        def rate(xs):
            return (xs[-1][2] - xs[0][2]) / (xs[-1][0] - xs[0][0]) if len(xs) > 1 and xs[-1][0] > xs[0][0] else float("nan")

        mid = s[-1][0] - WATCH_S / 2 if s else 0
        t.info(f"host {name}: {len(s)} samples, guest uptime {s[0][2]:.0f} -> {s[-1][2]:.0f} s, n {s[0][1]} -> "
               f"{s[-1][1]}; guest seconds per real second, first half {rate([x for x in s if x[0] < mid]):.3f}, "
               f"last {WATCH_S / 2:.0f} s {rate([x for x in s if x[0] >= mid]):.3f}; "
               f"gaps: {'; '.join(gaps) or 'none'}")
        clk = h.ssh(f"grep -a -i -E 'GUEST: (ready|clocksource)|clocksource|tsc|kvm-clock|hpet|timer' "
                    f"/var/lib/luo-vm/{VM}.serial | head -30").stdout
        for line in clk.splitlines():
            t.info(f"host {name}: guest: {line}")
        host_clk = h.ssh("dmesg | grep -i -E 'tsc|clocksource|kvm' | tail -8").stdout
        for line in host_clk.splitlines():
            t.info(f"host {name}: host: {line}")
        if name in UPDATE:
            # Every sample: real seconds since the watch began, counter,
            # guest uptime.
            t0 = s[0][0]
            t.info(f"host {name}: samples (real s, n, up): " + " ".join(f"{ts - t0:.0f}/{n}/{up:.1f}" for ts, n, up in s))
            serial = h.ssh(f"cat /var/lib/luo-vm/{VM}.serial", timeout=120).stdout
            path = os.path.join(t.log_dir, f"{t.name}-{t.stamp}-guest-{name}.serial")
            with open(path, "w") as f:
                f.write(serial)
            for line in [x for x in serial.splitlines() if "GUEST: tick" not in x][-40:]:
                t.info(f"host {name}: guest (late): {line}")
        if tail > 20:
            for line in stall_report(h, VM)[1].splitlines():
                t.info(f"host {name}: stalled: {line}")
