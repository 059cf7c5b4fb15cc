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

if ! "$VENV/bin/python" -c 'import cri_api.v1, grpc' 2>/dev/null; then
    note "installing the CRI client stubs (PyPI container-runtime-interface-api) into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q container-runtime-interface-api
fi

setup_lab containerd "$PLUGIN"
shims_before=$(ls /run/containerd/s 2>/dev/null || true)
netns_before=$(ip netns list | awk '{print $1}')
CTRD_PID=""
cleanup() {
    set +e
    if [ -n "$CTRD_PID" ]; then
        kill "$CTRD_PID" 2>/dev/null
        for _ in $(seq 1 50); do kill -0 "$CTRD_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$CTRD_PID" 2>/dev/null
        wait "$CTRD_PID" 2>/dev/null
    fi
    pkill -f "containerd-shim-runc-v2 -namespace k8s.io -id .* -address $WORK/containerd.sock" 2>/dev/null
    for s in $(ls /run/containerd/s 2>/dev/null); do
        echo "$shims_before" | grep -qx "$s" || rm -f "/run/containerd/s/$s"
    done
    for ns in $(ip netns list | awk '{print $1}' | grep '^cni-'); do
        echo "$netns_before" | grep -qx "$ns" || ip netns del "$ns"
    done
    umount -R "$WORK/containerd/root" 2>/dev/null
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
