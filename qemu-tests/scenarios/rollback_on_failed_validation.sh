# rollback_on_failed_validation (LUO kernel): a post-update hook fails and
# luod (--rollback auto) live-updates back to the previous kernel by itself.
# Kernel 1: a preserved file (session a) and a KVM guest of the test VMM
# (vm0); luod is told the running kernel (--rollback-kernel, its initrd and
# command line: this scenario's own images, root's files); a post-update hook
# in the default hooks directory (/etc/luod/hooks.d) fails unless the cycle
# is a rollback. Kernel 2: luod validates before any client restores, the
# hook fails, luod rolls back (prepare, freeze, kexec) with the unclaimed VM
# and the file carried again. Kernel 3 (the previous kernel, booted from the
# initrd recorded at cycle 1's prepare): the hook passes, a new VMM claims
# vm0 (RAM SHA-256 as at the pause, counter increasing), the file is
# byte-identical, and the history shows cycle 1 rolled back by cycle 2.

boot1() {
	step start-luod 60
	# The previous kernel's images: root's files, carried into every later initramfs.
	mkdir -p /rollback
	cp /kernel /rollback/vmlinuz
	chmod 0644 /rollback/vmlinuz
	# The validation hook (default hooks directory), in every later initramfs, the rollback's too.
	mkdir -p /etc/luod/hooks.d/post-update.d
	cat >/etc/luod/hooks.d/post-update.d/50-validate <<'HOOK'
#!/bin/sh
echo "validating cycle $LUOD_CYCLE (rollback of: ${LUOD_ROLLBACK_OF:-none}) on $LUOD_RELEASE"
[ -n "$LUOD_ROLLBACK_OF" ] && { echo "the previous kernel is healthy"; exit 0; }
echo "vm0 health check failed on the new kernel" >&2
exit 1
HOOK
	chmod 0755 /etc/luod/hooks.d /etc/luod/hooks.d/post-update.d /etc/luod/hooks.d/post-update.d/50-validate
	start_luod --rollback auto --rollback-kernel /rollback/vmlinuz --rollback-initrd /rollback/initrd.cpio \
		--rollback-cmdline "$(cat /proc/cmdline)"
	step preserve 60
	run luo-qemu-tool gen --size 300000 --seed 61 --out /run/a
	run luoctl session create a
	run luoctl session preserve a --token 1 --file /run/a
	hashfile a/1 /run/a before
	step rollback-initrd 120
	# The initramfs the rollback boots (with /hashes.before): it says "boot 3" itself.
	echo 3 >/boot.next
	(cd / && find . -xdev | cpio -o -H newc >/run/back.cpio 2>/dev/null) || fail "packing the rollback initramfs"
	rm -f /boot.next
	mv /run/back.cpio /rollback/initrd.cpio
	chmod 0644 /rollback/initrd.cpio
	info "rollback initramfs: $(wc -c </rollback/initrd.cpio) bytes"
	step vmm-start 60
	luo-test-vmm serve --socket "$SOCK" --name vm0 --heartbeat-ms 500 >/run/vmm.log 2>&1 &
	wait_for /run/vmm.log 'VMM: heartbeat .* counter=[1-9]' 30
	step repack 120
	repack
	step prepare 120
	run luoctl prepare --kernel /kernel --initrd /run/initrd.cpio --reuse-cmdline
	step freeze 60
	run luoctl freeze
	wait_for /run/vmm.log 'VMM: answered n=[0-9]* freeze ok' 10
	info "boot 1: VM vm0 paused at counter $(field /run/vmm.log 'VMM: paused ' counter)"
	step kexec 180
	luoctl reboot
	sleep 120
	fail "still running 120 s after luoctl reboot"
}

boot2() {
	# No client restores here: luod validates, fails, rolls back by itself.
	step validate-and-roll-back 240
	mkdir -p /run/luod
	mark luod-exec
	NO_COLOR=1 luod --socket "$SOCK" --state-dir /run/luod --rollback auto >>"$LUOD_LOG" 2>&1 &
	LUOD_PID=$!
	wait_for "$LUOD_LOG" 'post-update hook 50-validate: exit 1' 60
	grep -E 'post-update hook|rolling back' "$LUOD_LOG"
	info "boot 2: $(grep -o 'the update failed validation: [^;]*' "$LUOD_LOG" | head -n 1)"
	sleep 200
	cat "$LUOD_LOG"
	fail "luod did not roll back within 200 s"
}

boot3() {
	wait_updated --rollback auto
	step validated 60
	wait_for "$LUOD_LOG" 'post-update hook 50-validate: exit 0' 30
	step claim 90
	{
		luo-test-vmm claim --socket "$SOCK" --name vm0 --seconds 2
		echo $? >/run/claim.rc
	} 2>&1 | tee /run/claim.log
	[ "$(cat /run/claim.rc)" = 0 ] || fail "claiming vm0 after the rollback failed"
	grep -q 'VMM: restored .* ram_match=yes' /run/claim.log || fail "vm0's RAM not verified after both kexecs"
	grep -q 'VMM: resumed .* increasing=yes' /run/claim.log || fail "vm0 did not continue after both kexecs"
	before=$(field /run/claim.log 'VMM: resumed ' counter_before)
	after=$(field /run/claim.log 'VMM: resumed ' counter_after)
	info "vm0 across the update and its rollback: resumed $before -> $after (counter at the pause in kernel 1 above)"
	step retrieve 60
	run luoctl session retrieve a --token 1 --output /run/a.after
	hashfile a/1 /run/a.after after
	compare_hashes
	step finish 60
	run luoctl finish
	expect_state normal
	expect_json '"live_updates": 2'
	dmesg_has 'liveupdate number: 2'
	luoctl --json history >/run/history.json
	grep -q '"outcome": "rolled-back"' /run/history.json || { cat /run/history.json; fail "cycle 1 is not rolled-back"; }
	grep -q '"rolled_back_by": 2' /run/history.json || { cat /run/history.json; fail "cycle 1 not rolled back by 2"; }
	grep -q '"rollback_of": 1' /run/history.json || { cat /run/history.json; fail "cycle 2 is not the rollback of 1"; }
	grep -q '"reason": "vm0 health check failed on the new kernel"' /run/history.json ||
		{ cat /run/history.json; fail "the failed validation is not in the history"; }
	run luoctl history
	pass
}
