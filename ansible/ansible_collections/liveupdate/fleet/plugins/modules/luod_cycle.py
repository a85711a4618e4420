#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: liveupdate developers
# Apache License 2.0 (see the repository's Cargo.toml)

from __future__ import annotations

DOCUMENTATION = r'''
---
module: luod_cycle
short_description: One step of a live update on a host, through luoctl
description:
  - Runs one step of luod's live-update cycle with luoctl on the managed
    host. M(liveupdate.fleet.luod_update) chains the steps across the kexec;
    use this module directly to drive the steps yourself.
  - "Every failure message is luoctl's own error line
    (C(luoctl: WHAT: MESSAGE; HINT)), with its exit code and kind in
    RV(luoctl)."
  - O(step=check) runs C(luoctl check) with the target kernel (and its
    pins) and says whether the host is on the pinned kernel already (luoctl
    exit 9, C(already-on-target)). With a luoctl older than C(--sha256), the
    module judges that from C(luoctl history) (the last finished update
    loaded this digest and its release runs).
  - O(step=prepare) runs C(luoctl prepare --sha256) (normal -> prepared), so
    luod refuses an image that is not the pinned one (exit 20) before
    anything loads; with a luoctl older than C(--sha256), the module digests
    the files first.
  - O(step=reboot) runs C(luoctl freeze) then C(luoctl reboot) in one
    process, so that the blackout is not lengthened by a round trip. A
    failed freeze or a reboot the kernel refused is followed by
    C(luoctl cancel), so the host goes back to C(normal). With a real kexec
    the answer of C(luoctl reboot) may never arrive (exit 6, C(connection)),
    which is reported as RV(rebooting).
  - O(step=validate) requires state C(updated), then runs every
    O(validate) command and fetches O(validate_url).
  - O(step=finish), O(step=cancel), O(step=rollback) run that luoctl
    command. C(luoctl rollback) prepares, freezes and kexecs back to the
    previous kernel (a lost connection is RV(rebooting)); it needs a luoctl
    that has it.
version_added: "0.1.0"
author:
  - liveupdate developers (!UNKNOWN)
options:
  step:
    description: The step to run.
    type: str
    required: true
    choices: [check, prepare, reboot, validate, finish, cancel, rollback]
  kernel:
    description: The target kernel image on the host (C(--kernel)).
    type: path
  initrd:
    description: The target initrd on the host (C(--initrd)).
    type: path
  cmdline:
    description:
      - The target kernel's command line (C(--cmdline)). Without it,
        C(--reuse-cmdline).
    type: str
  kernel_sha256:
    description:
      - The pinned SHA-256 of O(kernel). O(step=prepare) refuses a kernel
        with another digest before luod loads anything.
    type: str
  initrd_sha256:
    description: The pinned SHA-256 of O(initrd).
    type: str
  validate:
    description:
      - Commands run by the shell on the host in state C(updated); each must
        exit 0.
    type: list
    elements: str
    default: []
  validate_url:
    description: A URL fetched from the host in state C(updated); it must answer 2xx or 3xx.
    type: str
  validate_timeout:
    description: Seconds each validation command and the URL may take.
    type: int
    default: 60
  luoctl:
    description: The luoctl executable (a name looked up in E(PATH), or a path).
    type: str
    default: luoctl
  socket:
    description: luod's socket (C(luoctl --socket)).
    type: path
attributes:
  check_mode:
    description: Can run in check mode and return changed status prediction without modifying target.
    support: full
    details: O(step=check) runs; the other steps change nothing and report C(changed).
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check mode), when in diff mode.
    support: none
'''

EXAMPLES = r'''
- name: Preflight
  liveupdate.fleet.luod_cycle:
    step: check
    kernel: /var/lib/liveupdate/stage/vmlinuz
    kernel_sha256: "{{ sha }}"

- name: Prepare
  liveupdate.fleet.luod_cycle:
    step: prepare
    kernel: /var/lib/liveupdate/stage/vmlinuz
    kernel_sha256: "{{ sha }}"

- name: Give up before the kexec
  liveupdate.fleet.luod_cycle:
    step: cancel
'''

