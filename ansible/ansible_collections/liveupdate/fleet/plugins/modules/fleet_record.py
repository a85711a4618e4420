#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: liveupdate developers
# Apache License 2.0 (see the repository's Cargo.toml)

from __future__ import annotations

DOCUMENTATION = r'''
---
module: fleet_record
short_description: Record a host's outcome in the rolling update's report
description:
  - Runs on the controller only. Writes O(record) to
    C(REPORT_DIR/hosts/HOST.json), then C(REPORT_DIR/report.json) and
    C(REPORT_DIR/report.md) for every host of O(hosts) (a host without a
    record is C(pending)).
  - A host found C(already-on-target) keeps the C(updated) record an
    earlier run wrote for the same O(kernel_sha256).
version_added: "0.1.0"
author:
  - liveupdate developers (!UNKNOWN)
options:
  record:
    description:
      - The host's record, C(host), C(outcome), C(kernel_before),
        C(kernel_after), C(luod_blackout_ns), C(vms) (each with C(name),
        C(phase), C(blackout_ms) (the VM's blackout, as C(luoctl vm list)
        shows it) and C(detail); other keys of a VM are dropped),
        C(message) and anything else.
    type: dict
    required: true
  report_dir:
    description: The report directory on the controller.
    type: path
    required: true
  hosts:
    description: Every host of the fleet, in the order the report lists them.
    type: list
    elements: str
    required: true
  kernel_sha256:
    description: The pinned kernel's SHA-256, kept in the record.
    type: str
attributes:
  action:
    description: Indicates this has a corresponding action plugin so some parts of the options can be executed on the controller.
    support: full
  check_mode:
    description: Can run in check mode and return changed status prediction without modifying target.
    support: none
    details: It writes the report in check mode too (the report of a check-mode run says C(would-update)).
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check mode), when in diff mode.
    support: none
  platform:
    description: Target OS/families that can be operated against.
    support: full
    platforms: posix
'''

EXAMPLES = r'''
- name: Record the outcome
  liveupdate.fleet.fleet_record:
    record:
      outcome: updated
      kernel_before: 6.19.0
      kernel_after: 6.19.1
    report_dir: /srv/fleet-report
    hosts: "{{ ansible_play_hosts_all }}"
'''

RETURN = r'''
record:
  description: The record written (or the earlier one kept).
  returned: always
  type: dict
counts:
  description: Hosts of the report by outcome.
  returned: always
  type: dict
'''
