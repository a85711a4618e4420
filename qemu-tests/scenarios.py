#!/usr/bin/env python3
"""Run the real-kernel QEMU scenarios (called by qemu-tests/run.sh).

Each scenario boots a kernel under QEMU (TCG) with a busybox initramfs that
holds luod, luoctl, luo-qemu-tool, luo-test-vmm, the kernel itself (/kernel, the kexec
target), qemu-tests/guest/scenario-init as /init and
qemu-tests/scenarios/NAME.sh as /scenario.sh. The guest prints "@@LUO ..."
markers on the serial console (see scenario-init); this runner follows the
console, stamps every line with the host's monotonic clock, enforces a
timeout per step (the guest announces each step with its timeout) and one
per scenario, and checks on the host side that every file hashed before
the kexec has the same SHA-256 after it.

Output: one line per scenario, "PASS name 12.3 s" or "FAIL name 12.3 s:
why" (details indented below it; on failure the failed step and the last
40 console lines), then exactly "N passed, N failed". Exit status 1 if any
failed.
"""

import argparse
import collections
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LUO_CMDLINE = "console=ttyS0 liveupdate=on panic=-1 luo_boot=1"
STOCK_CMDLINE = "console=ttyS0 panic=-1 luo_boot=1"
# A q35 machine with an Intel IOMMU and QEMU's edu PCI device at 0000:00:01.0
# (as lib/tests/fixtures/sysfs/ were recorded); the kernel needs intel_iommu=on.
Q35_IOMMU_EDU = ["-machine", "q35,kernel-irqchip=split", "-device", "intel-iommu,intremap=on",
                 "-device", "edu,addr=01.0"]


class Scenario:
    def __init__(self, name, kernel, boots, hashes, cmdline_extra="", mem=1024, timeout=300,
                 boot_timeout=None, bench=False, smp=1, demo=False, qemu_args=(), firmware_reboot=False,
                 script=None):
        self.name = name
        self.script_name = script or name  # scenarios/SCRIPT.sh (two scenarios may share one)
        self.kernel = kernel  # "luo" or "stock"
        self.boots = boots  # kernels the chain must reach
        self.hashes = hashes  # files hashed before the kexec must match after it
        self.cmdline_extra = cmdline_extra
        self.mem = mem
        self.timeout = timeout
        self.boot_timeout = boot_timeout or (90 if kernel == "luo" else 180)
        self.bench = bench
        self.smp = smp
        self.demo = demo  # scripts/demo.sh: echo the story, in no group
        self.qemu_args = list(qemu_args)  # extra QEMU arguments (machine, devices)
        # The guest reboots through the firmware (sysrq-b, a panic with
        # panic=-1): QEMU runs without -no-reboot, so it resets the machine
        # (guest RAM kept) and boots the same kernel, initramfs and command
        # line again. After the verdict QEMU is stopped by the host.
        self.firmware_reboot = firmware_reboot

    @property
    def script(self):
        return os.path.join(HERE, "scenarios", self.script_name + ".sh")


SCENARIOS = [
    Scenario("kexec_simple", "luo", 2, True),
    Scenario("multi_session", "luo", 2, True),
    Scenario("stress_sessions", "luo", 2, True, timeout=900),
    Scenario("stress_files", "luo", 2, True, timeout=900),
    Scenario("cancel_before_reboot", "luo", 2, False),
    Scenario("luod_restart_mid_cycle", "luo", 2, True),
    Scenario("two_updates_in_a_row", "luo", 3, True),
    Scenario("luod_systemd_path", "luo", 2, True),
    Scenario("luod_restart_after_update", "luo", 3, True),
    Scenario("target_without_liveupdate", "luo", 1, False),
    Scenario("kexec_simple_64mib", "stock", 2, True, "memmap=160M$0x30000000", timeout=600),
    Scenario("garbage_region_at_boot", "stock", 1, False, "memmap=16M$0x30000000"),
    Scenario("region_too_small", "stock", 1, False, "memmap=1M$0x30000000"),
    # luod's range, then 1 MiB of the scenario's own that tells the boot after the reset from the first.
    Scenario("warm_reset_after_freeze", "stock", 2, False, "memmap=16M$0x30000000 memmap=1M$0x32000000",
             firmware_reboot=True),
    Scenario("crash_after_freeze", "stock", 2, False, "memmap=16M$0x30000000 memmap=1M$0x32000000",
             firmware_reboot=True, script="warm_reset_after_freeze"),
    Scenario("bench_blackout", "luo", 11, True, timeout=900, bench=True),
    Scenario("bench_copy", "stock", 1, False, "memmap=160M$0x30000000", timeout=600, bench=True),
    Scenario("vm_survives_kexec", "luo", 2, True),
    Scenario("vm_veto", "luo", 1, False),
    Scenario("vm_freeze_timeout", "luo", 1, False),
    Scenario("vm_two_updates", "luo", 3, False),
    Scenario("iommu_groups_verified", "luo", 3, False, "intel_iommu=on", qemu_args=Q35_IOMMU_EDU),
    Scenario("iommu_off_veto", "luo", 1, False, qemu_args=["-machine", "q35", "-device", "edu,addr=01.0"]),
    Scenario("device_rebound_to_vfio", "luo", 2, False, "intel_iommu=on", qemu_args=Q35_IOMMU_EDU),
    Scenario("liveupdate_busy", "luo", 1, False),
    Scenario("pinned_target_mismatch", "luo", 1, False),
    Scenario("already_on_target", "luo", 2, False),
    Scenario("bench_vm_blackout", "luo", 11, False, timeout=900, bench=True),
    Scenario("bench_vm_fanout", "luo", 7, False, timeout=600, bench=True),
    Scenario("demo", "luo", 2, True, demo=True),
    Scenario("rollback_on_failed_validation", "luo", 3, True),
    Scenario("ten_updates_in_a_row", "luo", 11, True, timeout=600),
]