RETURN = r'''
luoctl:
  description: On a failure, luoctl's exit code (C(rc)), C(kind), C(what), C(message), C(hint) and C(line).
  returned: failure
  type: dict
report:
  description: The JSON object luoctl printed for the step (without C(ok)).
  returned: success
  type: dict
items:
  description: The items of C(luoctl check).
  returned: when O(step=check)
  type: list
  elements: dict
on_target:
  description: Whether the host runs the pinned kernel already (the last finished update loaded this digest and the running release is the one it came up in).
  returned: when O(step=check) and O(kernel_sha256) is given
  type: bool
on_target_reason:
  description: Why RV(on_target) is what it is.
  returned: when O(step=check) and O(kernel_sha256) is given
  type: str
rebooting:
  description: Whether C(luoctl reboot) (or C(luoctl rollback)) lost its connection, as it does when the kexec happens.
  returned: when O(step=reboot) or O(step=rollback)
  type: bool
validation:
  description: Each validation, in order, with C(name), C(rc), C(stdout), C(stderr).
  returned: when O(step=validate)
  type: list
  elements: dict
'''

import hashlib

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.urls import open_url
from ansible_collections.liveupdate.fleet.plugins.module_utils.luoctl import (
    EXIT_ALREADY_ON_TARGET, EXIT_CONNECTION, Luoctl, LuoctlError, on_target, running_release)


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def kernel_params(p, pins=False):
    params = dict(kernel=p['kernel'], initrd=p['initrd'], cmdline=p['cmdline'])
    if pins:
        params.update(kernel_sha256=p['kernel_sha256'], initrd_sha256=p['initrd_sha256'])
    return params


def verify_pins(module, p):
    """The pinned digests against the files, before luod is asked."""
    for what, path, pin in (('kernel', p['kernel'], p['kernel_sha256']),
                            ('initrd', p['initrd'], p['initrd_sha256'])):
        if not pin:
            continue
        if not path:
            module.fail_json(msg='%s_sha256 is given but %s is not' % (what, what))
        try:
            actual = sha256_of(path)
        except (IOError, OSError) as e:
            module.fail_json(msg='cannot read %s %s to verify its sha256: %s' % (what, path, e))
        if actual != pin.lower():
            module.fail_json(msg='%s %s has sha256 %s, not the pinned %s: nothing was prepared'
                             % (what, path, actual, pin.lower()))


def strip_ok(doc):
    return dict((k, v) for k, v in doc.items() if k != 'ok')


def running_kernel_item(items):
    for item in items or []:
        if item.get('name') == 'running kernel':
            return item.get('detail')
    return None


def step_check(module, luoctl, p):
    """luoctl check; with a pinned kernel, whether the host is on it already:
    luoctl's own verdict (exit 9) when it has one, else from history."""
    result = dict(changed=False)
    if luoctl.pins():
        try:
            report = luoctl.check(**kernel_params(p, pins=True))
        except LuoctlError as e:
            if e.rc != EXIT_ALREADY_ON_TARGET:
                raise
            state = luoctl.status().get('state')
            if state != 'normal':
                module.fail_json(
                    msg='%s; but luod is in state %s, not normal: finish or roll back the cycle in flight first'
                        % (e.line(), state), luoctl=e.as_dict(), items=e.items or [])
            result.update(on_target=True, on_target_reason=running_kernel_item(e.items) or e.message,
                          items=e.items or [])
            return result
        if p['kernel'] and p['kernel_sha256']:
            result.update(on_target=False, on_target_reason=running_kernel_item(report.get('items'))
                          or 'luoctl check did not say it is the running kernel')
    else:
        if p['kernel_sha256']:
            yes, why = on_target(luoctl.history(), running_release(), p['kernel_sha256'])
            result.update(on_target=yes, on_target_reason=why)
        report = luoctl.check(**kernel_params(p))
    result.update(items=report.get('items', []), report=strip_ok(report))
    return result


def step_prepare(module, luoctl, p):
    """luoctl prepare: with the pins when luoctl takes them (luod digests
    the descriptors it loads and refuses a mismatch, exit 20); else the
    module digests the files first."""
    if module.check_mode:
        return dict(changed=True)
    pins = luoctl.pins()
    if not pins:
        verify_pins(module, p)
    return dict(changed=True, report=strip_ok(luoctl.prepare(**kernel_params(p, pins=pins))))


def undo(luoctl, error):
    """Cancels after a failed freeze or reboot; the failure stays the first
    error, with the cancel's own failure added when it failed too."""
    try:
        luoctl.transition('cancel')
    except LuoctlError as e:
        return '%s (then cancel failed too: %s)' % (error.line(), e.line())
    return '%s (the cycle was cancelled: the host is back in state normal)' % error.line()


