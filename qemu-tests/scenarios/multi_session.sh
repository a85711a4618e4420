# multi_session (LUO kernel): three sessions with three memfds each, sizes
# 0 bytes, 1 byte, 4095, 4096 (a page), 8193, 1 MiB, 2 MiB, 3 MiB + 17, and
# tokens 0, 1, 2^40, 2^64-1; retrieved in another order than preserved; each
# session finished explicitly before `finish`.
FILES="alpha:1:0 alpha:2:4096 alpha:3:1 beta:10:3145745 beta:11:2097152 beta:12:4095 gamma:0:8193 gamma:1099511627776:1048576 gamma:18446744073709551615:65536"
boot1() {
	step start-luod 60
	start_luod
	expect_state normal
	step preserve 120
	for s in alpha beta gamma; do run luoctl session create $s; done
	seed=1
	for f in $FILES; do
		IFS=: read s t n <<EOT
$f
EOT
		run luo-qemu-tool gen --size "$n" --seed $seed --out "/run/$s.$t"
		run luoctl session preserve "$s" --token "$t" --file "/run/$s.$t"
		hashfile "$s/$t" "/run/$s.$t" before
		seed=$((seed + 1))
	done
	run luoctl session list
	expect_json '"name": "alpha"' '"name": "beta"' '"name": "gamma"'
	luo_cycle
}

boot2() {
	wait_updated
	run luoctl session list
	step retrieve 120
	# Reverse order of preservation.
	for f in $(echo $FILES | tr ' ' '\n' | sed -n '1!G;h;$p'); do
		IFS=: read s t n <<EOT
$f
EOT
		run luoctl session retrieve "$s" --token "$t" --output "/run/$s.$t.after"
		hashfile "$s/$t" "/run/$s.$t.after" after
	done
	compare_hashes
	step finish 60
	for s in gamma alpha beta; do run luoctl session finish $s; done
	run luoctl finish
	expect_state normal
	expect_json '"live_updates": 1'
	dmesg_has 'liveupdate number: 1'
	pass
}
