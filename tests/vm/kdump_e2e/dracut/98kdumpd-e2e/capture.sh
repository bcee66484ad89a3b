#!/bin/bash
# kdumpd-e2e-capture.service: the capture, after kdumpd.service (like kdump-capture.service).
#   kdumpd_e2e=swap     memory-hungry step on anonymous memory (needs swap), then the dump
#   kdumpd_e2e=scratch  the same step on a file in kdumpd's filesystem; the dump is staged
#                       there and copied out
#   kdumpd_e2e=control  kdumpd is off (rd.kdumpd=0): the step must be OOM-killed
#   kdumpd_e2e=luks-*   no step: the memory-hungry part was the unlock of the LUKS dump target
#                       (systemd-cryptsetup, before this unit); the dump goes onto it (luks.sh)
# DMA-like corruption runs against kdumpd's old memory during the step (swap, scratch).
# shellcheck source=lib.sh
. /usr/libexec/kdumpd-e2e/lib.sh
R=$T/run
mode=$(cmdarg kdumpd_e2e swap)
factor=$(cmdarg kdumpd_e2e_factor 3)
passes=$(cmdarg kdumpd_e2e_passes 2)
scratch=$(cmdarg kdumpd.mount /var/lib/kdumpd-scratch)
mountpoint -q "$T" || fail "dump target not mounted (reference step failed?)"
mark CAPTURE_START "$mode"

systemctl show kdumpd.service -p ActiveState -p Result -p ExecMainStatus \
    -p InactiveExitTimestampMonotonic -p ActiveEnterTimestampMonotonic > "$R/kdumpd-unit.txt"
kdumpd_on=no
if [ "$(systemctl is-active kdumpd.service)" = active ]; then
    kdumpd_on=yes
    kdumpd status --json > "$R/status-ready.json"
fi
cat /proc/swaps > "$R/swaps.ready"
{
    systemctl show system.slice kdumpd.slice -p MemoryHigh -p MemoryCurrent
    cat /sys/fs/cgroup/cgroup.subtree_control
    journalctl -b -u kdumpd.service --no-pager | tail -n 20
} > "$R/cgroups.ready" 2>&1
cat /proc/meminfo > "$R/meminfo.ready"
mark KDUMPD "$kdumpd_on"

# The memory-hungry step (FACTOR x what was available before kdumpd) while old memory is
# corrupted, then the final dump (swap, scratch, control).
hog_capture() {
    local hog_mib sampler_pid inject_pid t0 t1 hog_rc
    hog_mib=$(cmdarg kdumpd_e2e_mib 0)
    if [ "$hog_mib" = 0 ]; then
        hog_mib=$(( $(cat "$R/memavailable-kib") * factor / 1024 ))
    fi
    echo "$hog_mib" > "$R/hog-mib"

    sampler &
    sampler_pid=$!

    inject_pid=
    if [ $kdumpd_on = yes ]; then
        # kdumpd's interpreter: its libraries are in kdumpd's payload (dracut module 99kdumpd)
        LD_LIBRARY_PATH=/usr/lib/kdumpd/payload/lib \
            python3 -I "$E/inject.py" --run-dir /run/kdumpd --out "$R/inject.json" \
            > "$R/inject.log" 2>&1 &
        inject_pid=$!
    fi

    sync
    mark HOG_START "$hog_mib"
    t0=$(now)
    case "$mode" in
        scratch)
            mountpoint -q "$scratch" || fail "kdumpd's scratch filesystem is not mounted"
            (echo 1000 > /proc/self/oom_score_adj
             exec "$E/hog" file "$scratch/hog.bin" "$hog_mib" "$passes" "$R/hog.json") ;;
        *)
            (echo 1000 > /proc/self/oom_score_adj
             exec "$E/hog" anon "$hog_mib" "$passes" "$R/hog.json") ;;
    esac
    hog_rc=$?
    t1=$(now)
    timing hog_seconds "$(elapsed "$t0" "$t1")"
    echo "$hog_rc" > "$R/hog-rc"
    dmesg | grep -E "Out of memory|oom-kill|Killed process" > "$R/oom.txt"
    mark HOG_DONE "$hog_rc"

    if [ -n "$inject_pid" ]; then
        kill -TERM "$inject_pid"
        wait "$inject_pid"
    fi
    [ $kdumpd_on = yes ] && kdumpd status --json > "$R/status-end.json"
    kill "$sampler_pid"

    if [ "$mode" != control ]; then
        mark DUMP_START
        t0=$(now)
        if [ "$mode" = scratch ]; then
            rm -f "$scratch/hog.bin"
            makedumpfile -l --message-level 7 -d 31 /proc/vmcore "$scratch/final.kdump" \
                > "$R/final.log" 2>&1 || fail "final makedumpfile failed"
            t1=$(now)
            cp "$scratch/final.kdump" "$R/final.kdump" || fail "copying the staged dump out failed"
            sync
            timing stage_copy_seconds "$(elapsed "$t1" "$(now)")"
        else
            makedumpfile -l --message-level 7 -d 31 /proc/vmcore "$R/final.kdump" \
                > "$R/final.log" 2>&1 || fail "final makedumpfile failed"
            sync
        fi
        t1=$(now)
        timing dump_seconds "$(elapsed "$t0" "$t1")"
        mark DUMP_DONE "$(stat -c %s "$R/final.kdump")"
    fi
}

case "$mode" in
    luks-*)
        # shellcheck source=luks.sh
        . "$E/luks.sh"
        luks_capture ;;
    *)
        hog_capture ;;
esac

if [ $kdumpd_on = yes ]; then
    kdumpd status --json > "$R/status-final.json"
    t0=$(now)
    systemctl stop kdumpd.service
    timing stop_seconds "$(elapsed "$t0" "$(now)")"
    # kdumpd wrote its final report beside the dump (report = in the test's kdumpd.conf).
    cmp -s /run/kdumpd/report.json "$R/kdumpd-report.json" \
        || echo "kdumpd's report beside the dump differs from its run directory's" \
            >> "$R/failures.txt"
fi
cat /proc/meminfo > "$R/meminfo.end"
dmesg > "$R/dmesg.txt"
journalctl -b -o short-monotonic --no-pager > "$R/journal.txt" 2>&1
sync
systemctl stop kdumpd-e2e-sampler.service 2> /dev/null
umount "$T"
mark CAPTURE_DONE "$mode"
echo o > /proc/sysrq-trigger
