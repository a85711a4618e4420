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
# A KVM guest goes through it too: luo-test-vmm (a counter in 2 MiB of memfd
# RAM) registers with luod in kernel 1 and is paused at freeze; in kernel 2 a
# new VMM claims it (RAM memfd + vCPU state) and the guest counts on. The
# summary shows its counter before and after and the VM blackout (TSC).
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
	step vm 60
	luo-test-vmm serve --socket "$SOCK" --name vm0 --heartbeat-ms 500 >/run/vmm0.log 2>&1 &
	i=0
	until grep -q 'VMM: heartbeat .* counter=[1-9]' /run/vmm0.log 2>/dev/null; do
		i=$((i + 1)); [ $i -lt 600 ] || { cat /run/vmm0.log; fail "the VMM did not start its guest"; }
		usleep 50000
	done
	demo "VMM: a KVM guest (vm0: 2 MiB of RAM in a memfd) runs and counts, at $(field /run/vmm0.log 'VMM: heartbeat' counter) now; its VMM registered it with luod"
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
	[ "$(luoctl --json status | luo-qemu-tool json state)" = prepared ] || fail "prepare"
	step freeze 60
	demo "workload pauses; luoctl freeze"
	mark freeze-start
	luoctl freeze | sed 's/^/DEMO:   /'
	mark frozen
	demo "VMM: vm0 paused at counter $(field /run/vmm0.log 'VMM: paused ' counter); its vCPU state ($(field /run/vmm0.log 'VMM: paused ' state_bytes) bytes) went to luod"
	say "hash before vm0/ram $(field /run/vmm0.log 'VMM: paused ' ram_sha256) $(field /run/vmm0.log 'VMM: registered' ram_size)"
	step kexec 180
	demo "luoctl reboot: kexec into kernel $(uname -r) (the same LUO build), the memfds carried by the kernel"
	mark reboot-call
	luoctl reboot
	sleep 120
	fail "still running 120 s after luoctl reboot"
}

boot2() {
	demo "kernel $(uname -r) is up: $(dmesg | grep -o 'liveupdate number: [0-9]*')"
	# The new VMM starts with luod and claims vm0 as soon as luod answers.
	{
		luo-test-vmm claim --socket "$SOCK" --name vm0 --seconds 3 >/run/claim.log 2>&1
		echo $? >/run/claim.rc
	} &
	CLAIM_PID=$!
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
	step vm 60
	wait "$CLAIM_PID"
	[ "$(cat /run/claim.rc)" = 0 ] || { cat /run/claim.log; fail "luo-test-vmm claim failed"; }
	vm_before=$(field /run/claim.log 'VMM: resumed ' counter_before)
	vm_after=$(field /run/claim.log 'VMM: resumed ' counter_after)
	vm_blackout=$(sed -n 's/^VMM: blackout_tsc_ms=\([0-9.]*\).*/\1/p' /run/claim.log)
	grep -q 'VMM: restored .* ram_match=yes' /run/claim.log || fail "vm0's RAM differs after the update"
	say "hash after vm0/ram $(field /run/claim.log 'VMM: restored ' ram_sha256) $(field /run/claim.log 'VMM: restored ' ram_size)"
	demo "VMM: a new VMM claimed vm0 from luod (RAM memfd and vCPU state): RAM SHA-256 equal; the guest went on from counter $vm_before to $vm_after; VM blackout ${vm_blackout} ms"
	luoctl vm list | sed 's/^/DEMO:   /'
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
	echo "DEMO-SUMMARY VM vm0           counter $vm_before at the pause -> $vm_after after the update (KVM guest, RAM SHA-256 equal)"
	echo "DEMO-SUMMARY VM blackout      ${vm_blackout%.*} ms (last guest progress before the pause -> first after the claim, TSC)"
	pass
}
