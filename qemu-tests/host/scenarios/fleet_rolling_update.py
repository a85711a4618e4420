"""fleet_rolling_update: the Ansible collection liveupdate.fleet rolls a new
kernel across three Debian hosts, each running a QEMU VM, by live update.

Three hosts (the host image, `-smp 1`, 1.5 GiB each), luod from the .deb
under systemd, each with a VM `web` under `luo-qemu@web` (nested KVM, the
qemu_vm_survives_kexec guest, no disk) whose console is a file on its host
(a file chardev that each QEMU appends to, read over ssh: `GuestLog`; a
host serial port under TCG is slow enough to hold a restored guest's output
back for minutes). ssh on loopback ports. The controller is
this machine: the pinned ansible-core of ansible/setup.sh runs the real
playbook `liveupdate.fleet.rolling_update` with the inventory below.

The target is the LUO kernel the hosts booted with 4 KiB of random bytes
appended (kexec_file_load loads the bzImage's payload by its header and
ignores the tail): another image with another SHA-256, so that no host is
on the target before it is updated and a rolled-back host is not either,
at no extra kernel build (a second build with another CONFIG_LOCALVERSION
would make `uname -r` differ too, for 6.5 more minutes of a cold CI run).
"On the new kernel" is therefore judged by what luod loaded and booted:
the host's boot id changed and its last cycle's target is the pinned
digest; `uname -r` is the same before and after, in the report too. The
playbook stages it from this machine with its SHA-256 pinned. luod's
rollback target is the image the harness booted (`rollback-kernel =
"/boot/vmlinuz-luo"` in luod.toml: the harness boots it with QEMU's
-kernel, so there is no /boot/vmlinuz-RELEASE).

Health gates on every host: the VMs are `registered` with luod again (the
launcher restored its VM and registered it in `updated`), and on h2 a gate
that fails while /root/gate-fails exists.

1. `serial: 1`, `max_fail_percentage: 0`, h2's gate failing: h1 is updated,
   h2 is updated, fails its gate and is rolled back by `luoctl rollback` to
   the kernel it came from (a second live update) with its VM alive, and the
   run stops at the failure budget (Ansible's "NO MORE HOSTS LEFT"): h3
   is untouched (same boot, no cycle, its VM never checkpointed).
2. The gate fixed, the same command again: h1 is skipped (already on the
   target: no new cycle, same boot), h2 and h3 are updated.
Then every host runs the new kernel; every VM's guest kept its boot id and
printed every tick once, in order, across every kexec of its host; luo-qemu's
journal of each boot shows the VM checkpointed running before each kexec
and restored after it; and the report (report.json, report.md) has every
host with kernels before and after, luod's blackout and each VM's blackout
(luo-qemu's), report.md's rows saying what report.json says. The final
report.md is printed as @@INFO lines.
"""

import json
import os
import shutil
import subprocess
import threading
import time
import types

import luodhost
from qemuvm import (GUEST_STALLED, define_vm, install_launcher, launcher_log, parse_tick, stall_report,
                    tsc_went_back, wait_launcher)

TIMEOUT = 1500  # 642 s and 684 s measured (2026-11-30, alone on the machine)
# In `tests` (CI) and in a group `fleet` of its own. Until 2026-11-30 a
# restored guest stopped printing for minutes in most runs
# (qemuvm.GUEST_STALLED): every such stall followed a host boot whose TSC
# calibration fell back to the HPET, and the hosts now boot with the
# machine's TSC rate (hostvm.TSC_KHZ_LINE's comment).
# Three hosts of one vCPU: it takes three CPUs, that is all of this machine's.
CPUS = 3
FLEET = True
HOSTS = ("h1", "h2", "h3")
VM = "web"
FAILING = "h2"

# Every VM luod knows is registered again (restored by its launcher), within 120 s.
VM_GATE = r"""#!/bin/sh
for i in $(seq 120); do
    luoctl --json vm list | python3 -c 'import json, sys
vms = json.load(sys.stdin)["vms"]
sys.exit(0 if vms and all(v["phase"] == "registered" for v in vms) else 1)' && exit 0
    sleep 1
done
echo "health gate: the VMs are not running again: $(luoctl vm list | tr '\n' ' ')" >&2
exit 1
"""
FAIL_GATE = ('test ! -e /root/gate-fails || { echo "health gate: the guest agent of web does not answer" >&2; '
             'exit 1; }')


