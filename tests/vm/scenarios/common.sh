# Helpers shared by the safety scenarios' guest hooks.  /init sources this
# file followed by one scenario's hooks (mark, fail, hmp, load_scenario_modules
# and the default hooks come from /init itself).

# wait_until SECONDS WHAT CMD [ARGS...]: polls CMD every 0.2 s, fails after SECONDS.
wait_until() {
    _limit=$(($1 * 5))
    _what=$2
    shift 2
    _n=0
    until "$@"; do
        _n=$((_n + 1))
        [ $_n -lt $_limit ] || fail "timeout waiting for $_what"
        usleep 200000
    done
}

meminfo_kb() { awk -v k="$1:" '$1 == k { print $2 }' /proc/meminfo; }

# Memory blocks (memoryN names) currently in /sys/devices/system/memory.
memory_blocks() { ls -d /sys/devices/system/memory/memory* 2>/dev/null | sed 's,.*/,,'; }

# block_range memoryN: "start end" physical byte addresses, decimal.
block_range() {
    _bs=$((0x$(cat /sys/devices/system/memory/block_size_bytes)))
    _idx=$((0x$(cat "/sys/devices/system/memory/$1/phys_index")))
    echo "$((_idx * _bs)) $(((_idx + 1) * _bs))"
}
