#!/usr/bin/env bash
# Tests of the liveupdate.fleet Ansible collection, with the pinned
# ansible-core (ansible/setup.sh installs it in a cached venv):
#   1. ansible-test sanity (Python 3.11, no containers: --requirements)
#   2. ansible-test units: the modules against a fake luoctl
#   3. the rolling-update playbook against three real luods (file backend,
#      real luoctl) over the local connection: tests/test_rolling_local.py
# Needs target/debug/luod and luoctl (built here when missing). No stdin.
# Exit status: non-zero if anything failed; every part runs.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
collection=$here/ansible_collections/liveupdate/fleet

venv=$("$here/setup.sh") || { echo "ansible/setup.sh failed" >&2; exit 1; }
export PATH=$venv/bin:$PATH ANSIBLE_NOCOLOR=1 PIP_NO_INPUT=1

# ansible-test creates its sanity and unit venvs without pip and downloads a
# pip bootstrap script from its own file server, which this machine cannot
# reach: put the stand-in (ensurepip, then pip from PyPI) where it looks.
pip_version=$(sed -n "s/^ *pip='\([0-9.]*\)',.*/\1/p" \
    "$venv"/lib/python3*/site-packages/ansible_test/_internal/python_requirements.py | head -1)
if [ -n "$pip_version" ]; then
    home=$(python -c 'import os; print(os.path.expanduser("~"))')
    cached=$home/.ansible/test/cache/get_pip_${pip_version//./_}.py
    if [ ! -f "$cached" ]; then
        mkdir -p "$(dirname "$cached")"
        cp "$here/get_pip_standin.py" "$cached"
    fi
fi

rc=0
cd "$collection" || exit 1
echo "== ansible-test sanity (liveupdate.fleet)"
ansible-test sanity --requirements --python 3.11 --color no </dev/null 2>&1 | grep -v '^\(Collecting\|  Downloading\|Installing\|Successfully\|Requirement already\|Looking in\|Processing\|  Attempting\|    Found\|    Uninstalling\|      Successfully\)' || rc=1
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
echo "== ansible-test units (liveupdate.fleet, fake luoctl)"
ansible-test units --requirements --python 3.11 --color no </dev/null 2>&1 | grep -v '^\(Collecting\|  Downloading\|Installing\|Successfully\|Requirement already\)' || rc=1
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1

echo "== rolling-update playbook against three real luods (ansible/tests/test_rolling_local.py)"
cd "$repo" || exit 1
if [ ! -x target/debug/luod ] || [ ! -x target/debug/luoctl ]; then
    cargo build --workspace --bins --locked </dev/null || rc=1
fi
python -m pytest -q -p no:cacheprovider ansible/tests/test_rolling_local.py </dev/null || rc=1
exit $rc
