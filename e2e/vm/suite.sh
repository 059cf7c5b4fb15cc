#!/usr/bin/env bash
# The VM suite, run inside one VM boot (e2e/vm/run.sh e2e/vm/suite.sh ...): the IPVS
# netlink and ipset tests, then IPVS mode end to end on the namespace lab.
#   suite.sh DATAPLANE_IPVS_TEST_BINARY AGENT_PROXY_TEST_BINARY
# The lab runs the static release binaries (CALYX_BIN_DIR): under software emulation
# the debug build's syncs take seconds.
set -uo pipefail
dataplane=$1 proxy=$2
echo "vm: kernel $(uname -r), $(nproc) CPUs"
export CALYX_BIN_DIR=${CALYX_BIN_DIR:-target/x86_64-unknown-linux-musl/release}
failed=0
run() {
  echo "=== $*"
  "$@" || { echo "=== FAILED: $*"; failed=1; }
}
run "$dataplane" --ignored --test-threads 1
run "$proxy" --ignored --test-threads 1 --nocapture ipvs_
leftover=$(ip netns list | wc -l)
[ "$leftover" -eq 0 ] || { echo "=== $leftover network namespaces left behind"; ip netns list; failed=1; }
exit $failed
