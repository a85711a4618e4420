"""Report of the bench_vm_fanout scenario (called from scenarios.py's
bench_report; issue 8 item 2): the VM blackout through a live update with 8
VMs against with 1, rounds alternating in one QEMU run.

Bench values: vms@B (VMs kernel B served), vm_tsc_ms@B.I (the blackout of VM
I of kernel B, TSC, measured by its claiming VMM in kernel B+1),
vm_connect_ms@B.I, luod_freeze_ns@B (luod's own freeze time). Marks:
freeze-start, frozen, reboot-call, init-start, luod-exec, vms-resumed (all
claims returned)."""

import statistics


def _med(xs):
    return statistics.median(xs) if xs else float("nan")


def _fmt(xs, unit_ms=True):
    return " ".join(f"{x:.0f}" if unit_ms else f"{x:.3f}" for x in xs)


def report(res, pairs):
    counts = {int(k.split("@")[1]): int(v) for k, v in res.bench.items() if k.startswith("vms@")}
    per_round = {}  # boot -> [tsc ms of each VM]
    connect = {}
    for k, v in res.bench.items():
        name, _, where = k.partition("@")
        boot, _, _ = where.partition(".")
        if not boot.isdigit():
            continue
        if name == "vm_tsc_ms":
            per_round.setdefault(int(boot), []).append(v)
        elif name == "vm_connect_ms":
            connect.setdefault(int(boot), []).append(v)
    freeze_own = {int(k.split("@")[1]): v / 1e6 for k, v in res.bench.items() if k.startswith("luod_freeze_ns@")}
    # Host-measured parts, per round in boot order (one freeze-start per round).
    rounds = pairs(res.marks, "freeze-start", "vms-resumed")
    boots = sorted(b for b in per_round if b in counts)
    if not boots:
        return ["not enough numbers for the VM fan-out benchmark"]
    host = dict(zip(sorted(counts), rounds))
    lines = []
    by_n = {}
    for b in boots:
        n = counts[b]
        vms = per_round[b]
        row = {"worst": max(vms), "median": _med(vms), "freeze_own": freeze_own.get(b, float("nan")),
               "connect": _med(connect.get(b, []))}
        if b in host:
            t0, t1, mid = host[b]
            row["freeze_host"] = (mid["frozen"] - t0) * 1e3 if "frozen" in mid else float("nan")
            row["kexec"] = (mid["init-start"] - mid["reboot-call"]) * 1e3 if "init-start" in mid and "reboot-call" in mid else float("nan")
            row["claims"] = (t1 - mid["luod-exec"]) * 1e3 if "luod-exec" in mid else float("nan")
            # What the update adds to the kexec (the guest's clock follows the host's under TCG).
            row["beyond"] = max(vms) - row["kexec"]
        by_n.setdefault(n, []).append(row)
        lines.append(f"kernel {b}: {n} VM(s), blackout (TSC) per VM, ms: {_fmt(sorted(vms))}; worst {max(vms):.0f}")
    if 1 not in by_n or len(by_n) < 2:
        return lines + ["not enough rounds of both kinds for the VM fan-out ratio"]
    many = max(by_n)

    def med(n, key):
        return _med([r[key] for r in by_n[n] if key in r and r[key] == r[key]])

    for n in (1, many):
        lines.append(
            f"{n} VM(s), medians over {len(by_n[n])} rounds, ms: worst VM {med(n, 'worst'):.0f}, median VM "
            f"{med(n, 'median'):.0f}; parts: freeze (host: luoctl freeze run and answered) {med(n, 'freeze_host'):.0f} "
            f"(luod's own {med(n, 'freeze_own'):.1f}), luoctl reboot -> new /init {med(n, 'kexec'):.0f}, luod exec -> "
            f"every claim returned {med(n, 'claims'):.0f} (claiming VMM connect -> luod answered, median {med(n, 'connect'):.0f}; each claim runs its guest 1 s)")
    lines.append(f"beyond the kexec (worst VM's blackout - luoctl reboot -> new /init), medians, ms: 1 VM "
                 f"{med(1, 'beyond'):.0f}, {many} VMs {med(many, 'beyond'):.0f} (ratio "
                 f"{med(many, 'beyond') / med(1, 'beyond'):.3f})")
    lines.append(f"RATIO VM blackout {many} VMs/1 VM = {med(many, 'worst') / med(1, 'worst'):.3f} (worst VM of each round, "
                 f"medians; target <= 1.10); median VM: {med(many, 'median') / med(1, 'median'):.3f}; luod's freeze "
                 f"alone (its own clock): {med(many, 'freeze_own') / med(1, 'freeze_own'):.3f}")
    return lines
