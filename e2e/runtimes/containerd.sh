#!/usr/bin/env bash
# containerd's CRI plugin (what the kubelet calls) runs a pod sandbox through calyx:
# the pod gets an address and the node reaches it; stop (DEL with the netns) and
# removal (a second DEL with CNI_NETNS empty) both succeed and clean everything up.
set -euo pipefail
here=$(dirname "$(readlink -f "$0")")
. "$here/common.sh"
require containerd ctr runc podman busybox catatonit nsenter python3
PLUGIN=$(readlink -f "${1:?usage: containerd.sh PATH-TO-calyx}")
VENV=${CALYX_CRI_VENV:-/var/tmp/calyx-cri-venv}

ensure_cri_client
setup_lab containerd "$PLUGIN"
CTRD_PID=""
cleanup() {
    set +e
    stop_containerd
    ip netns del "$NODE" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
build_images

start_containerd
cri() { "$VENV/bin/python" "$here/cri_pod.py" "$WORK/containerd.sock" "$@"; }

note "RunPodSandbox through the CRI"
pod=$(cri run web-0) || { tail -20 "$WORK/containerd.log"; die "RunPodSandbox failed"; }
echo "$pod"
id=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['id'])" "$pod")
ip=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['ip'])" "$pod")
[[ $ip == 10.246.* ]] || die "pod sandbox got address '$ip'"
innode ping -c1 -W2 "$ip" >/dev/null || die "node cannot reach pod $ip"

note "StopPodSandbox (DEL with netns) then RemovePodSandbox (DEL without)"
cri stop "$id"
assert_clean
cri remove "$id"
assert_clean
dels=$(grep -c '"message":"DEL"' "$WORK/calyx.log" || true)
empty=$(grep '"message":"DEL"' "$WORK/calyx.log" | grep -c '"netns":""' || true)
note "calyx saw $dels DEL calls, $empty of them with CNI_NETNS empty"
[ "$dels" -ge 2 ] && [ "$empty" -ge 1 ] || die "expected a DEL with netns and a second one without"

# Every test stops what it started: containerd must be gone once cleanup ran.
trap - EXIT
cleanup
if kill -0 "$CTRD_PID" 2>/dev/null; then die "containerd (pid $CTRD_PID) still runs after cleanup"; fi
echo "containerd: PASS"