class External:
    """A check of its own (the smoke tests and the kernel's selftests), run as
    a command; it passes when the command exits 0."""

    def __init__(self, name, kernel, argv, timeout=600):
        self.name = name
        self.kernel = kernel
        self.argv = argv
        self.timeout = timeout
        self.bench = False
        self.demo = False


EXTERNAL = [
    External("boot_smoke", "luo", ["boot-smoke.sh"]),
    External("kernel_selftests", "luo", ["selftests.sh"], timeout=900),
    External("boot_smoke_stock", "stock", ["boot-smoke.sh", "--stock"]),
]
SCENARIOS += EXTERNAL


class HostScenario:
    """A scenario on the Debian host image (qemu-tests/host/): the Python file
    qemu-tests/host/scenarios/NAME.py, run by qemu-tests/host/runner.py. Its
    module-level TIMEOUT (default 900), BENCH (default False), SMOKE
    (default False: a smoke check of the image that other host scenarios
    cover, run by the groups `host` and `all` but not `tests`), FLEET
    (default False: the fleet scenario, in its own group `fleet` as well as
    in `tests`, `host` and `all`),
    CPUS (default 1: the host vCPUs it runs at once, which is what it takes
    of this machine's CPUs; hosts have one vCPU, see hostvm.Host), DEMO
    (default False: a demo, in no group) and DIAG (default False: a
    diagnosis run by name, in no group) are read here without importing
    it."""

    def __init__(self, path):
        import ast
        self.name = os.path.splitext(os.path.basename(path))[0]
        self.path = path
        self.kernel = "host"  # needs the LUO kernel and the host image
        self.timeout = 900
        self.bench = False
        self.demo = False
        self.smoke = False
        self.fleet = False
        self.diag = False
        self.cpus = 1
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                if node.targets[0].id == "TIMEOUT":
                    self.timeout = ast.literal_eval(node.value)
                elif node.targets[0].id == "BENCH":
                    self.bench = bool(ast.literal_eval(node.value))
                elif node.targets[0].id == "SMOKE":
                    self.smoke = bool(ast.literal_eval(node.value))
                elif node.targets[0].id == "FLEET":
                    self.fleet = bool(ast.literal_eval(node.value))
                elif node.targets[0].id == "CPUS":
                    self.cpus = int(ast.literal_eval(node.value))
                elif node.targets[0].id == "DEMO":
                    self.demo = bool(ast.literal_eval(node.value))
                elif node.targets[0].id == "DIAG":
                    self.diag = bool(ast.literal_eval(node.value))


def host_scenarios():
    d = os.path.join(HERE, "host", "scenarios")
    return [HostScenario(os.path.join(d, f)) for f in sorted(os.listdir(d)) if f.endswith(".py")] if os.path.isdir(d) else []


SCENARIOS += host_scenarios()
BY_NAME = {s.name: s for s in SCENARIOS}
GROUPS = {
    "all": [s.name for s in SCENARIOS if not s.demo and not getattr(s, "diag", False)],
    "luo": [s.name for s in SCENARIOS if s.kernel == "luo" and not s.bench],
    "smoke": [s.name for s in EXTERNAL],
    "stock": [s.name for s in SCENARIOS if s.kernel == "stock" and not s.bench],
    "bench": [s.name for s in SCENARIOS if s.bench],
    "tests": [s.name for s in SCENARIOS if not s.bench and not s.demo and not getattr(s, "smoke", False)
              and not getattr(s, "diag", False)],
    "fleet": [s.name for s in SCENARIOS if getattr(s, "fleet", False)],
    "host": [s.name for s in SCENARIOS if s.kernel == "host" and not s.bench and not s.demo
             and not getattr(s, "diag", False)],
}

# A host scenario that failed with one of qemuvm's HOST_DIED, GUEST_RESET and
# GUEST_STALLED in its reason is run once more, saying so (qemuvm imports
# only the standard library).
sys.path.insert(0, os.path.join(HERE, "host"))
from qemuvm import GUEST_RESET, GUEST_STALLED, HOST_DIED  # noqa: E402
MARKER = re.compile(r"@@LUO (\S+)\s?(.*)$")
print_lock = threading.Lock()


