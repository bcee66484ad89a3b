#!/bin/bash
# Test-only dracut module for tests/vm/kdump_e2e: it stands in for kdump-utils' kdumpbase.
# Its units take a reference dump before kdumpd starts (kdumpd-e2e-reference.service) and run
# the capture after it (kdumpd-e2e-capture.service, ordered like kdump-capture.service).
# $KDUMPD_E2E_BUILD holds the host-built programs (hog).

# shellcheck disable=SC2154  # initdir, moddir, systemdsystemunitdir come from dracut

check() {
    return 255
}

depends() {
    echo systemd kdumpd
}

installkernel() {
    hostonly='' instmods virtio_pci virtio_blk ext4 crc32c_generic
}

install() {
    local _u
    inst_multiple makedumpfile bash awk grep sed sleep cat sync cp mkdir date dmesg stat \
        journalctl timeout kill head tail tr wc df mountpoint cmp || return 1
    inst_simple "$KDUMPD_E2E_BUILD/hog" /usr/libexec/kdumpd-e2e/hog || return 1
    for _u in lib.sh reference.sh capture.sh; do
        inst_simple "$moddir/$_u" "/usr/libexec/kdumpd-e2e/$_u" || return 1
        chmod 0755 "$initdir/usr/libexec/kdumpd-e2e/$_u"
    done
    inst_simple "$moddir/../../guest/inject.py" /usr/libexec/kdumpd-e2e/inject.py || return 1
    # What kdumpbase would install: the collector the safety gate reads.
    mkdir -p "$initdir/etc"
    echo "core_collector makedumpfile -l --message-level 7 -d 31" > "$initdir/etc/kdump.conf"
    for _u in kdumpd-e2e-reference.service kdumpd-e2e-capture.service; do
        inst_simple "$moddir/$_u" "$systemdsystemunitdir/$_u" || return 1
        $SYSTEMCTL -q --root "$initdir" add-wants initrd.target "$_u"
    done
    # As kdumpbase does: the capture kernel never switches root.
    for _u in initrd-parse-etc.service initrd-cleanup.service; do
        mkdir -p "$initdir$systemdsystemunitdir/$_u.d"
        printf '%s\n' "[Unit]" "ConditionPathExists=!/proc/vmcore" \
            > "$initdir$systemdsystemunitdir/$_u.d/kdumpd-e2e.conf"
    done
    dracut_no_switch_root
    return 0
}
