"""qemu_two_vms_two_updates: two unmodified QEMU VMs (luo-qemu@a, luo-qemu@b,
each with a virtio disk; consoles on the host's ttyS1 and ttyS2) through two
consecutive live updates of the host (prepare, freeze, orderly `systemctl
kexec`, finish).

After each update, for each VM: the launcher restored it, the guest's boot
id is unchanged, its counter goes on by one from the last tick before the
pause, its uptime continues, its tmpfs and disk files read back identical
and no disk write was lost (qemuvm.expect_continues); luoctl finish, the
launchers register the VMs again and the second update takes them the same
way. The host logs liveupdate number 1, then 2; live_updates is 2.
"""

import luodhost
from qemuvm import define_vm, describe, expect_continues, last_tick_paused, start_vms, wait_launcher, with_vm_host

TIMEOUT = 2400
VMS = ("a", "b")


def run(t):
    with_vm_host(t, VMS, lambda h, cons, qemu_version: _run(t, h, cons, qemu_version))


def _run(t, h, cons, qemu_version):
    t.info(f"host: {h.last_boot['release']}, {qemu_version}")
    for i, vm in enumerate(VMS):
        define_vm(h, vm, f"ttyS{i + 1}", disk=True)
    first = start_vms(t, h, cons)
    t.expect(first["a"]["boot"] != first["b"]["boot"], "both consoles show the same guest")
    for update in (1, 2):
        last = {}

        def after_freeze():
            for vm in VMS:
                wait_launcher(t, h, vm, "checkpointed", 60)
            last.update(last_tick_paused(t, cons))

        k, _ = luodhost.cycle(t, h, before_reboot=after_freeze)
        n = h.wait_serial(r"liveupdate number: (\d+)", timeout=10, since=k["mark"])
        t.expect(n.group(1) == str(update), f"the new kernel logged {n.group(0)!r} after update {update}")
        for vm in VMS:
            wait_launcher(t, h, vm, "restored", 300)
            nxt = expect_continues(t, cons[vm], first[vm], last[vm])
            t.info(f"update {update}, VM {vm}: " + describe(first[vm], last[vm], nxt))
            t.measure(f"update {update}, VM {vm} blackout", nxt["ts"] - last[vm]["ts"])
        h.check("luoctl finish", timeout=300)
        for vm in VMS:
            wait_launcher(t, h, vm, f"VM {vm} registered with luod", 120)
        st = luodhost.status(h)
        t.expect(st["state"] == "normal" and st["live_updates"] == update,
                 f"after update {update}: {st['state']}, live_updates {st['live_updates']}")
    vms = h.check("luoctl vm list")
    t.expect(all(vm in vms for vm in VMS) and vms.count("registered") == 2, f"luoctl vm list: {vms}")
    t.info("two updates: both guests kept their boot ids, counters, uptimes, tmpfs and disk files; live_updates 2")
    h.shutdown()
