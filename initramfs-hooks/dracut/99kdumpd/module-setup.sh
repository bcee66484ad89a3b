#!/bin/bash
# dracut module "kdumpd": start kdumpd in the kdump capture initramfs, so that the crashed
# kernel's dump-excluded memory becomes swap (or a scratch filesystem) before the dump target
# is set up and before the capture runs.
#
# Picked up:
#   * Fedora/RHEL kdump-utils: mkdumprd exports IN_KDUMP=1 around dracut, and its
#     dracut.conf.d sets dracutmodules='' (= every module whose check() says 0): check()
#     returns 0 there, so every kdump initramfs gets kdumpd. `dracut_args --add kdumpd` in
#     /etc/kdump.conf also works.
#   * anywhere else only on request (dracut --add kdumpd, add_dracutmodules+=" kdumpd "):
#     check() returns 255. Even then the unit only starts when /proc/vmcore exists.
#
# dracut.conf variables (all optional):
#   kdumpd_python=/usr/bin/python3   the interpreter (nbdkit's python plugin must embed the
#                                    same version)
#   kdumpd_package_dir=DIR           directory holding the kdumpd package (default: where
#                                    $kdumpd_python imports it from)
#   kdumpd_plugin=FILE               the nbdkit plugin (default /usr/lib/kdumpd/kdumpd_plugin.py,
#                                    else nbd_plugin/ next to the package's source tree)
#   kdumpd_scratch=auto|yes|no       mkfs and the filesystem module for --as scratch (auto: yes
#                                    if /etc/kdumpd.conf says as = scratch)
#   kdumpd_python_source=yes         ship .py instead of byte code for the standard library

# shellcheck disable=SC2154  # initdir, moddir, systemdsystemunitdir, ... come from dracut

_kdumpd_py() {
    echo "${kdumpd_python:-/usr/bin/python3}"
}

# The host's kdumpd.conf value of KEY (last assignment wins, as the daemon reads it).
_kdumpd_conf_value() {
    local _conf="$dracutsysrootdir${kdumpd_conf:-/etc/kdumpd.conf}"
    [[ -r $_conf ]] || return 0
    sed -n -e 's/#.*//' -e "s/^[[:space:]]*$1[[:space:]]*=[[:space:]]*\\([^[:space:]]*\\).*/\\1/p" \
        "$_conf" | tail -n 1
}

_kdumpd_scratch_fstype() {
    case "${kdumpd_scratch:-auto}" in
        no) return 0 ;;
        yes) ;;
        *) [[ "$(_kdumpd_conf_value as)" == scratch ]] || return 0 ;;
    esac
    local _fs
    _fs=$(_kdumpd_conf_value fstype)
    echo "${_fs:-ext4}"
}

# inst_library for a shared object and every library it loads: dracut-install only follows the
# dependencies of executable files, and Python extension modules and nbdkit plugins are 0644.
_kdumpd_inst_so() {
    local _lib
    inst_library "$@" || return 1
    while read -r _lib; do
        inst_library "$_lib" || return 1
    done < <(ldd "$dracutsysrootdir$1" 2> /dev/null | sed -n 's/.*=> \(\/[^ ]*\) .*/\1/p')
}

# A python3 built on libpython3.X.so (python-launcher.c), printed if it can be had: a prebuilt
# one ($kdumpd_python_launcher, /usr/lib/kdumpd/python3-shared) or one compiled here. Nothing
# is printed when neither works; the caller then ships the interpreter's own static binary.
_kdumpd_launcher() {
    local _py=$1 _out _cfg _inc _libdir _ver
    for _out in "${kdumpd_python_launcher:-}" /usr/lib/kdumpd/python3-shared; do
        if [[ -n $_out ]] && [[ -x $dracutsysrootdir$_out ]]; then
            echo "$_out"
            return 0
        fi
    done
    [[ ${kdumpd_python_launcher:-} == no ]] && return 0
    command -v cc > /dev/null 2>&1 || return 0
    # "INCLUDEPY LIBDIR LDVERSION", from the interpreter itself.
    _cfg=$("$_py" -c 'import sysconfig as s; print(s.get_config_var("INCLUDEPY"), s.get_config_var("LIBDIR"), s.get_config_var("LDVERSION"))' 2> /dev/null) || return 0
    read -r _inc _libdir _ver <<< "$_cfg"
    [[ -f $_inc/Python.h ]] && [[ -e $_libdir/libpython$_ver.so ]] || return 0
    _out=$(mktemp -d "${DRACUT_TMPDIR:-/tmp}/kdumpd-launcher.XXXXXX") || return 0
    if cc -O2 -s -o "$_out/python3" "$moddir/python-launcher.c" -I"$_inc" -L"$_libdir" "-lpython$_ver" \
        > /dev/null 2>&1 && "$_out/python3" -S -c 'import sys' > /dev/null 2>&1; then
        echo "$_out/python3"
    fi
}

