#!/bin/bash
# kdumpd-e2e-sampler.service (LUKS scenario): memory samples from before the unlock (which
# runs in systemd-cryptsetup, outside the capture unit) until capture.sh stops it.
# shellcheck source=lib.sh
. /usr/libexec/kdumpd-e2e/lib.sh
mountpoint -q "$T" || exit 0
sampler
