# -*- coding: utf-8 -*-
# Copyright: liveupdate developers
# Apache License 2.0 (see the repository's Cargo.toml)
"""Runs luoctl for the collection's modules: the one place that knows
luoctl's command line, its exit codes and its ``--json`` shapes.

Every failure a module reports is luoctl's own: the ``error`` object of
``luoctl --json`` (``what``, ``message``, ``hint``) rendered exactly as
luoctl prints it on stderr without ``--json`` (``luoctl: WHAT: MESSAGE;
HINT``), or luoctl's stderr verbatim when it printed no JSON.
"""

from __future__ import annotations

import json
import os

# luoctl's exit codes (luoctl/CLI.md, "Exit codes"; luoctl/src/exit.rs).
# Stable numbers: scripts and these modules branch on them.
EXIT_CODES = {
    0: 'ok',
    1: 'internal',
    2: 'usage',
    3: 'check-failed',
    4: 'unreachable',
    5: 'protocol',
    6: 'connection',
    7: 'local-io',
    8: 'timeout',
    9: 'already-on-target',
    10: 'invalid-argument',
    11: 'wrong-state',
    12: 'permission-denied',
    13: 'vetoed',
    14: 'subsystem-failed',
    15: 'not-found',
    16: 'already-exists',
    17: 'kernel',
    18: 'record',
    19: 'quota-exceeded',
    20: 'digest-mismatch',
}
EXIT_OK = 0
EXIT_CHECK_FAILED = 3
EXIT_UNREACHABLE = 4
EXIT_CONNECTION = 6
EXIT_ALREADY_ON_TARGET = 9
EXIT_VETOED = 13
EXIT_WRONG_STATE = 11

# luod's states (luoctl/CLI.md, "JSON output").
STATES = ('normal', 'prepared', 'frozen', 'updated')


class LuoctlError(Exception):
    """luoctl failed: its exit code, the JSON error's fields, and the line
    luoctl prints for it."""

    def __init__(self, rc, kind, what, message, hint=None, items=None, step=None):
        self.rc = rc
        self.kind = kind
        self.what = what
        self.message = message
        self.hint = hint
        self.items = items
        self.step = step
        super(LuoctlError, self).__init__(self.line())

    def line(self):
        """The error as luoctl prints it on stderr without --json."""
        if self.what is None:
            return self.message
        text = 'luoctl: %s: %s' % (self.what, self.message)
        if self.hint:
            text += '; %s' % self.hint
        return text

    def as_dict(self):
        return {
            'rc': self.rc,
            'kind': self.kind,
            'what': self.what,
            'message': self.message,
            'hint': self.hint,
            'line': self.line(),
        }


def parse_output(rc, stdout, stderr):
    """luoctl's answer: the JSON object on success, LuoctlError otherwise.

    luoctl --json prints exactly one JSON object on stdout, on success and
    on failure. When stdout is not that (luoctl missing, killed by a
    signal, a luoctl without --json), the failure is luoctl's stderr as it
    is, or the reason there is none.
    """
    try:
        doc = json.loads(stdout) if stdout and stdout.strip() else None
    except ValueError:
        doc = None
    if isinstance(doc, dict) and doc.get('ok') is True and rc == 0:
        return doc
    if isinstance(doc, dict) and isinstance(doc.get('error'), dict):
        err = doc['error']
        return LuoctlError(
            rc,
            err.get('kind') or EXIT_CODES.get(rc, 'unknown'),
            err.get('what'),
            err.get('message') or '',
            err.get('hint'),
            items=doc.get('items'),
            step=err.get('step'),
        )
    text = (stderr or '').strip()
    if not text:
        if rc == 0:
            text = 'luoctl exited 0 but printed no JSON object: is it a luoctl with --json?'
        else:
            text = 'luoctl exited %s and printed nothing' % rc
    return LuoctlError(rc, EXIT_CODES.get(rc, 'unknown'), None, text)


