"""diag_guest_clock: two hosts, one VM each (the fleet's guest, console in a
file on its host); host b live-updates once, host a never does; then both
guests are watched for WATCH_S seconds, every 5 s: their last tick and
uptime against this machine's clock. Prints the guest clock's rate (guest
seconds per real second) per host and every gap of more than 20 s without
a new tick. A diagnosis of the fleet's stalled guests, in no group."""

import os
import threading
import time

import luodhost
from qemuvm import TICK, define_vm, install_launcher, stall_report, wait_launcher

DIAG = True
CPUS = 2
TIMEOUT = 2400
WATCH_S = float(os.environ.get("LUO_DIAG_WATCH_S", "720"))
VM = "web"


def last_tick(h):
    out = h.ssh(f"tail -n 3 /var/lib/luo-vm/{VM}.serial", timeout=60).stdout
    ticks = [m for m in map(TICK.search, out.splitlines()) if m]
    return (int(ticks[-1].group(1)), float(ticks[-1].group(3))) if ticks else None


def setup(t, deb, name, out):
    h = luodhost.boot_with_luod(t, deb, name=name, mem=1536)
    install_launcher(t, h)
    define_vm(h, VM, None, append="loglevel=7")
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

    ths = [threading.Thread(target=one, args=(n,)) for n in ("a", "b")]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    t.expect(not errors, "; ".join(errors))
    series = {"a": [], "b": []}
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
        hb = hosts["b"]
        k, _ = luodhost.cycle(t, hb)
        wait_launcher(t, hb, VM, "restored", 300)
        hb.check("luoctl finish", timeout=300)
        t.log(f"b: live update done ({k['release']})")
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
        # Rate over the last half of the watch (after b's update).
        half = [x for x in s if x[0] >= s[-1][0] - WATCH_S / 2]
        rate = (half[-1][2] - half[0][2]) / (half[-1][0] - half[0][0]) if len(half) > 1 else float("nan")
        t.info(f"host {name}: {len(s)} samples, guest uptime {s[0][2]:.0f} -> {s[-1][2]:.0f} s, n {s[0][1]} -> "
               f"{s[-1][1]}; guest seconds per real second over the last {WATCH_S / 2:.0f} s: {rate:.3f}; "
               f"gaps: {'; '.join(gaps) or 'none'}")
        clk = h.ssh(f"grep -a -i -E 'clocksource|tsc|kvm-clock|hpet|timer' /var/lib/luo-vm/{VM}.serial | head -30").stdout
        for line in clk.splitlines():
            t.info(f"host {name}: guest: {line}")
        host_clk = h.ssh("dmesg | grep -i -E 'tsc|clocksource|kvm' | tail -8").stdout
        for line in host_clk.splitlines():
            t.info(f"host {name}: host: {line}")
        if tail > 20:
            for line in stall_report(h, VM)[1].splitlines():
                t.info(f"host {name}: stalled: {line}")
