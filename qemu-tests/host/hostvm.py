"""The Debian host under QEMU, for scenarios (qemu-tests/host/scenarios/*.py).

A Host is one QEMU machine (TCG, `-cpu max` so /dev/kvm works inside) that
boots the host image built by qemu-tests/host/build-image.sh through a fresh
qcow2 overlay (the cached image is never written), with:

- ssh on a free loopback port (`hostfwd=tcp:127.0.0.1:PORT-:22`), root with
  the image's key (BatchMode, no known_hosts);
- the serial console (ttyS0) in a log file; the image prints
  `@@HOST up <boot id> <uname -r> uptime=<s>` once multi-user is reached and
  `@@HOST down <boot id> ...` when the orderly shutdown begins;
- QMP on a Unix socket (to stop QEMU when ssh cannot).

    img = Image(image_dir)
    with Host(img, luo_kernel=bzimage, log_prefix="/var/cache/.../logs/x") as h:
        h.boot()                        # QEMU started, @@HOST up seen, ssh ready
        r = h.ssh("systemctl is-system-running")   # CmdResult(rc, stdout, stderr)
        out = h.check("systemd --version")         # stdout, HostError unless rc 0
        h.put("/local/file", "/root/file", mode=0o755)
        h.kexec_load("/boot/vmlinuz-luo")           # kexec -s -l ... --reuse-cmdline
        t = h.kexec()                   # `systemctl kexec`; back with a new boot id
        h.wait_serial(r"liveupdate number: 1", since=t["mark"])
        h.shutdown()

Every wait has a timeout and fails with HostError carrying the last serial
lines; a wait also fails at once if QEMU exits or the kernel panics.
"""

import collections
import functools
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import tempfile
import time

CACHE = os.environ.get("LUO_CACHE", "/var/cache/liveupdate-qemu")
# tsc=reliable: under TCG the host's TSC is this machine's, but the kernel's
# clocksource watchdog, timing it against the emulated HPET of a loaded
# machine, marked it unstable (`Marking TSC unstable due to clocksource
# watchdog`) in most boots; KVM then keeps nested guests' TSCs by catch-up,
# and a guest restored by luo-qemu after a live update had its clock run at
# twice the real rate (diag_guest_clock, 2026-11-30).
LUO_CMDLINE = "root=/dev/vda rw console=ttyS0 liveupdate=on panic=-1 tsc=reliable"
STOCK_CMDLINE = "root=/dev/vda rw console=ttyS0 panic=-1 tsc=reliable"

# tsc_early_khz=<this machine's TSC rate>: the same TSC rate in every boot
# of every host. KVM takes its guests' TSC rate from the kernel's early
# calibration; under TCG that calibration sometimes fails against the PIT
# and falls back to the HPET, 470 ppm low (2594.9 MHz against 2596.1), and
# KVM then runs its guests at a rate it cannot honour ("kvm: user requested
# TSC rate below hardware speed"). A VM checkpointed in such a boot and
# restored in a boot whose calibration came out right stalled after its
# restore: QEMU asks for the old rate, KVM cannot scale to it ("TSC
# frequency mismatch ... TSC scaling unavailable"), and the restored guest
# (on the TSC) printed nothing for minutes. Every such stall in the logs of
# 2026-11-30 (CI's qemu_two_vms_two_updates, fleet_rolling_update's h2 and
# h3) was a restore from a boot calibrated against the HPET into one
# calibrated right; restores between boots calibrated alike did not stall.
# Why the mismatch stops the guest is not traced. TCG's TSC is this
# machine's own counter (QEMU reads it with rdtsc), so this machine's rate
# is the right one for every host.
TSC_KHZ_LINE = re.compile(r"tsc: (?:Refined TSC clocksource calibration: |Detected )([\d.]+) MHz")


