"""host_boot: the Debian host (systemd >= 261) boots the LUO kernel to
multi-user with /dev/liveupdate and /dev/kvm, ssh works, and an orderly
`systemctl kexec` into the same kernel brings it back with a new boot id and
the kernel's "liveupdate number: 1"."""

# A smoke check of the image, not in the `tests` group: host_update and host_two_updates boot the same image and kexec it through systemctl kexec with LUO.
SMOKE = True

TIMEOUT = 900


def run(t):
    v = t.image.versions
    m = t.image.manifest
    t.info(f"image {m['key']}: systemd {v['systemd']}, qemu {v['qemu-system-x86']}, glibc {v['libc6']}, "
           f"stock kernel {m['stock_kernel_release']}; built in {m['total_seconds']:.0f} s "
           f"(mmdebstrap {m['mmdebstrap_seconds']:.0f} s, mkfs.ext4 -d {m['mkfs_seconds']:.0f} s)")
    h = t.host()
    h.boot(timeout=300)
    t.measure("boot to ssh (QEMU start -> ssh works)", h.last_boot["ssh"])

    state = h.ssh("systemctl is-system-running --wait", timeout=180).stdout.strip()
    if state != "running":
        failed = h.ssh("systemctl --failed --no-legend --plain").stdout.strip()
        t.info(f"system state {state}; failed units: {failed or '(none listed)'}")
    t.expect(state in ("running", "degraded"), f"systemctl is-system-running says {state!r}")
    t.info(f"systemctl is-system-running: {state}")

    first = h.check("systemctl --version").splitlines()[0]  # "systemd 262 (262.1-1)"
    major = int(first.split()[1])
    t.expect(major >= 261, f"systemd {major} is not LUO-aware (need >= 261): {first}")
    release = h.check("uname -r").strip()
    t.expect(release == h.last_boot["release"], f"uname -r {release} but the marker said {h.last_boot['release']}")
    devs = h.ssh("ls -l /dev/liveupdate /dev/kvm")
    t.expect(devs.rc == 0, f"/dev/liveupdate or /dev/kvm missing: {devs.stderr.strip()}")
    t.info(f"{first}; kernel {release}; /dev/liveupdate and /dev/kvm present")

    boot1 = h.boot_id()
    h.kexec_load("/boot/vmlinuz-luo")
    k = h.kexec("systemctl kexec", timeout=300)
    t.expect(k["boot_id"] != boot1, "same boot id after the kexec")
    line = h.wait_serial(r"liveupdate number: (\d+)", timeout=10, since=k["mark"])
    t.expect(line.group(1) == "1", f"the new kernel logged {line.group(0)!r}, expected liveupdate number: 1")
    dmesg = h.check("dmesg | grep -m1 'liveupdate number' || true").strip()
    t.expect("liveupdate number: 1" in dmesg, f"dmesg of the new kernel lacks 'liveupdate number: 1': {dmesg!r}")
    t.expect(k["down_seen"], "the old boot never printed @@HOST down: no orderly shutdown?")
    shut = h.check("journalctl -b -1 -o cat | grep -m1 'Reached target kexec.target' || true").strip()
    t.expect(shut, "the previous boot's journal lacks 'Reached target kexec.target' (no orderly kexec?)")
    t.info(f"kexec: new boot id {k['boot_id']}, kernel says {line.group(0)!r}; previous boot's journal: {shut!r}")
    t.measure("kexec to ssh (systemctl kexec -> ssh works)", k["ssh"])
    t.measure("kexec to multi-user (systemctl kexec -> @@HOST up)", k["up"])
    h.shutdown()
