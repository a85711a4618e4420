# -*- coding: utf-8 -*-
# Copyright: liveupdate developers
# Apache License 2.0 (see the repository's Cargo.toml)
"""The report's VMs: each VM's blackout in the update, from `luoctl --json
vm list` (its VMM measured and reported it), in report.json and report.md."""

from __future__ import annotations

import json
import os

from ansible_collections.liveupdate.fleet.plugins.plugin_utils import report


def vm(name, phase, blackout_ms=None, detail=None):
    # As `luoctl --json vm list` prints a VM.
    return dict(name=name, owner_uid=0, tokens=[1, 2], phase=phase, detail=detail, blackout_ms=blackout_ms)


UPDATED = [vm('web', 'claimed', 1918, 'QEMU 11.1.3, running; restored'), vm('db', 'awaiting-claim'),
           vm('old', 'abandoned')]


def test_the_vms_an_update_carried_show_their_blackout_once_reported():
    after = [vm('web', 'registered', 1918, 'QEMU 11.1.3, running'), vm('db', 'registered')]
    assert report.unreported(['web', 'db'], after) == ['db']
    after[1]['blackout_ms'] = 2210
    assert report.unreported(['web', 'db'], after) == []
    # A VM not listed (its VMM has not registered it again) is not reported yet.
    assert report.unreported(['web', 'db'], after[:1]) == ['db']


def test_the_report_keeps_name_phase_blackout_and_detail_and_the_carried_vms_not_listed_yet():
    after = [vm('web', 'registered', 1918, 'QEMU 11.1.3, running'), vm('new', 'registered', 7, 'started after')]
    assert report.update_vms(UPDATED, after) == [
        dict(name='web', phase='registered', blackout_ms=1918, detail='QEMU 11.1.3, running'),
        # Not carried by this update: a blackout it shows is not this update's.
        dict(name='new', phase='registered', blackout_ms=None, detail='started after'),
        # Carried, not registered again yet: as luod showed it in `updated`, without a blackout.
        dict(name='db', phase='awaiting-claim', blackout_ms=None, detail=None),
    ]


def test_report_json_and_markdown_show_each_vms_blackout(tmp_path):
    record = dict(host='hv1', outcome='updated', kernel_before='6.19.0', kernel_after='6.19.1',
                  luod_blackout_ns=21_600_000_000, vms=[vm('web', 'registered', 1918, 'QEMU 11.1.3, running'),
                                                        vm('db', 'registered')])
    written = report.write(str(tmp_path), record, ['hv1', 'hv2'])
    with open(os.path.join(str(tmp_path), 'report.json')) as f:
        assert json.load(f) == written
    hv1 = written['hosts'][0]
    assert hv1['vms'] == [dict(name='web', phase='registered', blackout_ms=1918, detail='QEMU 11.1.3, running'),
                          dict(name='db', phase='registered', blackout_ms=None, detail=None)]
    assert written['hosts'][1]['outcome'] == 'pending'
    with open(os.path.join(str(tmp_path), 'report.md')) as f:
        md = f.read()
    assert ('| hv1 | updated | 6.19.0 | 6.19.1 | 21600.0 ms | web (registered, blackout 1918 ms), '
            'db (registered, blackout -) |') in md, md