@functools.lru_cache(maxsize=None)
def machine_tsc_khz():
    """This machine's TSC rate in kHz, as its kernel found it (its log), or
    measured here against CLOCK_MONOTONIC_RAW with a small C program; None
    when neither works (the hosts then calibrate their TSC themselves)."""
    for cmd in (["dmesg"], ["journalctl", "-k", "-b", "-o", "cat", "--no-pager"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        rates = [float(m.group(1)) for m in TSC_KHZ_LINE.finditer(out)]
        if rates:
            return round(rates[-1] * 1000)
    return measure_tsc_khz()


MEASURE_TSC_C = r"""
#include <stdio.h>
#include <time.h>
#include <x86intrin.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC_RAW, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(void) {
    double t0 = now(), t1; unsigned long long c0 = __rdtsc(), c1;
    do { t1 = now(); c1 = __rdtsc(); } while (t1 - t0 < 0.5);
    printf("%.0f\n", (c1 - c0) / (t1 - t0) / 1000.0);
    return 0;
}
"""


def measure_tsc_khz():
    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "tsc.c"), os.path.join(d, "tsc")
        with open(src, "w") as f:
            f.write(MEASURE_TSC_C)
        try:
            subprocess.run(["cc", "-O2", "-o", exe, src], check=True, capture_output=True, stdin=subprocess.DEVNULL)
            out = subprocess.run([exe], check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL).stdout
            return int(out.strip())
        except (OSError, subprocess.CalledProcessError, ValueError):
            return None
MARKER = re.compile(r"@@HOST (\S+) (\S+) (\S+)(?: uptime=(\S+))?")

CmdResult = collections.namedtuple("CmdResult", "rc stdout stderr")


class HostError(Exception):
    """Something the host did not do in time, or did wrong."""


class Image:
    """A built host image directory (see build-image.sh)."""

    def __init__(self, path):
        self.path = path
        self.rootfs = os.path.join(path, "rootfs.ext4")
        self.key = os.path.join(path, "id_ed25519")
        self.vmlinuz_stock = os.path.join(path, "vmlinuz-stock")
        self.initrd_stock = os.path.join(path, "initrd-stock")
        with open(os.path.join(path, "manifest.json")) as f:
            self.manifest = json.load(f)

    @property
    def versions(self):
        return self.manifest["versions"]


def free_port():
    """A loopback TCP port that is free right now (QEMU binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Host:
    """One QEMU machine running the host image.

    kernel: "luo" (the LUO test kernel given as luo_kernel, booted directly)
    or "stock" (sid's linux-image-amd64 with its initramfs, from the image).
    The overlay disk (`disk`) survives stop()/boot() of the same Host, so a
    scenario can power the host off and boot it again on another kernel.
    """

    def __init__(self, image, luo_kernel=None, kernel="luo", mem=2048, smp=1, cmdline_extra="",
                 qemu_args=(), log_prefix=None, work_dir=None, echo=None):
        if kernel not in ("luo", "stock"):
            raise ValueError(f"kernel must be 'luo' or 'stock', not {kernel!r}")
        if kernel == "luo" and not luo_kernel:
            raise ValueError("kernel='luo' needs luo_kernel (the bzImage path)")
        self.image = image
        self.luo_kernel = luo_kernel
        self.kernel = kernel
        self.mem = mem
        # One vCPU unless asked: with two, TCG ran a stale translation of a
        # finished kernel text patch (an int3) in a KVM vCPU thread as nested
        # VMs started, and the host oopsed or reset itself (2026-11-30); and a
        # host of one vCPU takes one of this machine's CPUs, so two host
        # scenarios run at once (scenarios.py's CPUS).
        self.smp = smp
        self.cmdline_extra = cmdline_extra
        self.qemu_args = list(qemu_args)
        self.work = work_dir or tempfile.mkdtemp(prefix="luo-host.")
        os.makedirs(self.work, exist_ok=True)
        prefix = log_prefix or os.path.join(self.work, "host")
        self.serial_log = prefix + ".serial.log"
        self.qemu_log = prefix + ".qemu.log"
        self.disk = os.path.join(self.work, "disk.qcow2")
        self.qmp_path = os.path.join(self.work, "qmp.sock")
        self.echo = echo  # callable(str) for progress lines, or None
        self.proc = None
        self.port = None
        self.last_match_end = 0
        self.last_boot = None
        self.boot_ids = []  # one per boot seen by boot()/kexec(), in order

    # ---- lifecycle -------------------------------------------------------

    def _say(self, msg):
        if self.echo:
            self.echo(msg)

    def cmdline(self):
        base = LUO_CMDLINE if self.kernel == "luo" else STOCK_CMDLINE
        khz = machine_tsc_khz()
        if khz:
            base += f" tsc_early_khz={khz}"
        return base + (" " + self.cmdline_extra if self.cmdline_extra else "")

    def qemu_argv(self):
        if self.kernel == "luo":
            kern = ["-kernel", self.luo_kernel]
        else:
            kern = ["-kernel", self.image.vmlinuz_stock, "-initrd", self.image.initrd_stock]
        return ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", str(self.mem), "-smp", str(self.smp),
                "-nodefaults", "-display", "none", "-no-reboot",
                *kern, "-append", self.cmdline(),
                "-drive", f"file={self.disk},if=virtio,format=qcow2,cache=unsafe",
                "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.port}-:22",
                "-device", "virtio-net-pci,netdev=n0",
                "-device", "virtio-rng-pci",
                "-chardev", f"file,id=ser0,path={self.serial_log}", "-serial", "chardev:ser0",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                *self.qemu_args]

    def start(self):
        """Starts QEMU (a new overlay on first start); returns at once."""
        if self.running():
            raise HostError("the host is already running")
        if not os.path.exists(self.disk):
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", self.image.rootfs, self.disk],
                           check=True, stdin=subprocess.DEVNULL)
        for attempt in range(5):
            self.port = free_port()
            argv = self.qemu_argv()
            # Append: a second boot of the same Host keeps the first one's console.
            with open(self.serial_log, "a"):
                pass
            qlog = open(self.qemu_log, "a")
            qlog.write("# " + " ".join(shlex.quote(a) for a in argv) + "\n")
            qlog.flush()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=subprocess.STDOUT)
            qlog.close()
            time.sleep(0.5)
            if self.proc.poll() is None:
                self._say(f"QEMU started (pid {self.proc.pid}, ssh port {self.port}, {self.kernel} kernel)")
                return
            if "hostfwd" not in self._tail_file(self.qemu_log, 5):
                break  # not a port race
        raise HostError(f"QEMU exited at once with status {self.proc.returncode}:\n{self._tail_file(self.qemu_log, 20)}")

    def boot(self, timeout=300):
        """start(), then wait for `@@HOST up` and for ssh. Returns seconds from
        QEMU start to ssh ready (also in self.last_boot)."""
        mark = self.serial_mark()
        t0 = time.monotonic()
        self.start()
        up = self.wait_marker("up", timeout=timeout, since=mark)
        t_up = time.monotonic() - t0
        self.wait_ssh(timeout=max(30, timeout - t_up))
        t_ssh = time.monotonic() - t0
        self.boot_ids.append(up["boot_id"])
        self.last_boot = {"up": t_up, "ssh": t_ssh, "boot_id": up["boot_id"], "release": up["release"]}
        self._say(f"boot {len(self.boot_ids)}: multi-user after {t_up:.1f} s, ssh after {t_ssh:.1f} s "
                  f"({up['release']}, boot id {up['boot_id']})")
        return t_ssh

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def shutdown(self, timeout=120):
        """`systemctl poweroff` and wait for QEMU to exit (killed after timeout)."""
        if not self.running():
            return
        self.ssh("systemctl poweroff", timeout=30)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise HostError(f"the host did not power off within {timeout} s")

    def stop(self):
        """Stops QEMU at once (QMP quit, then SIGKILL). The overlay stays."""
        if not self.running():
            return
        try:
            self.qmp("quit")
            self.proc.wait(timeout=10)
        except (OSError, HostError, subprocess.TimeoutExpired):
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    # ---- QMP -------------------------------------------------------------

    def qmp(self, command, **arguments):
        """One QMP command; returns its "return" value."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(self.qmp_path)
            f = s.makefile("rw")
            json.loads(f.readline())  # greeting
            f.write(json.dumps({"execute": "qmp_capabilities"}) + "\n")
            f.flush()
            json.loads(f.readline())
            msg = {"execute": command}
            if arguments:
                msg["arguments"] = arguments
            f.write(json.dumps(msg) + "\n")
            f.flush()
            while True:
                line = f.readline()
                if not line:
                    if command == "quit":
                        return {}
                    raise HostError(f"QMP {command}: connection closed")
                reply = json.loads(line)
                if "return" in reply:
                    return reply["return"]
                if "error" in reply:
                    raise HostError(f"QMP {command}: {reply['error'].get('desc')}")

    # ---- serial console --------------------------------------------------

    def serial(self, since=0):
        """The serial console text from byte offset `since` on."""
        try:
            with open(self.serial_log, "rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def serial_mark(self):
        """The current end of the serial log, for wait_serial(since=...)."""
        try:
            return os.path.getsize(self.serial_log)
        except FileNotFoundError:
            return 0

    @staticmethod
    def _tail_file(path, n):
        try:
            with open(path, "rb") as f:
                return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def serial_tail(self, n=40):
        return "\n".join(line.rstrip("\r") for line in self.serial().splitlines()[-n:])

    def _failure(self, what):
        return HostError(f"{what}\n--- last serial lines ({self.serial_log}):\n{self.serial_tail()}")

    def wait_serial(self, pattern, timeout=120, since=0):
        """Waits until regex `pattern` matches a serial line at or after byte
        offset `since`; returns the re.Match (its line is m.string) and sets
        self.last_match_end to the byte offset after that line. Fails on
        timeout, QEMU exit or a kernel panic."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(self.serial_log, "rb") as f:
                    f.seek(since)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            pos = since
            for raw in data.split(b"\n")[:-1]:  # complete lines only
                pos += len(raw) + 1
                line = raw.decode("utf-8", "replace").rstrip("\r")
                m = rx.search(line)
                if m:
                    self.last_match_end = pos
                    return m
                if "Kernel panic" in line:
                    raise self._failure(f"kernel panic while waiting for {pattern!r}: {line.strip()}")
            if not self.running():
                code = self.proc.returncode if self.proc else None
                raise self._failure(f"QEMU exited (status {code}) while waiting for {pattern!r}; "
                                    f"QEMU said:\n{self._tail_file(self.qemu_log, 10)}")
            if time.monotonic() > deadline:
                raise self._failure(f"no serial line matched {pattern!r} within {timeout} s")
            time.sleep(0.2)

    def wait_marker(self, what, timeout=120, since=0, not_boot_id=None):
        """Waits for `@@HOST <what> ...` (and a boot id other than
        not_boot_id); returns {"what", "boot_id", "release", "uptime"}."""
        rx = r"@@HOST " + re.escape(what) + r" "
        deadline = time.monotonic() + timeout
        pos = since
        while True:
            m = self.wait_serial(rx, timeout=max(0.1, deadline - time.monotonic()), since=pos)
            pos = self.last_match_end
            full = MARKER.search(m.string)
            if full and full.group(2) != not_boot_id:
                return {"what": full.group(1), "boot_id": full.group(2), "release": full.group(3),
                        "uptime": float(full.group(4)) if full.group(4) else None}

    # ---- ssh -------------------------------------------------------------

    def ssh_argv(self, connect_timeout=30):
        return ["ssh", "-i", self.image.key, "-p", str(self.port), "-o", "IdentitiesOnly=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-o", "BatchMode=yes", "-o", f"ConnectTimeout={connect_timeout}", "-o", "ServerAliveInterval=5",
                "-o", "ServerAliveCountMax=6", "root@127.0.0.1"]

    def ssh(self, command, timeout=60, input=None, connect_timeout=30):
        """Runs a shell command as root on the host. Returns CmdResult(rc,
        stdout, stderr) (rc 255: ssh itself failed); HostError on timeout.
        `input` (str or bytes) goes to the command's stdin."""
        if self.port is None:
            raise HostError("the host was never started")
        binary = isinstance(input, bytes)
        try:
            p = subprocess.run(self.ssh_argv(connect_timeout) + ["--", command], input=input,
                               stdin=None if input is not None else subprocess.DEVNULL,
                               capture_output=True, timeout=timeout, text=not binary)
        except subprocess.TimeoutExpired:
            raise HostError(f"ssh command timed out after {timeout} s: {command}") from None
        out, err = p.stdout, p.stderr
        if binary:
            out, err = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
        return CmdResult(p.returncode, out, err)

    def check(self, command, timeout=60, input=None):
        """ssh(), but rc must be 0; returns stdout."""
        r = self.ssh(command, timeout=timeout, input=input)
        if r.rc != 0:
            raise HostError(f"`{command}` exited with status {r.rc}\nstdout: {r.stdout.strip()}\n"
                            f"stderr: {r.stderr.strip()}")
        return r.stdout

    def json(self, command, timeout=60):
        """check() and parse stdout as JSON."""
        out = self.check(command, timeout=timeout)
        try:
            return json.loads(out)
        except ValueError as e:
            raise HostError(f"`{command}` printed no valid JSON ({e}): {out[:500]!r}") from None

    def wait_ssh(self, timeout=180):
        """Waits until `ssh true` succeeds; returns the seconds it took."""
        t0 = time.monotonic()
        last = None
        while True:
            if not self.running():
                raise self._failure(f"QEMU exited (status {self.proc.returncode}) while waiting for ssh")
            try:
                # Generous: under TCG on a loaded machine sshd's first fork+exec
                # for a connection can take seconds before the banner.
                r = self.ssh("true", timeout=60, connect_timeout=30)
                if r.rc == 0:
                    return time.monotonic() - t0
                last = r.stderr.strip()
            except HostError as e:
                last = str(e)
            if time.monotonic() - t0 > timeout:
                raise self._failure(f"ssh not reachable on 127.0.0.1:{self.port} within {timeout} s (last: {last})")
            time.sleep(1)

    def put(self, local, remote, mode=None, timeout=120):
        """Copies a local file to `remote` on the host (over the ssh
        channel: `cat > remote`), then chmod `mode` if given."""
        cmd = f"cat > {shlex.quote(remote)}"
        if mode is not None:
            cmd += f" && chmod {mode:o} {shlex.quote(remote)}"
        with open(local, "rb") as f:
            data = f.read()
        r = self.ssh(cmd, timeout=timeout, input=data)
        if r.rc != 0:
            raise HostError(f"copying {local} to the host's {remote} failed (status {r.rc}): {r.stderr.strip()}")

    def get(self, remote, local, timeout=120):
        """Copies a file from the host to `local`."""
        p = subprocess.run(self.ssh_argv() + ["--", f"cat {shlex.quote(remote)}"], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=timeout)
        if p.returncode != 0:
            raise HostError(f"reading the host's {remote} failed (status {p.returncode}): "
                            f"{p.stderr.decode(errors='replace').strip()}")
        with open(local, "wb") as f:
            f.write(p.stdout)

    def boot_id(self):
        return self.check("cat /proc/sys/kernel/random/boot_id").strip()

    # ---- kexec -----------------------------------------------------------

    def kexec_load(self, path="/boot/vmlinuz-luo", append=None, initrd=None):
        """Loads a kernel inside the host with kexec_file_load (`kexec -s -l`):
        with the running command line (--reuse-cmdline) unless `append` is
        given."""
        cmd = f"kexec -s -l {shlex.quote(path)}"
        cmd += f" --command-line={shlex.quote(append)}" if append is not None else " --reuse-cmdline"
        if initrd:
            cmd += f" --initrd={shlex.quote(initrd)}"
        self.check(cmd, timeout=120)
        loaded = self.check("cat /sys/kernel/kexec_loaded").strip()
        if loaded != "1":
            raise HostError(f"`{cmd}` succeeded but /sys/kernel/kexec_loaded is {loaded!r}")

    def kexec(self, command="systemctl kexec", timeout=300):
        """Runs `command` (which must end in a kexec) and waits until the host
        is back: `@@HOST up` with a new boot id, then ssh. Returns
        {"up": s, "ssh": s (seconds from the command), "boot_id", "release",
        "down_seen": the old boot printed `@@HOST down` (orderly shutdown),
        "mark": the serial offset before the command, for wait_serial(since=...)}."""
        old = self.boot_id()
        mark = self.serial_mark()
        t0 = time.monotonic()
        r = self.ssh(command, timeout=60)
        if r.rc not in (0, 255):  # 255: the connection dropped as the host went down
            raise HostError(f"`{command}` exited with status {r.rc}: {r.stderr.strip()}")
        up = self.wait_marker("up", timeout=timeout, since=mark, not_boot_id=old)
        t_up = time.monotonic() - t0
        down_seen = re.search(r"@@HOST down " + re.escape(old), self.serial(mark)) is not None
        self.wait_ssh(timeout=max(30, timeout - t_up))
        t_ssh = time.monotonic() - t0
        new = self.boot_id()
        if new == old or new != up["boot_id"]:
            raise self._failure(f"after `{command}` the boot id is {new} (before: {old}, marker: {up['boot_id']})")
        self.boot_ids.append(new)
        self._say(f"kexec: `{command}` -> multi-user after {t_up:.1f} s, ssh after {t_ssh:.1f} s "
                  f"({up['release']}, boot id {new})")
        return {"down_seen": down_seen, "up": t_up, "ssh": t_ssh, "boot_id": new, "release": up["release"], "mark": mark}
