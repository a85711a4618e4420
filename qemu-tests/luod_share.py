"""luod's own share of the blackout against a bare kexec (called from
scenarios.py's bench_report for bench_blackout; issue 8 item 6).

luod's share is what luod adds to the blackout around the kexec: the freeze
(before `luoctl freeze` -> it returned) plus luod's start in the new kernel
(the shell starts luod -> `luoctl status` says updated). Both are measured on
the host from the serial markers, per round; the parts come from luod's own
numbers (the freeze's `elapsed_ns`, `luod_started` -> `updated` in the record)
and from luod's log, which `luo-qemu-tool luod-times` prints in ms after the
shell started luod."""

import re
import statistics

STEP = re.compile(r"luod \+([0-9.]+) ms after exec: (.*)")


def _med(xs):
    return statistics.median(xs) if xs else float("nan")


def _by_boot(bench, key):
    """{boot: value} of the bench values KEY@BOOT."""
    out = {}
    for k, v in bench.items():
        name, _, boot = k.partition("@")
        if name == key and boot.isdigit():
            out[int(boot)] = v
    return out


def startup_steps(log_path):
    """Median time after luod's exec of each start-up step luod logged (the
    numbers in a message are masked, so that rounds line up)."""
    steps = {}
    order = []
    try:
        with open(log_path, errors="replace") as f:
            for line in f:
                m = STEP.search(line)
                if not m:
                    continue
                what = re.sub(r"[0-9]+(\.[0-9]+)?", "N", m.group(2)).strip()
                what = re.sub(r" \(.*", "", what)[:70]
                if what not in steps:
                    steps[what] = []
                    order.append(what)
                steps[what].append(float(m.group(1)))
    except OSError:
        return []
    return sorted(((_med(v), k, len(v)) for k, v in steps.items()), key=lambda x: x[0])


def report(res, pairs):
    bare = [t1 - t0 for t0, t1, _ in pairs(res.marks, "bare-kexec", "init-start")]
    rounds = pairs(res.marks, "freeze-start", "updated")
    if not bare or not rounds:
        return ["not enough markers for luod's share of the blackout"]
    freeze, start, share = [], [], []
    for t0, t1, mid in rounds:
        if "frozen" in mid and "luod-exec" in mid:
            freeze.append(mid["frozen"] - t0)
            start.append(t1 - mid["luod-exec"])
            share.append(freeze[-1] + start[-1])
    if not share:
        return ["not enough markers for luod's share of the blackout"]
    med_b = _med(bare)
    own_freeze = [v / 1e6 for v in _by_boot(res.bench, "luod_freeze_ns").values()]
    own_start = [v / 1e6 for v in _by_boot(res.bench, "luod_started_to_updated_ns").values()]
    lines = [
        f"luod's share (freeze + luod exec -> luoctl status says updated, host), s: "
        f"{' '.join(f'{x:.3f}' for x in share)}; median {_med(share):.3f}",
        f"  parts (medians, ms): freeze {_med(freeze) * 1e3:.0f} (host: luoctl freeze run and answered; "
        f"luod's own {_med(own_freeze):.1f}), luod exec -> updated {_med(start) * 1e3:.0f} (host: the shell "
        f"started luod -> its luoctl status poll saw updated; luod's own, process start -> state updated "
        f"{_med(own_start):.1f})",
        f"RATIO luod share/bare kexec = {_med(share) / med_b:.3f} (medians; target <= 0.03); "
        f"luod's own numbers only: {(_med(own_freeze) + _med(own_start)) / 1e3 / med_b:.3f}",
    ]
    steps = startup_steps(res.log) if res.log else []
    if steps:
        lines.append("  luod's start in the new kernel, median ms after the shell started it (luod's log):")
        for ms, what, n in steps:
            lines.append(f"    {ms:7.1f}  {what}")
    return lines