def target_kernel(t):
    """The fleet's target: the booted LUO kernel plus a random tail."""
    path = os.path.join(t.work, "vmlinuz-fleet-target")
    with open(t.luo_kernel, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data + os.urandom(4096))
    return path


def sha256(path):
    import hashlib
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def ansible_venv(t):
    p = subprocess.run([os.path.join(t.repo, "ansible", "setup.sh")], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True)
    if p.returncode != 0:
        t.fail(f"ansible/setup.sh failed ({p.returncode}): {p.stderr[-1500:]}")
    return p.stdout.strip().splitlines()[-1]


class GuestLog:
    """The guest's console as its QEMU writes it on the host: a file
    chardev (/var/lib/luo-vm/web.serial) that each QEMU appends to, read
    over ssh. Nothing is lost or held back on the way (a host serial port
    under TCG is slow enough to stall the guest's output for minutes after
    a restore), so every tick the guest printed is there, in order."""

    def __init__(self, name, h):
        self.name = name
        self.h = h

    def ticks(self):
        out = self.h.check(f"cat /var/lib/luo-vm/{VM}.serial")
        return [k for k in map(parse_tick, out.splitlines()) if k]

    def wait_tick(self, t, after, timeout):
        """The first tick with a counter above `after` (polled every 2 s)."""
        deadline = time.monotonic() + timeout
        while True:
            later = [k for k in self.ticks() if k["n"] > after]
            if later:
                return later[0]
            if time.monotonic() > deadline:
                tail = self.h.ssh(f"tail -c 600 /var/lib/luo-vm/{VM}.serial; luoctl vm list; "
                                  f"systemctl status luo-qemu@{VM} --no-pager | tail -5").stdout
                alive, diag = stall_report(self.h, VM)
                # Its QEMU runs and the guest printed before: GUEST_STALLED
                # (scenarios.py runs the scenario once more); no QEMU is a
                # failure of the launcher's.
                why = f"{GUEST_STALLED}: " if alive and self.ticks() else ""
                t.fail(f"{why}{self.name}: the guest printed no tick past n={after} within {timeout} s:\n{tail}\n"
                       f"{diag}")
            time.sleep(2)


def setup_host(t, deb, name, out):
    h = luodhost.boot_with_luod(t, deb, name=name, smp=1, mem=1536)
    install_launcher(t, h)
    h.ssh("cat >> /etc/luod/luod.toml", input='rollback-kernel = "/boot/vmlinuz-luo"\n')
    h.check("systemctl restart luod && test \"$(luoctl --json status | python3 -c "
            "'import json,sys; print(json.load(sys.stdin)[\"state\"])')\" = normal", timeout=120)
    h.ssh("cat > /usr/local/bin/vm-gate && chmod 755 /usr/local/bin/vm-gate", input=VM_GATE)
    # A tick a second: a fleet's VMs mostly wait, and three hosts share two
    # CPUs (a guest that ticks every 100 ms keeps its host's one vCPU busy).
    define_vm(h, VM, None, append="tick_ms=1000")
    h.check(f"systemctl daemon-reload && systemctl enable --now luo-qemu@{VM}", timeout=120)
    t.log(f"{name}: " + wait_launcher(t, h, VM, "started fresh", 300))
    wait_launcher(t, h, VM, f"VM {VM} registered with luod", 300)
    log = GuestLog(name, h)
    first = log.wait_tick(t, 5, 600)
    out[name] = {"host": h, "boot": h.boot_id(), "guest": first["boot"], "release": h.check("uname -r").strip(),
                 "log": log}


