# Shared by the runtime tests: a node namespace, a private CNI setup around the calyx
# binary under test, and local images (no registry here: built from busybox-static
# and catatonit, saved in docker-archive format that podman and containerd both load).

die() { echo "FAIL: $*" >&2; exit 1; }
note() { echo "--- $*"; }

# In CI a missing prerequisite fails; elsewhere the test says why it skips.
require() {
    local why=""
    [ "$(id -u)" = 0 ] || why="not root"
    for cmd in "$@"; do command -v "$cmd" >/dev/null || why="${why:+$why; }$cmd is not installed"; done
    if [ -n "$why" ]; then
        [ -n "${CI:-}" ] && die "runtime test cannot run in CI: $why"
        echo "SKIPPED: $why"; exit 0
    fi
}

# setup_lab NAME PLUGIN: a node namespace and a work dir with the plugin installed.
setup_lab() {
    LAB=$1; PLUGIN=$2; IPAMCTL=$(dirname "$PLUGIN")/ipamctl
    WORK=$(mktemp -d /tmp/calyx-rt-XXXXXX)
    NODE=cyxrt-$LAB-$$
    ip netns add "$NODE"
    ip -n "$NODE" link set lo up
    ip -n "$NODE" addr add 192.0.2.1/32 dev lo
    mkdir -p "$WORK/cni-bin" "$WORK/net.d"
    cp "$PLUGIN" "$WORK/cni-bin/calyx"
    for p in loopback host-local; do cp "/usr/lib/cni/$p" "$WORK/cni-bin/" 2>/dev/null || true; done
    cat > "$WORK/net.d/10-calyx.conflist" <<JSON
{"cniVersion": "1.0.0", "name": "calyx",
 "plugins": [{"type": "calyx", "datastore": "file://$WORK/store", "nodeName": "rt-node",
              "mtu": 1450, "logFile": "$WORK/calyx.log", "logLevel": "info",
              "ipam": {"pools": ["10.246.0.0/16"]}}]}
JSON
}

innode() { nsenter --net="/run/netns/$NODE" "$@"; }

# build_images: $WORK/busybox.tar and $WORK/pause.tar (docker-archive), via podman
# with private storage.
PODMAN_STORE=()
build_images() {
    PODMAN_STORE=(--root "$WORK/podman/root" --runroot "$WORK/podman/run" --storage-driver vfs)
    local rootfs=$WORK/rootfs
    mkdir -p "$rootfs/bin" "$rootfs/etc" "$rootfs/tmp"
    cp /bin/busybox "$rootfs/bin/busybox"
    for app in sh ip ping sleep cat nc wget ifconfig route; do ln -sf busybox "$rootfs/bin/$app"; done
    echo "root:x:0:0:root:/:/bin/sh" > "$rootfs/etc/passwd"
    tar -C "$rootfs" -cf "$WORK/busybox-rootfs.tar" .
    podman "${PODMAN_STORE[@]}" import -q --change 'CMD ["/bin/sh"]' "$WORK/busybox-rootfs.tar" localhost/busybox:latest >/dev/null
    local pause=$WORK/pause-rootfs
    mkdir -p "$pause"
    cp /usr/bin/catatonit "$pause/pause"
    tar -C "$pause" -cf "$WORK/pause-rootfs.tar" .
    podman "${PODMAN_STORE[@]}" import -q --change 'ENTRYPOINT ["/pause", "-P"]' "$WORK/pause-rootfs.tar" localhost/pause:latest >/dev/null
    podman "${PODMAN_STORE[@]}" save -q --format docker-archive -o "$WORK/busybox.tar" localhost/busybox:latest >/dev/null
    podman "${PODMAN_STORE[@]}" save -q --format docker-archive -o "$WORK/pause.tar" localhost/pause:latest >/dev/null
}

# ensure_cri_client: the CRI client stubs (PyPI container-runtime-interface-api) in
# $VENV, installed once.
ensure_cri_client() {
    if ! "$VENV/bin/python" -c 'import cri_api.v1, grpc' 2>/dev/null; then
        note "installing the CRI client stubs (PyPI container-runtime-interface-api) into $VENV"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install -q container-runtime-interface-api
    fi
}

# start_containerd: containerd with its CRI plugin in the node namespace, its CNI dirs
# the lab's, the pause image imported; CTRD_PID is containerd's own PID (nsenter execs
# it; started directly, not through innode, whose background subshell $! would name).
start_containerd() {
    CTRD_SHIMS_BEFORE=$(ls /run/containerd/s 2>/dev/null || true)
    CTRD_NETNS_BEFORE=$(ip netns list | awk '{print $1}')
    cat > "$WORK/containerd.toml" <<TOML
version = 2
root = "$WORK/containerd/root"
state = "$WORK/containerd/state"
[grpc]
  address = "$WORK/containerd.sock"
[ttrpc]
  address = "$WORK/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/pause:latest"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$WORK/cni-bin"
    conf_dir = "$WORK/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
TOML
    nsenter --net="/run/netns/$NODE" containerd --config "$WORK/containerd.toml" > "$WORK/containerd.log" 2>&1 &
    CTRD_PID=$!
    for _ in $(seq 1 50); do [ -S "$WORK/containerd.sock" ] && break; sleep 0.2; done
    [ -S "$WORK/containerd.sock" ] || { tail -20 "$WORK/containerd.log"; die "containerd did not start"; }
    ctr --address "$WORK/containerd.sock" -n k8s.io images import "$WORK/pause.tar" >/dev/null
}

# stop_containerd: containerd, then what it left behind: its shims, their sockets and
# the pod namespaces that were not there when it started, its mounts. Never fails.
stop_containerd() {
    if [ -n "${CTRD_PID:-}" ]; then
        kill "$CTRD_PID" 2>/dev/null
        for _ in $(seq 1 50); do kill -0 "$CTRD_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$CTRD_PID" 2>/dev/null
        wait "$CTRD_PID" 2>/dev/null
    fi
    pkill -f "containerd-shim-runc-v2 -namespace k8s.io -id .* -address $WORK/containerd.sock" 2>/dev/null
    for s in $(ls /run/containerd/s 2>/dev/null); do
        echo "${CTRD_SHIMS_BEFORE:-}" | grep -qx "$s" || rm -f "/run/containerd/s/$s"
    done
    for ns in $(ip netns list | awk '{print $1}' | grep '^cni-'); do
        echo "${CTRD_NETNS_BEFORE:-}" | grep -qx "$ns" || ip netns del "$ns"
    done
    umount -R "$WORK/containerd/root" 2>/dev/null
    return 0
}

# assert_clean: no calyx veth or route left in the node, no handle in the store.
assert_clean() {
    local veths routes handles
    veths=$(ip -n "$NODE" -o link show | grep -c ': cyx' || true)
    routes=$(ip -n "$NODE" route show proto 201 | wc -l)
    handles=$("$IPAMCTL" --datastore "file://$WORK/store" -o json show \
        | python3 -c "import json,sys; print(sum(p['inUse'] for p in json.load(sys.stdin)['pools']))")
    [ "$veths" = 0 ] || die "$veths calyx veths left in the node"
    [ "$routes" = 0 ] || die "$routes calyx routes left in the node"
    [ "$handles" = 0 ] || die "$handles allocations left in the store"
}
