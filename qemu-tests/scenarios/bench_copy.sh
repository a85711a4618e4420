# bench_copy (stock Debian kernel, memmap=160M$0x30000000; a benchmark, it
# passes when it ran): the reserved-memory backend's copy of a 64 MiB memfd
# into the range (liveupdate::record::RecordStore::write over the /dev/mem
# mapping of ReservedRegion, exactly what luod does at freeze) against a
# plain memcpy of 64 MiB in the same guest (RAM to RAM), best of 3; also a
# memcpy from the memfd's mapping into the range and the pread of the memfd
# alone. Ratio = memcpy time / RecordStore::write time (1.0: as fast as
# memcpy; target >= 0.5).
boot1() {
	step bench 600
	grep -i '30000000-39ffffff : Reserved' /proc/iomem || fail "the range is not Reserved"
	run luo-qemu-tool bench-copy --region '160M$0x30000000' --size 64M --reps 3
	step pat 60
	# How luod maps the range: the page attribute (PAT) of its /dev/mem
	# mapping, from the kernel's memtype list, while luod runs.
	mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
	start_luod --backend reserved-memory
	pat=$(grep -i '0x0*30000000-0x0*3a000000' /sys/kernel/debug/x86/pat_memtype_list 2>/dev/null | head -n 1)
	info "PAT memtype of luod's mapping of the range: ${pat:-not found in /sys/kernel/debug/x86/pat_memtype_list}"
	grep -i 'PAT' /proc/cpuinfo >/dev/null && info "PAT: $(dmesg | grep -m1 'x86/PAT' || echo '?')"
	pass
}
