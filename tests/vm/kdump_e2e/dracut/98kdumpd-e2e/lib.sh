#!/bin/bash
# Shared by reference.sh and capture.sh (kdumpd e2e guest side).
# shellcheck disable=SC2034  # T and E are used by the scripts that source this file

T=/kdump-target                # the dump target: an ext4 virtio disk the host reads back
E=/usr/libexec/kdumpd-e2e

# A mark for the host, in the journal and straight on the console (journald forwards to the
# console asynchronously, and the last marks come just before the power goes off).
mark() {
    echo "@@KDUMPD $*"
    echo "@@KDUMPD $*" > /dev/console
}

fail() {
    mark FAIL "$*"
    if [ -d "$T/run" ]; then
        echo "$*" >> "$T/run/failures.txt"
        dmesg > "$T/run/dmesg.txt"
        journalctl -b -o short-monotonic --no-pager > "$T/run/journal.txt" 2>&1
        sync
    fi
    exit 1
}

now() {
    date +%s.%N
}

# seconds between two `now` values
elapsed() {
    awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'
}

# The value of NAME=VALUE on the kernel command line, or $2.
cmdarg() {
    local arg args
    read -r -a args < /proc/cmdline
    for arg in "${args[@]}"; do
        case "$arg" in
            "$1="*) echo "${arg#*=}"; return 0 ;;
        esac
    done
    echo "$2"
}

timing() {
    echo "$1 $2" >> "$T/run/timings.txt"
}

# /dev/vdX of the virtio disk with serial $1, waiting for udev to probe it.
find_disk() {
    local i d
    for ((i = 0; i < 600; i++)); do
        for d in /sys/block/vd*; do
            [ -e "$d/serial" ] || continue
            if [ "$(cat "$d/serial")" = "$1" ] && [ -b "/dev/${d##*/}" ]; then
                echo "/dev/${d##*/}"
                return 0
            fi
        done
        sleep 0.2
    done
    return 1
}

# RSS and PSS (KiB) of a process, from smaps_rollup; "0 0" when it is gone.
memof() {
    awk '/^Rss:/ { r = $2 } /^Pss:/ { p = $2 } END { print r + 0, p + 0 }' \
        "/proc/${1:-0}/smaps_rollup" 2> /dev/null || echo "0 0"
}

# Every 2 s: daemon and nbdkit RSS and PSS, swap in use, free memory (KiB).
sampler() {
    local st dp np
    while :; do
        st=/run/kdumpd/state.json
        dp=$(sed -n 's/.*"daemon_pid": *\([0-9]*\).*/\1/p' $st 2> /dev/null)
        np=$(sed -n 's/.*"nbdkit_pid": *\([0-9]*\).*/\1/p' $st 2> /dev/null)
        echo "$(now) $(memof "$dp") $(memof "$np")" \
            "$(awk '/^SwapTotal:/ { t = $2 } /^SwapFree:/ { f = $2 } /^MemFree:/ { m = $2 }
                    END { print t - f, m }' /proc/meminfo)" >> "$T/run/samples.txt"
        sleep 2
    done
}
