#!/bin/bash
# kdumpd-e2e-reference.service: mount the dump target and take the reference dump with
# makedumpfile -d 31, before kdumpd starts (the unit is ordered Before=kdumpd.service).
# shellcheck source=lib.sh
. /usr/libexec/kdumpd-e2e/lib.sh
mark REFERENCE_START
dev=$(find_disk kdumpd-dump) || fail "no dump disk"
mkdir -p "$T"
mount -t ext4 "$dev" "$T" || fail "cannot mount the dump disk"
mkdir -p "$T/run"
cat /proc/meminfo > "$T/run/meminfo.start"
cat /proc/cmdline > "$T/run/cmdline"
cat /proc/iomem > "$T/run/iomem"
t0=$(now)
makedumpfile -l --message-level 7 -d 31 /proc/vmcore "$T/run/reference.kdump" \
    > "$T/run/reference.log" 2>&1 || fail "reference makedumpfile failed"
sync
t1=$(now)
timing reference_dump_seconds "$(elapsed "$t0" "$t1")"
# What the memory-hungry step is sized from: what is available before kdumpd exists.
awk '/^MemAvailable:/ { print $2 }' /proc/meminfo > "$T/run/memavailable-kib"
mark REFERENCE_DONE "$(stat -c %s "$T/run/reference.kdump")"
