"""host_package_lifecycle: the .deb on the Debian host under systemd.

packaging/build-deb.sh builds the package twice (the workspace's version and
a newer build, VERSION+host1). On the host:

1. `dpkg -i`: luod.service is active (Type=notify), the group `luod` is a
   system group made by systemd-sysusers, a member of it reaches the socket
   and a user outside it does not (luoctl exit 4);
2. a client running as the member preserves a 1 MiB memfd of random bytes;
3. `dpkg -i` of the newer build while `normal`: luod is restarted (a new
   MainPID) and still lists the session;
4. `luoctl prepare`: `dpkg -r` is refused with the reason, nothing changes;
   `freeze`, `reboot` (a real kexec): in the new kernel luod is `updated` and
   the member takes the memfd back byte-identical (SHA-256), `finish`;
5. `dpkg -r`: luod stopped, binaries and unit gone, the conffile kept;
   `dpkg -P`: /etc/luod and /run/luod gone, the fd store released, the group
   kept; dpkg and systemd no longer know the package or the unit.
"""

import os
import time

import luodhost

TIMEOUT = 1500

CLIENT = r"""
import hashlib, os, subprocess, sys
fd = os.memfd_create("pkg-client")
data = os.urandom(1 << 20)
os.write(fd, data)
subprocess.run(["luoctl", "session", "create", "pkg-client"], check=True)
subprocess.run(["luoctl", "session", "preserve", "pkg-client", "--token", "1", "--file", f"/proc/self/fd/{fd}"],
               pass_fds=[fd], check=True)
print(hashlib.sha256(data).hexdigest())
"""


def installed(h):
    r = h.ssh("dpkg-query -W -f='${Status} ${Version}' liveupdate")
    return r.stdout.strip() if r.rc == 0 else ""


def unit(h, *props):
    out = h.check("systemctl show " + " ".join(f"-p {p}" for p in props) + " luod.service")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def status(h, user=None):
    cmd = "luoctl --json status"
    if user:
        cmd = f"runuser -u {user} -- {cmd}"
    return h.json(cmd)


def session(st, name):
    return next((s for s in st["sessions"] if s["name"] == name), None)


