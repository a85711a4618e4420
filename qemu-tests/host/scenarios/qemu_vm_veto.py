"""qemu_vm_veto: a QEMU VM that cannot be checkpointed vetoes `luoctl
prepare` with QEMU's own reason, and nothing pauses.

The VM (luo-qemu@shm) has an ivshmem-plain device on a shared memory
backend (/dev/shm/luo-veto, share=on: the launcher's shared-memory check
passes). ivshmem in peer mode registers a migration blocker for every
migration mode, cpr-reboot included; the launcher's prepare answer asks
QEMU (query-migrate's blocked-reasons in cpr-reboot mode) and vetoes with
QEMU's text.

Asserts: luoctl prepare exits 13 (vetoed) naming the VM and QEMU's reason
("Migration is disabled when using feature 'peer mode' in device
'ivshmem'"); luod stays normal (STATUS=, status --json, its sessions
unchanged), the VM stays registered, and the guest never stops: its
counter goes on without a gap across the prepare.
"""

import luodhost
from qemuvm import define_vm, launcher_log, start_vm, with_vm_host

TIMEOUT = 1200
VM = "shm"
REASON = "Migration is disabled when using feature 'peer mode' in device 'ivshmem'"


def run(t):
    with_vm_host(t, [VM], lambda h, cons, qemu_version: _run(t, h, cons[VM], qemu_version))


def _run(t, h, console, qemu_version):
    t.info(f"host: {h.last_boot['release']}, {qemu_version}")
    define_vm(h, VM, "ttyS1", extra_args=[
        "-object", "memory-backend-file,id=shm0,size=1M,mem-path=/dev/shm/luo-veto,share=on",
        "-device", "ivshmem-plain,memdev=shm0"])
    start_vm(t, h, VM, console)
    before = luodhost.status(h)
    start = console.ticks()[-1]
    r = h.ssh("luoctl prepare --kernel /boot/vmlinuz-luo --reuse-cmdline", timeout=300)
    t.expect(r.rc == 13, f"luoctl prepare exited {r.rc}, want 13 (vetoed): {r.stdout} {r.stderr}")
    want = f"vetoed: VM {VM}: QEMU cannot checkpoint it: {REASON}"
    t.expect(want in r.stderr, f"luoctl prepare's message lacks {want!r}: {r.stderr}")
    t.info(f"luoctl prepare (exit 13): {r.stderr.strip()}")
    st = luodhost.status(h)
    t.expect(st["state"] == "normal", f"after the veto luod is {st['state']}")
    t.expect(st["sessions"] == before["sessions"], f"sessions changed: {before['sessions']} -> {st['sessions']}")
    t.expect(luodhost.unit(h, "luod.service", "StatusText")["StatusText"] == "state normal", "STATUS= after the veto")
    vms = h.check("luoctl vm list")
    t.expect(VM in vms and "registered" in vms, f"luoctl vm list after the veto: {vms}")
    # Nothing paused: the counter went on, tick after tick, with no gap.
    end = console.wait_tick(t, console.ticks()[-1]["n"] + 5, 60)
    ticks = [k for k in console.ticks() if start["n"] <= k["n"] <= end["n"]]
    t.expect([k["n"] for k in ticks] == list(range(start["n"], end["n"] + 1)), "ticks missing across the prepare")
    gap = max(b["ts"] - a["ts"] for a, b in zip(ticks, ticks[1:]))
    t.expect(gap < 2.0, f"the guest stopped for {gap:.1f} s across the prepare")
    t.expect(all(k["boot"] == start["boot"] for k in ticks), "the guest rebooted")
    log = launcher_log(h, VM)
    t.expect("checkpointed" not in log and "resumed" not in log, f"the launcher paused the VM:\n{log[-1500:]}")
    t.info(f"nothing paused: guest ticks n={start['n']}..{end['n']} across the prepare, longest gap {gap:.2f} s; "
           "luod normal, sessions unchanged, VM registered")
    h.shutdown()
