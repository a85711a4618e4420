# -*- coding: utf-8 -*-
# Copyright: liveupdate developers
# Apache License 2.0 (see the repository's Cargo.toml)
"""The action behind liveupdate.fleet.fleet_record: runs on the controller
only (the report lives there), writing the host's record and the report."""

from __future__ import annotations

import datetime
import json
import os

from ansible.errors import AnsibleActionFail
from ansible.module_utils.common.text.converters import to_text
from ansible.plugins.action import ActionBase
from ansible_collections.liveupdate.fleet.plugins.plugin_utils import report


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _VALID_ARGS = frozenset(('record', 'report_dir', 'hosts', 'kernel_sha256'))

    def run(self, tmp=None, task_vars=None):
        result = super(ActionModule, self).run(tmp, task_vars)
        del tmp
        args = self._task.args
        for name in ('record', 'report_dir', 'hosts'):
            if args.get(name) in (None, ''):
                raise AnsibleActionFail('%s is required' % name)
        record = dict(args['record'])
        record.setdefault('host', task_vars.get('inventory_hostname'))
        record['kernel_sha256'] = (args.get('kernel_sha256') or '').lower() or None
        record['at'] = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')
        report_dir = args['report_dir']
        path = os.path.join(report_dir, 'hosts', '%s.json' % record['host'])
        try:
            with open(path) as f:
                previous = json.load(f)
        except (OSError, ValueError):
            previous = {}
        if (record.get('outcome') == 'already-on-target' and previous.get('outcome') == 'updated'
                and previous.get('kernel_sha256') == record['kernel_sha256']):
            # The host was updated to this kernel by an earlier run: keep that record (its blackout, its kernels).
            record = previous
            result['kept'] = True
        try:
            written = report.write(report_dir, record, list(args['hosts']))
        except (OSError, ValueError) as e:
            raise AnsibleActionFail('cannot write the report in %s: %s' % (report_dir, to_text(e)))
        result.update(changed=True, record=record, counts=written['counts'])
        return result
