# -*- coding: utf-8 -*-
# Copyright: liveupdate developers
# Apache License 2.0 (see the repository's Cargo.toml)
"""luod_cycle and luod_facts against the fake luoctl: every step's luoctl
calls, their order, and that failures are luoctl's own lines."""

from __future__ import annotations

import hashlib
import os

from ansible_collections.liveupdate.fleet.plugins.modules import luod_cycle, luod_facts

from .conftest import HISTORY_EMPTY, STATUS_NORMAL, VMS_NONE, ok, refused

RELEASE = os.uname()[2]
CHECK_OK = ok(items=[dict(name='state', ok=True, detail='normal: prepare is allowed')])
CHECK_FAILED = refused(
    3, 'check-failed', 'check',
    'prepare would be refused (1 of 2 checks failed): privilege: transitions need root or CAP_SYS_BOOT',
    'fix what failed, then check again',
    items=[dict(name='state', ok=True, detail='normal: prepare is allowed'),
           dict(name='privilege', ok=False, detail='transitions need root or CAP_SYS_BOOT')])
PREPARED = ok(**{'from': 'normal', 'to': 'prepared', 'generation': 4, 'sessions': 0, 'files': 0, 'bytes': 0,
                 'elapsed_ns': 1000, 'notes': []})
FROZEN = ok(**{'from': 'prepared', 'to': 'frozen', 'generation': 5, 'sessions': 0, 'files': 0, 'bytes': 0,
               'elapsed_ns': 1000, 'notes': []})
CANCELLED = ok(**{'from': 'frozen', 'to': 'normal', 'generation': 6, 'sessions': 0, 'files': 0, 'bytes': 0,
                  'elapsed_ns': 1000, 'notes': []})
REBOOT_CUT = dict(rc=6, json=dict(ok=False, error=dict(
    kind='connection', code=6, what='reboot', message='connection to luod broke: Connection reset by peer',
    hint='if the host is kexec-ing into the new kernel this is expected: run `luoctl status` once it is up',
    step=None)))


def history_with(sha, to_release, outcome='finished'):
    target = dict(kernel='/boot/k', kernel_sha256=sha, initrd=None, initrd_sha256=None, cmdline='x')
    return ok(cycles=[dict(id=1, outcome=outcome, target=target,
                           from_release='6.1.0', to_release=to_release, timestamps={}, blackout_ns=5,
                           sessions=0, files=0, bytes=0)], events=[])


def kernel_file(tmp_path, content=b'a kernel image'):
    path = tmp_path / 'vmlinuz'
    path.write_bytes(content)
    return str(path), hashlib.sha256(content).hexdigest()


def test_check_passes_and_returns_the_items(fake, run_module, tmp_path):
    kernel, sha = kernel_file(tmp_path)
    f = fake(check=[CHECK_OK], history=[HISTORY_EMPTY])
    r = run_module(luod_cycle.main, dict(step='check', kernel=kernel, kernel_sha256=sha))
    assert not r.get('failed'), r
    assert r['changed'] is False
    assert r['items'] == CHECK_OK['json']['items']
    assert r['on_target'] is False
    assert r['on_target_reason'] == 'no live update has finished on this host'
    assert f.calls()[-1] == 'check --kernel %s --reuse-cmdline' % kernel


def test_a_failed_check_fails_with_luoctls_line_and_items(fake, run_module):
    fake(check=[CHECK_FAILED])
    r = run_module(luod_cycle.main, dict(step='check'))
    assert r['failed'] is True
    assert r['msg'] == ('luoctl: check: prepare would be refused (1 of 2 checks failed): privilege: transitions '
                        'need root or CAP_SYS_BOOT; fix what failed, then check again')
    assert r['luoctl']['rc'] == 3
    assert r['luoctl']['kind'] == 'check-failed'
    assert [i['name'] for i in r['items']] == ['state', 'privilege']


def test_on_target_when_the_last_finished_update_loaded_the_pinned_digest_and_its_release_runs(
        fake, run_module, tmp_path):
    kernel, sha = kernel_file(tmp_path)
    fake(check=[CHECK_OK], history=[history_with(sha, RELEASE)])
    r = run_module(luod_cycle.main, dict(step='check', kernel=kernel, kernel_sha256=sha.upper()))
    assert r['on_target'] is True
    assert r['on_target_reason'] == 'cycle 1 loaded kernel sha256 %s and came up in %s, which runs' % (sha, RELEASE)


