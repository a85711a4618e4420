"""luod on the Debian host: what the luod-under-systemd scenarios share
(qemu-tests/host/scenarios/host_update.py, host_restart_mid_cycle.py,
host_systemd_coexist.py, host_two_updates.py).

luod comes from the project's .deb (packaging/build-deb.sh), installed with
dpkg. A client service (`lu-client-preserve.service`, `lu-client-restore
.service`) runs as `vmm`, a non-root member of the operator group `luod`:
it creates sessions and preserves memfds of random bytes, keeping their
SHA-256 on disk, and after the kexec takes them back and writes what it got.
"""

import json
import os
import subprocess
import time

# The client, run by systemd as user vmm (python3 on the host).
CLIENT = r'''
import hashlib, json, os, subprocess, sys
STATE = "/var/lib/lu-client"
FILES = (("vm-a", 1, 1 << 20), ("vm-a", 2, 4096), ("vm-b", 1, 777))
if sys.argv[1] == "preserve":
    digests = {}
    for name in sorted({f[0] for f in FILES}):
        subprocess.run(["luoctl", "session", "create", name], check=True)
    for name, token, size in FILES:
        fd = os.memfd_create(f"{name}-{token}")
        data = os.urandom(size)
        os.write(fd, data)
        subprocess.run(["luoctl", "session", "preserve", name, "--token", str(token), "--file",
                        f"/proc/self/fd/{fd}"], pass_fds=[fd], check=True)
        os.close(fd)
        digests[f"{name}/{token}"] = hashlib.sha256(data).hexdigest()
    with open(f"{STATE}/preserved.json", "w") as f:
        json.dump(digests, f)
else:
    got = {}
    for name, token, _ in FILES:
        out = f"{STATE}/{name}-{token}"
        subprocess.run(["luoctl", "session", "retrieve", name, "--token", str(token), "--output", out], check=True)
        with open(out, "rb") as f:
            got[f"{name}/{token}"] = hashlib.sha256(f.read()).hexdigest()
        os.unlink(out)
    for name in sorted({f[0] for f in FILES}):
        subprocess.run(["luoctl", "session", "finish", name], check=True)
    with open(f"{STATE}/restored.json", "w") as f:
        json.dump(got, f)
'''

CLIENT_UNIT = """[Unit]
Description=luod client ({mode})
After=luod.service
Requires=luod.service

[Service]
Type=oneshot
User=vmm
StateDirectory=lu-client
ExecStart=/usr/bin/python3 /usr/local/bin/lu-client {mode}
"""


