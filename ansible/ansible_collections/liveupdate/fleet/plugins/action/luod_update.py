# -*- coding: utf-8 -*-
# Copyright: liveupdate developers
# Apache License 2.0 (see the repository's Cargo.toml)
"""The action behind liveupdate.fleet.luod_update.

A module cannot wait for its own host across a kexec: the process running
it dies with the old kernel. So the update is an action plugin, running on
the controller, that chains luod_cycle's steps on the host (check, prepare,
freeze+reboot), waits for the host and for luod to come back `updated` (as
ansible.builtin.reboot waits for a reboot: reset the connection, retry until
a timeout), then validates and finishes, or rolls back and fails with the
reason. Every step's failure message is luoctl's own line.
"""

from __future__ import annotations

import time

from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.module_utils.common.text.converters import to_text
from ansible.plugins.action import ActionBase
from ansible.utils.display import Display
from ansible_collections.liveupdate.fleet.plugins.plugin_utils.report import unreported, update_vms

display = Display()

CYCLE = 'liveupdate.fleet.luod_cycle'
# luoctl's exit code for a veto (luoctl/CLI.md; module_utils/luoctl.py has the table): finish refused
# after a failed post-update hook.
VETOED = 13
FACTS = 'liveupdate.fleet.luod_facts'

COMMON = frozenset(('luoctl', 'socket'))
KERNEL = frozenset(('kernel', 'initrd', 'cmdline', 'kernel_sha256', 'initrd_sha256'))
VALIDATE = frozenset(('validate', 'validate_url', 'validate_timeout'))


class HostFailure(Exception):
    """A step failed on the host: the message (luoctl's line) and the result."""

    def __init__(self, msg, result):
        super(HostFailure, self).__init__(msg)
        self.msg = msg
        self.result = result


class RolledBackByLuod(HostFailure):
    """luod rolled the update back by itself (--rollback auto)."""


