#!/usr/bin/env bash
# A live update end to end on this machine, with the file backend: a
# workload's cache is preserved in a memfd through luod, the host goes through
# prepare/freeze/reboot (a simulated kexec: luod writes its record and the
# preserved memory into a region file and exits), luod starts again on the
# region, the workload takes its cache back and checks it, and finish closes
# the cycle.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p luod -p luoctl 2>&1 | tail -n 1
bin=target/release
dir=$(mktemp -d /tmp/luod-demo.XXXXXX)
trap 'kill $(cat "$dir/luod.pid" 2>/dev/null) 2>/dev/null || true; rm -rf "$dir"' EXIT
sock=$dir/luod.sock
luoctl() { "$bin/luoctl" --socket "$sock" "$@"; }
start_luod() {
    "$bin/luod" --socket "$sock" --state-dir "$dir/state" --region "$dir/region" --region-size 128M 2>>"$dir/luod.log" &
    echo $! >"$dir/luod.pid"
    for _ in $(seq 100); do luoctl status >/dev/null 2>&1 && return; sleep 0.05; done
    echo "luod did not start:"; cat "$dir/luod.log"; exit 1
}

echo "== start luod (file backend, region $dir/region)"
start_luod
echo "== the workload builds a 32 MiB cache and hands it to luod"
head -c $((32 << 20)) /dev/urandom >"$dir/cache"
before=$(sha256sum <"$dir/cache" | cut -d' ' -f1)
luoctl session create cache
luoctl session preserve cache --token 1 --file "$dir/cache"
luoctl check
luoctl prepare
luoctl freeze
luoctl reboot || true
wait "$(cat "$dir/luod.pid")" || echo "luod exited with status $? (75: simulated kexec)"
echo "== luod starts again on the same region, as in the new kernel"
start_luod
luoctl status
luoctl session retrieve cache --token 1 --output "$dir/cache.after"
after=$(sha256sum <"$dir/cache.after" | cut -d' ' -f1)
luoctl finish
echo "== summary"
luoctl history
echo "cache sha256 before: $before"
echo "cache sha256 after:  $after"
[ "$before" = "$after" ] && echo "the cache came through the update intact"
