"""qemu_vm_freeze_failure: one of two QEMU VMs dies during `luoctl freeze`;
the freeze fails with that QEMU's fate, the other VM resumes, luod stays
`prepared`.

Two VMs (luo-qemu@a, luo-qemu@b; consoles ttyS1, ttyS2). After `luoctl
prepare`, one script in the host does: SIGSTOP b's QEMU (it no longer
answers QMP, so no freeze can complete while it is stopped), start `luoctl
freeze` in the background (luod calls both launchers at once: a's
checkpoint completes, b's launcher waits on its QMP command to the stopped
QEMU), 1.5 s later check that the freeze is still running (`kill -0`),
then SIGKILL b's QEMU and wait for the freeze. The kill lands inside the
freeze call by construction, not by timing luck, and well within luod's
--vm-timeout (5 s): b's launcher sees its QMP socket close and QEMU gone,
and fails the freeze with "QEMU exited (signal: 9 (SIGKILL))".

Asserts: the freeze was running when b's QEMU was killed; luoctl freeze
exits non-zero naming VM b and QEMU's exit; luod is `prepared` (status
--json and STATUS=); a's launcher logged its checkpoint and "resumed after
unfreeze", and a's guest went on across it (every counter value once,
same boot id and tmpfs file, ticking again); `luoctl cancel` brings luod
back to normal, a still ticking, and b's launcher reports its QEMU killed.
"""

import luodhost
from qemuvm import define_vm, qemu_pid, start_vms, wait_launcher, with_vm_host

TIMEOUT = 1500
VMS = ("a", "b")


def run(t):
    with_vm_host(t, VMS, lambda h, cons, qemu_version: _run(t, h, cons, qemu_version))


def _run(t, h, cons, qemu_version):
    t.info(f"host: {h.last_boot['release']}, {qemu_version}")
    for i, vm in enumerate(VMS):
        define_vm(h, vm, f"ttyS{i + 1}")
    first = start_vms(t, h, cons)
    pid_b = qemu_pid(t, h, "b")
    before = cons["a"].ticks()[-1]
    h.check("luoctl prepare --kernel /boot/vmlinuz-luo --reuse-cmdline", timeout=300)
    h.check(f"kill -STOP {pid_b}; luoctl freeze > /root/freeze.out 2> /root/freeze.err & f=$!; sleep 1.5; "
            f"if kill -0 $f; then echo running; else echo ended; fi > /root/freeze.at-kill; kill -KILL {pid_b}; "
            "wait $f; echo $? > /root/freeze.rc", timeout=120)
    at_kill = h.check("cat /root/freeze.at-kill").strip()
    rc = int(h.check("cat /root/freeze.rc").strip())
    err = h.check("cat /root/freeze.err")
    t.expect(at_kill == "running", f"luoctl freeze ended (exit {rc}) before b's QEMU was killed: {err}")
    t.expect(rc != 0, f"luoctl freeze succeeded with b's QEMU killed: {h.check('cat /root/freeze.out')}")
    want = "VM b: freeze failed: QEMU exited (signal: 9 (SIGKILL))"
    t.expect(want in err, f"luoctl freeze's message lacks {want!r}: {err}")
    t.info(f"luoctl freeze (exit {rc}; still running 1.5 s after b's QEMU was stopped, then b's QEMU was killed): "
           f"{err.strip()}")
    st = luodhost.status(h)
    t.expect(st["state"] == "prepared", f"after the failed freeze luod is {st['state']}")
    t.expect(luodhost.unit(h, "luod.service", "StatusText")["StatusText"] == "state prepared", "STATUS= after freeze")
    cp = wait_launcher(t, h, "a", "VM a checkpointed", 60)
    wait_launcher(t, h, "a", "VM a resumed after unfreeze", 60)
    end = cons["a"].wait_tick(t, cons["a"].ticks()[-1]["n"] + 3, 120)
    ticks = [k for k in cons["a"].ticks() if before["n"] <= k["n"] <= end["n"]]
    t.expect([k["n"] for k in ticks] == list(range(before["n"], end["n"] + 1)), "VM a: counter values missing")
    t.expect(all(k["boot"] == first["a"]["boot"] and k["tmpfs"] == first["a"]["tmpfs"] for k in ticks),
             "VM a's guest rebooted or lost its tmpfs file")
    gap = max(y["ts"] - x["ts"] for x, y in zip(ticks, ticks[1:]))
    t.info(f"VM a: {cp}; resumed after unfreeze: ticks n={before['n']}..{end['n']} each once, boot id unchanged, "
           f"longest pause {gap:.1f} s")
    h.check("luoctl cancel", timeout=120)
    t.expect(luodhost.status(h)["state"] == "normal", "luoctl cancel did not bring luod back to normal")
    cons["a"].wait_tick(t, end["n"] + 3, 60)
    gone = wait_launcher(t, h, "b", "VM b: QEMU exited (signal: 9 (SIGKILL))", 60)
    t.info(f"luoctl cancel: normal; VM a still ticking; b's launcher: {gone}")
    h.shutdown()
