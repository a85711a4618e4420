# -*- coding: utf-8 -*-
# Copyright: liveupdate developers
# Apache License 2.0 (see the repository's Cargo.toml)
"""Runs the collection's modules against the fake luoctl (tests/unit/fakes/luoctl)."""

from __future__ import annotations

import json
import os

import pytest

from ansible.module_utils.testing import patch_module_args

FAKE = os.path.join(os.path.dirname(__file__), '..', '..', 'fakes', 'luoctl')


def ok(**fields):
    doc = dict(ok=True)
    doc.update(fields)
    return dict(rc=0, json=doc)


def refused(rc, kind, what, message, hint=None, **extra):
    doc = dict(ok=False, error=dict(kind=kind, code=rc, what=what, message=message, hint=hint, step=None))
    doc.update(extra)
    return dict(rc=rc, json=doc)


STATUS_NORMAL = ok(state='normal', backend='file', region='file /tmp/r (8 MiB)', generation=3, sessions=[],
                   subsystems=['region-capacity'], last_cycle=None, live_updates=0, notes=[], in_progress=None)
HISTORY_EMPTY = ok(cycles=[], events=[])
VMS_NONE = ok(vms=[])
# `luoctl check --help` of a luoctl without and with pins (--sha256, exit 9).
HELP_OLD = dict(rc=0, stdout='Options:\n      --kernel <PATH>  Kernel image to load for kexec\n')
HELP_PINS = dict(rc=0, stdout=('Options:\n      --kernel <PATH>  Kernel image to load for kexec\n'
                               '      --sha256 <HEX>         Pin the kernel image\n'))


class Fake(object):
    """A scenario for the fake luoctl and what it was asked."""

    def __init__(self, tmp_path, answers):
        self.path = str(tmp_path / 'scenario.json')
        with open(self.path, 'w') as f:
            json.dump(dict(answers=answers), f)
        os.environ['FAKE_LUOCTL_SCENARIO'] = self.path

    def calls(self):
        """Each call's argv without the global options, but the `--help` ones."""
        return [c for c in self.all_calls() if not c.endswith('--help')]

    def all_calls(self):
        """Each call's argv without the global options."""
        if not os.path.exists(self.path + '.log'):
            return []
        out = []
        with open(self.path + '.log') as f:
            for line in f:
                argv = json.loads(line)
                out.append(' '.join(a for a in argv if a != '--json'))
        return out


@pytest.fixture
def fake(tmp_path):
    def make(pins=False, **answers):
        answers = dict((k.replace('_', ' '), v) for k, v in answers.items())
        answers.setdefault('check --help', [HELP_PINS if pins else HELP_OLD])
        return Fake(tmp_path, answers)
    yield make
    os.environ.pop('FAKE_LUOCTL_SCENARIO', None)


@pytest.fixture
def run_module(capsys):
    """Runs a module's main() with args; returns its JSON result."""
    def run(main, args, check_mode=False):
        args = dict(args)
        args.setdefault('luoctl', os.path.abspath(FAKE))
        if check_mode:
            args['_ansible_check_mode'] = True
        with patch_module_args(args):
            with pytest.raises(SystemExit):
                main()
        out = capsys.readouterr().out
        return json.loads(out)
    return run
