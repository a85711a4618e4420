"""Report of the bench_vm_scale scenario (called from scenarios.py's
bench_report): the freeze with 8 VMs against the freeze with 1, measured in
one QEMU run (issue 8: VMs are called in parallel; target 8/1 <= 1.10)."""

import statistics


def _series(bench, key):
    """Values of KEY@ROUND, in round order."""
    out = []
    for k, v in bench.items():
        name, _, r = k.partition("@")
        if name == key and r.isdigit():
            out.append((int(r), v))
    return [v for _, v in sorted(out)]


def _fmt(xs, scale=1.0, digits=1):
    return " ".join(f"{x * scale:.{digits}f}" for x in xs)


def report(res, pairs):
    counts = sorted({int(k.split("@")[0].rsplit("_", 1)[1]) for k in res.bench if k.startswith("freeze_ns_")})
    if len(counts) < 2:
        return ["not enough rounds for the freeze with 1 and with 8 VMs"]
    one, many = counts[0], counts[-1]
    lines = []
    med = {}
    for n in (one, many):
        own = [v / 1e6 for v in _series(res.bench, f"freeze_ns_{n}")]
        host = [t1 - t0 for t0, t1, _ in pairs(res.marks, f"freeze-{n}", f"frozen-{n}")]
        vm = _series(res.bench, f"vm_blackout_ms_{n}")
        med[n] = (statistics.median(own), statistics.median(host) * 1e3 if host else float("nan"),
                  statistics.median(vm) if vm else float("nan"))
        lines.append(f"{n} VM(s): freeze (luod's own), ms: {_fmt(own)}; median {med[n][0]:.1f}; "
                     f"luoctl freeze (host), ms: {_fmt(host, 1e3, 0)}; worst VM's blackout through freeze and "
                     f"cancel (VMM), ms: {_fmt(vm)}; median {med[n][2]:.1f}")
    lines.append(f"RATIO freeze {many} VMs/{one} VM = {med[many][0] / med[one][0]:.3f} (luod's own, medians; "
                 f"target <= 1.10); luoctl freeze on the host {med[many][1] / med[one][1]:.3f}; worst VM blackout "
                 f"through freeze and cancel {med[many][2] / med[one][2]:.3f}")
    return lines
