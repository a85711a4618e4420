"""qemu_vm_relaunch_failure: the relaunch of a QEMU VM fails in the new
kernel (its disk image is missing); the VM is reported, its RAM and device
state stay preserved by luod, and once the image is back a retry restores
the same guest.

luo-qemu@db has a virtio disk (/var/lib/luo-vm/db.img). prepare, freeze;
before the kexec the image is renamed away (the old QEMU keeps its open
file). In the new kernel systemd starts luo-qemu@db: its dry run (QEMU
with this configuration and `-incoming defer` on an empty memfd, before
anything is claimed) fails on the missing image; the launcher exits 3,
which the unit does not restart (RestartPreventExitStatus=3).

Asserts: the launcher's journal says "relaunch failed" with QEMU's own
message naming the image, and that RAM and state stay preserved; the unit
is failed with status 3; `luoctl vm list` shows db awaiting-claim; its
session vm-db still holds the guest RAM (128 MiB) and state (4 MiB)
memfds, not retrieved; `luoctl finish` refuses (exit 11) naming db, and
luod stays `updated`. `systemctl reload` (SIGHUP, for a launcher that
failed after its claim and still holds the VM) does not apply: the
launcher is not running. The image is renamed back and `systemctl restart
luo-qemu@db` restores the VM: same guest boot id, counter on by one, tmpfs
and disk files identical, no disk write lost; then finish succeeds.
"""

import luodhost
from qemuvm import (define_vm, describe, disk_path, expect_continues, last_tick_paused, launcher_log, start_vm,
                    wait_launcher, with_vm_host)

TIMEOUT = 1500
VM = "db"


def run(t):
    with_vm_host(t, [VM], lambda h, cons, qemu_version: _run(t, h, cons[VM], qemu_version))


def vm_session(h):
    st = h.json("luoctl --json session list")
    return next((s for s in st["sessions"] if s["name"] == f"vm-{VM}"), None)


def _run(t, h, console, qemu_version):
    t.info(f"host: {h.last_boot['release']}, {qemu_version}")
    define_vm(h, VM, "ttyS1", disk=True)
    first = start_vm(t, h, VM, console)
    image, away = disk_path(VM), disk_path(VM) + ".away"
    mark = {}

    def before_reboot():
        wait_launcher(t, h, VM, "checkpointed", 60)
        mark["last"] = last_tick_paused(t, {VM: console})[VM]
        h.check(f"mv {image} {away}")

    luodhost.cycle(t, h, before_reboot=before_reboot)
    last = mark["last"]
    failed = wait_launcher(t, h, VM, "relaunch failed", 300)
    for want in (f"VM {VM}: relaunch failed: QEMU exited (exit status: 1); QEMU said: ", image,
                 "its RAM and state stay preserved by luod"):
        t.expect(want in failed, f"the launcher's report lacks {want!r}: {failed}")
    t.info(f"launcher: {failed}")
    u = luodhost.unit(h, f"luo-qemu@{VM}.service", "ActiveState", "ExecMainStatus", "NRestarts")
    t.expect(u["ActiveState"] == "failed" and u["ExecMainStatus"] == "3" and u["NRestarts"] == "0",
             f"luo-qemu@{VM} after the failed relaunch: {u}")
    vms = h.json("luoctl --json vm list")["vms"]
    t.expect([(v["name"], v["phase"]) for v in vms] == [(VM, "awaiting-claim")], f"luoctl vm list: {vms}")
    s = vm_session(h)
    files = sorted((f["token"], f["size"], f["retrieved"]) for f in (s or {}).get("files", []))
    t.expect(files == [(1, 128 << 20, False), (2, 4 << 20, False)], f"session vm-{VM} in luod: {s}")
    fin = h.ssh("luoctl finish", timeout=120)
    want = f"1 VM(s) of the update were not restored: {VM}"
    t.expect(fin.rc == 11 and want in fin.stderr, f"luoctl finish exited {fin.rc}: {fin.stderr}")
    t.expect(luodhost.status(h)["state"] == "updated", "luod left updated after the refused finish")
    t.info(f"reported: unit failed (status 3), vm list: {VM} awaiting-claim, session vm-{VM}: RAM 128 MiB and "
           f"state 4 MiB kept; luoctl finish (exit 11): {fin.stderr.strip()}")
    reload = h.ssh(f"systemctl reload luo-qemu@{VM}")
    t.expect(reload.rc != 0, f"systemctl reload of the stopped launcher succeeded: {reload.stdout}")

    h.check(f"mv {away} {image}")
    h.check(f"systemctl restart luo-qemu@{VM}", timeout=120)
    restored = wait_launcher(t, h, VM, "restored", 300)
    nxt = expect_continues(t, console, first, last)
    t.info(f"after the image came back, systemctl restart: {restored}")
    t.info("guest: " + describe(first, last, nxt))
    h.check("luoctl finish", timeout=300)
    wait_launcher(t, h, VM, f"VM {VM} registered with luod", 120)
    st = luodhost.status(h)
    t.expect(st["state"] == "normal" and st["live_updates"] == 1, f"after finish: {st['state']}, {st['live_updates']}")
    t.expect("relaunch failed after the claim" not in launcher_log(h, VM), "the launcher failed after its claim")
    h.shutdown()
