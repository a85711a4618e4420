# ten_updates_in_a_row (LUO kernel): ten live updates in a row, alternating
# between two kernels: /kernel (A) and a byte-different copy of it (B, 512
# bytes appended past the image's payload), each booted with its own tag on
# the command line (luo_kernel=A|B). Every kernel retrieves session a, checks
# its SHA-256 against the one taken before the kexec (host and guest), checks
# that it is the kernel the cycle loaded, finishes, and preserves new data
# for the next cycle. The eleventh kernel checks live_updates 10, the
# kernel's "liveupdate number: 10" and ten finished cycles.

LAST=11

boot_any() {
	if [ "$BOOT" = 1 ]; then
		step start-luod 60
		cp /kernel /kernel-b
		head -c 512 /dev/zero | tr '\0' 'B' >>/kernel-b
		cmp -s /kernel /kernel-b && fail "the two kernels are the same bytes"
		info "kernel A $(sha256sum </kernel | cut -c1-16), kernel B $(sha256sum </kernel-b | cut -c1-16)"
		start_luod
	else
		wait_updated
		want=A
		[ $((BOOT % 2)) = 0 ] && want=B
		grep -q "luo_kernel=$want" /proc/cmdline || fail "booted $(cat /proc/cmdline), expected kernel $want"
		step retrieve 60
		run luoctl session retrieve a --token 1 --output /run/a.after
		hashfile "a/1@$((BOOT - 1))" /run/a.after after
		compare_hashes
		step finish 60
		run luoctl finish
		expect_json "\"live_updates\": $((BOOT - 1))"
		info "update $((BOOT - 1)) of 10: kernel $want, data identical"
	fi
	if [ "$BOOT" = "$LAST" ]; then
		dmesg_has 'liveupdate number: 10'
		luoctl --json history >/run/history.json
		c=$(grep -c '"outcome": "finished"' /run/history.json)
		[ "$c" = 10 ] || { cat /run/history.json; fail "history holds $c finished cycles, expected 10"; }
		pass
	fi
	step preserve 60
	run luo-qemu-tool gen --size 200000 --seed $((70 + BOOT)) --out /run/a
	run luoctl session create a
	run luoctl session preserve a --token 1 --file /run/a
	hashfile "a/1@$BOOT" /run/a before
	if [ $((BOOT % 2)) = 1 ]; then next=B image=/kernel-b; else next=A image=/kernel; fi
	base=$(tr ' ' '\n' </proc/cmdline | grep -v -e '^luo_kernel=' -e '^luod.handover=' | tr '\n' ' ')
	luo_cycle --kernel "$image" --initrd /run/initrd.cpio --cmdline "${base}luo_kernel=$next"
}