def build_deb(t, version=None):
    """packaging/build-deb.sh (with LIVEUPDATE_DEB_VERSION=`version` if
    given); the path of a copy of the .deb in t.work.
    Host scenarios run two at once: the lock holds off another scenario's
    build until this one has its copy (a build rewrites the .deb in place)."""
    import fcntl
    import shutil
    t0 = time.monotonic()
    os.makedirs(os.path.join(t.repo, "target"), exist_ok=True)
    with open(os.path.join(t.repo, "target", "build-deb.scenario.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        env = dict(os.environ, **({"LIVEUPDATE_DEB_VERSION": version} if version else {}))
        p = subprocess.run([os.path.join(t.repo, "packaging", "build-deb.sh")], cwd=t.repo, env=env,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if p.returncode != 0:
            t.fail(f"packaging/build-deb.sh failed ({p.returncode}): {p.stderr[-1500:]}")
        built = os.path.join(t.repo, p.stdout.strip().splitlines()[-1])
        deb = os.path.join(t.work, os.path.basename(built))
        shutil.copyfile(built, deb)
    t.log(f"built {os.path.basename(deb)} in {time.monotonic() - t0:.1f} s")
    return deb


def unit(h, name, *props):
    out = h.check("systemctl show " + " ".join(f"-p {p}" for p in props) + " " + name)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def status(h):
    return h.json("luoctl --json status")


def boot_with_luod(t, deb, name="host", **host_kw):
    """A booted host with the .deb installed, luod active, the client
    installed and user vmm in the group luod. Returns the Host (host_kw go
    to t.host, e.g. qemu_args)."""
    h = t.host(name, **host_kw)
    h.boot(timeout=300)
    h.check("systemctl is-system-running --wait || true", timeout=180)
    h.put(deb, "/root/liveupdate.deb")
    h.check("dpkg -i /root/liveupdate.deb", timeout=180)
    u = unit(h, "luod.service", "ActiveState", "Type", "StatusText")
    t.expect(u["ActiveState"] == "active" and u["Type"] == "notify",
             f"luod.service after dpkg -i: {u}\n{h.ssh('journalctl -b -u luod -o cat | tail -20').stdout}")
    t.expect(u["StatusText"] == "state normal", f"luod's STATUS= is {u['StatusText']!r}, want 'state normal'")
    h.check("useradd --create-home --groups luod vmm")
    h.ssh("cat > /usr/local/bin/lu-client", input=CLIENT)
    for mode in ("preserve", "restore"):
        h.ssh(f"cat > /etc/systemd/system/lu-client-{mode}.service", input=CLIENT_UNIT.format(mode=mode))
    h.check("systemctl daemon-reload")
    return h


def expect_systemd_path(t, h):
    """luoctl check and status --json name the systemd reboot path."""
    check = h.json("luoctl --json check --kernel /boot/vmlinuz-luo --reuse-cmdline")
    item = next((i for i in check["items"] if i["name"] == "reboot path"), None)
    t.expect(item is not None and item["detail"].startswith("systemd: orderly shutdown: reboot runs `systemctl kexec`"),
             f"luoctl check's reboot path: {item}")
    st = status(h)
    t.expect(st["reboot_path"]["path"] == "systemd", f"status --json reboot_path: {st['reboot_path']}")
    return item["detail"]


def preserve(t, h):
    h.check("systemctl start lu-client-preserve.service", timeout=120)
    st = status(h)
    names = sorted(s["name"] for s in st["sessions"])
    t.expect(names == ["vm-a", "vm-b"], f"sessions after the client ran: {names}")
    uid = int(h.check("id -u vmm").strip())
    t.expect(all(s["owner_uid"] == uid for s in st["sessions"]), f"sessions not owned by vmm ({uid}): {st['sessions']}")
    return json.loads(h.check("cat /var/lib/lu-client/preserved.json"))


def cycle(t, h, after_prepare=None, before_reboot=None):
    """prepare, freeze, reboot (orderly systemctl kexec); back in the new
    kernel with luod updated. Returns h.kexec()'s dict plus reboot's reply."""
    h.check("luoctl prepare --kernel /boot/vmlinuz-luo --reuse-cmdline", timeout=300)
    t.expect(unit(h, "luod.service", "StatusText")["StatusText"] == "state prepared", "STATUS= after prepare")
    if after_prepare:
        after_prepare()
    h.check("luoctl freeze", timeout=300)
    t.expect(unit(h, "luod.service", "StatusText")["StatusText"] == "state frozen", "STATUS= after freeze")
    if before_reboot:
        before_reboot()
    # The reply goes to the disk: the orderly shutdown syncs it.
    k = h.kexec("luoctl --json reboot > /root/reboot.json 2> /root/reboot.err; sync", timeout=400)
    reply = json.loads(h.check("cat /root/reboot.json"))
    t.expect(any("orderly shutdown under way" in n for n in reply.get("notes", [])),
             f"luoctl reboot's reply: {reply} {h.ssh('cat /root/reboot.err').stdout}")
    t.expect(k["down_seen"], "the old kernel did not print @@HOST down: no orderly shutdown")
    h.wait_serial(r"Preserved fd stores in LUO session 'systemd'", timeout=5, since=k["mark"])
    stopped = h.check("journalctl -b -1 -u luod -o cat | tail -5")
    t.expect("SIGTERM received, shutting down" in stopped or "Terminated received" in stopped
             or "luod exits with status 0" in stopped, f"luod's journal of the old boot ends:\n{stopped}")
    st = status(h)
    t.expect(st["state"] == "updated", f"after the kexec luod is {st['state']}: {st.get('notes')}")
    log = h.check("journalctl -b -u luod -o cat")
    t.expect("IncomingFromSystemd start" in log, f"luod did not take its sessions from systemd:\n{log[-2000:]}")
    return k, reply


def restore(t, h, digests):
    h.check("systemctl start lu-client-restore.service", timeout=120)
    got = json.loads(h.check("cat /var/lib/lu-client/restored.json"))
    t.expect(got == digests, f"the client got back {got}, preserved {digests}")
