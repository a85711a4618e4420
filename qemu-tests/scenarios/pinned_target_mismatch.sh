# pinned_target_mismatch (LUO kernel): `luoctl prepare --kernel /kernel
# --sha256 WRONG` is refused with exit 20 (kind digest-mismatch) naming both
# digests, before anything loads: /sys/kernel/kexec_loaded stays 0, state
# normal, no cycle in the history, the session untouched. The same for a
# pinned initrd. `check` with a wrong pin exits 3 naming it, and shows the
# kernel's kexec signature policy. The right pins (from sha256sum) prepare:
# the image is loaded (kexec_loaded 1), then cancel.
boot1() {
	step start-luod 60
	start_luod
	run luoctl session create vm0
	run luo-qemu-tool gen --size 8192 --seed 51 --out /run/d
	run luoctl session preserve vm0 --token 1 --file /run/d
	luoctl --json session list >/run/sessions.before
	kernel_sha=$(sha256sum /kernel | cut -d' ' -f1)
	initrd_sha=$(sha256sum /run/d | cut -d' ' -f1)
	wrong=0000000000000000000000000000000000000000000000000000000000000000
	step refuse-kernel 60
	expect_exit 20 "kernel image /kernel has sha256 $kernel_sha, not the pinned $wrong" \
		luoctl prepare --kernel /kernel --reuse-cmdline --sha256 $wrong
	expect_exit 20 '"kind": "digest-mismatch"' luoctl --json prepare --kernel /kernel --reuse-cmdline --sha256 $wrong
	[ "$(cat /sys/kernel/kexec_loaded)" = 0 ] || fail "a kexec image was loaded by a refused prepare"
	expect_state normal
	step refuse-initrd 60
	expect_exit 20 "initrd /run/d has sha256 $initrd_sha, not the pinned $wrong" \
		luoctl prepare --kernel /kernel --sha256 "$kernel_sha" --initrd /run/d --initrd-sha256 $wrong --reuse-cmdline
	[ "$(cat /sys/kernel/kexec_loaded)" = 0 ] || fail "a kexec image was loaded by a refused prepare"
	expect_state normal
	luoctl --json history >/run/history.json
	grep -q '"cycles": \[\]' /run/history.json || { cat /run/history.json; fail "a refused prepare left a cycle in the history"; }
	luoctl --json session list >/run/sessions.after
	cmp /run/sessions.before /run/sessions.after || fail "the sessions changed"
	step check 60
	expect_exit 3 "not the pinned $wrong" luoctl check --kernel /kernel --reuse-cmdline --sha256 $wrong
	expect_exit 0 'kexec signatures' luoctl check --kernel /kernel --reuse-cmdline --sha256 "$kernel_sha"
	grep -E 'kexec signatures +(signed kexec images required|signatures not required|signature policy unknown).*lockdown' \
		/run/out.txt || fail "check does not show the signature policy"
	echo "@@LUO info $(grep 'kexec signatures' /run/out.txt)"
	step accept 60
	run luoctl prepare --kernel /kernel --reuse-cmdline --sha256 "$(echo "$kernel_sha" | tr a-f A-F)"
	expect_state prepared
	[ "$(cat /sys/kernel/kexec_loaded)" = 1 ] || fail "the pinned image was not loaded"
	run luoctl cancel
	expect_state normal
	pass
}
