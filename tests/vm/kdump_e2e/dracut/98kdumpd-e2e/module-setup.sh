#!/bin/bash
# Test-only dracut module for tests/vm/kdump_e2e: it stands in for kdump-utils' kdumpbase.
# Its units take a reference dump before kdumpd starts (kdumpd-e2e-reference.service) and run
# the capture after it (kdumpd-e2e-capture.service, ordered like kdump-capture.service).
# $KDUMPD_E2E_BUILD holds the host-built programs (hog). The LUKS scenario
# ($KDUMPD_E2E_LUKS_KEY, $KDUMPD_E2E_LUKS_UUID set; built with dracut's crypt module) adds the
# dump target's /etc/crypttab entry and key file, as kdump-utils does for a LUKS target.

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

# The LUKS dump target: unlocked by systemd-cryptsetup (its generator reads /etc/crypttab;
# headless: a wrong or missing key fails instead of asking on the console), marks around it,
# and a memory sampler running through it.
install_luks() {
    local _name=kdumpdluks _u
    inst_simple "$KDUMPD_E2E_LUKS_KEY" /etc/kdumpd-e2e/luks.key || return 1
    chmod 0400 "$initdir/etc/kdumpd-e2e/luks.key"
    printf '%s UUID=%s /etc/kdumpd-e2e/luks.key luks,headless=true\n' "$_name" \
        "$KDUMPD_E2E_LUKS_UUID" > "$initdir/etc/crypttab"
    _u="systemd-cryptsetup@$_name.service"
    mkdir -p "$initdir$systemdsystemunitdir/$_u.d"
    inst_simple "$moddir/luks-unlock-marks.conf" "$systemdsystemunitdir/$_u.d/kdumpd-e2e.conf" \
        || return 1
    if [ "${KDUMPD_E2E_LUKS_NOLOCK:-}" = 1 ]; then
        inst_simple "$moddir/luks-nolock.conf" "$systemdsystemunitdir/$_u.d/nolock.conf" \
            || return 1
    fi
    inst_simple "$moddir/kdumpd-e2e-sampler.service" \
        "$systemdsystemunitdir/kdumpd-e2e-sampler.service" || return 1
    $SYSTEMCTL -q --root "$initdir" add-wants initrd.target kdumpd-e2e-sampler.service
}

install() {
    local _u
    inst_multiple makedumpfile bash awk grep sed sleep cat sync cp mkdir date dmesg stat \
        journalctl timeout kill head tail tr wc df mountpoint cmp touch || return 1
    inst_simple "$KDUMPD_E2E_BUILD/hog" /usr/libexec/kdumpd-e2e/hog || return 1
    for _u in lib.sh reference.sh capture.sh luks.sh sampler.sh; do
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
    if [ -n "${KDUMPD_E2E_LUKS_KEY:-}" ]; then
        install_luks || return 1
    fi
    dracut_no_switch_root
    return 0
}
