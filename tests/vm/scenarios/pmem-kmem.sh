# pmem-kmem-6.1: an emulated NVDIMM is turned into a devdax namespace and
# handed to the kmem driver as System RAM, then the capture kernel is loaded
# (its elfcorehdr covers the pmem range), then the workload runs.

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
}
