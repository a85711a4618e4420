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


def _vm_ms(ms):
    if ms is None:
        return '-'
    return '%d ms' % ms


def vm_row(vm, blackout=True):
    """A VM as the report keeps it, from `luoctl --json vm list`: its name,
    luod's phase, the blackout its VMM measured in the last live update
    (`blackout_ms`; `None` unless `blackout`, and when unknown) and the
    VMM's `detail`."""
    return dict(name=vm.get('name'), phase=vm.get('phase'),
                blackout_ms=vm.get('blackout_ms') if blackout else None, detail=vm.get('detail'))


def unreported(carried, vms):
    """The names of `carried` (VMs the update carried) that `vms` (a `vm
    list`) does not show with a blackout yet: their VMMs have not restored
    them, or not registered them again, or not reported."""
    shown = dict((v.get('name'), v) for v in vms or [])
    return [name for name in carried if (shown.get(name) or {}).get('blackout_ms') is None]


def update_vms(updated_vms, vms):
    """The VMs of a host's report after its update: those `vms` (the `vm
    list` after finish) shows, with the blackout of the update for the VMs
    it carried (`updated_vms`: the `vm list` in state updated, less those
    abandoned), then the carried VMs `vms` does not show (their VMMs did not
    register them again yet), as luod showed them in `updated`, without a
    blackout."""
    carried = [v.get('name') for v in updated_vms or [] if v.get('phase') != 'abandoned']
    rows = [vm_row(v, blackout=v.get('name') in carried) for v in vms or []]
    shown = set(r['name'] for r in rows)
    rows += [vm_row(v, blackout=False) for v in updated_vms or [] if v.get('name') in carried and v.get('name') not in shown]
    return rows


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
        vm_cell = ', '.join('%s (%s, blackout %s)' % (v.get('name'), v.get('phase'), _vm_ms(v.get('blackout_ms')))
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
    record = dict(record, vms=[vm_row(v) for v in record.get('vms') or []])
    write_atomically(os.path.join(report_dir, 'hosts', '%s.json' % record['host']),
                     json.dumps(record, indent=2, sort_keys=True) + '\n')
    report = fleet_report(report_dir, hosts)
    write_atomically(os.path.join(report_dir, 'report.json'), json.dumps(report, indent=2, sort_keys=True) + '\n')
    write_atomically(os.path.join(report_dir, 'report.md'), fleet_report_markdown(report))
    return report
