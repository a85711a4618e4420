"""qemu_vm_survives_kexec: an unmodified QEMU VM (the host's Debian QEMU,
`-accel kvm`: nested KVM inside the TCG host) keeps its Linux guest across
the host's kexec.

luod from the .deb under systemd; the launcher `luo-qemu` (the static build
of qemu-tests/run.sh) runs the VM through the template unit
`luo-qemu@web.service` with /etc/luod/vms/web.toml. The guest is Debian's
stock kernel with the launcher tests' busybox initramfs
(qemu-launcher/guest/): at boot it writes 64 KiB of random bytes to its
tmpfs and then prints every 100 ms `GUEST: tick n=N boot=B up=U
tmpfs=MD5`. Its console is the host's second serial port (ttyS1), which is a
file on this machine, so each line gets this machine's monotonic time when
it arrives (the VM blackout is measured here, across the host's kexec); QEMU
also logs it to /var/lib/luo-vm/web.serial in the host.

luoctl prepare/freeze/reboot (orderly `systemctl kexec`); in the new kernel
systemd starts luo-qemu@web, which claims the VM from luod and restores it.
Asserts: the guest's boot id is unchanged, the first tick after is the
counter's next value, the uptime goes on from where it stopped (no reset),
the tmpfs file's MD5 is the same, no tick from another guest boot; the host
runs the new kernel (a new boot id, "liveupdate number: 1"); luoctl finish,
and the launcher registers the VM again.
"""

import os
import re
import subprocess
import threading
import time

import luodhost

TIMEOUT = 1800
TICK = re.compile(r"GUEST: tick n=(\d+) boot=(\S+) up=([\d.]+) tmpfs=([0-9a-f]{32})")
VM = "web"


