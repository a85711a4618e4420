#!/usr/bin/env bash
# Installs the pinned ansible-core (requirements.txt) into a venv and prints
# the venv's path on stdout. Idempotent and cached: the venv is reused while
# requirements.txt is unchanged (a stamp holds its hash). No stdin needed.
#
#   ansible/setup.sh            # -> /var/cache/liveupdate-ansible/venv-<hash>
#   LIVEUPDATE_ANSIBLE_CACHE=DIR ansible/setup.sh
#
# Python: Debian 12's python3 (3.11), which ansible-core 2.19 supports as a
# controller. python3-venv is installed with apt when venv is missing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
req=$here/requirements.txt
cache=${LIVEUPDATE_ANSIBLE_CACHE:-/var/cache/liveupdate-ansible}
python=${LIVEUPDATE_ANSIBLE_PYTHON:-/usr/bin/python3}
hash=$(sha256sum "$req" | cut -c1-16)
venv=$cache/venv-$hash

if [ -f "$venv/.installed" ] && "$venv/bin/python" -c 'import ansible' 2>/dev/null; then
    echo "$venv"
    exit 0
fi

case "$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" in
3.11 | 3.12 | 3.13) ;;
*)
    echo "ansible/setup.sh: $python is not Python 3.11 to 3.13, which ansible-core 2.19's controller needs" >&2
    exit 1
    ;;
esac

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
if [ ! -f "$venv/.installed" ]; then
    rm -rf "$venv"
    if ! "$python" -m venv "$venv" >/dev/null 2>&1; then
        rm -rf "$venv"
        echo "ansible/setup.sh: installing python3-venv" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv </dev/null >&2 ||
            { apt-get update -q </dev/null >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv </dev/null >&2; }
        "$python" -m venv "$venv"
    fi
    "$venv/bin/pip" install -q --disable-pip-version-check --no-input -r "$req" </dev/null >&2
    touch "$venv/.installed"
fi
echo "$venv"