class ValidationFailed(HostFailure):
    """The updated host failed a health gate (or luod's own post-update hook): roll it back."""


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _VALID_ARGS = COMMON | KERNEL | VALIDATE | frozenset(('reboot_timeout', 'rollback', 'vm_report_timeout'))

    def _pick(self, args, names):
        return dict((k, v) for k, v in args.items() if k in names and v is not None)

    def _module(self, name, module_args, task_vars):
        result = self._execute_module(module_name=name, module_args=module_args, task_vars=task_vars)
        if result.get('unreachable'):
            raise AnsibleConnectionFailure(result.get('msg', 'unreachable'))
        return result

    def _step(self, step, task_vars, **extra):
        args = self._pick(self._task.args, COMMON)
        if step in ('check', 'prepare'):
            args.update(self._pick(self._task.args, KERNEL))
        if step == 'validate':
            args.update(self._pick(self._task.args, VALIDATE))
        args.update(extra)
        args['step'] = step
        result = self._module(CYCLE, args, task_vars)
        if result.get('failed'):
            raise HostFailure(result.get('msg', '%s failed' % step), result)
        return result

    def _facts(self, task_vars):
        args = self._pick(self._task.args, COMMON)
        result = self._module(FACTS, args, task_vars)
        if result.get('failed'):
            raise HostFailure(result.get('msg', 'luod_facts failed'), result)
        return result['ansible_facts']['luod']

    def _wait_updated(self, task_vars, cycle_id, timeout):
        """Waits until the host answers and luod is `updated` in cycle
        `cycle_id` (the cycle prepared for this kexec), as after a kexec."""
        deadline = time.time() + timeout
        last = 'no answer yet'
        while True:
            try:
                self._connection.reset()
            except Exception as e:  # a connection plugin that cannot reset yet: try again
                last = 'connection reset failed: %s' % to_text(e)
            else:
                try:
                    luod = self._facts(task_vars)
                except AnsibleConnectionFailure as e:
                    last = 'host unreachable: %s' % to_text(e)
                except HostFailure as e:
                    last = e.msg
                else:
                    cycle = luod.get('last_cycle') or {}
                    if (cycle.get('id') or 0) > cycle_id:
                        raise RolledBackByLuod(
                            'luod is in cycle %s, not %s: it rolled the update back by itself (luod --rollback auto '
                            'after a failed post-update hook); `luoctl history` says why' % (cycle.get('id'), cycle_id),
                            dict(luod=luod))
                    if luod.get('state') == 'updated' and cycle.get('id') == cycle_id:
                        return luod
                    if luod.get('state') == 'normal' and (cycle.get('id') or 0) >= cycle_id:
                        notes = '; '.join(luod.get('notes') or []) or 'no notes'
                        raise HostFailure(
                            'the host came back with luod in state normal, not updated: the handover of cycle %s '
                            'was not taken (luod: %s)' % (cycle_id, notes), dict(luod=luod))
                    last = 'luod in state %s (cycle %s)' % (luod.get('state'), cycle.get('id'))
            if time.time() >= deadline:
                raise HostFailure('the host did not come back updated within %d s after the reboot: %s'
                                  % (timeout, last), {})
            time.sleep(1)

    def _vms_after(self, task_vars, updated, wait):
        """The facts after `finish`, once every VM the update carried (the
        VMs `updated` shows, less those abandoned) shows its blackout in `vm
        list`: its VMM restored it, reported, and registered again. Waits at
        most `wait` seconds; VMs still without a blackout then are reported
        without one. Returns (facts, the report's VMs)."""
        carried = [v.get('name') for v in updated.get('vms') or [] if v.get('phase') != 'abandoned']
        deadline = time.time() + wait
        while True:
            after = self._facts(task_vars)
            missing = unreported(carried, after.get('vms'))
            if not missing or time.time() >= deadline:
                if missing:
                    display.warning('luod_update: no blackout reported for VM(s) %s within %d s after finish'
                                    % (', '.join(missing), wait))
                return after, update_vms(updated.get('vms'), after.get('vms'))
            time.sleep(0.5)

    def _wait_vms_claimed(self, task_vars, timeout):
        """Before `finish`: waits until no VM of the update awaits its claim
        (its VMM restores it after the kexec, at its own pace; luod refuses
        `finish` until then). After the timeout `finish` runs anyway, and
        its refusal names the VMs."""
        deadline = time.time() + timeout
        while True:
            waiting = [v.get('name') for v in self._facts(task_vars).get('vms') or []
                       if v.get('phase') == 'awaiting-claim']
            if not waiting or time.time() >= deadline:
                return
            display.vvv('luod_update: waiting for VMs to be restored: %s' % ', '.join(waiting))
            time.sleep(1)

    def _finish(self, task_vars, timeout):
        self._wait_vms_claimed(task_vars, timeout)
        return self._step('finish', task_vars)

    def _kexec(self, task_vars, timeout, step='reboot'):
        """Runs freeze+reboot (or rollback) and waits for the host to come back."""
        before = self._facts(task_vars)
        cycle_id = ((before.get('last_cycle') or {}).get('id') or 0)
        try:
            if step == 'rollback':
                self._step('rollback', task_vars)
                cycle_id += 1
            else:
                self._step('reboot', task_vars)
        except AnsibleConnectionFailure as e:
            # A real kexec takes the host down under the running step.
            display.vvv('luod_update: %s: connection lost, as a kexec does: %s' % (step, to_text(e)))
        return self._wait_updated(task_vars, cycle_id, timeout)

    def run(self, tmp=None, task_vars=None):
        result = super(ActionModule, self).run(tmp, task_vars)
        del tmp
        args = self._task.args
        timeout = int(args.get('reboot_timeout') or 600)
        vm_wait = int(args.get('vm_report_timeout') if args.get('vm_report_timeout') is not None else 30)
        rollback = args.get('rollback', True)
        record = dict(changed=False, steps=[])
        try:
            before = self._facts(task_vars)
            record.update(kernel_before=before.get('running_kernel'), state_before=before.get('state'))
            check = self._step('check', task_vars)
            record['steps'].append('check')
            record['check'] = check.get('items', [])
            if check.get('on_target'):
                record.update(skipped_reason=check.get('on_target_reason'), on_target=True,
                              kernel_after=before.get('running_kernel'), outcome='already-on-target', luod=before,
                              msg='already on the target kernel: %s' % check.get('on_target_reason'))
                result.update(record)
                return result
            record['on_target'] = False
            if self._task.check_mode:
                record.update(changed=True, outcome='would-update', msg='would update (check mode): luoctl check passed')
                result.update(record)
                return result
            self._step('prepare', task_vars)
            record['steps'].append('prepare')
            record['changed'] = True
            updated = self._kexec(task_vars, timeout)
            record['steps'] += ['freeze', 'reboot']
            record['cycle_id'] = (updated.get('last_cycle') or {}).get('id')
            try:
                try:
                    validation = self._step('validate', task_vars)
                except HostFailure as failed:
                    raise ValidationFailed(failed.msg, failed.result)
                record['steps'].append('validate')
                record['validation'] = validation.get('validation', [])
                try:
                    finish = self._finish(task_vars, timeout)
                except HostFailure as refused:
                    # luod refuses finish (exit 13) after its own post-update hook failed: a failed validation too.
                    if (refused.result.get('luoctl') or {}).get('rc') != VETOED:
                        raise
                    raise ValidationFailed(refused.msg, dict(refused.result, validation=record['validation']))
            except ValidationFailed as failure:
                record['validation'] = failure.result.get('validation', record.get('validation', []))
                record['validation_failure'] = failure.msg
                if not rollback:
                    raise HostFailure('%s; rollback is off: the host stays in state updated' % failure.msg,
                                      failure.result)
                try:
                    back = self._kexec(task_vars, timeout, step='rollback')
                    record['steps'].append('rollback')
                    finished = self._finish(task_vars, timeout)
                except HostFailure as second:
                    raise HostFailure('%s; the rollback failed: %s' % (failure.msg, second.msg), second.result)
                after, record['vms'] = self._vms_after(task_vars, back, vm_wait)
                # The luod blackout a rolled-back host reports is its rollback's (the last pause its VMs saw).
                record.update(kernel_after=after.get('running_kernel'), outcome='rolled-back', luod=after,
                              blackout_ns=((finished.get('report') or {}).get('cycle') or {}).get('blackout_ns'))
                raise HostFailure('%s; rolled back to %s' % (failure.msg, after.get('running_kernel')), failure.result)
            record['steps'].append('finish')
            record['finish'] = finish.get('report')
            after, record['vms'] = self._vms_after(task_vars, updated, vm_wait)
            record.update(kernel_after=after.get('running_kernel'), outcome='updated', luod=after,
                          blackout_ns=((finish.get('report') or {}).get('cycle') or {}).get('blackout_ns'),
                          msg='updated: %s -> %s' % (record['kernel_before'], after.get('running_kernel')))
        except RolledBackByLuod as failure:
            record.update(failed=True, outcome='rolled-back', msg=failure.msg)
        except HostFailure as failure:
            record.setdefault('outcome', 'failed')
            record.update(failed=True, msg=failure.msg)
            if 'luoctl' in failure.result:
                record['luoctl'] = failure.result['luoctl']
        except AnsibleConnectionFailure as e:
            record.update(failed=True, outcome='unreachable', msg='the host went away: %s' % to_text(e))
        except AnsibleError as e:
            record.update(failed=True, outcome='failed', msg=to_text(e))
        result.update(record)
        return result