def play(t, venv, inventory, evars, report_dir):
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=os.path.join(t.repo, "ansible"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_FORCE_COLOR="0", ANSIBLE_PIPELINING="1", ANSIBLE_HOST_KEY_CHECKING="0",
               ANSIBLE_RETRY_FILES_ENABLED="0", ANSIBLE_TIMEOUT="30", ANSIBLE_LOCAL_TEMP=os.path.join(t.work, "atmp"),
               PATH=os.path.join(venv, "bin") + os.pathsep + os.environ["PATH"])
    evars = dict(evars, fleet_report_dir=report_dir, fleet_reboot_timeout=600, fleet_health_timeout=180)
    argv = [os.path.join(venv, "bin", "ansible-playbook"), "-i", inventory, "liveupdate.fleet.rolling_update",
            "-e", json.dumps(evars)]
    play.runs = getattr(play, "runs", 0) + 1
    # The output goes to the log as it comes, each line stamped with the
    # seconds since the run started (a task's time is the gap to the next).
    t0 = time.monotonic()
    lines = []
    with open(os.path.join(t.log_dir, f"{t.name}-{t.stamp}-ansible.log"), "a") as log:
        log.write(f"# run {play.runs}: ansible-playbook ... -e '{argv[-1]}'\n")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env, cwd=t.work)
        for line in proc.stdout:
            lines.append(line)
            log.write(f"[{time.monotonic() - t0:7.1f}] {line}")
            log.flush()
        proc.wait()
        took = time.monotonic() - t0
        log.write(f"# run {play.runs}: exit {proc.returncode} in {took:.1f} s\n")
    p = types.SimpleNamespace(returncode=proc.returncode, stdout="".join(lines))
    t.log(f"ansible-playbook run {play.runs}: exit {p.returncode} in {took:.1f} s")
    for ext in ("md", "json"):
        src = os.path.join(report_dir, f"report.{ext}")
        if os.path.exists(src):
            shutil.copy(src, os.path.join(t.log_dir, f"{t.name}-{t.stamp}-report-run{play.runs}.{ext}"))
    return p, took


def report(report_dir):
    with open(os.path.join(report_dir, "report.json")) as f:
        return {r["host"]: r for r in json.load(f)["hosts"]}


def history(h):
    return [c for c in h.json("luoctl --json history")["cycles"] if c.get("target")]


def guest_ok(t, name, log, first_boot):
    """The guest ticks now, in the boot it started with, and printed every
    tick of that boot once, in order (its counter on by one from line to
    line, across every kexec of its host). Returns the number of ticks."""
    ticks = log.ticks()
    log.wait_tick(t, ticks[-1]["n"], 120)
    ticks = log.ticks()
    mine = [i for i, k in enumerate(ticks) if k["boot"] == first_boot]
    t.expect(mine, f"{name}: no tick of the guest's boot {first_boot}")
    ticks = ticks[mine[0]:]
    boots = {k["boot"] for k in ticks}
    t.expect(boots == {first_boot}, f"{name}: the guest's boot ids since its first tick: {boots}, want only {first_boot}")
    steps = [(a["n"], b["n"]) for a, b in zip(ticks, ticks[1:]) if b["n"] != a["n"] + 1]
    t.expect(not steps, f"{name}: the guest's counter did not go on by one: {steps[:10]}")
    back = tsc_went_back(ticks)
    t.expect(not back, f"{name}: the guest's TSC went back between ticks {back[:10]}")
    return len(ticks)


def vm_carried(t, name, h, kexecs):
    """The VM went through each of the host's `kexecs` live updates
    running, by luo-qemu's journal of each boot (persistent across the
    kexecs): the boot before each kexec checkpointed it with the guest
    running, the boot after restored it from that checkpoint. (The guest's
    own ticks cannot tell this apart from a guest that never ran between an
    update and its quick rollback: under TCG a restored guest may print its
    first tick only after the rollback's checkpoint.)"""
    for k in range(kexecs):
        before, after = launcher_log(h, VM, f"-b {k - kexecs}"), launcher_log(h, VM, f"-b {k - kexecs + 1}")
        t.expect(any(f"VM {VM} checkpointed:" in line and "was_running=true" in line for line in before.splitlines()),
                 f"{name}: luo-qemu@{VM} did not checkpoint a running VM before kexec {k + 1}:\n{before[-1500:]}")
        t.expect(any(f"VM {VM} restored:" in line and line.endswith(" running=true") for line in after.splitlines()),
                 f"{name}: luo-qemu@{VM} did not restore the VM after kexec {k + 1}:\n{after[-1500:]}")


