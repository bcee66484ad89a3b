#!/bin/sh
# Install kdumpd's kdump integration on this machine (as root).
#
#   install.sh --dracut [--root DIR]   the dracut module (Fedora/RHEL kdump-utils, or any
#                                      dracut-built capture initramfs)
#   install.sh --debian [--root DIR]   the unit and hook for Debian/Ubuntu kdump-tools
#
# The kdumpd package itself (python3 -m pip install . or a distribution package) and the
# nbdkit plugin (/usr/lib/kdumpd/kdumpd_plugin.py) are installed separately; --root installs
# into another tree (packaging, tests).
#
# --dracut: /usr/lib/dracut/modules.d/99kdumpd. kdump-utils then picks it up by itself
#   (mkdumprd sets IN_KDUMP=1 and includes every module whose check() agrees); rebuild with
#   `kdumpctl rebuild` (or touch /etc/kdump.conf and restart kdump). Other dracut users add
#   it with `dracut --add kdumpd` or add_dracutmodules+=" kdumpd " in dracut.conf.d.
#   kdump-utils boots the capture kernel with cgroup_disable=memory: add it to
#   KDUMP_COMMANDLINE_REMOVE in /etc/sysconfig/kdump so that kdumpd-memreserve can keep memory
#   free for the swap device (without it kdumpd still runs, without that reserve).
# --debian: kdumpd.service in /lib/systemd/system, enabled as a dependency of
#   kdump-tools-dump.service; the cp/reboot hook in /usr/lib/kdumpd/kdump-tools, put first on
#   kdump-config's PATH by one line in /etc/default/kdump-tools; /etc/kdumpd.conf with
#   "as = swap" if there is none. Nothing in the kdump initrd changes: kdump-tools' capture
#   kernel boots the real root file system, where all of this lives.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
mode=
root=
while [ $# -gt 0 ]; do
    case "$1" in
    --dracut | --debian) mode=${1#--} ;;
    --root)
        root=${2:?--root needs a directory}
        shift
        ;;
    *)
        echo "usage: $0 --dracut|--debian [--root DIR]" >&2
        exit 2
        ;;
    esac
    shift
done
[ -n "$mode" ] || {
    echo "usage: $0 --dracut|--debian [--root DIR]" >&2
    exit 2
}

install_file() { # MODE SRC DST
    mkdir -p "$(dirname "$root$3")"
    cp "$2" "$root$3"
    chmod "$1" "$root$3"
}

if [ "$mode" = dracut ]; then
    dst=/usr/lib/dracut/modules.d/99kdumpd
    for f in module-setup.sh kdumpd-pyfiles kdumpd-memreserve; do
        install_file 0755 "$here/dracut/99kdumpd/$f" "$dst/$f"
    done
    for f in kdumpd.service python-launcher.c; do
        install_file 0644 "$here/dracut/99kdumpd/$f" "$dst/$f"
    done
    echo "installed the dracut module kdumpd in $root$dst"
    exit 0
fi

install_file 0644 "$here/systemd/kdumpd.service" /lib/systemd/system/kdumpd.service
install_file 0755 "$here/dracut/99kdumpd/kdumpd-memreserve" /usr/lib/kdumpd/kdumpd-memreserve
for f in cp reboot; do
    install_file 0755 "$here/kdump-tools/$f" "/usr/lib/kdumpd/kdump-tools/$f"
done
mkdir -p "$root/etc/systemd/system/kdump-tools-dump.service.wants"
ln -sf /lib/systemd/system/kdumpd.service \
    "$root/etc/systemd/system/kdump-tools-dump.service.wants/kdumpd.service"
defaults=$root/etc/default/kdump-tools
marker="# kdumpd: cp and reboot hooks for the capture kernel (initramfs-hooks/kdump-tools)"
if [ -f "$defaults" ] && ! grep -qF "$marker" "$defaults"; then
    # shellcheck disable=SC2016  # $PATH is for the shell that sources the file
    printf '\n%s\nPATH=/usr/lib/kdumpd/kdump-tools:$PATH\n' "$marker" >> "$defaults"
fi
if [ ! -e "$root/etc/kdumpd.conf" ]; then
    mkdir -p "$root/etc"
    printf '%s\n' "# kdumpd in the kdump capture kernel (see docs/kdumpd.conf.example)" \
        "as = swap" > "$root/etc/kdumpd.conf"
fi
[ -f "$defaults" ] || echo "note: $defaults does not exist (kdump-tools not installed?);" \
    "add 'PATH=/usr/lib/kdumpd/kdump-tools:\$PATH' to it once it does" >&2
echo "installed kdumpd for kdump-tools under ${root:-/}"
