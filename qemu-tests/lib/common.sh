# shellcheck shell=bash
# Shared helpers for the qemu-tests scripts.
: "${LUO_CACHE:=/var/cache/liveupdate-qemu}"
export LUO_CACHE
QEMU_TESTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log()  { printf '%s: %s\n' "${LOG_TAG:-qemu-tests}" "$*" >&2; }
die()  { printf '%s: ERROR: %s\n' "${LOG_TAG:-qemu-tests}" "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found; run qemu-tests/setup.sh (as root) first"; }
now_ms() { date +%s%3N; }
# secs_since START_MS -> "12.345"
secs_since() { local d=$(( $(now_ms) - $1 )); printf '%d.%03d' $((d / 1000)) $((d % 1000)); }
