#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: liveupdate developers
# Apache License 2.0 (see the repository's Cargo.toml)

from __future__ import annotations

DOCUMENTATION = r'''
---
module: luod_facts
short_description: Gather luod's live-update state on a host
description:
  - Asks luod, through C(luoctl status --json), C(luoctl history --json) and
    C(luoctl vm list --json), for its state, the last cycle and its blackout,
    the VMs it knows, and the newest finished live update, and adds the
    running kernel's release.
  - The facts land in C(ansible_facts.luod).
  - Fails with luoctl's own error line when luoctl fails (for example luod
    is not running, exit 4, C(unreachable)).
version_added: "0.1.0"
author:
  - liveupdate developers (!UNKNOWN)
options:
  luoctl:
    description: The luoctl executable (a name looked up in E(PATH), or a path).
    type: str
    default: luoctl
  socket:
    description: luod's socket (C(luoctl --socket)); luoctl's default when not set.
    type: path
attributes:
  check_mode:
    description: Can run in check mode and return changed status prediction without modifying target.
    support: full
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check mode), when in diff mode.
    support: none
  facts:
    description: Action returns an C(ansible_facts) dictionary that will update existing host facts.
    support: full
'''

EXAMPLES = r'''
- name: Read luod's state
  liveupdate.fleet.luod_facts:

- name: Show it
  ansible.builtin.debug:
    msg: "{{ ansible_facts.luod.state }} on {{ ansible_facts.luod.running_kernel }}"
'''

RETURN = r'''
ansible_facts:
  description: The facts.
  returned: always
  type: complex
  contains:
    luod:
      description: >-
        C(state) (normal, prepared, frozen, updated), C(backend), C(region),
        C(generation), C(running_kernel) (C(uname -r)), C(live_updates),
        C(last_cycle) (as in C(luoctl status --json)), C(blackout_ns) (of the
        last cycle), C(in_progress), C(notes), C(subsystems), C(vms) (as in
        C(luoctl vm list --json)), C(last_update) (the newest finished cycle of
        C(luoctl history --json)) and C(cycles).
      returned: always
      type: dict
'''

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.liveupdate.fleet.plugins.module_utils.luoctl import (
    Luoctl, LuoctlError, facts)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            luoctl=dict(type='str', default='luoctl'),
            socket=dict(type='path'),
        ),
        supports_check_mode=True,
    )
    luoctl = Luoctl(module, module.params['luoctl'], module.params['socket'])
    try:
        luod = facts(luoctl)
    except LuoctlError as e:
        module.fail_json(msg=e.line(), luoctl=e.as_dict())
    module.exit_json(changed=False, ansible_facts=dict(luod=luod))


if __name__ == '__main__':
    main()
