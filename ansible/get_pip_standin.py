# A local stand-in for the get-pip.py bootstrap script that ansible-test
# downloads from its own CI file server (unreachable from this project's
# machines, which reach PyPI only). ansible-test creates its sanity and
# unit-test venvs without pip, then runs this file as
#   python get_pip.py --disable-pip-version-check pip==X [--no-setuptools] [--no-wheel] ...
# It does the same with what Python ships: ensurepip installs the bundled
# pip into the venv, then that pip installs the requested versions from PyPI.
# ansible/test.sh puts it where ansible-test looks for its cached copy
# (~/.ansible/test/cache/get_pip_X_Y.py) when none is there.
import ensurepip
import subprocess
import sys

ensurepip.bootstrap(upgrade=True)
args = [a for a in sys.argv[1:] if a not in ('--no-setuptools', '--no-wheel')]
sys.exit(subprocess.call([sys.executable, '-m', 'pip', 'install', '--no-input'] + args))
