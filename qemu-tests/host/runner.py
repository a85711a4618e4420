#!/usr/bin/env python3
"""Runs one Debian-host scenario: qemu-tests/host/scenarios/NAME.py.

    runner.py NAME --image DIR --luo-kernel BZIMAGE [--log-dir DIR] [-v]

A scenario is a Python file in qemu-tests/host/scenarios/ that defines

    TIMEOUT = 900          # optional, seconds for the whole scenario (default 900)
    BENCH = False          # optional: True = a benchmark (group bench, not tests)
    DEMO = False           # optional: True = a demo (scripts/demo.sh), in no group
    def run(t): ...        # t is a Context (below)

and fails by raising (t.fail(), t.expect(), or any exception, e.g. HostError
from hostvm.py). The file name is the scenario name; scenarios.py finds it
there (group `host`, included in `tests` and `all`).

Output (what scenarios.py reads): progress lines, then `@@INFO text` lines
(the details printed under the PASS/FAIL line), for a demo `@@DEMO text`
(the story, echoed as it comes) and `@@SUMMARY text` (printed as the summary
after the PASS/FAIL line), and finally `@@PASS` or `@@FAIL why`. Exit status 0 only on pass. Every QEMU this runner started is
stopped at the end, pass or fail (also on SIGTERM).
"""

import argparse
import importlib.util
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.dont_write_bytecode = True  # no __pycache__ in the repository
sys.path.insert(0, HERE)
import hostvm  # noqa: E402  (qemu-tests/host/hostvm.py)

SCENARIO_DIR = os.path.join(HERE, "scenarios")


class Failure(Exception):
    """A scenario's own verdict (t.fail / t.expect)."""


class Context:
    """What a scenario's run(t) gets.

    t.image       hostvm.Image of the built image (t.image.versions: systemd, qemu, ...)
    t.luo_kernel  path of the LUO bzImage (also inside the image as /boot/vmlinuz-luo)
    t.bindir      directory with the static luod, luoctl, luo-qemu-tool, luo-test-vmm, luo-qemu (may be "")
    t.repo        the repository's top directory
    t.work        a scratch directory on the machine, removed afterwards
    t.host(name="host", **kw)   a new hostvm.Host (kw: kernel="luo"|"stock", mem, smp,
                  cmdline_extra, qemu_args); its logs are <log-dir>/<scenario>-<time>-<name>.{serial,qemu}.log
    t.log(msg)    a progress line (stamped with seconds since the scenario started)
    t.info(msg)   a detail printed under the scenario's PASS/FAIL line
    t.measure(what, seconds)    t.info("<what>: 12.3 s") and kept in t.measures
    t.expect(cond, why) / t.fail(why)   the scenario's verdict
    t.demo(msg) / t.summary(msg)        a demo's story line / summary line
    """

    def __init__(self, name, image, luo_kernel, bindir, log_dir, verbose):
        self.name = name
        self.image = image
        self.luo_kernel = luo_kernel
        self.bindir = bindir
        self.repo = os.path.dirname(os.path.dirname(HERE))
        self.log_dir = log_dir
        self.verbose = verbose
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.work = tempfile.mkdtemp(prefix=f"luo-host-{name}.", dir="/var/tmp")
        self.hosts = []
        self.measures = {}
        self.t0 = time.monotonic()

    def log(self, msg):
        print(f"[{time.monotonic() - self.t0:8.3f}] {msg}", flush=True)

    def info(self, msg):
        print(f"@@INFO {msg}", flush=True)

    def measure(self, what, seconds):
        self.measures[what] = seconds
        self.info(f"{what}: {seconds:.1f} s")

    def demo(self, msg):
        self.log(msg)
        print(f"@@DEMO {msg}", flush=True)

    def summary(self, msg):
        print(f"@@SUMMARY {msg}", flush=True)

    def fail(self, why):
        raise Failure(why)

    def expect(self, cond, why):
        if not cond:
            raise Failure(why)

    def host(self, name="host", **kw):
        kw.setdefault("luo_kernel", self.luo_kernel)
        h = hostvm.Host(self.image, log_prefix=os.path.join(self.log_dir, f"{self.name}-{self.stamp}-{name}"),
                        work_dir=os.path.join(self.work, name), echo=lambda m: self.log(f"{name}: {m}"), **kw)
        self.hosts.append(h)
        return h

    def cleanup(self):
        for h in self.hosts:
            try:
                h.stop()
            except Exception as e:  # noqa: BLE001 - cleanup goes on
                self.log(f"stopping {h.serial_log}: {e}")
        shutil.rmtree(self.work, ignore_errors=True)


def load(name):
    path = os.path.join(SCENARIO_DIR, name + ".py")
    if not os.path.isfile(path):
        raise SystemExit(f"no host scenario {name!r} ({path} does not exist)")
    spec = importlib.util.spec_from_file_location(f"host_scenario_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not callable(getattr(mod, "run", None)):
        raise SystemExit(f"{path} defines no run(t)")
    return mod


def host_panic(t):
    """The first `Kernel panic` line in a host's serial console, if any: the
    host's own kernel (the LUO test kernel under TCG, running nested KVM
    guests) died under the scenario, a failure of the harness's machine
    rather than of the code under test. No host scenario panics a host on
    purpose."""
    for h in t.hosts:
        try:
            with open(h.serial_log, "rb") as f:
                for raw in f:
                    line = raw.decode("utf-8", "replace").strip()
                    if "Kernel panic - not syncing" in line:
                        return line[-160:]
        except OSError:
            pass
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name")
    ap.add_argument("--image", required=True, help="the image directory build-image.sh printed")
    ap.add_argument("--luo-kernel", required=True)
    ap.add_argument("--bindir", default="")
    ap.add_argument("--log-dir", default=os.path.join(hostvm.CACHE, "logs"))
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    os.makedirs(a.log_dir, exist_ok=True)
    mod = load(a.name)
    t = Context(a.name, hostvm.Image(a.image), a.luo_kernel, a.bindir, a.log_dir, a.verbose)

    def on_term(signum, _frame):
        t.cleanup()
        print(f"@@FAIL stopped by signal {signum} (timeout?)", flush=True)
        os._exit(1)

    signal.signal(signal.SIGTERM, on_term)
    try:
        mod.run(t)
        verdict = None
    except Failure as e:
        verdict = str(e)
    except hostvm.HostError as e:
        verdict = str(e)
    except Exception:  # noqa: BLE001 - a bug in the scenario is its failure
        verdict = traceback.format_exc()
    finally:
        t.cleanup()
    if verdict is None:
        print("@@PASS", flush=True)
        return 0
    first, _, rest = verdict.partition("\n")
    panic = host_panic(t)
    if panic:
        # Said first: scenarios.py runs a scenario whose host kernel
        # panicked once more (HOST_DIED).
        first = f"the host's QEMU exited: its kernel panicked ({panic}); then: {first}"
    if rest:
        print(rest, flush=True)
    print(f"@@FAIL {first}", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