def test_not_on_target_when_another_release_runs_or_the_digest_differs(fake, run_module, tmp_path):
    kernel, sha = kernel_file(tmp_path)
    fake(check=[CHECK_OK], history=[history_with(sha, 'not-' + RELEASE)])
    r = run_module(luod_cycle.main, dict(step='check', kernel=kernel, kernel_sha256=sha))
    assert r['on_target'] is False
    assert r['on_target_reason'] == 'the last update (cycle 1) came up in not-%s, but %s runs' % (RELEASE, RELEASE)


def test_prepare_refuses_a_kernel_whose_digest_is_not_the_pinned_one_before_asking_luod(fake, run_module, tmp_path):
    kernel, sha = kernel_file(tmp_path)
    f = fake(prepare=[PREPARED])
    r = run_module(luod_cycle.main, dict(step='prepare', kernel=kernel, kernel_sha256='0' * 64))
    assert r['failed'] is True
    assert r['msg'] == '%s %s has sha256 %s, not the pinned %s: nothing was prepared' % (
        'kernel', kernel, sha, '0' * 64)
    assert [c for c in f.calls() if c.startswith('prepare')] == []


def test_prepare_with_the_pinned_digest_loads_the_kernel(fake, run_module, tmp_path):
    kernel, sha = kernel_file(tmp_path)
    f = fake(prepare=[PREPARED])
    r = run_module(luod_cycle.main, dict(step='prepare', kernel=kernel, kernel_sha256=sha, cmdline='console=ttyS0'))
    assert not r.get('failed'), r
    assert r['changed'] is True
    assert r['report']['to'] == 'prepared'
    assert f.calls()[-1] == 'prepare --kernel %s --cmdline console=ttyS0' % kernel


def test_a_veto_at_prepare_is_luoctls_message(fake, run_module):
    fake(prepare=[refused(13, 'vetoed', 'prepare', 'subsystem qemu:vm0 failed prepare: vetoed: a migration runs',
                          'resolve what subsystem qemu:vm0 reports, then prepare again')])
    r = run_module(luod_cycle.main, dict(step='prepare'))
    assert r['msg'] == ('luoctl: prepare: subsystem qemu:vm0 failed prepare: vetoed: a migration runs; '
                        'resolve what subsystem qemu:vm0 reports, then prepare again')
    assert r['luoctl']['rc'] == 13


def test_check_mode_prepare_changes_nothing(fake, run_module, tmp_path):
    kernel, sha = kernel_file(tmp_path)
    f = fake(prepare=[PREPARED])
    r = run_module(luod_cycle.main, dict(step='prepare', kernel=kernel, kernel_sha256=sha), check_mode=True)
    assert r['changed'] is True
    assert f.calls() == []


def test_reboot_freezes_then_reboots(fake, run_module):
    f = fake(freeze=[FROZEN], reboot=[ok(**{'from': 'frozen', 'to': 'updated', 'notes': ['simulated kexec']})])
    r = run_module(luod_cycle.main, dict(step='reboot'))
    assert r['rebooting'] is False
    assert r['report']['to'] == 'updated'
    assert f.calls() == ['freeze', 'reboot']


def test_a_reboot_whose_connection_breaks_is_a_kexec_under_way(fake, run_module):
    f = fake(freeze=[FROZEN], reboot=[REBOOT_CUT])
    r = run_module(luod_cycle.main, dict(step='reboot'))
    assert not r.get('failed'), r
    assert r['rebooting'] is True
    assert f.calls() == ['freeze', 'reboot']


def test_a_failed_freeze_is_cancelled_and_fails_with_freezes_message(fake, run_module):
    f = fake(freeze=[refused(14, 'subsystem-failed', 'freeze', 'subsystem kvm failed freeze: VM vm0 did not answer '
                             'within 5 s', 'see luod\'s log')], cancel=[CANCELLED])
    r = run_module(luod_cycle.main, dict(step='reboot'))
    assert r['failed'] is True
    assert r['msg'] == ('luoctl: freeze: subsystem kvm failed freeze: VM vm0 did not answer within 5 s; see luod\'s '
                        'log (the cycle was cancelled: the host is back in state normal)')
    assert r['luoctl']['rc'] == 14
    assert f.calls() == ['freeze', 'cancel']


