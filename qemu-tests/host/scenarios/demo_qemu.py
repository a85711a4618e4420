"""demo_qemu: the demo (scripts/demo.sh): an unmodified QEMU VM with a Linux
guest keeps running across its host's live update, told as it happens, with
a summary of the guest's own evidence at the end.

The host is the Debian sid image under QEMU (TCG; systemd 262, luod from the
project's .deb); the VM is the host's Debian QEMU (`-accel kvm`, nested)
with Debian's stock kernel and the launcher tests' busybox initramfs, run by
`luo-qemu@web.service`. The guest writes 64 KiB of random bytes to its tmpfs
at boot and prints `GUEST: tick n=N boot=B up=U tmpfs=MD5` every 100 ms on
the host's ttyS1, a file on this machine (stamped here, across the host's
kexec). Beside the VM, a non-root client service (user `vmm`, group `luod`)
hands luod three memfds (1 MiB, 4 KiB, 777 bytes: a workload's cache) and
takes them back after the update.

luoctl prepare, freeze (QEMU's cpr-reboot checkpoint), reboot (an orderly
`systemctl kexec` into the LUO kernel); systemd starts luo-qemu@web in the
new kernel, which claims the VM and relaunches QEMU on the preserved RAM;
luoctl finish. The scenario fails unless the guest's boot id is unchanged,
its counter goes on by one, its uptime goes on, its tmpfs MD5 is the same,
the client's memfds come back byte-identical and the host runs a new boot.
"""

import re
import time

import luodhost
from qemuvm import consoles, define_vm, field, install_launcher, start_vm, ticks_since, wait_launcher

DEMO = True
TIMEOUT = 1800
VM = "web"


def run(t):
    t.demo("building the .deb (luod, luoctl) and booting the Debian host (QEMU TCG, 1 vCPU, 2 GiB)")
    deb = luodhost.build_deb(t)
    cons, qemu_args = consoles(t, [VM])
    try:
        _run(t, deb, cons[VM], qemu_args)
    finally:
        cons[VM].stop()