def run(t):
    with open(os.path.join(t.repo, "Cargo.toml")) as f:
        version = next(line.split('"')[1] for line in f if line.startswith("version = "))
    newer = f"{version}+host1"
    deb1, deb2 = luodhost.build_deb(t), luodhost.build_deb(t, newer)

    h = t.host()
    h.boot(timeout=300)
    h.check("systemctl is-system-running --wait || true", timeout=180)
    for deb in (deb1, deb2):
        h.put(deb, "/root/" + os.path.basename(deb))

    # 1. install
    t0 = time.monotonic()
    h.check(f"dpkg -i /root/{os.path.basename(deb1)}", timeout=180)
    t.measure("dpkg -i (luod started)", time.monotonic() - t0)
    t.expect(installed(h) == f"install ok installed {version}", f"after dpkg -i: {installed(h)!r}")
    u = unit(h, "ActiveState", "SubState", "MainPID", "Type", "UnitFileState", "FragmentPath")
    t.expect(u["ActiveState"] == "active" and u["Type"] == "notify",
             f"luod.service after install: {u} / {h.ssh('journalctl -b -u luod -o cat | tail -20').stdout}")
    t.expect(u["UnitFileState"] == "enabled" and u["FragmentPath"] == "/usr/lib/systemd/system/luod.service",
             f"luod.service is not enabled from /usr/lib/systemd/system: {u}")
    group = h.check("getent group luod").strip().split(":")
    t.expect(int(group[2]) < 1000, f"the group luod is not a system group: {group}")
    h.check("useradd --create-home --groups luod op && useradd --create-home outsider")
    t.expect(status(h, "op")["state"] == "normal", "a member of luod does not see luod normal")
    r = h.ssh("runuser -u outsider -- luoctl status")
    t.expect(r.rc == 4, f"a user outside the group luod: luoctl exit {r.rc} (want 4, unreachable): {r.stderr}")
    t.info(f"install: luod.service active (notify), enabled; group luod gid {group[2]} (sysusers); "
           f"member op reaches the socket, outsider gets exit 4")

    # 2. a client's preserved memfd
    digest = h.check("runuser -u op -- python3 -", input=CLIENT).split()[-1]  # after luoctl's own lines
    st = status(h)
    s = session(st, "pkg-client")
    t.expect(s is not None and [f["size"] for f in s["files"]] == [1 << 20], f"session pkg-client: {s}")
    before = unit(h, "MainPID", "NFileDescriptorStore")

    # 3. upgrade while normal: luod restarted, the session kept
    t0 = time.monotonic()
    h.check(f"dpkg -i /root/{os.path.basename(deb2)}", timeout=180)
    t.measure("dpkg -i of the newer build (luod restarted)", time.monotonic() - t0)
    t.expect(installed(h) == f"install ok installed {newer}", f"after the upgrade: {installed(h)!r}")
    after = unit(h, "ActiveState", "MainPID", "NFileDescriptorStore")
    t.expect(after["ActiveState"] == "active" and after["MainPID"] not in ("0", before["MainPID"]),
             f"luod was not restarted by the upgrade: before {before}, after {after}")
    st = status(h)
    s = session(st, "pkg-client")
    t.expect(st["state"] == "normal" and s is not None and [f["size"] for f in s["files"]] == [1 << 20],
             f"after the upgrade: state {st['state']}, session {s}")
    t.info(f"upgrade {version} -> {newer} while normal: luod restarted (MainPID {before['MainPID']} -> "
           f"{after['MainPID']}), fd store {before['NFileDescriptorStore']} -> {after['NFileDescriptorStore']} "
           f"descriptors, session pkg-client kept")

    # 4. a cycle: removal refused mid-cycle, the memfd back after a real kexec
    h.check("luoctl prepare --kernel /boot/vmlinuz-luo --reuse-cmdline", timeout=300)
    gen = status(h)["generation"]
    r = h.ssh("dpkg -r liveupdate", timeout=120)
    want = ("liveupdate: refusing to remove the package: luod is 'prepared': a live-update cycle is in progress. "
            "Finish it (luoctl finish, in the new kernel) or abandon it (luoctl cancel, before the reboot); "
            "then run dpkg again. Nothing was changed.")
    t.expect(r.rc != 0 and want in r.stderr.splitlines(), f"dpkg -r while prepared: rc {r.rc}, {r.stderr}")
    st = status(h)
    t.expect(st["state"] == "prepared" and st["generation"] == gen and h.ssh("test -x /usr/sbin/luod").rc == 0
             and unit(h, "ActiveState")["ActiveState"] == "active",
             f"the refused removal changed something: state {st['state']} generation {st['generation']} (was {gen})")
    t.info("dpkg -r while prepared: refused with the reason; luod, its state and the package unchanged")
    h.check("luoctl freeze", timeout=300)
    k = h.kexec("luoctl reboot", timeout=400)
    t.measure("luoctl reboot -> ssh in the new kernel", k["ssh"])
    st = status(h)
    t.expect(st["state"] == "updated", f"after the kexec luod is {st['state']}: {st.get('notes')}")
    back = h.check("runuser -u op -- sh -c 'cd && luoctl session retrieve pkg-client --token 1 --output back "
                   "&& sha256sum back'").splitlines()[-1].split()[0]
    t.expect(back == digest, f"the memfd came back with SHA-256 {back}, preserved {digest}")
    h.check("runuser -u op -- luoctl session finish pkg-client && luoctl finish", timeout=300)
    t.expect(status(h)["state"] == "normal", "luod is not normal after finish")
    t.info(f"after the upgrade, a kexec cycle: the member's 1 MiB memfd came back byte-identical (SHA-256 {digest[:16]}...)")

    # 5. remove, purge
    h.check("dpkg -r liveupdate", timeout=120)
    t.expect(installed(h) == f"deinstall ok config-files {newer}", f"after dpkg -r: {installed(h)!r}")
    u = unit(h, "ActiveState", "LoadState", "NFileDescriptorStore")
    t.expect(u["ActiveState"] in ("inactive", "failed") and u["ActiveState"] != "failed",
             f"luod.service after dpkg -r: {u}")
    gone = h.ssh("ls /usr/sbin/luod /usr/bin/luoctl /usr/lib/systemd/system/luod.service 2>/dev/null").stdout.strip()
    t.expect(gone == "", f"dpkg -r left {gone}")
    t.expect(h.ssh("test -f /etc/luod/luod.toml").rc == 0, "dpkg -r removed the conffile /etc/luod/luod.toml")
    t.info(f"dpkg -r: luod stopped, binaries and unit gone, conffile kept; unit {u}")
    h.check("dpkg -P liveupdate", timeout=120)
    t.expect(installed(h) == "", f"after dpkg -P: {installed(h)!r}")
    left = h.ssh("ls -d /etc/luod /run/luod 2>/dev/null").stdout.strip()
    t.expect(left == "", f"dpkg -P left {left}")
    t.expect(h.ssh("getent group luod").rc == 0, "dpkg -P removed the group luod (it stays, as documented)")
    t.expect(h.ssh("dpkg -l liveupdate").rc != 0, "dpkg -l still lists liveupdate after the purge")
    u = unit(h, "LoadState", "ActiveState", "NFileDescriptorStore")
    t.expect(u["LoadState"] == "not-found" and u["ActiveState"] == "inactive" and u["NFileDescriptorStore"] == "0",
             f"systemd still holds luod.service after the purge: {u}")
    failed = h.check("systemctl --failed --no-legend --plain").strip()
    t.expect("luod" not in failed, f"systemctl --failed lists luod: {failed}")
    sc = h.ssh("systemctl status luod.service")
    t.info(f"dpkg -P: /etc/luod, /run/luod gone, fd store released ({u}), group kept; "
           f"systemctl status luod exits {sc.rc}")
    h.shutdown()
