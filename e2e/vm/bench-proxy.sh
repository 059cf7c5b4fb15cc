#!/usr/bin/env bash
# bench-proxy inside the VM (e2e/vm/run.sh): IPVS mode beside nftables mode measured in
# the same VM, so the ratio is what counts (software emulation is several times slower).
#   bench-proxy.sh RELEASE_DIR [bench-proxy args...]
set -euo pipefail
release=$1; shift
echo "vm: kernel $(uname -r), $(nproc) CPUs"
exec "$release/bench-proxy" --plugin "$release/calyx" --agent "$release/calyx-agent" \
  --modes nftables,ipvs --sizes 1000,10000 --changes 30 "$@"