def test_a_kexec_the_kernel_refused_is_cancelled(fake, run_module):
    f = fake(freeze=[FROZEN], reboot=[refused(17, 'kernel', 'reboot', 'kexec failed: Invalid argument (os error 22)')],
             cancel=[refused(11, 'wrong-state', 'cancel', 'cannot cancel in state normal')])
    r = run_module(luod_cycle.main, dict(step='reboot'))
    assert r['msg'] == ('luoctl: reboot: kexec failed: Invalid argument (os error 22) (then cancel failed too: '
                        'luoctl: cancel: cannot cancel in state normal)')
    assert f.calls() == ['freeze', 'reboot', 'cancel']


def test_validate_needs_state_updated(fake, run_module):
    fake(status=[STATUS_NORMAL])
    r = run_module(luod_cycle.main, dict(step='validate', validate=['true']))
    assert r['msg'] == 'validation needs state updated, but luod is in state normal'


def test_validate_fails_with_the_commands_last_stderr_line(fake, run_module):
    updated = dict(STATUS_NORMAL, json=dict(STATUS_NORMAL['json'], state='updated'))
    fake(status=[updated])
    r = run_module(luod_cycle.main, dict(step='validate', validate=['true', 'echo one >&2; echo two >&2; exit 3']))
    assert r['failed'] is True
    assert r['msg'] == 'validation `echo one >&2; echo two >&2; exit 3` exited 3: two'
    assert [v['rc'] for v in r['validation']] == [0, 3]


def test_validate_times_a_hung_command_out(fake, run_module):
    updated = dict(STATUS_NORMAL, json=dict(STATUS_NORMAL['json'], state='updated'))
    fake(status=[updated])
    r = run_module(luod_cycle.main, dict(step='validate', validate=['sleep 30'], validate_timeout=1))
    assert r['msg'] == 'validation `sleep 30` exited 124: no output'


def test_rollback_needs_a_luoctl_that_has_it(fake, run_module):
    f = fake(**{'--help': [dict(rc=0, stdout='Commands:\n  status  Show\n  finish  Close\n')]})
    r = run_module(luod_cycle.main, dict(step='rollback'))
    assert r['msg'] == ('this luoctl has no `rollback` command: the host stays in state updated; roll it back by a '
                        'live update to its previous kernel')
    assert f.all_calls() == ['--help']


def test_rollback_runs_luoctl_rollback_when_it_exists(fake, run_module):
    f = fake(**{'--help': [dict(rc=0, stdout='Commands:\n  rollback  Live-update back\n')],
                'rollback': [ok(**{'from': 'updated', 'to': 'updated'})]})
    r = run_module(luod_cycle.main, dict(step='rollback'))
    assert not r.get('failed'), r
    assert f.all_calls() == ['--help', 'rollback']


def test_a_rollback_whose_connection_breaks_is_a_kexec_under_way(fake, run_module):
    cut = dict(REBOOT_CUT['json'], error=dict(REBOOT_CUT['json']['error'], what='rollback'))
    fake(**{'--help': [dict(rc=0, stdout='Commands:\n  rollback  Live-update back\n')],
            'rollback': [dict(REBOOT_CUT, json=cut)]})
    r = run_module(luod_cycle.main, dict(step='rollback'))
    assert not r.get('failed'), r
    assert r['rebooting'] is True


RUNNING_KERNEL_NO = dict(name='running kernel', ok=True,
                         detail='/k has no version string in its header: not known to be the running kernel')


def test_check_with_a_pinning_luoctl_passes_the_pins_and_takes_its_verdict(fake, run_module, tmp_path):
    kernel, sha = kernel_file(tmp_path)
    items = [dict(name='state', ok=True, detail='normal: prepare is allowed'), RUNNING_KERNEL_NO]
    f = fake(pins=True, check=[ok(items=items, already_on_target=False)])
    r = run_module(luod_cycle.main, dict(step='check', kernel=kernel, kernel_sha256=sha.upper()))
    assert not r.get('failed'), r
    assert r['on_target'] is False
    assert r['on_target_reason'] == RUNNING_KERNEL_NO['detail']
    assert f.calls() == ['check --kernel %s --sha256 %s --reuse-cmdline' % (kernel, sha)]


