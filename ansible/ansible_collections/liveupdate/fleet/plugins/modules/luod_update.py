#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: liveupdate developers
# Apache License 2.0 (see the repository's Cargo.toml)

from __future__ import annotations

DOCUMENTATION = r'''
---
module: luod_update
short_description: Take one host through a live update to a pinned kernel
description:
  - Takes the host through C(luoctl check), C(luoctl prepare) with the
    pinned digest, C(luoctl freeze) and C(luoctl reboot) (a kexec), waits
    for the host to come back with luod in state C(updated), runs the
    validation, then C(luoctl finish); or, when the validation fails, rolls
    back with C(luoctl rollback) (a live update to the previous kernel) and
    fails with the reason.
  - Before each C(luoctl finish) (of the update, or of the rollback) it
    waits, up to O(reboot_timeout), until no VM is C(awaiting-claim), since
    the VMMs restore their VMs after the kexec at their own pace and luod
    refuses C(finish) until they have (after the wait, C(finish)'s refusal
    names the VMs).
  - This is an action plugin, since a module cannot wait for its own host across
    the kexec, so the controller runs M(liveupdate.fleet.luod_cycle) for each
    step and waits for the host in between (it resets the connection and
    retries until O(reboot_timeout), as M(ansible.builtin.reboot) does).
  - Every failure message is luoctl's own error line; RV(luoctl) has its
    exit code and kind.
  - C(changed) is false when the host runs the target kernel already
    (C(luoctl check --kernel K --sha256 HEX) exits 9, C(already-on-target));
    nothing but the check is run then. With a luoctl older than C(--sha256),
    the host is on the target when its last finished live update loaded
    O(kernel_sha256) and the running release is the one it came up in.
  - A failed validation, or a C(luoctl finish) that luod vetoes after its
    own C(post-update) hook failed, is rolled back with C(luoctl rollback)
    (see O(rollback)); the task fails with the reason either way. When luod
    rolls back by itself (C(luod --rollback auto)), the task fails with
    outcome C(rolled-back).
  - A freeze that fails or a kexec the kernel refuses is followed by
    C(luoctl cancel), so the host is back in C(normal), nothing changed.
version_added: "0.1.0"
author:
  - liveupdate developers (!UNKNOWN)
options:
  kernel:
    description: The target kernel image on the host.
    type: path
  initrd:
    description: The target initrd on the host.
    type: path
  cmdline:
    description: The target kernel's command line; the running one (C(--reuse-cmdline)) when not set.
    type: str
  kernel_sha256:
    description: The pinned SHA-256 of O(kernel); a kernel with another digest is refused before anything loads.
    type: str
  initrd_sha256:
    description: The pinned SHA-256 of O(initrd).
    type: str
  validate:
    description: Commands run by the shell on the host once it is C(updated), before C(finish); each must exit 0.
    type: list
    elements: str
    default: []
  validate_url:
    description: A URL the host must fetch with a 2xx or 3xx answer once it is C(updated), before C(finish).
    type: str
  validate_timeout:
    description: Seconds each validation may take.
    type: int
    default: 60
  rollback:
    description: Roll back with C(luoctl rollback) when the validation fails; otherwise the host stays C(updated).
    type: bool
    default: true
  reboot_timeout:
    description: Seconds to wait for the host and luod to come back C(updated) after the kexec, and then for its VMs to be claimed before C(finish).
    type: int
    default: 600
  vm_report_timeout:
    description:
      - Seconds to wait after C(finish) for every VM the update carried to show its blackout in
        C(luoctl vm list) (its VMM restored it, reported the blackout and registered again, as luo-qemu does).
        A VM still without one then is reported with C(blackout_ms) null; C(0) does not wait.
    type: int
    default: 30
  luoctl:
    description: The luoctl executable on the host.
    type: str
    default: luoctl
  socket:
    description: luod's socket (C(luoctl --socket)).
    type: path
attributes:
  action:
    description: Indicates this has a corresponding action plugin so some parts of the options can be executed on the controller.
    support: full
  check_mode:
    description: Can run in check mode and return changed status prediction without modifying target.
    support: full
    details: Runs C(luoctl check) and reports whether the host would be updated; changes nothing.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check mode), when in diff mode.
    support: none
  platform:
    description: Target OS/families that can be operated against.
    support: full
    platforms: posix
seealso:
  - module: liveupdate.fleet.luod_cycle
  - module: liveupdate.fleet.luod_facts
'''

EXAMPLES = r'''
- name: Live-update to the staged kernel
  liveupdate.fleet.luod_update:
    kernel: /var/lib/liveupdate/stage/vmlinuz-6.19.1
    initrd: /var/lib/liveupdate/stage/initrd.img-6.19.1
    kernel_sha256: "{{ fleet_kernel_sha256 }}"
    validate:
      - systemctl is-system-running --wait
    validate_url: http://127.0.0.1:8080/health
'''

RETURN = r'''
outcome:
  description: C(updated), C(already-on-target), C(would-update) (check mode), C(rolled-back), C(failed) or C(unreachable).
  returned: always
  type: str
kernel_before:
  description: The running kernel's release before.
  returned: when luod answered
  type: str
kernel_after:
  description: The running kernel's release after.
  returned: when the host came back
  type: str
steps:
  description: The steps that completed, in order.
  returned: always
  type: list
  elements: str
blackout_ns:
  description:
    - luod's blackout of the cycle (freeze start to C(updated)), in nanoseconds; for a host rolled back, the
      rollback's (the last pause its VMs saw).
  returned: when updated or rolled back
  type: int
vms:
  description:
    - The host's VMs after the update (or the rollback), each with C(name), C(phase) (luod's), C(blackout_ms) (the
      VM's blackout in this update as its VMM measured it, from C(luoctl vm list); null when unknown) and
      C(detail) (what its VMM reported, e.g. C(QEMU 11.1.3, running)). VMs the update carried come first as listed,
      then those not registered again yet.
  returned: when updated or rolled back
  type: list
  elements: dict
luod:
  description: The facts of M(liveupdate.fleet.luod_facts) after the update (VMs included).
  returned: when updated or rolled back
  type: dict
validation:
  description: Each validation with its C(rc), C(stdout) and C(stderr).
  returned: when the validation ran
  type: list
  elements: dict
luoctl:
  description: On a luoctl failure, its exit code (C(rc)), C(kind), C(what), C(message), C(hint) and C(line).
  returned: on a luoctl failure
  type: dict
'''