def step_reboot(module, luoctl, p):
    if module.check_mode:
        return dict(changed=True, rebooting=False)
    try:
        frozen = luoctl.transition('freeze')
    except LuoctlError as e:
        module.fail_json(msg=undo(luoctl, e), luoctl=e.as_dict())
    try:
        report = luoctl.transition('reboot')
    except LuoctlError as e:
        if e.rc == EXIT_CONNECTION:
            return dict(changed=True, rebooting=True, freeze=strip_ok(frozen), luoctl=e.as_dict())
        module.fail_json(msg=undo(luoctl, e), luoctl=e.as_dict())
    return dict(changed=True, rebooting=False, freeze=strip_ok(frozen), report=strip_ok(report))


def step_validate(module, luoctl, p):
    status = luoctl.status()
    if status.get('state') != 'updated':
        module.fail_json(msg='validation needs state updated, but luod is in state %s' % status.get('state'),
                         state=status.get('state'))
    results = []
    for cmd in p['validate']:
        rc, out, err = module.run_command(['/bin/sh', '-c', 'exec timeout %d /bin/sh -c "$0"' % p['validate_timeout'], cmd])
        results.append(dict(name=cmd, rc=rc, stdout=out, stderr=err))
        if rc != 0:
            lines = [line for line in (err or out or '').splitlines() if line.strip()]
            last = lines[-1].strip() if lines else 'no output'
            module.fail_json(msg='validation `%s` exited %d: %s' % (cmd, rc, last), validation=results)
    if p['validate_url']:
        url = p['validate_url']
        try:
            resp = open_url(url, timeout=p['validate_timeout'], validate_certs=True, follow_redirects='none')
            code = resp.getcode()
        except Exception as e:  # urllib's HTTPError and URLError alike: the reason is the message
            code = getattr(e, 'code', None)
            if code is None or not 200 <= code < 400:
                results.append(dict(name=url, rc=1, stdout='', stderr=str(e)))
                module.fail_json(msg='validation %s failed: %s' % (url, e), validation=results)
        results.append(dict(name=url, rc=0, stdout='HTTP %s' % code, stderr=''))
    return dict(changed=False, validation=results)


def step_transition(name):
    def run(module, luoctl, p):
        if module.check_mode:
            return dict(changed=True)
        if name == 'rollback' and not luoctl.supports('rollback'):
            module.fail_json(msg='this luoctl has no `rollback` command: the host stays in state updated; '
                                 'roll it back by a live update to its previous kernel')
        try:
            return dict(changed=True, rebooting=False, report=strip_ok(luoctl.transition(name)))
        except LuoctlError as e:
            if name == 'rollback' and e.rc == EXIT_CONNECTION:
                # luoctl rollback ends with the kexec, as reboot does.
                return dict(changed=True, rebooting=True, luoctl=e.as_dict())
            raise
    return run


STEPS = {
    'check': step_check,
    'prepare': step_prepare,
    'reboot': step_reboot,
    'validate': step_validate,
    'finish': step_transition('finish'),
    'cancel': step_transition('cancel'),
    'rollback': step_transition('rollback'),
}


def main():
    module = AnsibleModule(
        argument_spec=dict(
            step=dict(type='str', required=True, choices=list(STEPS)),
            kernel=dict(type='path'),
            initrd=dict(type='path'),
            cmdline=dict(type='str'),
            kernel_sha256=dict(type='str'),
            initrd_sha256=dict(type='str'),
            validate=dict(type='list', elements='str', default=[]),
            validate_url=dict(type='str'),
            validate_timeout=dict(type='int', default=60),
            luoctl=dict(type='str', default='luoctl'),
            socket=dict(type='path'),
        ),
        required_by=dict(initrd=('kernel',), cmdline=('kernel',)),
        supports_check_mode=True,
    )
    p = module.params
    luoctl = Luoctl(module, p['luoctl'], p['socket'])
    try:
        result = STEPS[p['step']](module, luoctl, p)
    except LuoctlError as e:
        module.fail_json(msg=e.line(), luoctl=e.as_dict(), items=e.items or [])
    module.exit_json(**result)


if __name__ == '__main__':
    main()
