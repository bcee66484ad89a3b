# hotplug-6.1: two pc-dimms of HP_MIB each are hot-added, onlined (movable)
# and filled with "KDUMPDHP" pages (hazard fill) through a tmpfs file that
# is then deleted, the capture kernel is loaded (its elfcorehdr covers them),
# then dimm1 is
# offlined and hot-removed (device_del: the range no longer exists at all)
# and dimm2 is only offlined (present, but offline in the old kernel), then
# sysrq-c.  6.1 has no crash hotplug support (6.6 added it), so the
# elfcorehdr still covers both ranges.

blocks_appeared() { [ "$(memory_blocks | wc -l)" -ge $((BLOCKS_BEFORE + HP_BLOCKS)) ]; }

# range_of BLOCK...: "start end" of a contiguous run of memory blocks.
range_of() {
    first=$(block_range "$1" | cut -d' ' -f1)
    for b in "$@"; do last=$b; done
    echo "$first $(block_range "$last" | cut -d' ' -f2)"
}

scenario_setup() {
    memory_blocks | sort > /run/blocks.before
    BLOCKS_BEFORE=$(wc -l < /run/blocks.before)
    bs=$((0x$(cat /sys/devices/system/memory/block_size_bytes)))
    HP_BLOCKS=$((2 * HP_MIB * 1024 * 1024 / bs))
    [ "$HP_BLOCKS" -ge 2 ] || fail "dimms smaller than a memory block"
    for i in 1 2; do
        hmp "object_add memory-backend-ram,id=hpmem$i,size=${HP_MIB}M"
        hmp "device_add pc-dimm,id=dimm$i,memdev=hpmem$i"
    done
    wait_until 60 "hot-added memory blocks" blocks_appeared
    # QEMU places dimm1 first, so the lower half of the new blocks is dimm1.
    new=$(memory_blocks | grep -vxF -f /run/blocks.before \
        | while read -r b; do echo "$((0x$(cat /sys/devices/system/memory/$b/phys_index))) $b"; done \
        | sort -n | cut -d' ' -f2)
    half=$((HP_BLOCKS / 2))
    DIMM1=$(echo $new | tr ' ' '\n' | head -n $half)
    DIMM2=$(echo $new | tr ' ' '\n' | tail -n +$((half + 1)))
    for b in $DIMM1 $DIMM2; do
        echo online_movable > "/sys/devices/system/memory/$b/state" || fail "online $b"
    done
    # Leave recognisable data in the dimms: tmpfs pages are movable, so they
    # go to ZONE_MOVABLE, i.e. the dimms, first; freeing does not clear them.
    mkdir -p /run/hpfill
    mount -t tmpfs -o size=$((2 * HP_MIB))m tmpfs /run/hpfill || fail "mount tmpfs"
    /bin/hazard fill /run/hpfill/fill $((2 * HP_MIB * 7 / 8)) || fail "fill the dimms"
    grep -E "^(MemFree|Shmem):" /proc/meminfo
    rm /run/hpfill/fill
    umount /run/hpfill
    DIMM1_RANGE=$(range_of $DIMM1)
    DIMM2_RANGE=$(range_of $DIMM2)
    {
        echo "block_size $bs"
        echo "dimm1 $DIMM1_RANGE $(echo $DIMM1)"
        echo "dimm2 $DIMM2_RANGE $(echo $DIMM2)"
        echo "memtotal_kb_online $(meminfo_kb MemTotal)"
    } > /meta/hotplug.txt
    cat /proc/iomem > /meta/iomem.hotplugged
}

dimm1_gone() {
    for b in $DIMM1; do
        [ ! -e "/sys/devices/system/memory/$b" ] || return 1
    done
}

scenario_loaded() {
    # The capture kernel and its elfcorehdr are in place: take memory away.
    for b in $DIMM2 $DIMM1; do
        echo offline > "/sys/devices/system/memory/$b/state" || fail "offline $b"
    done
    hmp "device_del dimm1"
    wait_until 60 "dimm1 removal" dimm1_gone
    hmp "info memory-devices"
    {
        echo "removed $DIMM1_RANGE dimm1"
        echo "offline $DIMM2_RANGE dimm2"
        for b in $DIMM2; do echo "state $b $(cat /sys/devices/system/memory/$b/state)"; done
        echo "memtotal_kb_after $(meminfo_kb MemTotal)"
    } >> /meta/hotplug.txt
}

# In the capture kernel: /proc/vmcore may fail to read in places; copy what
# is readable and record the rest (file ranges) in /meta/vmcore.readerrors.
capture_vmcore() {
    /bin/hazard copy /proc/vmcore "$OUT" /meta/vmcore.readerrors > /meta/vmcore.copied
}
