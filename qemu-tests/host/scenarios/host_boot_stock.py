"""host_boot_stock: the Debian host boots sid's stock kernel (no LUO) from
its own initramfs with a reserved range (`memmap=16M$0x30000000`): systemd
reaches multi-user, /dev/kvm works (kvm_amd loaded by udev), ssh works; 1 MiB
of random bytes written to the range through /dev/mem reads back
byte-identical after an orderly `systemctl kexec` into the same kernel (what
luod's reserved-memory backend relies on)."""

# A smoke check of the image, not in the `tests` group: host_reserved_memory boots the same stock kernel with the memmap reservation and carries data through it.
SMOKE = True

import hashlib
import os

TIMEOUT = 900
REGION = 0x30000000
MEMMAP = "memmap=16M$0x30000000"
SIZE = 1 << 20

# Runs on the host: `devmem.py write|read` copies SIZE bytes stdin -> range, or range -> stdout.
DEVMEM = f"""
import mmap, os, sys
fd = os.open("/dev/mem", os.O_RDWR | os.O_SYNC)
m = mmap.mmap(fd, {SIZE}, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset={REGION})
if sys.argv[1] == "write":
    data = sys.stdin.buffer.read()
    assert len(data) == {SIZE}, len(data)
    m[:] = data  # O_SYNC: an uncached mapping, nothing to msync (and /dev/mem refuses msync)
else:
    sys.stdout.buffer.write(m[:])
"""


def run(t):
    h = t.host(kernel="stock", cmdline_extra=MEMMAP)
    h.boot(timeout=400)
    t.measure("stock kernel: boot to ssh", h.last_boot["ssh"])
    state = h.ssh("systemctl is-system-running --wait", timeout=180).stdout.strip()
    if state != "running":
        t.info(f"system state {state}; failed units: {h.ssh('systemctl --failed --no-legend --plain').stdout.strip()}")
    t.expect(state in ("running", "degraded"), f"systemctl is-system-running says {state!r}")
    release = h.check("uname -r").strip()
    t.expect(release == t.image.manifest["stock_kernel_release"],
             f"booted {release}, the image's stock kernel is {t.image.manifest['stock_kernel_release']}")
    t.expect(h.ssh("test -c /dev/kvm && grep -qw kvm_amd /proc/modules").rc == 0, "no /dev/kvm or kvm_amd not loaded")
    t.expect(h.ssh("test -e /dev/liveupdate").rc != 0, "the stock kernel has /dev/liveupdate (it should have no LUO)")
    iomem = h.check("grep -i '30000000-' /proc/iomem || true").strip()
    t.expect("30000000-30ffffff" in iomem, f"the memmap range is not in /proc/iomem: {iomem!r}")
    t.info(f"kernel {release}, {MEMMAP}: /proc/iomem says {iomem!r}; /dev/kvm with kvm_amd")

    data = os.urandom(SIZE)
    want = hashlib.sha256(data).hexdigest()
    with open(os.path.join(t.work, "devmem.py"), "w") as f:
        f.write(DEVMEM)
    h.put(os.path.join(t.work, "devmem.py"), "/root/devmem.py")
    h.check("python3 /root/devmem.py write", input=data)
    before = h.check("python3 /root/devmem.py read | sha256sum").split()[0]
    t.expect(before == want, f"read back {before} right after writing {want}")

    h.kexec_load(f"/boot/vmlinuz-{release}", initrd=f"/boot/initrd.img-{release}")
    k = h.kexec("systemctl kexec", timeout=400)
    t.expect(k["down_seen"], "the old boot never printed @@HOST down: no orderly shutdown?")
    t.expect(MEMMAP in h.check("cat /proc/cmdline"), "the kexec'd kernel lost the memmap= reservation")
    after = h.check("python3 /root/devmem.py read | sha256sum").split()[0]
    t.expect(after == want, f"the reserved range changed across the kexec: sha256 {want} -> {after}")
    t.info(f"1 MiB through /dev/mem at {REGION:#x}: sha256 {want[:16]}... identical after the kexec "
           f"(new boot id {k['boot_id']})")
    t.measure("stock kernel: kexec to ssh", k["ssh"])
    h.shutdown()
