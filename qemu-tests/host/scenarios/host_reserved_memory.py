"""host_reserved_memory: luod from the .deb on the Debian host booted on
sid's stock kernel (no LUO) with `memmap=64M$0x30000000`: luod.service picks
the reserved-memory backend by itself (`--backend auto`), a non-root member
of the group luod preserves a 1 MiB memfd of random bytes, `luoctl prepare
--kernel /boot/vmlinuz-REL --initrd ... --reuse-cmdline`, `freeze`,
`reboot` (a real kexec into the same stock kernel, the reservation on the new
command line too): in the new kernel luod is `updated` with the same
backend, the member takes the memfd back byte-identical (SHA-256), `finish`
returns to `normal`."""

import luodhost

TIMEOUT = 1500
MEMMAP = "memmap=64M$0x30000000"

# Runs on the host as the member: preserves a 1 MiB memfd, prints its SHA-256.
CLIENT = r"""
import hashlib, os, subprocess
fd = os.memfd_create("rm-client")
data = os.urandom(1 << 20)
os.write(fd, data)
subprocess.run(["luoctl", "session", "create", "rm-client"], check=True, stdout=subprocess.DEVNULL)
subprocess.run(["luoctl", "session", "preserve", "rm-client", "--token", "1", "--file", f"/proc/self/fd/{fd}"],
               pass_fds=[fd], check=True, stdout=subprocess.DEVNULL)
print(hashlib.sha256(data).hexdigest())
"""


def run(t):
    deb = luodhost.build_deb(t)
    h = t.host(kernel="stock", cmdline_extra=MEMMAP)
    h.boot(timeout=400)
    t.measure("stock kernel: boot to ssh", h.last_boot["ssh"])
    h.check("systemctl is-system-running --wait || true", timeout=180)
    rel = h.check("uname -r").strip()
    t.expect(h.ssh("test -e /dev/liveupdate").rc != 0, "the stock kernel has /dev/liveupdate")

    h.put(deb, "/root/liveupdate.deb")
    h.check("dpkg -i /root/liveupdate.deb", timeout=180)
    active = h.ssh("systemctl is-active luod.service").stdout.strip()
    t.expect(active == "active", f"luod.service is {active!r}: {h.ssh('journalctl -b -u luod -o cat | tail -20').stdout}")
    st = h.json("luoctl --json status")
    t.expect(st["state"] == "normal" and st["backend"] == "reserved-memory",
             f"luod on the stock kernel: state {st['state']}, backend {st['backend']} (want normal, reserved-memory); "
             f"notes {st.get('notes')}")
    t.info(f"stock kernel {rel}, {MEMMAP}: luod.service (from the .deb, --backend auto) chose "
           f"{st['backend']}, region {st['region']}")

    h.check("useradd --create-home --groups luod op")
    digest = h.check("runuser -u op -- python3 -", input=CLIENT).strip().splitlines()[-1]
    h.check(f"luoctl prepare --kernel /boot/vmlinuz-{rel} --initrd /boot/initrd.img-{rel} --reuse-cmdline",
            timeout=300)
    h.check("luoctl freeze", timeout=300)
    k = h.kexec("luoctl reboot", timeout=400)
    t.measure("stock kernel: luoctl reboot -> ssh in the new kernel", k["ssh"])
    cmdline = h.check("cat /proc/cmdline").strip()
    t.expect(MEMMAP in cmdline, f"the new kernel's command line lost {MEMMAP}: {cmdline}")
    st = h.json("luoctl --json status")
    t.expect(st["state"] == "updated" and st["backend"] == "reserved-memory",
             f"after the kexec luod is {st['state']} on {st['backend']}: notes {st.get('notes')}")
    back = h.check("runuser -u op -- sh -c 'cd && luoctl session retrieve rm-client --token 1 --output back "
                   ">/dev/null && sha256sum back'").split()[0]
    t.expect(back == digest, f"the memfd came back with SHA-256 {back}, preserved {digest}")
    h.check("runuser -u op -- luoctl session finish rm-client && luoctl finish", timeout=300)
    st = h.json("luoctl --json status")
    t.expect(st["state"] == "normal", f"luod is {st['state']} after finish")
    t.info(f"luoctl reboot (kexec {rel} -> {k['release']}, boot id {k['boot_id']}): luod updated on "
           f"reserved-memory, the member's 1 MiB memfd back byte-identical (SHA-256 {digest[:16]}...), finish -> normal")
    h.shutdown()