check() {
    require_binaries nbdkit nbd-client mkswap swapon swapoff || return 1
    [[ -x "$dracutsysrootdir$(_kdumpd_py)" ]] || return 1
    # kdump-utils' mkdumprd: every kdump initramfs (like its own kdumpbase module).
    [[ $IN_KDUMP == 1 ]] && return 0
    # Everywhere else: only when asked for.
    return 255
}

depends() {
    echo systemd
    return 0
}

installkernel() {
    local _fs
    hostonly='' instmods nbd
    _fs=$(_kdumpd_scratch_fstype)
    [[ -n $_fs ]] && hostonly='' instmods "$_fs"
    return 0
}

# Everything kdumpd runs: the interpreter, the Python modules kdumpd imports, nbdkit with its
# python plugin, nbd-client, and the shared libraries they load.
_kdumpd_install_payload() {
    local _py _pyreal _launcher _pkgdir _plugin _src _dst _args _plugindir

    _py=$(_kdumpd_py)
    _pyreal=$(readlink -f "$dracutsysrootdir$_py")
    _pyreal=${_pyreal#"$dracutsysrootdir"}
    _launcher=$(_kdumpd_launcher "$_py")
    if [[ -n $_launcher ]]; then
        inst_binary "$_launcher" "$_pyreal" || return 1
    else
        inst_binary "$_pyreal" || return 1
    fi
    [[ $_pyreal == "$_py" ]] || ln_r "$_pyreal" "$_py"

    inst_multiple nbdkit nbd-client || return 1
    _plugindir=$(nbdkit --dump-config 2> /dev/null | sed -n 's/^plugindir=//p')
    _kdumpd_inst_so "${_plugindir:-/usr/lib/x86_64-linux-gnu/nbdkit/plugins}/nbdkit-python-plugin.so" \
        || return 1

    # The package, the plugin and exactly the Python modules they import.
    _pkgdir=${kdumpd_package_dir:-}
    if [[ -z $_pkgdir ]]; then
        _pkgdir=$("$_py" -c 'import os, kdumpd; print(os.path.dirname(os.path.dirname(os.path.abspath(kdumpd.__file__))))' 2> /dev/null)
    fi
    if [[ -z $_pkgdir ]] || [[ ! -f $_pkgdir/kdumpd/__init__.py ]]; then
        derror "kdumpd: the kdumpd package is not importable by $_py (set kdumpd_package_dir)"
        return 1
    fi
    _plugin=${kdumpd_plugin:-}
    if [[ -z $_plugin ]]; then
        for _src in /usr/lib/kdumpd/kdumpd_plugin.py "$_pkgdir/../nbd_plugin/kdumpd_plugin.py"; do
            if [[ -f $_src ]]; then
                _plugin=$_src
                break
            fi
        done
    fi
    if [[ ! -f $_plugin ]]; then
        derror "kdumpd: nbdkit plugin kdumpd_plugin.py not found (set kdumpd_plugin)"
        return 1
    fi
    _args=(--initdir "$initdir" --package-dir "$_pkgdir"
        --extra "$_plugin=/usr/lib/kdumpd/kdumpd_plugin.py")
    [[ -n $dracutsysrootdir ]] && _args+=(--sysroot "$dracutsysrootdir")
    [[ ${kdumpd_python_source:-} == yes ]] && _args+=(--source)
    # It prints the extension modules ("SRC DST"); inst resolves their shared libraries.
    while read -r _src _dst; do
        _kdumpd_inst_so "$_src" "$_dst" || return 1
    done < <("$_py" -S "$moddir/kdumpd-pyfiles" "${_args[@]}") || return 1

    # /usr/bin/kdumpd: the package sits in the interpreter's own site-packages in the image.
    mkdir -p "$initdir/usr/bin"
    printf '%s\n' "#!$_py -I" "import sys" "from kdumpd.cli import main" "sys.exit(main())" \
        > "$initdir/usr/bin/kdumpd"
    chmod 0755 "$initdir/usr/bin/kdumpd"
    return 0
}

# kdumpd_squash=auto|yes|no: pack the payload into a compressed read-only image (auto: when
# mksquashfs is there). The kernel unpacks the initramfs into a tmpfs capped at half of the
# capture kernel's memory before anything runs, and every unpacked byte stays pinned there: the
# payload is ~21 MB of files but ~7 MB as squashfs. kdumpd-image.service moves it to a RAM disk
# and mounts it before kdumpd starts; its files are then page cache the kernel can drop.
_kdumpd_squash_wanted() {
    case "${kdumpd_squash:-auto}" in
        no) return 1 ;;
        yes) return 0 ;;
        *) command -v mksquashfs > /dev/null 2>&1 ;;
    esac
}

