"""qemu_vm_freeze_failure: one of two QEMU VMs dies during `luoctl freeze`;
the freeze fails with that QEMU's fate, the other VM resumes, luod stays
`prepared`.

Two VMs (luo-qemu@a, luo-qemu@b; consoles ttyS1, ttyS2). After `luoctl
prepare`, b's QEMU is stopped with SIGSTOP: it no longer answers QMP, so
the freeze cannot complete while it is stopped. `luoctl freeze` runs in
the background; luod calls both launchers at once: a's checkpoint
completes, b's launcher waits on its QMP command to the stopped QEMU. The
scenario checks that the freeze is still running 3 s later (it takes well
under a second otherwise) and that a was checkpointed, and only then kills
b's QEMU (SIGKILL): the kill lands inside the freeze call by construction,
not by timing luck. b's launcher sees its QMP socket close and QEMU gone
and fails the freeze with "QEMU exited (signal: 9 (SIGKILL))".

Asserts: luoctl freeze exits non-zero naming VM b and QEMU's exit; luod is
`prepared` (status --json and STATUS=); a's launcher logged its checkpoint
and "resumed after unfreeze", and a's guest ticks again (same boot id,
counter on by one from its last tick before the pause); `luoctl cancel`
brings luod back to normal with a still running.
"""

import time

import luodhost
from qemuvm import (consoles, define_vm, expect_continues, install_launcher, last_tick_paused, qemu_pid, start_vms,
                    wait_launcher)

TIMEOUT = 1500
VMS = ("a", "b")


def run(t):
    deb = luodhost.build_deb(t)
    cons, qemu_args = consoles(t, list(VMS))
    try:
        _run(t, deb, cons, qemu_args)
    finally:
        for c in cons.values():
            c.stop()


def _run(t, deb, cons, qemu_args):
    h = luodhost.boot_with_luod(t, deb, qemu_args=qemu_args)
    qemu_version = install_launcher(t, h)
    t.info(f"host: {h.last_boot['release']}, {qemu_version}")
    for i, vm in enumerate(VMS):
        define_vm(h, vm, f"ttyS{i + 1}")
    first = start_vms(t, h, cons)
    pid_b = qemu_pid(t, h, "b")
    h.check("luoctl prepare --kernel /boot/vmlinuz-luo --reuse-cmdline", timeout=300)
    h.check(f"kill -STOP {pid_b}")
    h.check("rm -f /root/freeze.*; (luoctl freeze > /root/freeze.out 2> /root/freeze.err; echo $? > /root/freeze.rc) "
            "< /dev/null > /dev/null 2>&1 &")
    cp = wait_launcher(t, h, "a", "checkpointed", 60)
    last = last_tick_paused(t, {"a": cons["a"]})["a"]
    time.sleep(2.0)
    t.expect(h.ssh("test -e /root/freeze.rc").rc != 0,
             f"luoctl freeze ended while b's QEMU was stopped: {h.ssh('cat /root/freeze.rc /root/freeze.err').stdout}")
    t.expect(luodhost.status(h)["state"] == "prepared", "luod left prepared during the freeze")
    h.check(f"kill -KILL {pid_b}")
    deadline = time.monotonic() + 120
    while h.ssh("test -e /root/freeze.rc").rc != 0:
        t.expect(time.monotonic() < deadline, "luoctl freeze did not end within 120 s of the kill")
        time.sleep(0.5)
    rc = int(h.check("cat /root/freeze.rc").strip())
    err = h.check("cat /root/freeze.err")
    t.expect(rc != 0, f"luoctl freeze succeeded with b's QEMU killed: {h.check('cat /root/freeze.out')}")
    want = "VM b: freeze failed: QEMU exited (signal: 9 (SIGKILL))"
    t.expect(want in err, f"luoctl freeze's message lacks {want!r}: {err}")
    t.info(f"luoctl freeze (exit {rc}): {err.strip()}")
    st = luodhost.status(h)
    t.expect(st["state"] == "prepared", f"after the failed freeze luod is {st['state']}")
    t.expect(luodhost.unit(h, "luod.service", "StatusText")["StatusText"] == "state prepared", "STATUS= after freeze")
    wait_launcher(t, h, "a", "VM a resumed after unfreeze", 60)
    nxt = expect_continues(t, cons["a"], first["a"], last, disk=False)
    t.info(f"VM a: {cp}; resumed after unfreeze: tick n={last['n']} -> n={nxt['n']}, boot id unchanged, "
           f"paused {nxt['ts'] - last['ts']:.1f} s")
    h.check("luoctl cancel", timeout=120)
    t.expect(luodhost.status(h)["state"] == "normal", "luoctl cancel did not bring luod back to normal")
    cons["a"].wait_tick(t, nxt["n"] + 5, 60)
    gone = wait_launcher(t, h, "b", "VM b: QEMU exited (signal: 9 (SIGKILL))", 60)
    t.info(f"luoctl cancel: normal; VM a still ticking; b's launcher: {gone}")
    h.shutdown()