def out(line=""):
    with print_lock:
        print(line, flush=True)


def cpio_gz(root, dest):
    """Packs directory `root` as a gzip -1 newc cpio archive owned by root."""
    find = subprocess.Popen(["find", "."], cwd=root, stdout=subprocess.PIPE)
    with open(dest, "wb") as f:
        cpio = subprocess.Popen(["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"], cwd=root,
                                stdin=find.stdout, stdout=subprocess.PIPE)
        gz = subprocess.Popen(["gzip", "-1", "-n"], stdin=cpio.stdout, stdout=f)
        find.stdout.close()
        cpio.stdout.close()
        rc = (gz.wait(), cpio.wait(), find.wait())
    if any(rc):
        raise RuntimeError(f"packing {root} failed: {rc}")


class Fixtures:
    """The initramfs parts: one base archive per kernel, one small one per scenario."""

    def __init__(self, work, bindir, busybox, kernels):
        self.work = work
        self.bindir = bindir
        self.busybox = busybox
        self.kernels = kernels
        self.base = {}
        self.lock = threading.Lock()

    def base_for(self, kind):
        with self.lock:
            if kind in self.base:
                return self.base[kind]
            root = os.path.join(self.work, f"base-{kind}")
            for d in ("bin", "dev", "proc", "sys", "run", "tmp"):
                os.makedirs(os.path.join(root, d), exist_ok=True)
            shutil.copy(self.busybox, os.path.join(root, "bin", "busybox"))
            # The applet links, made here: `busybox --install` costs ~0.3 s at
            # every boot under TCG.
            applets = subprocess.run([self.busybox, "--list"], check=True, capture_output=True, text=True).stdout.split()
            for a in applets:
                if a != "busybox" and "/" not in a:
                    link = os.path.join(root, "bin", a)
                    if not os.path.lexists(link):
                        os.symlink("busybox", link)
            for b in ("luod", "luoctl", "luo-qemu-tool", "luo-test-vmm"):
                dst = os.path.join(root, b)
                shutil.copy(os.path.join(self.bindir, b), dst)
                subprocess.run(["strip", "--strip-all", dst], check=True)
            shutil.copy(self.kernels[kind], os.path.join(root, "kernel"))
            shutil.copy(os.path.join(HERE, "guest", "scenario-init"), os.path.join(root, "init"))
            os.chmod(os.path.join(root, "init"), 0o755)
            dest = os.path.join(self.work, f"base-{kind}.cpio.gz")
            cpio_gz(root, dest)
            self.base[kind] = dest
            return dest

    def initrd_for(self, sc):
        base = self.base_for(sc.kernel)
        root = os.path.join(self.work, f"scn-{sc.name}")
        os.makedirs(root, exist_ok=True)
        shutil.copy(sc.script, os.path.join(root, "scenario.sh"))
        with open(os.path.join(root, "scenario.name"), "w") as f:
            f.write(sc.name + "\n")
        small = os.path.join(self.work, f"scn-{sc.name}.cpio.gz")
        cpio_gz(root, small)
        # The kernel unpacks concatenated archives in order.
        dest = os.path.join(self.work, f"initrd-{sc.name}.gz")
        with open(dest, "wb") as f:
            for part in (base, small):
                with open(part, "rb") as p:
                    shutil.copyfileobj(p, f)
        return dest


class Result:
    def __init__(self, name):
        self.name = name
        self.ok = False
        self.why = ""
        self.secs = 0.0
        self.step = "boot"
        self.details = []
        self.tail = collections.deque(maxlen=40)
        self.log = ""
        self.marks = []  # (name, host seconds since QEMU start, boot index)
        self.hashes = {}  # phase -> {key: (sha, size)}
        self.bench = {}
        self.boots = []
        self.summary = []
        self.bench_host = {}
        self.boot_uptimes = []  # (boot index, host seconds, guest uptime at /init)


def run_external(sc, kernels, log_dir):
    res = Result(sc.name)
    t0 = time.monotonic()
    if not kernels.get(sc.kernel):
        res.why = f"no {sc.kernel} kernel (see the build/fetch step above)"
        return res
    argv = [os.path.join(HERE, sc.argv[0])] + sc.argv[1:]
    if sc.argv[0] == "boot-smoke.sh":
        argv += ["--kernel", kernels[sc.kernel]]
    res.log = os.path.join(log_dir, f"{sc.name}-{time.strftime('%Y%m%d-%H%M%S')}.log")
    res.step = " ".join(sc.argv)
    with open(res.log, "w") as log:
        try:
            rc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                timeout=sc.timeout).returncode
            res.why = "" if rc == 0 else f"{' '.join(sc.argv)} exited with status {rc}"
        except subprocess.TimeoutExpired:
            rc = None
            res.why = f"{' '.join(sc.argv)} timed out after {sc.timeout} s"
    res.secs = time.monotonic() - t0
    res.ok = rc == 0
    with open(res.log, errors="replace") as f:
        lines = f.read().splitlines()
    res.tail.extend(lines[-40:])
    for line in lines:
        if re.search(r"selftests: \d+ passed|all checks passed|^\s+(PASS|FAIL)\s", line):
            res.details.append(line.strip())
    return res


