# target_without_liveupdate (LUO kernel): `luoctl prepare --kernel /kernel
# --cmdline "console=ttyS0"` (no liveupdate=on: the target kernel would not
# take the LUO data) is refused with exit 10 and a message naming
# liveupdate=on; `--json` gives kind invalid-argument; `check` with the same
# options exits 3; the state stays normal, no kexec image is loaded, and a
# prepare with --reuse-cmdline then works (with 3 MiB preserved); `check`
# with the same options then agrees (exit 0).
boot1() {
	step start-luod 60
	start_luod
	run luoctl session create vm0
	run luo-qemu-tool gen --size 4096 --seed 41 --out /run/d
	run luoctl session preserve vm0 --token 1 --file /run/d
	step refuse 60
	expect_exit 10 'liveupdate=on' luoctl prepare --kernel /kernel --cmdline "console=ttyS0"
	expect_exit 10 '"kind": "invalid-argument"' luoctl --json prepare --kernel /kernel --cmdline "console=ttyS0"
	grep -q 'liveupdate=on' /run/out.txt || fail "the JSON error does not name liveupdate=on"
	expect_exit 3 'liveupdate=on' luoctl check --kernel /kernel --cmdline "console=ttyS0"
	expect_state normal
	[ "$(cat /sys/kernel/kexec_loaded)" = 0 ] || fail "a kexec image was loaded by a refused prepare"
	luoctl --json history >/run/history.json
	grep -q '"cycles": \[\]' /run/history.json || { cat /run/history.json; fail "a refused prepare left a cycle in the history"; }
	step accept 60
	# 3 MiB more: more than the data area of luod's 4 MiB record memfd,
	# which the LUO backend does not copy files into (the kernel carries them).
	run luo-qemu-tool gen --size 3M --seed 42 --out /run/big
	run luoctl session preserve vm0 --token 2 --file /run/big
	run luoctl prepare --kernel /kernel --reuse-cmdline
	expect_state prepared
	run luoctl cancel
	expect_state normal
	step check-agrees-with-prepare 60
	# `check` must not predict a refusal that `prepare` does not make.
	expect_exit 0 '' luoctl check --kernel /kernel --reuse-cmdline
	pass
}
