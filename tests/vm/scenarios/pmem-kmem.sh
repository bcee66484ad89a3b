# pmem-kmem-6.1: an emulated NVDIMM is turned into a devdax namespace and
# handed to the kmem driver as System RAM, then the capture kernel is loaded
# (its elfcorehdr covers the pmem range), then the workload runs.
# Both kernels also save the firmware's ACPI NFIT (the table that describes
# NVDIMMs; e820 does not) as /meta/nfit.bin: the capture kernel loads no
# NVDIMM driver, so its iomem has no pmem line and the NFIT is what tells.

# save_nfit: the raw bytes of /sys/firmware/acpi/tables/NFIT (one table) or
# NFIT1, NFIT2, ... (several; sysfs numbers them only then), concatenated in
# that order, to /meta/nfit.bin; the names and sizes to /meta/nfit.tables.
# No table (or one unreadable): /meta/nfit.missing says so and lists what
# /sys/firmware/acpi/tables has; never fatal here, the host judges.
save_nfit() {
    [ -d /sys/firmware ] || mount -t sysfs sysfs /sys
    _t=/sys/firmware/acpi/tables
    _names=$(ls "$_t" 2>/dev/null | grep -E '^NFIT[0-9]*$' \
        | awk '{ n = substr($0, 5); print (n == "" ? 0 : n), $0 }' | sort -n | cut -d' ' -f2)
    rm -f /meta/nfit.bin /meta/nfit.tables /meta/nfit.missing
    if [ -z "$_names" ]; then
        { echo "# no NFIT in $_t, which holds:"; ls "$_t" 2>&1; } > /meta/nfit.missing
        return 0
    fi
    : > /meta/nfit.bin
    for _n in $_names; do
        if cat "$_t/$_n" >> /meta/nfit.bin; then
            echo "$_n $(cat "$_t/$_n" | wc -c)" >> /meta/nfit.tables
        else
            { echo "# cannot read $_t/$_n, which holds:"; ls "$_t" 2>&1; } >> /meta/nfit.missing
        fi
    done
}

kmem_online() { grep -q "System RAM (kmem)" /proc/iomem; }

scenario_setup() {
    load_scenario_modules
    wait_until 30 "nvdimm region" test -e /sys/bus/nd/devices/region0
    wait_until 30 "nvdimm namespace" test -e /sys/bus/nd/devices/namespace0.0
    ndctl create-namespace -f -e namespace0.0 -m devdax -a 2M > /meta/ndctl.json \
        || fail "ndctl create-namespace devdax"
    wait_until 30 "dax device" test -e /sys/bus/dax/devices/dax0.0
    daxctl reconfigure-device -m system-ram dax0.0 > /meta/daxctl.json \
        || fail "daxctl reconfigure-device system-ram"
    wait_until 30 "System RAM (kmem)" kmem_online
    offline=0
    for b in $(memory_blocks); do
        if [ "$(cat /sys/devices/system/memory/$b/state)" = offline ]; then
            echo online_movable > "/sys/devices/system/memory/$b/state" || offline=$((offline + 1))
        fi
    done
    {
        grep -E "Persistent Memory|System RAM \(kmem\)|dax" /proc/iomem
        echo "offline_blocks_left $offline"
        echo "memtotal_kb $(meminfo_kb MemTotal)"
    } > /meta/pmem.txt
    save_nfit
}

# Capture kernel: no nfit driver here, only the firmware's table.
scenario_kdump() { save_nfit; }
