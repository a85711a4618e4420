"""The rolling-update playbook against three local "hosts", each a real luod
(file backend, as tests/src/lib.rs starts it) driven by the real luoctl,
over Ansible's local connection.

The file backend simulates the kexec: at `reboot` luod writes the record and
exits 75; a supervisor here starts it again on the same region, as the new
kernel's systemd would, and it comes up `updated`. So the whole flow runs:
staging with digest checks, preflight, check, prepare with the pinned digest,
freeze, reboot, the wait for the host, health gates, finish, the skip of
hosts already on the target, abort by stop file, resume, and the report.
A failed health gate rolls the host back with `luoctl rollback` (a second
simulated kexec, to the image luod was given as `--rollback-kernel`). What
it cannot show: a real kexec (the kernel release stays the same); the QEMU
fleet scenario will.

The steps share one fleet and run in order, each starting from the state the
one before left.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TARGET = os.environ.get('CARGO_TARGET_DIR', os.path.join(REPO, 'target'))
LUOD = os.environ.get('LUOD', os.path.join(TARGET, 'debug', 'luod'))
LUOCTL = os.environ.get('LUOCTL', os.path.join(TARGET, 'debug', 'luoctl'))
FAKE_VMM = os.path.join(TARGET, 'debug', 'luo-fake-vmm')
VENV_BIN = os.path.dirname(sys.executable)
HOSTS = ('h1', 'h2', 'h3')
RELEASE = os.uname()[2]
SIMULATED_KEXEC_EXIT = 75


class Host(object):
    """A luod on a file-backed region, started again after each simulated kexec."""

    def __init__(self, root, name, previous, vm=None):
        self.name = name
        self.previous = previous
        self.dir = os.path.join(root, name)
        os.makedirs(self.dir)
        self.socket = os.path.join(self.dir, 'luod.sock')
        self.log = os.path.join(self.dir, 'luod.log')
        self.proc = None
        self.stopping = False
        self.starts = 0
        self.thread = threading.Thread(target=self._supervise, daemon=True)
        self.thread.start()
        self.wait_up()
        self.vmm = None
        if vm:
            # A VMM for VM `vm` that claims it after each simulated kexec and
            # reports its blackout, as luo-qemu does (without QEMU).
            self.vmm = subprocess.Popen([FAKE_VMM, self.socket, vm], stdin=subprocess.DEVNULL,
                                        stdout=open(os.path.join(self.dir, 'vmm.log'), 'ab'), stderr=subprocess.STDOUT)
            deadline = time.time() + 10
            while [v.get('detail') for v in self.json('vm', 'list')['vms']] != ['fake VMM, running']:
                assert time.time() < deadline, 'the fake VMM of %s did not register' % name
                time.sleep(0.05)

    def _supervise(self):
        while not self.stopping:
            with open(self.log, 'ab') as log:
                self.proc = subprocess.Popen(
                    [LUOD, '--backend', 'file', '--socket', self.socket, '--state-dir', os.path.join(self.dir, 'state'),
                     '--region', os.path.join(self.dir, 'region'), '--region-size', '8M',
                     '--hooks-dir', os.path.join(self.dir, 'hooks.d'), '--rollback-kernel', self.previous,
                     '--rollback-cmdline', 'console=ttyS0'],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            self.starts += 1
            rc = self.proc.wait()
            if rc != SIMULATED_KEXEC_EXIT:
                return

    def wait_up(self):
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.proc is not None and os.path.exists(self.socket):
                if self.luoctl('status').returncode == 0:
                    return
            time.sleep(0.05)
        raise AssertionError('luod of %s did not start; its log:\n%s' % (self.name, open(self.log).read()))

    def luoctl(self, *args, json_out=False):
        argv = [LUOCTL, '--socket', self.socket] + (['--json'] if json_out else []) + list(args)
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)

    def json(self, *args):
        r = self.luoctl(*args, json_out=True)
        assert r.returncode == 0, r
        return json.loads(r.stdout)

    def state(self):
        return self.json('status')['state']

    def cycles(self):
        return self.json('history')['cycles']

    def stop(self):
        self.stopping = True
        if self.vmm is not None:
            self.vmm.kill()
            self.vmm.wait(10)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.thread.join(10)


def bzimage(path):
    """A file luod's file backend takes as a kernel image: a bzImage boot
    header ("HdrS" at 0x202, boot protocol 2.15) whose version string (at
    0x200 + the pointer at 0x20E) is the running kernel's (`uname -r`, then
    `uname -v`), as a rebuilt or updated kernel of the same release would
    have, and random contents, so each image has its own digest."""
    data = bytearray(os.urandom(64 * 1024))
    data[0x202:0x206] = b'HdrS'
    data[0x206:0x208] = (0x020F).to_bytes(2, 'little')
    data[0x20E:0x210] = (0x0300).to_bytes(2, 'little')
    version = ('%s (fleet-test@localhost) %s' % (os.uname().release, os.uname().version)).encode() + b'\0'
    data[0x500:0x500 + len(version)] = version
    with open(path, 'wb') as f:
        f.write(bytes(data))
    return hashlib.sha256(bytes(data)).hexdigest()


class Fleet(object):
    def __init__(self, root):
        self.root = root
        self.previous = os.path.join(root, 'vmlinuz-running')
        self.previous_sha = bzimage(self.previous)
        self.kernel = os.path.join(root, 'vmlinuz-new')
        self.sha = bzimage(self.kernel)
        # h1 and h3 run a VM each (h2 none: its rollback from `updated` needs
        # files nobody took back, and a VMM claims its VM at once).
        self.hosts = dict((name, Host(root, name, self.previous, vm={'h1': 'vm0', 'h3': 'vm0'}.get(name)))
                          for name in HOSTS)
        self.report_dir = os.path.join(root, 'report')
        self.stop_file = os.path.join(self.report_dir, 'STOP')
        self.fail_marker = os.path.join(root, 'h2-unhealthy')
        inventory = {'hypervisors': {'hosts': {}}}
        for name, host in self.hosts.items():
            health = {
                # h1's gate creates the stop file: the run aborts after h1's batch.
                'h1': ['touch %s' % self.stop_file],
                'h2': ['test ! -e %s || { echo "health gate: guest agent of vm0 does not answer" >&2; exit 1; }'
                       % self.fail_marker],
                'h3': ['true'],
            }[name]
            inventory['hypervisors']['hosts'][name] = {
                'ansible_connection': 'local',
                'ansible_python_interpreter': sys.executable,
                'fleet_socket': host.socket,
                'fleet_luoctl': LUOCTL,
                'fleet_stage_dir': os.path.join(host.dir, 'stage'),
                'fleet_health_commands': health,
            }
        self.inventory = os.path.join(root, 'inventory.json')
        with open(self.inventory, 'w') as f:
            json.dump(inventory, f)

    def play(self, *extra, check=False, **evars):
        evars.setdefault('fleet_kernel_src', self.kernel)
        evars.setdefault('fleet_kernel_sha256', self.sha)
        evars.setdefault('fleet_report_dir', self.report_dir)
        evars.setdefault('fleet_reboot_timeout', 30)
        argv = [os.path.join(VENV_BIN, 'ansible-playbook'), '-i', self.inventory, 'liveupdate.fleet.rolling_update',
                '-e', json.dumps(evars)] + (['--check'] if check else []) + list(extra)
        env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=os.path.join(REPO, 'ansible'), ANSIBLE_NOCOLOR='1', ANSIBLE_PIPELINING='1',
                   ANSIBLE_FORCE_COLOR='0', ANSIBLE_RETRY_FILES_ENABLED='0', ANSIBLE_LOCALHOST_WARNING='0',
                   ANSIBLE_INVENTORY_UNPARSED_WARNING='0', PATH=VENV_BIN + os.pathsep + os.environ['PATH'])
        t0 = time.time()
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, check=False,
                           cwd=self.root)
        print('ansible-playbook %s: exit %d in %.1f s' % (' '.join(argv[3:]), r.returncode, time.time() - t0))
        print(r.stdout[-6000:], r.stderr[-3000:])
        return r

    def report(self):
        with open(os.path.join(self.report_dir, 'report.json')) as f:
            report = json.load(f)
        return dict((h['host'], h) for h in report['hosts'])

    def stop(self):
        for host in self.hosts.values():
            host.stop()


@pytest.fixture(scope='module')
def fleet():
    for path in (LUOD, LUOCTL, FAKE_VMM):
        assert os.access(path, os.X_OK), '%s is missing: run `cargo build --workspace --bins` first' % path
    root = tempfile.mkdtemp(prefix='fleet-test-')
    f = Fleet(root)
    yield f
    f.stop()
    shutil.rmtree(root, ignore_errors=True)


def updates(host):
    """The cycles that loaded a kernel (h3 also has one test 3 prepared and cancelled by hand)."""
    return [c for c in host.cycles() if c['target']]


def untouched(host):
    assert host.state() == 'normal'
    assert updates(host) == []


def test_1_check_mode_stages_and_checks_but_updates_nothing(fleet):
    r = fleet.play(check=True)
    assert r.returncode == 0
    report = fleet.report()
    assert [report[h]['outcome'] for h in HOSTS] == ['would-update'] * 3
    assert report['h1']['vms'] == [dict(name='vm0', phase='registered', blackout_ms=None, detail='fake VMM, running')]
    assert report['h2']['vms'] == []
    for h in HOSTS:
        untouched(fleet.hosts[h])
        staged = os.path.join(fleet.hosts[h].dir, 'stage', 'vmlinuz-' + fleet.sha[:16])
        with open(staged, 'rb') as f:
            assert hashlib.sha256(f.read()).hexdigest() == fleet.sha


def test_2_a_wrong_digest_stops_the_run_while_staging(fleet):
    r = fleet.play(fleet_kernel_sha256='0' * 64)
    assert r.returncode != 0
    assert ('vmlinuz-0000000000000000 has sha256 %s, not the pinned %s' % (fleet.sha, '0' * 64)) in r.stdout
    for h in HOSTS:
        untouched(fleet.hosts[h])


def test_3_an_unhealthy_host_stops_the_fleet_before_any_update_with_luoctls_message(fleet):
    h3 = fleet.hosts['h3']
    assert h3.luoctl('prepare').returncode == 0
    staged = os.path.join(h3.dir, 'stage', 'vmlinuz-' + fleet.sha[:16])
    expected = h3.luoctl('check', '--kernel', staged, '--reuse-cmdline').stderr.strip()
    assert expected.startswith('luoctl: check: prepare would be refused'), expected
    r = fleet.play()
    assert r.returncode != 0
    report = fleet.report()
    assert report['h3']['outcome'] == 'preflight-failed'
    assert report['h3']['message'] == expected
    assert 'preflight failed on h3: h3: %s; no host was updated' % expected in r.stdout.replace('\n', ' ')
    untouched(fleet.hosts['h1'])
    untouched(fleet.hosts['h2'])
    assert h3.state() == 'prepared'
    assert h3.luoctl('cancel').returncode == 0


def test_4_the_stop_file_aborts_after_the_first_batch(fleet):
    r = fleet.play(fleet_serial=1, fleet_max_fail_percentage=0)
    assert r.returncode == 0, 'end_play is not a failure'
    assert os.path.exists(fleet.stop_file)
    h1 = fleet.hosts['h1']
    cycles = updates(h1)
    assert len(cycles) == 1
    assert cycles[0]['outcome'] == 'finished'
    assert cycles[0]['target']['kernel_sha256'] == fleet.sha
    assert cycles[0]['to_release'] == RELEASE
    assert h1.state() == 'normal'
    assert h1.starts == 2, 'luod came back once, after the simulated kexec'
    report = fleet.report()
    assert report['h1']['outcome'] == 'updated'
    assert report['h1']['kernel_before'] == RELEASE and report['h1']['kernel_after'] == RELEASE
    assert report['h1']['luod_blackout_ns'] == cycles[0]['blackout_ns'] > 0
    assert report['h1']['steps'] == ['check', 'prepare', 'freeze', 'reboot', 'validate', 'finish']
    # The VM's blackout in this update, as its VMM measured and reported it (luoctl vm list).
    [vm] = report['h1']['vms']
    assert (vm['name'], vm['phase'], vm['detail']) == ('vm0', 'registered', 'fake VMM, running'), vm
    shown = [v['blackout_ms'] for v in h1.json('vm', 'list')['vms']]
    assert shown == [vm['blackout_ms']] and 0 < vm['blackout_ms'] < 30000, (shown, vm)
    with open(os.path.join(fleet.report_dir, 'report.md')) as f:
        assert 'vm0 (registered, blackout %d ms)' % vm['blackout_ms'] in f.read()
    assert [report[h]['outcome'] for h in ('h2', 'h3')] == ['pending', 'pending']
    untouched(fleet.hosts['h2'])
    untouched(fleet.hosts['h3'])


def test_5_resume_skips_the_updated_host_and_rolls_back_at_a_failed_health_gate(fleet):
    os.remove(fleet.stop_file)
    open(fleet.fail_marker, 'w').close()
    r = fleet.play(fleet_serial=[2, 1], fleet_max_fail_percentage=0)
    assert r.returncode != 0
    report = fleet.report()
    assert report['h1']['outcome'] == 'updated', 'the record of the earlier update is kept'
    assert len(updates(fleet.hosts['h1'])) == 1, 'h1 was skipped'
    h2 = fleet.hosts['h2']
    assert report['h2']['outcome'] == 'rolled-back'
    assert report['h2']['message'] == (
        'validation `test ! -e %s || { echo "health gate: guest agent of vm0 does not answer" >&2; exit 1; }` '
        'exited 1: health gate: guest agent of vm0 does not answer; rolled back to %s' % (fleet.fail_marker, RELEASE))
    assert report['h2']['steps'] == ['check', 'prepare', 'freeze', 'reboot', 'rollback']
    assert h2.state() == 'normal'
    cycles = updates(h2)
    assert [(c['id'], c['outcome'], c['target']['kernel_sha256']) for c in cycles] == [
        (1, 'rolled-back', fleet.sha), (2, 'finished', fleet.previous_sha)]
    assert cycles[0]['rolled_back_by'] == 2 and cycles[1]['rollback_of'] == 1
    assert report['h2']['luod_blackout_ns'] == cycles[1]['blackout_ns'] > 0, "the rollback's luod blackout"
    assert h2.starts == 3, 'luod came back after the update and after the rollback'
    assert report['h3']['outcome'] == 'pending'
    untouched(fleet.hosts['h3'])


def test_6_running_again_completes_the_rest(fleet):
    os.remove(fleet.fail_marker)
    r = fleet.play(fleet_serial='34%', fleet_max_fail_percentage=0, fleet_pause_seconds=1)
    assert r.returncode == 0
    report = fleet.report()
    assert report['h1']['outcome'] == 'updated'
    assert len(updates(fleet.hosts['h1'])) == 1, 'h1 was skipped again'
    assert report['h2']['outcome'] == 'updated'
    assert report['h3']['outcome'] == 'updated'
    assert report['h3']['luod_blackout_ns'] == updates(fleet.hosts['h3'])[0]['blackout_ns']
    [vm] = report['h3']['vms']
    assert vm['name'] == 'vm0' and vm['blackout_ms'] > 0, vm
    assert report['h2']['vms'] == []
    assert [c['target']['kernel_sha256'] for c in updates(fleet.hosts['h2'])] == [fleet.sha, fleet.previous_sha,
                                                                                   fleet.sha]
    for h in HOSTS:
        assert fleet.hosts[h].state() == 'normal'
        assert updates(fleet.hosts[h])[-1]['target']['kernel_sha256'] == fleet.sha
    with open(os.path.join(fleet.report_dir, 'report.md')) as f:
        md = f.read()
    print(md)
    assert '| h3 | updated | %s | %s |' % (RELEASE, RELEASE) in md
    assert 'updated 3' in md


def test_7_a_fleet_on_the_target_is_skipped_by_luoctls_verdict(fleet):
    r = fleet.play()
    assert r.returncode == 0
    for h in HOSTS:
        assert updates(fleet.hosts[h])[-1]['target']['kernel_sha256'] == fleet.sha
    assert [len(updates(fleet.hosts[h])) for h in HOSTS] == [1, 3, 1]
    report = fleet.report()
    assert [report[h]['outcome'] for h in HOSTS] == ['updated'] * 3, 'the records of the updates are kept'
