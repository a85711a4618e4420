"""Report of the bench_vm_blackout scenario (called from scenarios.py's
bench_report): the VM blackout through a live update against a bare kexec
of the same kernel and initramfs, measured in the same QEMU run."""

import statistics


def _fmt(xs):
    return " ".join(f"{x:.3f}" for x in xs)


def report(res, pairs):
    """Lines for the report. `pairs` is scenarios.pairs; `res` a Result with
    marks (name, host seconds, boot) and bench values (vm_tsc_ms@BOOT, ...)."""
    lines = []
    bare = [t1 - t0 for t0, t1, _ in pairs(res.marks, "bare-kexec", "init-start")]
    host = pairs(res.marks, "freeze-start", "vm-resumed")
    tsc = [v / 1e3 for k, v in sorted(res.bench.items(), key=lambda kv: int(kv[0].split("@")[-1]))
           if k.startswith("vm_tsc_ms@")]
    if not bare or not tsc:
        return ["not enough markers for the VM blackout benchmark"]
    med_b, med_v = statistics.median(bare), statistics.median(tsc)
    lines.append(f"bare kexec (reboot(KEXEC) -> next /init, host), s: {_fmt(bare)}; median {med_b:.3f}")
    lines.append(f"VM blackout (guest progress before the pause -> first after the claim, TSC), s: {_fmt(tsc)}; "
                 f"median {med_v:.3f}")
    if host:
        total = [t1 - t0 for t0, t1, _ in host]
        lines.append(f"VM blackout (host: before luoctl freeze -> the claiming VMM sees progress), s: {_fmt(total)}; "
                     f"median {statistics.median(total):.3f}")

        def part(a, b):
            vals = [mid[b] - mid[a] if a in mid and b in mid else None for _, _, mid in host]
            vals = [v for v in vals if v is not None]
            return statistics.median(vals) if vals else float("nan")

        def ends(a, b):
            vals = []
            for t0, t1, mid in host:
                x = t0 if a == "freeze-start" else mid.get(a)
                y = t1 if b == "vm-resumed" else mid.get(b)
                if x is not None and y is not None:
                    vals.append(y - x)
            return statistics.median(vals) if vals else float("nan")

        kexec = ends("reboot-call", "init-start")
        lines.append("VM blackout parts (host, medians, s): "
                     f"freeze + reboot call {ends('freeze-start', 'reboot-call'):.3f}, "
                     f"reboot call -> /init {kexec:.3f}, "
                     f"/init -> luod exec {part('init-start', 'luod-exec'):.3f}, "
                     f"luod exec -> guest progress {ends('luod-exec', 'vm-resumed'):.3f}")
        lines.append(f"the kexec itself with the VM's memory preserved vs bare: {kexec:.3f} / {med_b:.3f} s "
                     f"= {kexec / med_b:.3f}")
        lines.append(f"RATIO VM blackout host-measured/bare = {statistics.median(total) / med_b:.3f} (medians)")
        own = [(t1 - t0) / (mid["init-start"] - mid["reboot-call"]) for t0, t1, mid in host
               if "init-start" in mid and "reboot-call" in mid and mid["init-start"] > mid["reboot-call"]]
        if own:
            lines.append(f"VM blackout (host) over the kexec inside it (reboot call -> /init), per round: "
                         f"{' '.join(f'{x:.2f}' for x in own)}; median {statistics.median(own):.3f} "
                         f"(what luod, the /init and the VMMs add around the kexec, whatever the host load)")
    conn = [v for k, v in res.bench.items() if k.startswith("vm_connect_ms@")]
    first = [v for k, v in res.bench.items() if k.startswith("vm_restore_to_first_progress_ms@")]
    if conn and first:
        lines.append(f"claiming VMM (medians): start -> luod answered the claim {statistics.median(conn):.0f} ms; "
                     f"restored -> first guest progress {statistics.median(first):.0f} ms")
    lines.append(f"minimum: bare {min(bare):.3f} s, VM {min(tsc):.3f} s (ratio of minima {min(tsc) / min(bare):.3f})")
    lines.append(f"RATIO VM blackout/bare kexec = {med_v / med_b:.3f} (medians; VM by TSC, bare on the host; "
                 f"target <= 1.10)")
    return lines