# Standard shared library directories (the dynamic linker's default path on Debian and Fedora).
_kdumpd_is_libdir() {
    case "$1" in
        /lib | /lib64 | /usr/lib | /usr/lib64 | /lib/*-linux-gnu | /usr/lib/*-linux-gnu) return 0 ;;
    esac
    return 1
}

# Move what the payload added to the image (every path not in the list BEFORE) into a
# squashfs image at /usr/lib/kdumpd/payload.squashfs, mounted at /usr/lib/kdumpd/payload.
# Programs and Python's tree keep their usual paths (/usr/bin/python3, /usr/bin/nbdkit,
# nbdkit's plugin directory, Python's prefix) as links to their place under the mount point.
# Shared libraries go to the image's own lib/ (LD_LIBRARY_PATH, set for kdumpd.service and by
# /usr/bin/kdumpd), never as links in the system's library directories: dracut resolves the
# libraries of later modules after this runs, and must find real files or nothing there.
_kdumpd_pack_payload() {
    local _before=$1 _mnt=/usr/lib/kdumpd/payload _stage _rel _comp _py
    _stage=$(mktemp -d "${DRACUT_TMPDIR:-/tmp}/kdumpd-payload.XXXXXX") || return 1
    mkdir -p "$_stage/lib" || return 1
    while IFS= read -r _rel; do
        _rel=${_rel#.}
        [[ $_rel == /etc || $_rel == /etc/* ]] && continue
        # Gone: below a directory moved already.
        [[ -L $initdir$_rel ]] || [[ -e $initdir$_rel ]] || continue
        if [[ ${_rel##*/} == *.so* ]] && _kdumpd_is_libdir "${_rel%/*}" \
            && { [[ -L $initdir$_rel ]] || [[ -f $initdir$_rel ]]; }; then
            mv "$initdir$_rel" "$_stage/lib/${_rel##*/}" || return 1
            continue
        fi
        [[ -L $initdir$_rel ]] && continue # python3 -> python3.11 stays, beside its target
        mkdir -p "$_stage${_rel%/*}" || return 1
        mv "$initdir$_rel" "$_stage$_rel" || return 1
        ln -s "$_mnt$_rel" "$initdir$_rel" || return 1
    done < <(cd "$initdir" && find . -mindepth 1 | LC_ALL=C sort | LC_ALL=C comm -13 "$_before" -)

    # /usr/bin/kdumpd: the library path, then the interpreter (Python's prefix comes from
    # its own path, /usr/bin, so the standard library is found at /usr/lib/python3.X).
    _py=$(_kdumpd_py)
    rm -f "$initdir/usr/bin/kdumpd"
    printf '%s\n' '#!/bin/sh' "# kdumpd (dracut module 99kdumpd): its payload is mounted at $_mnt" \
        "export LD_LIBRARY_PATH=$_mnt/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" \
        "exec $_py -I -c 'import sys; from kdumpd.cli import main; sys.argv[0] = \"kdumpd\"; sys.exit(main())' \"\$@\"" \
        > "$initdir/usr/bin/kdumpd"
    chmod 0755 "$initdir/usr/bin/kdumpd"

    _comp=${kdumpd_squash_comp:-zstd}
    mksquashfs "$_stage" "$initdir/usr/lib/kdumpd/payload.squashfs" -noappend -all-root \
        -no-xattrs -quiet -no-progress -comp "$_comp" > /dev/null || return 1
    rm -rf "$_stage"
    hostonly='' instmods brd loop squashfs
    inst_multiple mount umount losetup dd stat rm || return 1
    inst_simple "$moddir/kdumpd-image" /usr/lib/kdumpd/kdumpd-image || return 1
    chmod 0755 "$initdir/usr/lib/kdumpd/kdumpd-image"
    inst_simple "$moddir/kdumpd-image.service" "$systemdsystemunitdir/kdumpd-image.service" \
        || return 1
    mkdir -p "$initdir$systemdsystemunitdir/kdumpd.service.d"
    printf '%s\n' "# added by dracut module kdumpd: the payload is a squashfs image" "[Unit]" \
        "Requires=kdumpd-image.service" "After=kdumpd-image.service" "[Service]" \
        "Environment=LD_LIBRARY_PATH=$_mnt/lib" \
        > "$initdir$systemdsystemunitdir/kdumpd.service.d/payload.conf"
    return 0
}

