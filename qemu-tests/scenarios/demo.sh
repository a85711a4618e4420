# demo (scripts/demo.sh; LUO kernel): a live update told as a story. Lines
# with "DEMO" are echoed on the host as they come.
#
# Kernel 1: luod starts; a workload builds a 32 MiB cache and serves
# requests from it; it hands the cache to luod (session "cache": token 1 the
# data, token 2 its own state: requests served and the cache's SHA-256);
# `luoctl check`, `prepare` (loads the kernel to go to), the workload pauses,
# `freeze`, `reboot`: a real kexec.
# Kernel 2: luod comes up `updated`; the workload takes its state and cache
# back, checks the SHA-256 and goes on counting; `luoctl finish`; a summary
# from `luoctl --json history` (the host adds the blackout it measured on the
# serial console).
demo() { echo "DEMO: $*"; }

workload_serve() { # serve N: "requests" that read the cache
	i=0
	while [ $i -lt "$1" ]; do
		served=$((served + 1))
		dd if=/run/cache bs=4096 count=1 skip=$(((served * 97) % 8192)) 2>/dev/null >/dev/null
		i=$((i + 1))
	done
}

boot1() {
	step start-luod 60
	demo "kernel $(uname -r): starting luod"
	start_luod
	demo "$(luoctl status | sed -n 's/^backend *//p' | sed 's/^/backend: /')"
	step workload 120
	luo-qemu-tool gen --size 32M --seed 2026 --out /run/cache >/dev/null || fail "gen"
	sum=$(sha256sum </run/cache | cut -c1-64)
	served=0
	workload_serve 20
	demo "workload: built a 32 MiB cache (sha256 $(echo "$sum" | cut -c1-16)...) and served $served requests from it"
	hashfile cache/1 /run/cache before
	echo "served=$served sha256=$sum" >/run/state
	run luoctl session create cache
	run luoctl session preserve cache --token 1 --file /run/cache
	run luoctl session preserve cache --token 2 --file /run/state
	demo "workload: handed its cache (token 1) and its state (token 2: $(cat /run/state | cut -c1-30)...) to luod"
	step repack 120
	repack
	step check 60
	luoctl check --kernel /kernel --initrd /run/initrd.cpio --reuse-cmdline | sed 's/^/DEMO:   check: /'
	step prepare 120
	demo "luoctl prepare --kernel /kernel --initrd initrd.cpio --reuse-cmdline"
	luoctl prepare --kernel /kernel --initrd /run/initrd.cpio --reuse-cmdline | sed 's/^/DEMO:   /'
	[ "$(luoctl --json status | sed -n 's/.*"state": "\(.*\)".*/\1/p')" = prepared ] || fail "prepare"
	step freeze 60
	demo "workload pauses; luoctl freeze"
	mark freeze-start
	luoctl freeze | sed 's/^/DEMO:   /'
	mark frozen
	step kexec 180
	demo "luoctl reboot: kexec into kernel $(uname -r) (the same LUO build), the memfds carried by the kernel"
	mark reboot-call
	luoctl reboot
	sleep 120
	fail "still running 120 s after luoctl reboot"
}

boot2() {
	demo "kernel $(uname -r) is up: $(dmesg | grep -o 'liveupdate number: [0-9]*')"
	wait_updated
	demo "luod: $(luoctl status | sed -n 's/^state *//p'); $(sed -n 's/^ *"\(came up[^"]*\)".*/\1/p' /run/status.json | head -n 1)"
	step workload 120
	run luoctl session retrieve cache --token 2 --output /run/state
	run luoctl session retrieve cache --token 1 --output /run/cache
	hashfile cache/1 /run/cache after
	served=$(sed -n 's/^served=\([0-9]*\) .*/\1/p' /run/state)
	want=$(sed -n 's/.*sha256=\([0-9a-f]*\).*/\1/p' /run/state)
	got=$(sha256sum </run/cache | cut -c1-64)
	[ "$got" = "$want" ] || fail "the cache's SHA-256 changed: $want -> $got"
	demo "workload: took its cache back: sha256 matches; it had served $served requests"
	workload_serve 10
	demo "workload: serving again from the same cache: $served requests in all"
	step finish 60
	luoctl finish | sed 's/^/DEMO:   /'
	step summary 60
	luoctl --json history >/run/h.json
	status_json
	num() { sed -n "s/.*\"$1\": \([0-9][0-9]*\).*/\1/p" /run/h.json | tail -n 1; }
	str() { sed -n "s/.*\"$1\": \"\([^\"]*\)\".*/\1/p" /run/h.json | tail -n 1; }
	ms() { echo "$((($2 - $1) / 1000000)) ms"; }
	fs=$(num freeze_started) fz=$(num frozen) rb=$(num reboot) ls=$(num luod_started) up=$(num updated)
	echo "DEMO-SUMMARY backend          $(sed -n 's/.*"backend": "\([^"]*\)".*/\1/p' /run/status.json | head -n 1)"
	echo "DEMO-SUMMARY sessions         $(num sessions) (files $(num files))"
	echo "DEMO-SUMMARY bytes preserved  $(num bytes)"
	echo "DEMO-SUMMARY kernel           $(str from_release) -> $(str to_release)"
	echo "DEMO-SUMMARY blackout (luod)  $(ms "$fs" "$up") (luoctl history: freeze start -> updated)"
	echo "DEMO-SUMMARY   freeze         $(ms "$fs" "$fz") (freeze start -> frozen)"
	echo "DEMO-SUMMARY   reboot call    $(ms "$fs" "$rb") after freeze start"
	echo "DEMO-SUMMARY   luod start     $(ms "$rb" "$ls") after the reboot call (crosses the kexec: guest clock from the RTC, 1 s resolution)"
	echo "DEMO-SUMMARY   updated        $(ms "$ls" "$up") after luod start"
	pass
}
