#!/usr/bin/env bash
# containerd's CRI plugin picks up a conflist replaced the way `calyx-agent install-cni`
# replaces it (written whole beside it in the same directory, renamed over it) and one
# written in place: a conflist with another pool replaces the one containerd started
# with, and the next pod's address comes from the new pool. (Measured here with
# Debian's containerd 1.6.20: a file written in another directory and mv-ed in is NOT
# noticed; the pod still got the old pool.)
set -euo pipefail
here=$(dirname "$(readlink -f "$0")")
. "$here/common.sh"
require containerd ctr runc podman busybox catatonit nsenter python3
PLUGIN=$(readlink -f "${1:?usage: containerd-reload.sh PATH-TO-calyx}")
VENV=${CALYX_CRI_VENV:-/var/tmp/calyx-cri-venv}
ensure_cri_client

# run_case HOW: a fresh containerd started with the 10.246 conflist, which HOW then
# replaces by a 10.247 one; prints the address of the pod run afterwards.
run_case() {
    local how=$1 CTRD_PID="" out
    setup_lab containerd "$PLUGIN"
    local dest="$WORK/net.d/10-calyx.conflist"
    sed 's/10\.246\./10.247./g' "$dest" > "$WORK/new.conflist"
    build_images
    cleanup_case() {
        set +e
        stop_containerd
        ip netns del "$NODE" 2>/dev/null
        rm -rf "$WORK"
        set -e
    }
    trap cleanup_case EXIT
    start_containerd
    sleep 2
    case $how in
    rename) cp "$WORK/new.conflist" "$WORK/net.d/.10-calyx.conflist.calyx-tmp"
            mv "$WORK/net.d/.10-calyx.conflist.calyx-tmp" "$dest" ;;
    inplace) cat "$WORK/new.conflist" > "$dest" ;;
    esac
    sleep 3
    out=$("$VENV/bin/python" "$here/cri_pod.py" "$WORK/containerd.sock" run "reload-$how") \
        || { tail -5 "$WORK/containerd.log"; die "$how: RunPodSandbox failed"; }
    local id
    id=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['id'])" "$out")
    "$VENV/bin/python" "$here/cri_pod.py" "$WORK/containerd.sock" stop "$id"
    "$VENV/bin/python" "$here/cri_pod.py" "$WORK/containerd.sock" remove "$id"
    cleanup_case
    trap - EXIT
    python3 -c "import json,sys; print(json.loads(sys.argv[1])['ip'])" "$out"
}

for how in rename inplace; do
    ip=$(run_case "$how")
    note "$how: the next pod got $ip"
    [[ $ip == 10.247.* ]] || die "$how: containerd kept the old conflist (pod address $ip)"
done
echo "containerd-reload: PASS"