install() {
    local _fs _before

    # The tools the base image may have already, then the payload on top of them.
    inst_multiple mkswap swapon swapoff modprobe mount umount || return 1
    if _kdumpd_squash_wanted; then
        # dracut resolves shared libraries at the end; resolve what the image holds so far
        # now, so that what the base already needs is not taken into the payload.
        if [[ -n ${DRACUT_RESOLVE_LAZY:-} ]]; then
            # shellcheck disable=SC2086
            find "$initdir" -type f -perm /0111 -not -path '*.ko' -print0 \
                | xargs -r -0 $DRACUT_INSTALL ${initdir:+-D "$initdir"} \
                    ${dracutsysrootdir:+-r "$dracutsysrootdir"} -R --
        fi
        _before=$(mktemp "${DRACUT_TMPDIR:-/tmp}/kdumpd-before.XXXXXX") || return 1
        mkdir -p "$initdir/usr/lib/kdumpd/payload" || return 1 # the mount point stays
        (cd "$initdir" && find . -mindepth 1 | LC_ALL=C sort) > "$_before"
        DRACUT_RESOLVE_DEPS=1 _kdumpd_install_payload || return 1
        _kdumpd_pack_payload "$_before" || return 1
        rm -f "$_before"
    else
        _kdumpd_install_payload || return 1
    fi

    _fs=$(_kdumpd_scratch_fstype)
    if [[ -n $_fs ]]; then
        inst_multiple "mkfs.$_fs" || return 1
    fi

    # Configuration: the host's, made to attach swap unless it says otherwise (the daemon's
    # own default is to serve without attaching).
    mkdir -p "$initdir/etc"
    if [[ -r "$dracutsysrootdir${kdumpd_conf:-/etc/kdumpd.conf}" ]]; then
        cp "$dracutsysrootdir${kdumpd_conf:-/etc/kdumpd.conf}" "$initdir/etc/kdumpd.conf"
    else
        : > "$initdir/etc/kdumpd.conf"
    fi
    if [[ -z "$(_kdumpd_conf_value as)" ]]; then
        printf '%s\n' "# added by dracut module kdumpd: the capture kernel's swap" "as = swap" \
            >> "$initdir/etc/kdumpd.conf"
    fi
    chmod 0644 "$initdir/etc/kdumpd.conf"

    inst_simple "$moddir/kdumpd-memreserve" /usr/lib/kdumpd/kdumpd-memreserve || return 1
    chmod 0755 "$initdir/usr/lib/kdumpd/kdumpd-memreserve"
    inst_multiple systemctl awk grep || return 1
    inst_simple "$moddir/kdumpd.service" "$systemdsystemunitdir/kdumpd.service" || return 1
    $SYSTEMCTL -q --root "$initdir" add-wants initrd.target kdumpd.service
    return 0
}