def run_host(sc, kernels, bindir, log_dir, verbose):
    """Runs qemu-tests/host/runner.py NAME; its @@INFO lines are the details."""
    res = Result(sc.name)
    t0 = time.monotonic()
    if not kernels.get("luo") or not kernels.get("host"):
        res.why = "no LUO kernel or no host image (see the build steps above)"
        return res
    argv = [sys.executable, os.path.join(HERE, "host", "runner.py"), sc.name, "--image", kernels["host"],
            "--luo-kernel", kernels["luo"], "--bindir", bindir, "--log-dir", log_dir]
    res.log = os.path.join(log_dir, f"{sc.name}-{time.strftime('%Y%m%d-%H%M%S')}.log")
    res.step = "run"
    verdict = None
    with open(res.log, "w", buffering=1) as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
        def stop():
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the runner stops its QEMUs and says @@FAIL
            except ProcessLookupError:
                pass

        timer = threading.Timer(sc.timeout, stop)
        timer.start()
        for line in proc.stdout:
            line = line.rstrip("\n")
            log.write(line + "\n")
            if verbose:
                out(f"  {sc.name} {line}")
            if line.startswith("@@INFO "):
                res.details.append(line[7:])
            elif line.startswith("@@DEMO "):
                if not verbose:
                    out(f"[{time.monotonic() - t0:7.1f}] {line[7:]}")
            elif line.startswith("@@SUMMARY "):
                res.summary.append(line[10:])
            elif line.startswith("@@PASS"):
                verdict = ""
            elif line.startswith("@@FAIL "):
                verdict = line[7:]
            else:
                res.tail.append(line)
                if line.startswith("[") and "] " in line:
                    res.step = line.split("] ", 1)[1][:80]
        rc = proc.wait()
        timed_out = not timer.is_alive() and rc != 0
        timer.cancel()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # QEMUs left behind by a killed runner
    except ProcessLookupError:
        pass
    res.secs = time.monotonic() - t0
    res.ok = rc == 0 and verdict == ""
    if not res.ok:
        res.why = (f"timed out after {sc.timeout} s; " if timed_out else "") + (
            verdict or f"runner.py exited with status {rc} without a verdict")
    return res


