# hwpoison-6.1: frames with PG_hwpoison at the crash, of every kind we can
# reach from user space: anonymous pages of a live process (hard and soft
# offline, one inside a THP), free pages inside large free buddy blocks
# (hard and soft offline through sysfs) and page-cache pages (clean, via
# sysfs; dirty, via madvise on a file mapping).  Each target is appended to
# /meta/hwpoison-targets.txt as "pfn method kind detail".

TARGETS=/meta/hwpoison-targets.txt
SYSMEM=/sys/devices/system/memory

# offline_free_page FILE SKIP OFFSET: poisons frame head+OFFSET of a free block.
offline_free_page() {
    found=$(/bin/hazard free-block 4 "$2") || fail "no free buddy block of order >= 4"
    set -- "$1" "$2" "$3" $found
    pfn=$(($4 + $3 % (1 << $5)))
    echo "$pfn ${1} free inside-free-block-head-$4-order-$5-flags-$(/bin/hazard kpf "$4")" \
        >> "$TARGETS"
    echo $((pfn * 4096)) > "$SYSMEM/$1" || fail "$1 of free pfn $pfn"
}

scenario_prepare() {
    echo "# pfn method kind detail" > "$TARGETS"
    # (b) free pages first, while the large free blocks are intact.
    offline_free_page hard_offline_page 0 517
    offline_free_page soft_offline_page 1 123
    # (c) page cache: a clean page of cache.bin, a dirty page of dirty.bin.
    pfn=$(/bin/hazard file-pfn /mnt/data/cache.bin 7) || fail "file-pfn cache.bin"
    echo "$pfn hard_offline_page pagecache-clean cache.bin-page-7" >> "$TARGETS"
    echo $((pfn * 4096)) > "$SYSMEM/hard_offline_page" || fail "hard_offline_page of cache pfn $pfn"
    pfn=$(/bin/hazard file-poison /mnt/data/dirty.bin 3) || fail "file-poison dirty.bin"
    echo "$pfn madvise-hwpoison pagecache-dirty dirty.bin-page-3" >> "$TARGETS"
    # (a) anonymous pages of a process that stays alive until the crash.
    /bin/hazard anon "$TARGETS" /run/hazard.ready &
    HAZARD_PID=$!
    wait_until 60 "hazard anon" hazard_ready
}

hazard_ready() {
    kill -0 $HAZARD_PID 2>/dev/null || fail "hazard anon died"
    [ -e /run/hazard.ready ]
}
