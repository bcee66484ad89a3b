# mce-6.1: the crash is a fatal machine check that QEMU injects on CPU 0
# (HMP "mce"), with a valid address inside a page of the workload.

scenario_prepare() {
    # The 6th frame of the workload's anonymous region (region 1).
    pfn=$(awk '$1 == 1 { print $3 + 5; exit }' /meta/workload-pfns.txt)
    [ -n "$pfn" ] || fail "no workload frame for the machine check"
    addr=$((pfn * 4096 + MCE_ADDR_OFFSET))
    {
        echo "cpu $MCE_CPU"
        echo "bank $MCE_BANK"
        echo "status $MCE_STATUS"
        echo "mcgstatus $MCE_MCGSTATUS"
        echo "addr $addr"
        echo "misc $MCE_MISC"
        echo "pfn $pfn"
    } > /meta/mce.txt
    MCE_ADDR=$addr
}

scenario_crash() {
    hmp "mce $MCE_CPU $MCE_BANK $MCE_STATUS $MCE_MCGSTATUS $MCE_ADDR $MCE_MISC"
    sleep 30
    fail "no panic 30 s after the machine check was injected"
}
