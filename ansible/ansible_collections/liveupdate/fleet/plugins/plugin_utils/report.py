# -*- coding: utf-8 -*-
# Copyright: liveupdate developers
# Apache License 2.0 (see the repository's Cargo.toml)
"""The rolling update's report: one record per host in
REPORT_DIR/hosts/HOST.json, and report.json and report.md built from them
for every host of the fleet (a host without a record is `pending`: not
reached yet, or the run stopped before it)."""

from __future__ import annotations

import json
import os

from ansible.errors import AnsibleError


def fleet_report(report_dir, hosts):
    records = []
    counts = {}
    for host in hosts:
        path = os.path.join(report_dir, 'hosts', '%s.json' % host)
        try:
            with open(path) as f:
                record = json.load(f)
        except FileNotFoundError:
            record = dict(host=host, outcome='pending', message='not updated yet')
        except (OSError, ValueError) as e:
            raise AnsibleError('cannot read the record of %s (%s): %s' % (host, path, e))
        records.append(record)
        counts[record.get('outcome')] = counts.get(record.get('outcome'), 0) + 1
    return dict(hosts=records, counts=counts)


def _ms(ns):
    if ns is None:
        return '-'
    return '%.1f ms' % (ns / 1e6)


def _cell(text):
    return str(text if text not in (None, '') else '-').replace('|', '\\|').replace('\n', ' ')


def fleet_report_markdown(report):
    """The report as a Markdown table, then each host's VMs and message."""
    lines = [
        '# Rolling live update',
        '',
        ', '.join('%s %d' % (k, v) for k, v in sorted(report.get('counts', {}).items())) or 'no hosts',
        '',
        '| host | outcome | kernel before | kernel after | luod blackout | VMs |',
        '| --- | --- | --- | --- | --- | --- |',
    ]
    for r in report.get('hosts', []):
        vms = r.get('vms') or []
        vm_cell = ', '.join('%s (%s, blackout %s)' % (v.get('name'), v.get('phase'), _ms(v.get('blackout_ns')))
                            for v in vms) or 'none'
        lines.append('| %s | %s | %s | %s | %s | %s |' % tuple(_cell(x) for x in (
            r.get('host'), r.get('outcome'), r.get('kernel_before'), r.get('kernel_after'),
            _ms(r.get('luod_blackout_ns')), vm_cell)))
    messages = [r for r in report.get('hosts', []) if r.get('message')]
    if messages:
        lines += ['', '## Messages', '']
        lines += ['- **%s**: %s' % (r.get('host'), r.get('message')) for r in messages]
    return '\n'.join(lines) + '\n'


def write_atomically(path, text):
    tmp = '%s.tmp-%d' % (path, os.getpid())
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, path)


def write(report_dir, record, hosts):
    """Writes the host's record, then report.json and report.md; returns the report."""
    os.makedirs(os.path.join(report_dir, 'hosts'), exist_ok=True)
    write_atomically(os.path.join(report_dir, 'hosts', '%s.json' % record['host']),
                     json.dumps(record, indent=2, sort_keys=True) + '\n')
    report = fleet_report(report_dir, hosts)
    write_atomically(os.path.join(report_dir, 'report.json'), json.dumps(report, indent=2, sort_keys=True) + '\n')
    write_atomically(os.path.join(report_dir, 'report.md'), fleet_report_markdown(report))
    return report
