# already_on_target (LUO kernel): before any update `check --kernel /kernel`
# exits 0 (same version as the running kernel, but no update loaded a
# kernel yet, so no digest to compare). After a real kexec into /kernel,
# `check --kernel /kernel` exits 9 (`already on target`, JSON
# "already_on_target": true) both in `updated` and after `finish`: the
# image header's version string is `uname -r` ... `uname -v`, and its sha256
# is the one cycle 1 loaded. A different image (the same bytes plus one)
# is not on target: exit 0, "already_on_target": false, the digests named.
boot1() {
	step start-luod 60
	start_luod
	step check-before 60
	expect_exit 0 'no update has loaded a kernel on this host yet' luoctl check --kernel /kernel --reuse-cmdline
	expect_exit 0 '"already_on_target": false' luoctl --json check --kernel /kernel --reuse-cmdline
	luo_cycle
}

boot2() {
	wait_updated
	step check-updated 60
	expect_exit 9 'already on target' luoctl check --kernel /kernel --reuse-cmdline
	echo "@@LUO info $(tail -n 1 /run/out.txt)"
	step finish 60
	run luoctl finish
	expect_state normal
	expect_json '"live_updates": 1'
	step check-finished 60
	expect_exit 9 '"already_on_target": true' luoctl --json check --kernel /kernel --reuse-cmdline
	grep -q '"kind": "already-on-target"' /run/out.txt || fail "the JSON error kind is not already-on-target"
	grep -q "$(uname -r)" /run/out.txt || fail "the detail does not name the running release"
	grep -q "$(sha256sum /kernel | cut -d' ' -f1)" /run/out.txt || fail "the detail does not name the digest"
	step check-other 60
	cp /kernel /run/kernel.other
	printf x >>/run/kernel.other
	expect_exit 0 '"already_on_target": false' luoctl --json check --kernel /run/kernel.other --reuse-cmdline
	grep -q "has the running kernel's version $(uname -r), but its sha256 $(sha256sum /run/kernel.other | cut -d' ' -f1)" \
		/run/out.txt || fail "the other image's detail does not name its digest"
	pass
}
