#!/usr/bin/env bash
# Real container runtimes drive the calyx plugin: podman (CNI backend) and
# containerd's CRI plugin. Usage: run.sh PATH-TO-calyx
set -euo pipefail
here=$(dirname "$(readlink -f "$0")")
plugin=${1:?usage: run.sh PATH-TO-calyx}
failed=0
for t in podman containerd containerd-reload; do
    echo "=== runtime test: $t"
    if bash "$here/$t.sh" "$plugin"; then passed=$((${passed:-0} + 1)); else failed=$((failed + 1)); echo "=== $t FAILED"; fi
done
echo "runtimes: ${passed:-0} passed, $failed failed"
[ "$failed" = 0 ]
