#!/usr/bin/env bash
# podman (CNI backend) runs a container on a calyx network: the container gets an
# address from the pool, reaches the node, and removal cleans everything up.
set -euo pipefail
here=$(dirname "$(readlink -f "$0")")
. "$here/common.sh"
require podman busybox catatonit nsenter python3
PLUGIN=$(readlink -f "${1:?usage: podman.sh PATH-TO-calyx}")

setup_lab podman "$PLUGIN"
cleanup() {
    set +e
    innode podman "${PODMAN_STORE[@]}" rm -af >/dev/null 2>&1
    ip netns del "$NODE" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
build_images

# A private containers.conf: CNI backend, our plugin dir and config dir only,
# ulimits this machine allows.
cat > "$WORK/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[network]
network_backend = "cni"
cni_plugin_dirs = ["$WORK/cni-bin"]
network_config_dir = "$WORK/net.d"
CONF
export CONTAINERS_CONF=$WORK/containers.conf
pm() { innode podman "${PODMAN_STORE[@]}" --cgroup-manager cgroupfs --events-backend none "$@"; }

note "podman run on the calyx network"
out=$(pm run --rm --network calyx localhost/busybox:latest \
      sh -c 'ip -4 -o addr show dev eth0; ip route; ping -c1 -W2 192.0.2.1 >/dev/null && echo NODE-REACHABLE')
echo "$out"
echo "$out" | grep -q 'inet 10\.246\.' || die "container has no address from the pool"
echo "$out" | grep -q 'default via 169.254.1.1' || die "container has no default route via 169.254.1.1"
echo "$out" | grep -q NODE-REACHABLE || die "container cannot reach the node"

note "the node reaches a running container, and removal cleans up"
pm run -d --name web --network calyx localhost/busybox:latest sleep 300 >/dev/null
ip=$(pm inspect web --format '{{.NetworkSettings.Networks.calyx.IPAddress}}')
[[ $ip == 10.246.* ]] || die "podman reports address '$ip'"
innode ping -c1 -W2 "$ip" >/dev/null || die "node cannot reach container $ip"
pm rm -f -t 0 web >/dev/null
assert_clean
echo "podman: PASS"