def run_scenario(sc, fixtures, kernels, log_dir, verbose):
    if isinstance(sc, External):
        return run_external(sc, kernels, log_dir)
    if isinstance(sc, HostScenario):
        return run_host(sc, kernels, fixtures.bindir, log_dir, verbose)
    res = Result(sc.name)
    t_start = time.monotonic()
    if sc.kernel not in kernels or not kernels[sc.kernel]:
        res.why = f"no {sc.kernel} kernel (see the build/fetch step above)"
        return res
    try:
        initrd = fixtures.initrd_for(sc)
    except Exception as e:  # noqa: BLE001 - reported as the scenario's failure
        res.why = f"building the initramfs failed: {e}"
        return res
    cmdline = (LUO_CMDLINE if sc.kernel == "luo" else STOCK_CMDLINE) + (" " + sc.cmdline_extra if sc.cmdline_extra else "")
    qemu = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", str(sc.mem), "-smp", str(sc.smp),
            "-nodefaults", "-display", "none", "-serial", "stdio"] + ([] if sc.firmware_reboot else ["-no-reboot"]) + [
            "-kernel", kernels[sc.kernel], "-initrd", initrd, "-append", cmdline] + sc.qemu_args
    res.log = os.path.join(log_dir, f"{sc.name}-{time.strftime('%Y%m%d-%H%M%S')}.log")
    log = open(res.log, "w", buffering=1)
    log.write("# " + " ".join(qemu) + "\n")
    proc = subprocess.Popen(qemu, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    t0 = time.monotonic()
    overall = t0 + sc.timeout
    step_deadline = t0 + sc.boot_timeout
    step_timeout = sc.boot_timeout
    verdict = None  # ("pass", "") or ("fail", why)
    ended_at = None
    buf = b""
    boot = 0
    panic_expected = False  # the guest announced a panic it causes (@@LUO expect-panic)

    def handle(line, now):
        nonlocal verdict, step_deadline, step_timeout, boot, ended_at, panic_expected
        rel = now - t0
        log.write(f"[{rel:8.3f}] {line}\n")
        res.tail.append(f"[{rel:8.3f}] {line}")
        if verbose:
            out(f"  {sc.name} [{rel:8.3f}] {line}")
        elif sc.demo and "DEMO" in line and "DEMO-SUMMARY" not in line and "@@LUO" not in line:
            out(f"[{rel:7.3f}] {line[line.index('DEMO') + 5:].lstrip()}")
        if sc.demo and "DEMO-SUMMARY " in line:
            res.summary.append(line[line.index("DEMO-SUMMARY ") + 13:])
        if "Kernel panic" in line and verdict is None:
            if panic_expected:
                panic_expected = False
                res.details.append(f"the panic the scenario caused: {line.strip()}")
            else:
                verdict = ("fail", f"kernel panic: {line.strip()}")
                ended_at = now
        m = MARKER.search(line)
        if not m:
            return
        kind, rest = m.group(1), m.group(2).strip()
        if kind == "step":
            # A kernel line may follow on the same console line ("60[    2.1] ..."): take the leading number.
            sm = re.match(r"(\S+)(?:\s+(\d+(?:\.\d+)?))?", rest)
            res.step = sm.group(1) if sm else "?"
            step_timeout = float(sm.group(2)) if sm and sm.group(2) else 60.0
            step_deadline = now + step_timeout
        elif kind == "expect-panic":
            panic_expected = True
        elif kind == "boot" and verdict is not None:
            return  # a reset after the verdict (firmware_reboot): not part of the chain
        elif kind == "boot":
            if len(res.boots) >= sc.boots:
                verdict = ("fail", f"{len(res.boots) + 1} kernels reached /init, expected {sc.boots}")
                ended_at = now
                return
            boot = int(rest.split()[0])
            res.boots.append((boot, rel))
            um = re.search(r"uptime=([0-9.]+)", rest)
            if um:
                res.boot_uptimes.append((boot, rel, float(um.group(1))))
            res.step = f"boot {boot}"
        elif kind == "mark":
            res.marks.append((rest.split()[0], rel, boot))
        elif kind == "hash":
            p = rest.split()
            if len(p) >= 3:
                res.hashes.setdefault(p[0], {})[p[1]] = (p[2], p[3] if len(p) > 3 else "?")
        elif kind == "info":
            res.details.append(rest)
        elif kind == "bench":
            p = rest.split()
            if len(p) == 2:
                res.bench[p[0]] = float(p[1])
        elif kind == "pass" and verdict is None:
            verdict = ("pass", "")
            ended_at = now
        elif kind == "fail" and verdict is None:
            verdict = ("fail", rest)
            ended_at = now

    while True:
        now = time.monotonic()
        if verdict is not None and now - ended_at > (3 if sc.firmware_reboot else 20):
            break  # the guest did not power off (or resets again); it has said what it had to
        if verdict is None and now > step_deadline:
            verdict = ("fail", f"step {res.step!r} timed out after {step_timeout:.0f} s")
            break
        if verdict is None and now > overall:
            verdict = ("fail", f"scenario timed out after {sc.timeout} s (step {res.step!r})")
            break
        wait = max(0.05, min(step_deadline, overall) - now) if verdict is None else 1.0
        r, _, _ = select.select([proc.stdout], [], [], min(wait, 1.0))
        if r:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            now = time.monotonic()
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                handle(raw.decode("utf-8", "replace").rstrip("\r"), now)
        elif proc.poll() is not None:
            break
    if buf:
        handle(buf.decode("utf-8", "replace").rstrip("\r"), time.monotonic())
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    rc = proc.wait()
    log.close()
    res.secs = time.monotonic() - t_start
    if verdict is None:
        verdict = ("fail", f"QEMU exited with status {rc} during step {res.step!r} without a verdict")
    res.ok = verdict[0] == "pass"
    res.why = verdict[1]
    if res.ok:
        host_checks(sc, res)
    if sc.name == "bench_copy":
        host_copy_reference(fixtures.bindir, res)
    return res


def host_copy_reference(bindir, res):
    """The same copy benchmark on the host, natively (a file region on tmpfs
    instead of /dev/mem): what the guest's figures look like without TCG,
    which emulates the crc32 instruction slowly."""
    region = os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(), f"luo-bench-copy.{os.getpid()}")
    try:
        p = subprocess.run([os.path.join(bindir, "luo-qemu-tool"), "bench-copy", "--file", region, "--size", "64M", "--reps", "3"],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        res.details.append(f"host-native reference not measured: {e}")
        return
    finally:
        if os.path.exists(region):
            os.unlink(region)
    for line in p.stdout.splitlines():
        m = MARKER.search(line)
        if m and m.group(1) == "bench":
            k, v = m.group(2).split()
            res.bench_host[k] = float(v)


def host_checks(sc, res):
    """What the host verifies itself, from the markers."""
    seen = len(res.boots)
    if seen != sc.boots:
        res.ok = False
        res.why = f"{seen} kernel(s) reached /init, expected {sc.boots}"
        return
    if sc.hashes:
        before = res.hashes.get("before", {})
        after = res.hashes.get("after", {})
        if not before:
            res.ok, res.why = False, "no file was hashed before the kexec"
            return
        if set(before) != set(after):
            res.ok = False
            res.why = f"hashed before but not after: {sorted(set(before) - set(after))}; after only: {sorted(set(after) - set(before))}"
            return
        bad = [k for k in before if before[k][0] != after[k][0] or before[k][1] != after[k][1]]
        if bad:
            res.ok = False
            res.why = "SHA-256 differ after the kexec: " + ", ".join(f"{k} {before[k]} -> {after[k]}" for k in bad)
            return
        many = sum(int(v[1]) for k, v in before.items() if k.startswith("manifest:") and v[1].isdigit())
        single = [k for k in before if not k.startswith("manifest:")]
        what = []
        if single:
            what.append(f"{len(single)} file(s) one by one")
        if many:
            what.append(f"the manifest digest of {many} file(s)")
        res.details.insert(0, f"host: SHA-256 identical before and after the kexec for {', '.join(what)}")
    for line in blackout_lines(res):
        res.details.append(line)


def pairs(marks, start, end):
    """(t_start, t_end, marks in between) for each `start` mark followed by an `end` mark."""
    found = []
    for i, (name, t, _) in enumerate(marks):
        if name != start:
            continue
        for j in range(i + 1, len(marks)):
            if marks[j][0] == end:
                found.append((t, marks[j][1], {m[0]: m[1] for m in marks[i + 1:j]}))
                break
            if marks[j][0] == start:
                break
    return found


def blackout_lines(res):
    lines = []
    for t0, t1, mid in pairs(res.marks, "freeze-start", "updated"):
        parts = []
        if "frozen" in mid:
            parts.append(f"freeze {mid['frozen'] - t0:.3f}")
        if "reboot-call" in mid and "init-start" in mid:
            parts.append(f"reboot call -> new /init {mid['init-start'] - mid['reboot-call']:.3f}")
        if "init-start" in mid and "luod-exec" in mid:
            parts.append(f"new /init -> luod exec {mid['luod-exec'] - mid['init-start']:.3f}")
            parts.append(f"luod exec -> luoctl status says updated {t1 - mid['luod-exec']:.3f}")
        elif "init-start" in mid:
            parts.append(f"new /init -> luod updated {t1 - mid['init-start']:.3f}")
        lines.append(f"host-measured blackout {t1 - t0:.3f} s ({', '.join(parts)})")
    return lines


def bench_report(name, res):
    lines = []
    if name == "bench_blackout":
        bare = [t1 - t0 for t0, t1, _ in pairs(res.marks, "bare-kexec", "init-start")]
        luod = pairs(res.marks, "freeze-start", "updated")
        total = [t1 - t0 for t0, t1, _ in luod]
        if bare and total:
            med_b, med_l = statistics.median(bare), statistics.median(total)
            lines.append(f"bare kexec (reboot(KEXEC) -> next /init), s: {' '.join(f'{x:.3f}' for x in bare)}; median {med_b:.3f}")
            lines.append(f"luod cycle (before luoctl freeze -> luoctl status says updated), s: {' '.join(f'{x:.3f}' for x in total)}; median {med_l:.3f}")

            def med(key):
                vals = []
                for t0, t1, mid in luod:
                    vals.append({"freeze": mid.get("frozen", t0) - t0,
                                 "frozen->reboot call": mid.get("reboot-call", t0) - mid.get("frozen", t0),
                                 "reboot call->/init": mid.get("init-start", t1) - mid.get("reboot-call", t0),
                                 "/init->luod exec": mid.get("luod-exec", t1) - mid.get("init-start", t1),
                                 "luod exec->updated": t1 - mid.get("luod-exec", t1)}[key])
                return statistics.median(vals)
            lines.append("luod parts (medians, s): " + ", ".join(
                f"{k} {med(k):.3f}" for k in ("freeze", "frozen->reboot call", "reboot call->/init", "/init->luod exec",
                                              "luod exec->updated")))
            # The new kernel's own boot time (its uptime when /init ran) after each kind of kexec.
            up = {}
            for boot, _, uptime in res.boot_uptimes:
                if boot > 1:
                    up.setdefault("bare" if boot % 2 == 0 else "luod", []).append(uptime)
            if up.get("bare") and up.get("luod"):
                lines.append(f"new kernel's uptime at /init (medians, s): after a bare kexec {statistics.median(up['bare']):.3f}, "
                             f"after a luod cycle {statistics.median(up['luod']):.3f}")
            lines.append(f"minimum: bare {min(bare):.3f} s, luod {min(total):.3f} s (the least disturbed runs: "
                         f"ratio of minima {min(total) / min(bare):.3f})")
            lines.append(f"RATIO blackout luod/bare = {med_l / med_b:.3f} (medians; target <= 1.10)")
            import luod_share  # qemu-tests/luod_share.py
            lines += luod_share.report(res, pairs)
        else:
            lines.append("not enough markers for the blackout benchmark")
    elif name == "bench_vm_blackout":
        import vm_bench  # qemu-tests/vm_bench.py
        lines += vm_bench.report(res, pairs)
    elif name == "bench_vm_fanout":
        import vm_fanout  # qemu-tests/vm_fanout.py
        lines += vm_fanout.report(res, pairs)
    elif name == "bench_copy":
        b = res.bench
        if "record_write_ms" in b and "memcpy_ram_ms" in b:
            mib = b.get("copy_bytes", 64 << 20) / (1 << 20)
            for key, what in (("memcpy_ram_ms", "memcpy RAM->RAM"),
                              ("record_write_ms", "RecordStore::write sealed memfd->region, through its mapping"),
                              ("record_write_pread_ms", "RecordStore::write memfd->region with pread (an unsealed memfd)"),
                              ("memcpy_region_ms", "memcpy memfd mapping->region"), ("pread_ms", "pread memfd->RAM"),
                              ("crc32c_ms", "crc32c of 64 MiB in RAM")):
                if key in b:
                    lines.append(f"{what}: {b[key]:.1f} ms ({mib / (b[key] / 1e3):.0f} MiB/s), best of 3, {mib:.0f} MiB")
            lines.append(f"RATIO copy bandwidth record/memcpy = {b['memcpy_ram_ms'] / b['record_write_ms']:.3f} (target >= 0.9)")
            h = res.bench_host
            if "record_write_ms" in h and "memcpy_ram_ms" in h:
                lines.append(f"host-native reference (same tool and code, file region on tmpfs, no TCG): memcpy {h['memcpy_ram_ms']:.1f} ms, "
                             f"RecordStore::write {h['record_write_ms']:.1f} ms, pread {h.get('pread_ms', 0):.1f} ms, "
                             f"crc32c {h.get('crc32c_ms', 0):.1f} ms: ratio {h['memcpy_ram_ms'] / h['record_write_ms']:.3f}"
                             + (f" (with pread, as for an unsealed memfd: {h['memcpy_ram_ms'] / h['record_write_pread_ms']:.3f})"
                                if "record_write_pread_ms" in h else ""))
        else:
            lines.append("the copy benchmark printed no numbers")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="scenarios or groups (all, tests, luo, stock, host, bench); default all")
    ap.add_argument("--luo-kernel", default="")
    ap.add_argument("--stock-kernel", default="")
    ap.add_argument("--host-image", default="", help="the Debian host image directory (qemu-tests/host/build-image.sh)")
    ap.add_argument("--bindir", default="", help="directory with static luod, luoctl, luo-qemu-tool")
    ap.add_argument("--busybox", default="/bin/busybox")
    ap.add_argument("--log-dir", default=os.path.join(os.environ.get("LUO_CACHE", "/var/cache/liveupdate-qemu"), "logs"))
    ap.add_argument("--jobs", "-j", type=int, default=int(os.environ.get("LUO_QEMU_JOBS", "0") or 0),
                    help="CPUs to fill with scenarios at once (default: this machine's CPU count); a busybox "
                         "scenario takes its -smp, a Debian-host scenario its hosts' vCPUs (CPUS, default 1)")
    ap.add_argument("--verbose", "-v", action="store_true", help="echo the console")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--needs", action="store_true", help="print the number of scenarios selected and the kernels they need")
    ap.add_argument("--total-timeout", type=float, default=float(os.environ.get("LUO_QEMU_TOTAL_TIMEOUT", "3600")),
                    help="no scenario starts after this many seconds (those left FAIL)")
    a = ap.parse_args()
    if a.list:
        for s in SCENARIOS:
            kind = "bench" if s.bench else "check" if isinstance(s, External) else "host" if isinstance(s, HostScenario) else "test"
            out(f"{s.name:28} {s.kernel:6} {kind}")
        return 0
    names = []
    for n in a.names or ["all"]:
        for m in GROUPS.get(n, [n]):
            if m not in BY_NAME:
                out(f"unknown scenario {m!r}; known: {', '.join(BY_NAME)} (groups: {', '.join(GROUPS)})")
                return 2
            if m not in names:
                names.append(m)
    if a.needs:
        kinds = sorted({BY_NAME[n].kernel for n in names})
        out(f"{len(names)} {' '.join(kinds)}")
        return 0
    if not a.bindir:
        out("--bindir is required")
        return 2
    os.makedirs(a.log_dir, exist_ok=True)
    kernels = {"luo": a.luo_kernel, "stock": a.stock_kernel, "host": a.host_image}
    work = tempfile.mkdtemp(prefix="luo-scenarios.")
    fixtures = Fixtures(work, a.bindir, a.busybox, {k: v for k, v in kernels.items() if v and k != "host"})
    results = {}
    # Benchmarks run alone, after the tests, so that nothing else loads the host.
    tests = [n for n in names if not BY_NAME[n].bench]
    benches = [n for n in names if BY_NAME[n].bench]

    def report(res):
        with print_lock:
            print(f"{'PASS' if res.ok else 'FAIL'} {res.name} {res.secs:.1f} s" + ("" if res.ok else f": {res.why}"))
            for d in res.details:
                print(f"  {d}")
            if BY_NAME[res.name].bench:
                for d in bench_report(res.name, res):
                    print(f"  {d}")
            if BY_NAME[res.name].demo and res.summary:
                print("summary of the live update:")
                for d in res.summary:
                    print(f"  {d}")
                for t0, t1, mid in pairs(res.marks, "freeze-start", "updated"):
                    print(f"  blackout (host)  {(t1 - t0) * 1e3:.0f} ms, measured on the host from the serial console markers")
                    if "frozen" in mid:
                        print(f"    freeze         {(mid['frozen'] - t0) * 1e3:.0f} ms")
                    if "reboot-call" in mid and "init-start" in mid:
                        print(f"    kexec          {(mid['init-start'] - mid['reboot-call']) * 1e3:.0f} ms (luoctl reboot -> the new kernel's /init)")
                    if "init-start" in mid and "luod-exec" in mid:
                        print(f"    /init -> luod  {(mid['luod-exec'] - mid['init-start']) * 1e3:.0f} ms (the test /init's own setup)")
                        print(f"    luod -> updated {(t1 - mid['luod-exec']) * 1e3:.0f} ms (luod start until `luoctl status` says updated)")
            if not res.ok:
                print(f"  failed step: {res.step}; console log: {res.log or '(none)'}")
                if res.tail:
                    print("  last console lines:")
                    for t in res.tail:
                        print(f"  | {t}")
            sys.stdout.flush()

    t_all = time.monotonic()

    # Scenarios share the CPUs: a busybox scenario takes as many as its
    # QEMU's -smp (TCG runs a thread per vCPU), a check 1, a Debian-host
    # scenario its CPUS (its hosts' vCPUs: one host of -smp 1 unless it
    # says more). The next scenario to start is the first queued one that
    # fits.
    cpus = a.jobs if a.jobs > 0 else (os.cpu_count() or 1)

    def weight(n):
        sc = BY_NAME[n]
        return min(cpus, sc.cpus if isinstance(sc, HostScenario) else getattr(sc, "smp", 1))

    sched = threading.Condition()
    free = [cpus]

    def worker(queue):
        while True:
            with sched:
                while True:
                    if not queue:
                        return
                    i = next((i for i, n in enumerate(queue) if weight(n) <= free[0]), None)
                    if i is not None:
                        break
                    sched.wait()
                n = queue.pop(i)
                free[0] -= weight(n)
            try:
                if time.monotonic() - t_all > a.total_timeout:
                    res = Result(n)
                    res.why = f"not run: the overall timeout of {a.total_timeout:.0f} s has passed"
                else:
                    t_one = time.monotonic()
                    res = run_scenario(BY_NAME[n], fixtures, kernels, a.log_dir, a.verbose)
                    took_one = time.monotonic() - t_one
                    why = res.why or ""
                    harness = (HOST_DIED, GUEST_RESET, GUEST_STALLED)
                    if not res.ok and isinstance(BY_NAME[n], HostScenario) and any(k in why for k in harness):
                        # The host's own QEMU (TCG, running nested KVM guests)
                        # exited under the scenario, or a nested guest reset
                        # itself in its QEMU or stopped printing (see
                        # qemuvm.GUEST_RESET, GUEST_STALLED): once
                        # more, and the result says so; unless a second run
                        # as long as the first would end past the overall
                        # timeout (CI stops a run at 90 minutes).
                        first = res.why
                        if time.monotonic() - t_all + took_one > a.total_timeout:
                            res.details.insert(0, f"not run twice: a second run of {took_one:.0f} s would end past "
                                                  f"the overall timeout of {a.total_timeout:.0f} s")
                        else:
                            res = run_scenario(BY_NAME[n], fixtures, kernels, a.log_dir, a.verbose)
                            res.details.insert(0, f"run twice: in the first run {first}")
                results[n] = res
                report(res)
            finally:
                with sched:
                    free[0] += weight(n)
                    sched.notify_all()

    try:
        queue = list(tests)
        threads = [threading.Thread(target=worker, args=(queue,)) for _ in range(max(1, min(cpus, len(queue))))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        free[0] = cpus
        worker(list(benches))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    passed = sum(1 for r in results.values() if r.ok)
    failed = len(names) - passed
    took = time.monotonic() - t_all
    t0 = os.environ.get("LUO_RUN_T0_MS")
    if t0 and t0.isdigit():
        print(f"scenarios took {took:.1f} s; run.sh {time.time() - int(t0) / 1000:.1f} s in all "
              f"(setup, kernels and binaries {time.time() - int(t0) / 1000 - took:.1f} s)", flush=True)
    else:
        print(f"scenarios took {took:.1f} s", flush=True)
    print(f"{passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
