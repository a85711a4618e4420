# vm_freeze_timeout (LUO kernel): a VMM that never answers freeze. luod runs
# with --vm-timeout 2; two VMMs: vm-good (registered first) and vm-hung
# (`--hang-at freeze`). `luoctl freeze` fails (exit 14) naming vm-hung after
# 2 s; luod undoes: vm-good, already paused, gets unfreeze and its guest runs
# again (its counter keeps increasing); the state is `prepared`, vm-hung is
# `disconnected`. Then the VMM that dies in freeze: vm-hung is abandoned,
# the cycle cancelled, a third VMM (`--exit-at freeze`) registers, and the
# next freeze fails naming it while vm-good resumes again.

serve() { # serve NAME ARGS...: a VMM in the background, logging to /run/NAME.log
	name=$1
	shift
	echo "+ luo-test-vmm serve --socket $SOCK --name $name $* &"
	luo-test-vmm serve --socket "$SOCK" --name "$name" --heartbeat-ms 250 "$@" >"/run/$name.log" 2>&1 &
	wait_for "/run/$name.log" 'VMM: heartbeat .* counter=[1-9]' 30
}
# resumed_after NAME CALL-NUMBER: the guest of NAME was paused and runs again
# since call n: it got unfreeze, progressed, and heartbeats show it counting.
resumed_after() {
	log=/run/$1.log
	wait_for "$log" "VMM: resumed n=$2 after unfreeze" 10
	i=0
	while [ "$(grep -c 'VMM: first-progress after resume' "$log")" -lt "$(grep -c 'VMM: resumed n=' "$log")" ]; do
		i=$((i + 1)); [ $i -lt 200 ] || fail "$1: no guest progress after the resume"; usleep 50000
	done
	n=$(grep -c 'VMM: heartbeat' "$log")
	i=0
	while [ "$(grep -c 'VMM: heartbeat' "$log")" -lt $((n + 2)) ]; do
		i=$((i + 1)); [ $i -lt 100 ] || fail "$1: no heartbeat after the resume"; usleep 50000
	done
	paused_at=$(field "$log" 'VMM: paused ' counter)
	first=$(field "$log" 'VMM: first-progress after resume' counter)
	last=$(field "$log" 'VMM: heartbeat' counter)
	st=$(field "$log" 'VMM: heartbeat' state)
	[ "$st" = running ] && [ "$first" -gt "$paused_at" ] && [ "$last" -gt "$first" ] ||
		fail "$1 did not resume: paused at $paused_at, first progress $first, last heartbeat $last ($st)"
	info "$1 resumed after the failed freeze: paused at counter $paused_at, first progress after unfreeze $first (in-process blackout $(field "$log" 'VMM: first-progress after resume' blackout_ms) ms), $last at the last heartbeat (running)"
}

boot1() {
	step start-luod 60
	start_luod --vm-timeout 2
	expect_state normal
	step vmm-start 60
	serve vm-good
	serve vm-hung --hang-at freeze
	run luoctl vm list
	step prepare 120
	run luoctl prepare --kernel /kernel --reuse-cmdline
	expect_state prepared
	step freeze 60
	t0=$(cut -d' ' -f1 /proc/uptime)
	expect_exit 14 'VM vm-hung: its VMM did not answer freeze within 2 s' luoctl freeze
	t1=$(cut -d' ' -f1 /proc/uptime)
	expect_state prepared
	info "luoctl freeze failed after $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}') s: $(head -n 1 /run/out.txt)"
	step vm-good-resumes 60
	grep -E 'VMM: (call|paused|resumed|answered|first-progress)' /run/vm-good.log
	grep -E 'VMM: (call|hanging|answered)' /run/vm-hung.log
	grep -q 'VMM: hanging at freeze' /run/vm-hung.log || fail "vm-hung did not get freeze"
	resumed_after vm-good 3
	expect_exit 0 'vm-hung.*disconnected' luoctl vm list
	grep -q 'vm-good.*registered' /run/out.txt || fail "vm-good is not registered any more"

	# A VMM that exits in freeze, instead of hanging.
	step exit-at-freeze 120
	run luoctl cancel
	expect_state normal
	run luoctl vm abandon vm-hung
	serve vm-exit --exit-at freeze
	run luoctl prepare --kernel /kernel --reuse-cmdline
	expect_exit 14 'VM vm-exit: its VMM disconnected during freeze' luoctl freeze
	expect_state prepared
	info "luoctl freeze: $(head -n 1 /run/out.txt)"
	wait_for /run/vm-exit.log 'VMM: exiting at freeze without answering' 10
	resumed_after vm-good 7
	run luoctl cancel
	expect_state normal
	run luoctl vm list
	pass
}