class Luoctl(object):
    """luoctl on the managed host, run through an AnsibleModule."""

    def __init__(self, module, binary='luoctl', socket=None, timeout=None):
        self.module = module
        self.binary = binary
        self.socket = socket
        self.timeout = timeout
        self._help = {}

    def command(self, args):
        """The argv for `luoctl --json ARGS`."""
        path = self.binary
        if os.sep not in path:
            found = self.module.get_bin_path(path)
            if found:
                path = found
        argv = [path]
        if self.socket:
            argv += ['--socket', self.socket]
        if self.timeout:
            argv += ['--timeout', str(self.timeout)]
        argv.append('--json')
        return argv + list(args)

    def run(self, *args):
        """Runs luoctl; returns its JSON object or raises LuoctlError."""
        rc, out, err = self.module.run_command(self.command(args), check_rc=False)
        result = parse_output(rc, out, err)
        if isinstance(result, LuoctlError):
            raise result
        return result

    def supports(self, option, *subcommand):
        """Whether `luoctl SUBCOMMAND --help` lists OPTION (a flag or a
        command name). Flags that newer luoctls add (--sha256, rollback)
        are used only when the luoctl on the host has them."""
        key = subcommand
        if key not in self._help:
            argv = [self.command([])[0]] + list(subcommand) + ['--help']
            rc, out, err = self.module.run_command(argv, check_rc=False)
            self._help[key] = out if rc == 0 else ''
        text = self._help[key]
        if option.startswith('-'):
            return (' %s ' % option) in text or (' %s,' % option) in text or (' %s\n' % option) in text
        return any(line.strip().startswith(option + ' ') or line.strip() == option
                   for line in text.splitlines())

    def pins(self):
        """Whether this luoctl pins images (`--sha256`, `--initrd-sha256`)
        and answers `check` with exit 9 when the kernel is the running one:
        luod then checks the very descriptor it loads, and judges "on the
        target" from the image's header and digest."""
        return self.supports('--sha256', 'check')

    # The commands the modules use.

    def status(self):
        return self.run('status')

    def history(self):
        return self.run('history')

    def vms(self):
        return self.run('vm', 'list').get('vms', [])

    def kernel_args(self, kernel=None, initrd=None, cmdline=None, kernel_sha256=None, initrd_sha256=None):
        """`--kernel K [--sha256 HEX] [--initrd I [--initrd-sha256 HEX]]
        (--cmdline S | --reuse-cmdline)`; the pins only when given."""
        args = []
        if kernel:
            args += ['--kernel', kernel]
            if kernel_sha256:
                args += ['--sha256', kernel_sha256.lower()]
            if initrd:
                args += ['--initrd', initrd]
                if initrd_sha256:
                    args += ['--initrd-sha256', initrd_sha256.lower()]
            if cmdline is None:
                args.append('--reuse-cmdline')
            else:
                args += ['--cmdline', cmdline]
        return args

    def check(self, **kernel):
        return self.run('check', *self.kernel_args(**kernel))

    def prepare(self, **kernel):
        return self.run('prepare', *self.kernel_args(**kernel))

    def transition(self, name):
        return self.run(name)


def running_release():
    """The running kernel's release (`uname -r`)."""
    return os.uname()[2]


def last_finished(history):
    """The newest cycle of `luoctl history --json` that finished, or None."""
    finished = [c for c in history.get('cycles', []) if c.get('outcome') == 'finished']
    return finished[-1] if finished else None


def on_target(history, release, kernel_sha256):
    """For a luoctl without exit 9 (see Luoctl.pins): whether the host runs
    the pinned kernel already, judged from history: the last update that
    finished loaded a kernel with this digest, and the running release is
    the one that update came up in.

    Returns (bool, reason)."""
    if not kernel_sha256:
        return False, 'no pinned digest to compare'
    cycle = last_finished(history)
    if cycle is None:
        return False, 'no live update has finished on this host'
    target = cycle.get('target') or {}
    loaded = (target.get('kernel_sha256') or '').lower()
    if loaded != kernel_sha256.lower():
        return False, 'the last update (cycle %s) loaded kernel sha256 %s, not %s' % (
            cycle.get('id'), loaded or 'none', kernel_sha256.lower())
    if cycle.get('to_release') != release:
        return False, 'the last update (cycle %s) came up in %s, but %s runs' % (
            cycle.get('id'), cycle.get('to_release'), release)
    return True, 'cycle %s loaded kernel sha256 %s and came up in %s, which runs' % (
        cycle.get('id'), loaded, release)


def facts(luoctl):
    """What luod_facts returns: luod's state, the running kernel, the last
    cycle with its blackout, the VMs, the newest finished update."""
    status = luoctl.status()
    history = luoctl.history()
    vms = luoctl.vms()
    last = status.get('last_cycle')
    return {
        'state': status.get('state'),
        'backend': status.get('backend'),
        'region': status.get('region'),
        'generation': status.get('generation'),
        'running_kernel': running_release(),
        'live_updates': status.get('live_updates'),
        'last_cycle': last,
        'blackout_ns': last.get('blackout_ns') if last else None,
        'in_progress': status.get('in_progress'),
        'notes': status.get('notes', []),
        'subsystems': status.get('subsystems', []),
        'vms': vms,
        'last_update': last_finished(history),
        'cycles': len(history.get('cycles', [])),
    }
