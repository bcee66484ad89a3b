#!/bin/bash
# The LUKS scenario's capture (sourced by capture.sh; kdumpd_e2e=luks-control or luks-swap).
# The dump target is LUKS2 (Argon2id, 1 GiB): systemd-cryptsetup unlocked it from /etc/crypttab
# before this unit (its unit is ordered after cryptsetup-pre.target, so after kdumpd.service,
# and this one after cryptsetup.target). Here: what the unlock did, then the final dump onto
# the unlocked disk. The reference dump and every record stay on the plain disk ($T).
# shellcheck disable=SC2154  # R, kdumpd_on: set by capture.sh

LUKS_NAME=kdumpdluks
LUKS_MNT=/kdump-luks

luks_capture() {
    local unit="systemd-cryptsetup@$LUKS_NAME.service" dev=/dev/mapper/$LUKS_NAME t0
    systemctl show "$unit" -p ActiveState -p Result -p ExecMainStatus -p ExecMainCode \
        -p ExecMainStartTimestampMonotonic -p ExecMainExitTimestampMonotonic \
        -p InactiveExitTimestampMonotonic -p ActiveEnterTimestampMonotonic \
        > "$R/luks-unit.txt" 2>&1
    journalctl -b -u "$unit" -o short-monotonic --no-pager > "$R/luks-journal.txt" 2>&1
    dmesg | grep -E "__vm_enough_memory|Out of memory|oom-kill|Killed process" \
        > "$R/luks-kernel.txt"
    [ "$kdumpd_on" = yes ] && kdumpd status --json > "$R/status-end.json"
    if [ ! -b "$dev" ]; then
        mark LUKS_FAILED "$(systemctl show -P Result "$unit" 2> /dev/null)"
        return 0
    fi
    touch "$R/luks-open"
    mark LUKS_OPEN
    mkdir -p "$LUKS_MNT"
    mount -t ext4 "$dev" "$LUKS_MNT" || fail "cannot mount the unlocked LUKS disk"
    mark DUMP_START
    t0=$(now)
    makedumpfile -l --message-level 7 -d 31 /proc/vmcore "$LUKS_MNT/final.kdump" \
        > "$R/final.log" 2>&1 || fail "final makedumpfile (onto the LUKS disk) failed"
    sync
    timing dump_seconds "$(elapsed "$t0" "$(now)")"
    mark DUMP_DONE "$(stat -c %s "$LUKS_MNT/final.kdump")"
    umount "$LUKS_MNT" || fail "cannot unmount the LUKS disk"
}