def run(t):
    t0 = time.monotonic()
    target = target_kernel(t)
    digest = sha256(target)
    venv = ansible_venv(t)
    deb = luodhost.build_deb(t)
    # The guest's initramfs once, before the hosts are set up in parallel.
    initrd = os.path.join(t.work, "guest-initrd.gz")
    subprocess.run(["bash", os.path.join(t.repo, "qemu-launcher", "guest", "make-initrd.sh"), initrd], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    _run(t, t0, target, digest, venv, deb)


def _run(t, t0, target, digest, venv, deb):
    fleet, errors = {}, []

    def setup(name):
        try:
            setup_host(t, deb, name, fleet)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(f"{name}: {e}")

    threads = [threading.Thread(target=setup, args=(n,)) for n in HOSTS]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    t.expect(not errors, "setting the hosts up failed: " + "; ".join(errors))
    t.measure("three hosts booted with luod and a running VM each", time.monotonic() - t0)
    rel = {fleet[n]["release"] for n in HOSTS}
    t.expect(len(rel) == 1, f"the hosts run different kernels: {rel}")
    rel = rel.pop()
    booted = sha256(t.luo_kernel)

    inventory = {"hypervisors": {"hosts": {}, "vars": {
        "ansible_user": "root", "ansible_ssh_private_key_file": t.image.key,
        "ansible_ssh_common_args": ("-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes "
                                    "-o ServerAliveInterval=5 -o ServerAliveCountMax=6"),
        "ansible_python_interpreter": "/usr/bin/python3"}}}
    for name in HOSTS:
        gates = ["vm-gate"] + ([FAIL_GATE] if name == FAILING else [])
        inventory["hypervisors"]["hosts"][name] = {"ansible_host": "127.0.0.1",
                                                   "ansible_port": fleet[name]["host"].port,
                                                   "fleet_health_commands": gates}
    inv = os.path.join(t.work, "inventory.json")
    with open(inv, "w") as f:
        json.dump(inventory, f)
    report_dir = os.path.join(t.work, "fleet-report")
    evars = {"fleet_kernel_src": target, "fleet_kernel_sha256": digest, "fleet_serial": 1,
             "fleet_max_fail_percentage": 0}
    hosts = {n: fleet[n]["host"] for n in HOSTS}

    # 1. h2's gate fails: h1 updated, h2 rolled back, the run stops before h3.
    hosts[FAILING].check("touch /root/gate-fails")
    p, took1 = play(t, venv, inv, evars, report_dir)
    t.expect(p.returncode != 0, f"the run with h2's failing gate exited 0:\n{p.stdout[-3000:]}")
    r = report(report_dir)
    t.expect(r["h1"]["outcome"] == "updated" and (r["h1"]["kernel_before"], r["h1"]["kernel_after"]) == (rel, rel),
             f"h1's record: {r['h1']}\n{p.stdout[-3000:]}")
    c1 = history(hosts["h1"])
    t.expect([(c["outcome"], c["target"]["kernel_sha256"]) for c in c1] == [("finished", digest)], f"h1's history: {c1}")
    t.expect(hosts["h1"].boot_id() != fleet["h1"]["boot"], "h1's boot id did not change")
    t.expect(r["h2"]["outcome"] == "rolled-back", f"h2's record: {r['h2']}\n{p.stdout[-3000:]}")
    want = (f"validation `{FAIL_GATE}` exited 1: health gate: the guest agent of web does not answer; "
            f"rolled back to {rel}")
    t.expect(r["h2"]["message"] == want, f"h2's message: {r['h2']['message']!r}, want {want!r}")
    t.expect(r["h2"]["steps"] == ["check", "prepare", "freeze", "reboot", "rollback"], f"h2's steps: {r['h2']}")
    t.expect(r["h3"]["outcome"] == "pending", f"h3's record: {r['h3']}")
    # max_fail_percentage 0: Ansible ends the play after h2's batch.
    t.expect("NO MORE HOSTS LEFT" in p.stdout and "Update the batch's hosts" in p.stdout,
             f"the run did not stop at the failure budget:\n{p.stdout[-3000:]}")
    h2 = hosts["h2"]
    st = luodhost.status(h2)
    t.expect(st["state"] == "normal", f"h2's luod after the rollback: {st['state']} {st.get('notes')}")
    cycles = history(h2)
    got = [(c["id"], c["outcome"], c.get("rollback_of"), c["target"]["kernel_sha256"]) for c in cycles]
    t.expect(got == [(1, "rolled-back", None, digest), (2, "finished", 1, booted)],
             f"h2's history: {got} (the target {digest}, the booted kernel {booted})")
    vms = h2.json("luoctl --json vm list")["vms"]
    t.expect([(v["name"], v["phase"]) for v in vms] == [(VM, "registered")], f"h2's VMs after the rollback: {vms}")
    guest_ok(t, "h2", fleet["h2"]["log"], fleet["h2"]["guest"])
    vm_carried(t, "h2", h2, 2)
    h3 = hosts["h3"]
    t.expect(h3.boot_id() == fleet["h3"]["boot"] and history(h3) == [] and luodhost.status(h3)["state"] == "normal",
             "h3 was touched by the stopped run")
    guest_ok(t, "h3", fleet["h3"]["log"], fleet["h3"]["guest"])
    cp = launcher_log(h3, VM)
    t.expect("checkpointed" not in cp, f"h3's VM was checkpointed in the stopped run:\n{cp[-1500:]}")
    t.info(f"run 1 (serial 1, max_fail_percentage 0, h2's gate failing): exit {p.returncode} in {took1:.0f} s; "
           f"h1 updated; h2 rolled back to the booted kernel (cycles 1 rolled-back, 2 finished), its VM registered "
           f"and its guest on with the same boot id, every tick printed once; h3 untouched")

    # 2. The gate fixed, the same command: h1 skipped, h2 and h3 updated.
    h2.check("rm /root/gate-fails")
    h1_boot = hosts["h1"].boot_id()
    p, took2 = play(t, venv, inv, evars, report_dir)
    t.expect(p.returncode == 0, f"the second run exited {p.returncode}:\n{p.stdout[-4000:]}")
    r = report(report_dir)
    t.expect(hosts["h1"].boot_id() == h1_boot and len(history(hosts["h1"])) == 1, "h1 was not skipped")
    blackouts = {}
    for name in HOSTS:
        h = hosts[name]
        rec = r[name]
        t.expect(rec["outcome"] == "updated" and (rec["kernel_before"], rec["kernel_after"]) == (rel, rel),
                 f"{name}'s record: {rec}")
        last = history(h)[-1]
        t.expect(last["outcome"] == "finished" and last["target"]["kernel_sha256"] == digest,
                 f"{name}'s last cycle: {last}")
        t.expect(h.boot_id() != fleet[name]["boot"], f"{name}'s boot id did not change")
        t.expect(rec["luod_blackout_ns"] == last["blackout_ns"] and rec["luod_blackout_ns"] > 0,
                 f"{name}'s report blackout {rec['luod_blackout_ns']}, luod's {last['blackout_ns']}")
        t.expect([v["name"] for v in rec["vms"]] == [VM] and all(isinstance(v["blackout_ms"], int) and v["blackout_ms"] > 0
                                                                   for v in rec["vms"]),
                 f"{name}'s VMs in the report (each with the blackout its VMM reported): {rec['vms']}")
        vms = h.json("luoctl --json vm list")["vms"]
        t.expect([(v["name"], v["phase"]) for v in vms] == [(VM, "registered")], f"{name}'s VMs: {vms}")
        n = guest_ok(t, name, fleet[name]["log"], fleet[name]["guest"])
        kexecs = {"h1": 1, "h2": 3, "h3": 1}[name]
        vm_carried(t, name, h, kexecs)
        blackouts[name] = (kexecs, n, rec["vms"][0]["blackout_ms"] / 1e3)
    t.expect(len(history(h2)) == 3, f"h2's cycles: {history(h2)}")
    with open(os.path.join(report_dir, "report.md")) as f:
        md = f.read()
    for name in HOSTS:
        # report.md's row says what report.json says: outcome, kernels, luod's blackout, each VM's blackout.
        rec = r[name]
        vm_cells = ", ".join(f"{v['name']} ({v['phase']}, blackout {v['blackout_ms']} ms)" for v in rec["vms"])
        row = f"| {name} | updated | {rel} | {rel} | {rec['luod_blackout_ns'] / 1e6:.1f} ms | {vm_cells} |"
        t.expect(row in md, f"report.md has no row {row!r}:\n{md}")
    t.expect(md.splitlines()[2] == "updated 3", f"report.md's counts:\n{md}")
    t.info(f"run 2 (same command, gate fixed): exit 0 in {took2:.0f} s; h1 skipped (same boot, 1 cycle), "
           f"h2 and h3 updated")
    t.info(f"every host booted the target (sha256 {digest[:16]}...; {rel}); every guest kept its boot id and printed "
           "every tick once across its host's kexecs; " + "; ".join(
               f"{n}: {blackouts[n][0]} kexec(s), {blackouts[n][1]} ticks, VM blackout in its last update "
               f"{blackouts[n][2]:.1f} s (luo-qemu)" for n in HOSTS))
    for line in md.strip().splitlines():
        t.info("report.md: " + line)
    t.measure("fleet scenario", time.monotonic() - t0)