def test_check_exit_9_is_already_on_target(fake, run_module, tmp_path):
    kernel, sha = kernel_file(tmp_path)
    detail = '%s is the running kernel: ... already on target' % kernel
    items = [dict(name='running kernel', ok=True, detail=detail)]
    f = fake(pins=True, status=[STATUS_NORMAL],
             check=[refused(9, 'already-on-target', 'check', 'the kernel is the running one already',
                            items=items, already_on_target=True)])
    r = run_module(luod_cycle.main, dict(step='check', kernel=kernel, kernel_sha256=sha))
    assert not r.get('failed'), r
    assert r['on_target'] is True
    assert r['on_target_reason'] == detail
    assert f.calls()[0].startswith('check --kernel')


def test_on_target_with_a_cycle_in_flight_fails(fake, run_module, tmp_path):
    kernel, sha = kernel_file(tmp_path)
    updated = dict(STATUS_NORMAL, json=dict(STATUS_NORMAL['json'], state='updated'))
    fake(pins=True, status=[updated],
         check=[refused(9, 'already-on-target', 'check', 'the kernel is the running one already', items=[])])
    r = run_module(luod_cycle.main, dict(step='check', kernel=kernel, kernel_sha256=sha))
    assert r['failed'] is True
    assert r['msg'] == ('luoctl: check: the kernel is the running one already; but luod is in state updated, not '
                        'normal: finish or roll back the cycle in flight first')


def test_prepare_with_a_pinning_luoctl_lets_luod_refuse_a_mismatch(fake, run_module, tmp_path):
    kernel, sha = kernel_file(tmp_path)
    message = ('kernel image %s has sha256 %s, not the pinned %s: it is not the image the pin names, so nothing '
               'was loaded' % (kernel, sha, '0' * 64))
    hint = 'check that the image is the one you meant (sha256sum FILE), or correct the pinned digest'
    f = fake(pins=True, prepare=[refused(20, 'digest-mismatch', 'prepare', message, hint)])
    r = run_module(luod_cycle.main, dict(step='prepare', kernel=kernel, kernel_sha256='0' * 64))
    assert r['msg'] == 'luoctl: prepare: %s; %s' % (message, hint)
    assert r['luoctl']['rc'] == 20 and r['luoctl']['kind'] == 'digest-mismatch'
    assert f.calls() == ['prepare --kernel %s --sha256 %s --reuse-cmdline' % (kernel, '0' * 64)]


def test_facts_gather_status_history_and_vms(fake, run_module):
    vms = ok(vms=[dict(name='vm0', owner_uid=0, tokens=[1], phase='registered')])
    fake(status=[STATUS_NORMAL], history=[HISTORY_EMPTY], vm_list=[vms])
    r = run_module(luod_facts.main, dict())
    luod = r['ansible_facts']['luod']
    assert luod['state'] == 'normal'
    assert luod['running_kernel'] == RELEASE
    assert luod['vms'] == vms['json']['vms']
    assert luod['last_update'] is None
    assert r['changed'] is False


def test_facts_fail_with_luoctls_line_when_luod_is_unreachable(fake, run_module):
    fake(status=[refused(4, 'unreachable', 'status', 'cannot connect to luod at /run/luod/luod.sock: No such file '
                         'or directory (os error 2)', 'is luod running? start it, or pass --socket with its path')])
    r = run_module(luod_facts.main, dict())
    assert r['msg'] == ('luoctl: status: cannot connect to luod at /run/luod/luod.sock: No such file or directory '
                        '(os error 2); is luod running? start it, or pass --socket with its path')
    assert r['luoctl']['kind'] == 'unreachable'


def test_a_luoctl_that_prints_no_json_fails_with_its_stderr(fake, run_module):
    fake(status=[dict(rc=101, stderr='thread main panicked at luoctl/src/main.rs:9\n')], history=[HISTORY_EMPTY],
         vm_list=[VMS_NONE])
    r = run_module(luod_facts.main, dict())
    assert r['msg'] == 'thread main panicked at luoctl/src/main.rs:9'
    assert r['luoctl']['rc'] == 101
