"""qemu_vm_survives_kexec: an unmodified QEMU VM (the host's Debian QEMU,
`-accel kvm`: nested KVM inside the TCG host) keeps its Linux guest across
the host's kexec.

luod from the .deb under systemd; the launcher `luo-qemu` (the static build
of qemu-tests/run.sh) runs the VM through the template unit
`luo-qemu@web.service` with /etc/luod/vms/web.toml. The guest is Debian's
stock kernel with the launcher tests' busybox initramfs
(qemu-launcher/guest/) and the kernel's virtio_blk module: at boot it
writes 64 KiB of random bytes to its tmpfs and 64 KiB to its virtio disk (a
raw image /var/lib/luo-vm/web.img on the host), and then prints every 100
ms `GUEST: tick n=N boot=B up=U tmpfs=MD5 disk=MD5 dn=K` (the disk file
read back from the disk on every tick, and the counter the previous tick
wrote to the disk). Its console is the host's second serial port (ttyS1), a file on
this machine (qemuvm.Console: the VM blackout is measured here, across the
host's kexec); QEMU also logs it to /var/lib/luo-vm/web.serial in the host.

luoctl prepare/freeze/reboot (orderly `systemctl kexec`); in the new kernel
systemd starts luo-qemu@web, which claims the VM from luod and restores it.
Asserts: the guest's boot id is unchanged, the first tick after is the
counter's next value, the uptime goes on from where it stopped (no reset),
the tmpfs file's MD5 and the disk file's MD5 (read from the disk the new
QEMU opened) are the same, the first tick after reads from the disk the
counter the last tick before wrote (QEMU drained and flushed the disk at
the checkpoint), no tick from another guest boot; the host
runs the new kernel (a new boot id, "liveupdate number: 1"); luoctl finish,
and the launcher registers the VM again.
"""

import re

import luodhost
from qemuvm import define_vm, describe, expect_continues, field, last_tick_paused, start_vm, wait_launcher, with_vm_host

TIMEOUT = 1800
VM = "web"


def run(t):
    with_vm_host(t, [VM], lambda h, cons, qemu_version: _run(t, h, cons[VM], qemu_version))


def _run(t, h, console, qemu_version):
    uart = h.ssh("cat /sys/class/tty/ttyS1/port /sys/class/tty/ttyS1/type")
    t.expect(uart.rc == 0 and uart.stdout.split()[-1] != "0",
             f"the host's ttyS1 (the guest's console) is missing: {uart.stdout} {uart.stderr}")
    t.info(f"host: {h.last_boot['release']}, {qemu_version}, /dev/kvm present")
    define_vm(h, VM, "ttyS1", disk=True)
    first = start_vm(t, h, VM, console)
    t.expect(first["disk"] is not None, f"the guest has no virtio disk: {console.tail(5)}")
    image = h.check(f"head -c 65536 /var/lib/luo-vm/{VM}.img | md5sum").split()[0]
    t.expect(image == first["disk"], f"the host's image holds {image}, the guest wrote {first['disk']}")
    vms = h.check("luoctl vm list")
    t.expect(VM in vms and "registered" in vms, f"luoctl vm list: {vms}")
    t.info(f"guest (stock kernel, -accel kvm) ticking: boot id {first['boot']}, tmpfs md5 {first['tmpfs']}, "
           f"disk md5 {first['disk']} (the host's image agrees)")

    old_boot = h.boot_id()
    mark = {}

    def after_freeze():
        cp = wait_launcher(t, h, VM, "checkpointed", 60)
        t.expect("was_running=true" in cp, f"checkpoint: {cp}")
        mark["cp"], mark["last"] = cp, last_tick_paused(t, {VM: console})[VM]

    k, reply = luodhost.cycle(t, h, before_reboot=after_freeze)
    last = mark["last"]
    t.expect(k["boot_id"] != old_boot, "the host's boot id did not change")
    n = h.wait_serial(r"liveupdate number: (\d+)", timeout=10, since=k["mark"])
    t.expect(n.group(1) == "1", f"the new kernel logged {n.group(0)!r}, expected liveupdate number: 1")
    restored = wait_launcher(t, h, VM, "restored", 300)
    nxt = expect_continues(t, console, first, last)
    # The host's own copy of the console (QEMU's chardev logfile) agrees.
    hostlog = h.check(f"grep -c 'boot={first['boot']}' /var/lib/luo-vm/{VM}.serial; "
                      f"grep -c 'GUEST: ready' /var/lib/luo-vm/{VM}.serial")
    t.expect(hostlog.split()[1] == "1", f"the guest booted more than once per the host's log: {hostlog}")

    blackout = nxt["ts"] - last["ts"]
    t.info("guest: " + describe(first, last, nxt))
    t.info(f"host: boot id {old_boot} -> {k['boot_id']}, {k['release']}, {n.group(0)}")
    t.measure("VM blackout (last tick before the pause -> first tick after)", blackout)
    rel = h.check(f"journalctl -b -u luo-qemu@{VM} -o short-monotonic | grep -m1 ' restored'")
    at = re.match(r"\[\s*([\d.]+)\]", rel)
    parts = [f"checkpoint {field(mark['cp'], 'checkpoint_ms')} ms",
             f"luoctl reboot -> host multi-user {k['up']:.1f} s",
             f"launcher restored at {at.group(1) if at else '?'} s of the new kernel's uptime",
             f"QEMU relaunch {field(restored, 'relaunch_ms')} ms", f"state load {field(restored, 'load_ms')} ms"]
    t.info("parts: " + ", ".join(parts))
    t.info(f"launcher: {mark['cp']}")
    t.info(f"launcher: {restored}")

    h.check("luoctl finish", timeout=300)
    wait_launcher(t, h, VM, f"VM {VM} registered with luod", 120)
    st = luodhost.status(h)
    t.expect(st["state"] == "normal" and st["live_updates"] == 1, f"after finish: {st['state']}, {st['live_updates']}")
    t.info("luoctl finish: normal, live_updates 1; the launcher registered the VM again")
    h.shutdown()