def _run(t, deb, console, qemu_args):
    t0 = time.monotonic()
    h = luodhost.boot_with_luod(t, deb, qemu_args=qemu_args)
    old_boot = h.boot_id()
    old_release = h.last_boot["release"]
    systemd = h.check("systemctl --version").split("\n")[0]
    t.demo(f"host up in {time.monotonic() - t0:.0f} s: kernel {old_release}, boot id {old_boot}, {systemd}; "
           f"luod.service active (installed from {deb.rsplit('/', 1)[-1]})")
    digests = luodhost.preserve(t, h)  # first: it expects luod to hold the client's sessions only
    t.demo("client service (user vmm) handed luod 3 memfds in 2 sessions (1 MiB, 4 KiB, 777 bytes)")
    qemu_version = install_launcher(t, h)
    define_vm(h, VM, "ttyS1")
    t.demo(f"starting VM {VM}: luo-qemu@{VM}.service runs {qemu_version} (-accel kvm, 128 MiB of guest RAM "
           "in a memfd registered with luod)")
    first = start_vm(t, h, VM, console)
    t.demo(f"guest ticking: n={first['n']} boot id {first['boot']} up={first['up']} s tmpfs md5 {first['tmpfs']}")

    h.check("luoctl prepare --kernel /boot/vmlinuz-luo --reuse-cmdline", timeout=300)
    t.demo("luoctl prepare: /boot/vmlinuz-luo loaded; luod asked the launcher whether QEMU can be checkpointed: yes")
    st = luodhost.status(h)  # what crosses the kexec
    crossing = [f["size"] for ses in st["sessions"] for f in ses["files"]]
    h.check("luoctl freeze", timeout=300)
    cp = wait_launcher(t, h, VM, "checkpointed", 60)
    last = console.ticks()[-1]
    t.demo(f"luoctl freeze: QEMU checkpointed the VM (cpr-reboot, {field(cp, 'checkpoint_ms')} ms, "
           f"{field(cp, 'state_bytes') / 1e3:.0f} KB of device state; guest RAM stays in its memfd); "
           f"last tick n={last['n']}")
    t.demo("luoctl reboot: luod hands its record and the VM's memfds to the kernel's LUO; systemctl kexec")
    k = h.kexec("luoctl --json reboot > /root/reboot.json 2> /root/reboot.err; sync", timeout=600)
    t.expect(k["boot_id"] != old_boot, "the host's boot id did not change")
    n = h.wait_serial(r"liveupdate number: (\d+)", timeout=10, since=k["mark"])
    t.demo(f"host back after {k['up']:.0f} s: kernel {k['release']}, boot id {k['boot_id']}, kernel says "
           f"{n.group(0)!r}")
    restored = wait_launcher(t, h, VM, "restored", 300)
    nxt = console.wait_tick(t, last["n"], 300)
    after = console.wait_tick(t, last["n"] + 20, 120)
    t.demo(f"luo-qemu@{VM} claimed the VM, relaunched QEMU on the preserved RAM "
           f"({field(restored, 'relaunch_ms')} ms) and loaded its state ({field(restored, 'load_ms')} ms)")
    t.demo(f"guest ticks on: n={nxt['n']} boot id {nxt['boot']} up={nxt['up']} s tmpfs md5 {nxt['tmpfs']}")
    t.expect(nxt["n"] == last["n"] + 1, f"the counter went from {last['n']} to {nxt['n']}, not on by one")
    t.expect(nxt["boot"] == first["boot"] == after["boot"], f"the guest's boot id changed: {first['boot']} -> {nxt['boot']}")
    t.expect(nxt["tmpfs"] == first["tmpfs"], f"the tmpfs file changed: {first['tmpfs']} -> {nxt['tmpfs']}")
    t.expect(last["up"] < nxt["up"] < after["up"], f"the guest's uptime did not go on: {last['up']} -> {nxt['up']}")
    others = {k2["boot"] for k2 in ticks_since(console, first)} - {first["boot"]}
    t.expect(not others, f"ticks from another guest boot: {others}")
    luodhost.restore(t, h, digests)
    t.demo("client service took its 3 memfds back: SHA-256 identical")
    h.check("luoctl finish", timeout=300)
    wait_launcher(t, h, VM, f"VM {VM} registered with luod", 120)
    cycle = h.json("luoctl --json history")["cycles"][-1]
    t.demo(f"luoctl finish: cycle #{cycle['id']} {cycle['outcome']}; the launcher registered the VM again "
           "for the next update")

    blackout = nxt["ts"] - last["ts"]
    rel = h.check(f"journalctl -b -u luo-qemu@{VM} -o short-monotonic | grep -m1 ' restored'")
    at = re.match(r"\[\s*([\d.]+)\]", rel)
    t.summary(f"host kernel       {old_release} -> {k['release']} ({n.group(0)})")
    t.summary(f"host boot id      {old_boot} -> {k['boot_id']} (a new boot)")
    t.summary(f"QEMU              {qemu_version}, unmodified; RAM in a memfd luod preserved through LUO")
    t.summary(f"guest boot id     {first['boot']} -> {nxt['boot']} (unchanged: the guest did not reboot)")
    t.summary(f"guest counter     n={last['n']} (last tick before the pause) -> n={nxt['n']} (first after)")
    t.summary(f"guest uptime      {last['up']:.2f} s -> {nxt['up']:.2f} s (goes on; +{nxt['up'] - last['up']:.2f} s "
              "of guest time across the pause)")
    t.summary(f"guest tmpfs md5   {first['tmpfs']} -> {nxt['tmpfs']} (64 KiB of random bytes in guest RAM)")
    t.summary(f"VM blackout       {blackout:.1f} s (last tick before the pause -> first tick after, this machine's clock)")
    t.summary(f"  checkpoint      {field(cp, 'checkpoint_ms')} ms (QEMU cpr-reboot, at luoctl freeze)")
    t.summary(f"  kexec           {k['up']:.1f} s (luoctl reboot -> the new host at multi-user; "
              "TCG: a real host takes seconds)")
    t.summary(f"  restore         launcher started at {float(at.group(1)) if at else float('nan'):.1f} s of the new kernel's uptime; "
              f"QEMU relaunch {field(restored, 'relaunch_ms')} ms, state load {field(restored, 'load_ms')} ms")
    t.summary(f"luod blackout     {cycle['blackout_ns'] / 1e9:.1f} s (luoctl history: freeze start -> updated)")
    t.summary(f"preserved         {len(st['sessions'])} sessions, {len(crossing)} memfds, {sum(crossing) / 2**20:.1f} MiB "
              f"crossed the kexec (the VM's RAM and device state in session vm-{VM}; the client's 3 memfds, "
              "back byte-identical)")
    h.shutdown()
