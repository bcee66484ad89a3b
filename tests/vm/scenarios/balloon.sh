# balloon-6.1: a virtio balloon inflated by BALLOON_MIB before the crash, so
# the guest holds that many PageOffline frames the host may have reclaimed.

scenario_setup() {
    load_scenario_modules
    wait_until 30 "virtio balloon device" test -d /sys/bus/virtio/drivers/virtio_balloon/virtio*
}

balloon_inflated() {
    [ $((MEMTOTAL_BEFORE - $(meminfo_kb MemTotal))) -ge $((BALLOON_MIB * 1024 * 98 / 100)) ]
}

scenario_prepare() {
    MEMTOTAL_BEFORE=$(meminfo_kb MemTotal)
    hmp "balloon $BALLOON_TARGET_MIB"
    wait_until 120 "balloon inflation by $BALLOON_MIB MiB" balloon_inflated
    hmp "info balloon"
    {
        echo "target_mib $BALLOON_TARGET_MIB"
        echo "balloon_mib $BALLOON_MIB"
        echo "memtotal_kb_before $MEMTOTAL_BEFORE"
        echo "memtotal_kb_after $(meminfo_kb MemTotal)"
        for f in /sys/bus/virtio/drivers/virtio_balloon/virtio*/features; do
            echo "features $(cat "$f")"
        done
    } > /meta/balloon.txt
}