class Console:
    """Tails a file that grows, stamping each complete line with
    time.monotonic() when it is read (polled every 10 ms)."""

    def __init__(self, path):
        self.path = path
        self.lines = []
        self.lock = threading.Lock()
        self.done = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        pos, buf = 0, b""
        while not self.done:
            try:
                with open(self.path, "rb") as f:
                    f.seek(pos)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            if data:
                now = time.monotonic()
                pos += len(data)
                buf += data
                *full, buf = buf.split(b"\n")
                with self.lock:
                    self.lines.extend((now, raw.decode("utf-8", "replace")) for raw in full)
            time.sleep(0.01)

    def ticks(self):
        with self.lock:
            lines = list(self.lines)
        out = []
        for ts, line in lines:
            m = TICK.search(line)
            if m:
                out.append({"ts": ts, "n": int(m.group(1)), "boot": m.group(2), "up": float(m.group(3)),
                            "tmpfs": m.group(4)})
        return out

    def tail(self, n=15):
        with self.lock:
            return "\n".join(line for _, line in self.lines[-n:])

    def wait_tick(self, t, after, timeout):
        """The first tick with a counter above `after`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            later = [k for k in self.ticks() if k["n"] > after]
            if later:
                return later[0]
            time.sleep(0.05)
        t.fail(f"the guest printed no tick past n={after} within {timeout} s; its console ends:\n{self.tail()}")


def launcher_log(h, boot="-b"):
    return h.check(f"journalctl {boot} -u luo-qemu@{VM} -o cat")


def wait_launcher(t, h, needle, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = launcher_log(h)
        for line in log.splitlines():
            if needle in line:
                return line
        time.sleep(1)
    t.fail(f"luo-qemu@{VM} did not log {needle!r} within {timeout} s:\n{launcher_log(h)[-2500:]}\n"
           f"{h.ssh(f'systemctl status luo-qemu@{VM} --no-pager | tail -5').stdout}")


def field(line, name):
    m = re.search(re.escape(name) + r"=([\d.]+)", line)
    return float(m.group(1)) if m else None


def run(t):
    luo_qemu = os.path.join(t.bindir, "luo-qemu")
    t.expect(os.path.isfile(luo_qemu), f"no static luo-qemu in {t.bindir!r} (qemu-tests/run.sh builds it)")
    initrd = os.path.join(t.work, "guest-initrd.gz")
    subprocess.run(["bash", os.path.join(t.repo, "qemu-launcher", "guest", "make-initrd.sh"), initrd], check=True,
                   stdin=subprocess.DEVNULL)
    deb = luodhost.build_deb(t)
    con_path = os.path.join(t.work, "vm-console.log")
    open(con_path, "wb").close()
    console = Console(con_path)
    try:
        _run(t, deb, luo_qemu, initrd, console, con_path)
    finally:
        console.done = True


def _run(t, deb, luo_qemu, initrd, console, con_path):
    h = luodhost.boot_with_luod(t, deb, qemu_args=["-chardev", f"file,id=vmcon,path={con_path}",
                                                   "-serial", "chardev:vmcon"])
    qemu_version = h.check("qemu-system-x86_64 --version").splitlines()[0]
    kvm = h.ssh("test -c /dev/kvm && grep -c -w -e vmx -e svm /proc/cpuinfo")
    t.expect(kvm.rc == 0, f"the host has no usable /dev/kvm (nested KVM under TCG -cpu max): {kvm.stdout} "
                          f"{h.ssh('ls -l /dev/kvm; dmesg | grep -i kvm | tail -5').stdout}")
    uart = h.ssh("cat /sys/class/tty/ttyS1/port /sys/class/tty/ttyS1/type")
    t.expect(uart.rc == 0 and uart.stdout.split()[-1] != "0",
             f"the host's ttyS1 (the guest's console) is missing: {uart.stdout} {uart.stderr}")
    t.info(f"host: {h.last_boot['release']}, {qemu_version}, /dev/kvm present")

    h.check("mkdir -p /var/lib/luo-vm /etc/luod/vms")
    h.put(luo_qemu, "/usr/bin/luo-qemu", mode=0o755)
    h.put(os.path.join(t.repo, "qemu-launcher", "systemd", "luo-qemu@.service"),
          "/etc/systemd/system/luo-qemu@.service")
    h.put(t.image.vmlinuz_stock, "/var/lib/luo-vm/vmlinuz")
    h.put(initrd, "/var/lib/luo-vm/initrd.gz")
    args = ["-nodefaults", "-machine", "q35", "-accel", "kvm", "-cpu", "qemu64", "-smp", "1", "-display", "none",
            "-kernel", "/var/lib/luo-vm/vmlinuz", "-initrd", "/var/lib/luo-vm/initrd.gz",
            "-append", "console=ttyS0,115200 quiet",
            "-chardev", f"serial,id=ser,path=/dev/ttyS1,logfile=/var/lib/luo-vm/{VM}.serial,logappend=on",
            "-serial", "chardev:ser"]
    toml = ('qemu = "/usr/bin/qemu-system-x86_64"\nmemory_mib = 128\nstate_mib = 4\ntimeout_secs = 60\n'
            "args = [" + ", ".join(f'"{a}"' for a in args) + "]\n")
    h.ssh(f"cat > /etc/luod/vms/{VM}.toml", input=toml)
    h.check(f"systemctl daemon-reload && systemctl enable --now luo-qemu@{VM}", timeout=120)
    started = wait_launcher(t, h, "started fresh", 300)
    t.log(started)
    wait_launcher(t, h, f"VM {VM} registered with luod", 300)
    first = console.wait_tick(t, 20, 600)
    vms = h.check("luoctl vm list")
    t.expect(VM in vms and "registered" in vms, f"luoctl vm list: {vms}")
    t.info(f"guest (stock kernel, -accel kvm) ticking: boot id {first['boot']}, tmpfs md5 {first['tmpfs']}")

    old_boot = h.boot_id()
    mark = {}

    def after_freeze():
        cp = wait_launcher(t, h, "checkpointed", 60)
        t.expect("was_running=true" in cp, f"checkpoint: {cp}")
        last = console.ticks()[-1]
        time.sleep(1.0)
        t.expect(console.ticks()[-1]["n"] == last["n"], "the guest still ticks after freeze")
        mark["cp"], mark["last"] = cp, last

    k, reply = luodhost.cycle(t, h, before_reboot=after_freeze)
    last = mark["last"]
    t.expect(k["boot_id"] != old_boot, "the host's boot id did not change")
    n = h.wait_serial(r"liveupdate number: (\d+)", timeout=10, since=k["mark"])
    t.expect(n.group(1) == "1", f"the new kernel logged {n.group(0)!r}, expected liveupdate number: 1")
    restored = wait_launcher(t, h, "restored", 300)
    nxt = console.wait_tick(t, last["n"], 300)
    after = console.wait_tick(t, last["n"] + 5, 120)
    t.expect(nxt["n"] == last["n"] + 1, f"the counter went from {last['n']} to {nxt['n']}, not on by one")
    t.expect(nxt["boot"] == first["boot"] and after["boot"] == first["boot"],
             f"the guest's boot id changed: {first['boot']} -> {nxt['boot']}")
    t.expect(nxt["tmpfs"] == first["tmpfs"], f"the tmpfs file changed: {first['tmpfs']} -> {nxt['tmpfs']}")
    t.expect(last["up"] < nxt["up"] < after["up"], f"the guest's uptime did not go on: {last['up']} -> {nxt['up']}")
    others = {k2["boot"] for k2 in console.ticks()} - {first["boot"]}
    t.expect(not others, f"ticks from another guest boot: {others}")
    # The host's own copy of the console (QEMU's chardev logfile) agrees.
    hostlog = h.check(f"grep -c 'boot={first['boot']}' /var/lib/luo-vm/{VM}.serial; "
                      f"grep -c 'GUEST: ready' /var/lib/luo-vm/{VM}.serial")
    t.expect(hostlog.split()[1] == "1", f"the guest booted more than once per the host's log: {hostlog}")

    blackout = nxt["ts"] - last["ts"]
    t.info(f"guest: boot id {nxt['boot']} unchanged, tick n={last['n']} up={last['up']} -> n={nxt['n']} "
           f"up={nxt['up']} (uptime +{nxt['up'] - last['up']:.2f} s), tmpfs md5 {nxt['tmpfs']} unchanged")
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
    wait_launcher(t, h, f"VM {VM} registered with luod", 120)
    st = luodhost.status(h)
    t.expect(st["state"] == "normal" and st["live_updates"] == 1, f"after finish: {st['state']}, {st['live_updates']}")
    t.info("luoctl finish: normal, live_updates 1; the launcher registered the VM again")
    h.shutdown()
