#!/usr/bin/env bash
# The kind suite: Calyx as the pod network and service proxy of a real Kubernetes
# cluster (kind: one control plane, two workers, no kube-proxy), installed from
# manifests/ (kustomize, the image imported as an archive) with an etcd datastore,
# then checked the way a user would: nodes Ready, CoreDNS up, pod to pod on one node
# and across nodes, a Service by its DNS name, a NodePort, a hostPort, pod to outside
# (masqueraded), node to pod, all of it again with FORWARD policy DROP on every node
# and after the agents restart (new pods, ready, repairing a deleted route), and no
# address leaked after a burst of pods comes and goes.
#
# Needs docker (with its daemon), kind, kubectl, registry access (the workload's
# images) and, to build the image, what `make image` needs (podman, mmdebstrap): it
# does not run on the development machines (no Docker daemon there); run it where
# those are:
#
#   make e2e-kind                 # or e2e/kind/run.sh
#   KEEP=1 make e2e-kind          # keep the cluster afterwards (kind delete cluster --name calyx-e2e)
#   SKIP_BUILD=1 ...              # use the image podman already has
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cluster=${CLUSTER:-calyx-e2e}
ns=calyx-e2e
work=$(mktemp -d)

die() { echo "FAIL: $*" >&2; exit 1; }
ok() { echo "ok: $*"; }
step() { echo "--- $*"; }
k() { kubectl --context "kind-$cluster" "$@"; }

for cmd in docker kind kubectl; do
    command -v "$cmd" >/dev/null || die "the kind suite needs $cmd"
done
docker info >/dev/null 2>&1 || die "the kind suite needs a running Docker daemon"

cleanup() {
    local status=$?
    if [ "$status" != 0 ] && kind get clusters 2>/dev/null | grep -qx "$cluster"; then
        echo "--- state at failure"
        k get nodes -o wide || true
        k get pods -A -o wide || true
        k -n kube-system logs -l app.kubernetes.io/name=calyx -c agent --tail=40 --prefix || true
        k -n kube-system logs -l app.kubernetes.io/name=calyx -c install-cni --prefix || true
    fi
    if [ -z "${KEEP:-}" ]; then
        kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
    fi
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT

# retry SECONDS CMD...: runs CMD until it succeeds or SECONDS pass.
retry() {
    local deadline=$((SECONDS + $1)); shift
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 2
    done
}

# The image the manifest names (its version's tag).
image=$(grep -m1 -o 'localhost/calyx:[^ ]*' "$root/manifests/calyx.yaml")
if [ -z "${SKIP_BUILD:-}" ]; then
    step "image $image"
    make -C "$root" image IMAGE="$image"
fi
# An archive, not `kind load docker-image`: that fails on images with provenance
# attestations in Docker's containerd store.
podman save --format docker-archive -o "$work/calyx.tar" "$image"

step "cluster"
kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
kind create cluster --name "$cluster" --config "$here/cluster.yaml"
kind load image-archive "$work/calyx.tar" --name "$cluster"
mapfile -t workers < <(k get nodes -l '!node-role.kubernetes.io/control-plane' -o name | sed 's|node/||')
[ "${#workers[@]}" = 2 ] || die "expected two workers, got: ${workers[*]}"
mapfile -t nodes < <(k get nodes -o name | sed 's|node/||')

step "datastore: etcd on the control plane's host network"
control_plane=$(k get nodes -l node-role.kubernetes.io/control-plane -o name | sed 's|node/||')
control_ip=$(k get node "$control_plane" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')
# The image kubeadm runs the cluster's etcd with (the static pod manifest: with no pod
# network yet, the mirror pod may not be listed).
etcd_image=$(docker exec "$control_plane" sed -n 's/^ *image: *//p' /etc/kubernetes/manifests/etcd.yaml | head -n1)
[ -n "$etcd_image" ] || die "no image in the control plane's etcd manifest"
sed "s|__ETCD_IMAGE__|$etcd_image|" "$here/etcd.yaml" | k apply -f -
k -n kube-system rollout status deploy/calyx-etcd --timeout=120s
datastore="etcd://$control_ip:6666"

step "calyx ($datastore, service proxy nftables)"
# The operator's settings, over the shipped manifests (kustomize, as README shows).
mkdir -p "$work/overlay"
cp -r "$root/manifests" "$work/base"
cat > "$work/overlay/kustomization.yaml" <<EOF_K
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [../base]
configMapGenerator:
  - name: calyx-config
    namespace: kube-system
    behavior: merge
    literals:
      - datastore=$datastore
      - proxyMode=nftables
      - kubernetesServiceHost=$control_ip
      - kubernetesServicePort=6443
generatorOptions: {disableNameSuffixHash: true}
EOF_K
k apply -k "$work/overlay"
k -n kube-system rollout status ds/calyx --timeout=180s
k wait --for=condition=Ready node --all --timeout=180s
ok "nodes Ready: ${nodes[*]}"
k -n kube-system rollout status deploy/coredns --timeout=180s
ok "CoreDNS running on the Calyx network"

ipamctl() { k -n kube-system exec ds/calyx -c agent -- ipamctl "$@"; }
in_use() { ipamctl -o json show | grep -o '"inUse": *[0-9]*' | awk -F: '{n += $2} END {print n + 0}'; }

step "workload"
sed -e "s|__WORKER1__|${workers[0]}|" -e "s|__WORKER2__|${workers[1]}|" -e "s|__CONTROL__|$control_plane|" \
    "$here/workload.yaml" | k apply -f -
k -n "$ns" wait --for=condition=Ready pod --all --timeout=180s
ip_of() { k -n "$ns" get pod "$1" -o jsonpath='{.status.podIP}'; }
server1=$(ip_of server-1); server2=$(ip_of server-2); client=$(ip_of client)
for ip in "$server1" "$server2" "$client"; do
    case $ip in 10.244.*) ;; *) die "pod address $ip is outside the pool 10.244.0.0/16" ;; esac
done
[ "$(printf '%s\n' "$server1" "$server2" "$client" | sort -u | wc -l)" = 3 ] || die "duplicate pod addresses"
ok "pod addresses from the pool: $client (client), $server1, $server2"

in_pod() { k -n "$ns" exec client -- "$@"; }
in_pod ip -o addr show dev eth0 | grep -q "inet $client/32" || die "client's eth0 does not hold $client/32"
in_pod ip route | grep -q "^default via 169.254.1.1" || die "client has no default route via 169.254.1.1"
ok "client: $client/32 on eth0, default via 169.254.1.1"

fetch() { in_pod wget -q -T 5 -O - "$1"; }
expect_host() { # URL NAME: the server at URL answers with its pod name
    local got
    got=$(fetch "$1") || return 1
    [ "$got" = "$2" ]
}

node_ip() { k get node "$1" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}'; }
worker1_ip=$(node_ip "${workers[0]}"); worker2_ip=$(node_ip "${workers[1]}")

# from_control_plane IP PORT PATTERN: GET /hostname from the control plane node answers
# a line matching PATTERN (bash's /dev/tcp, as the node image may lack curl).
from_control_plane() {
    docker exec "$control_plane" timeout 5 bash -c \
        "exec 3<>/dev/tcp/$1/$2 && printf 'GET /hostname HTTP/1.0\r\n\r\n' >&3 && cat <&3" \
        | tail -n 1 | grep -qx "$3"
}

# Pod to outside: the host-network server on the control plane sees the worker's
# address (masqueraded), not the pod's.
masqueraded() {
    local seen
    seen=$(fetch "http://$control_ip:8081/clientip") || return 1
    [ "${seen%:*}" = "$worker1_ip" ]
}

connectivity() { # the checks that must hold whatever happened to the nodes
    retry 30 expect_host "http://$server1:8080/hostname" server-1 || die "$1: pod to pod on one node"
    retry 30 expect_host "http://$server2:8080/hostname" server-2 || die "$1: pod to pod across nodes"
    retry 30 fetch "http://web.$ns.svc.cluster.local/hostname" >/dev/null || die "$1: Service by DNS name"
    retry 30 from_control_plane "$server2" 8080 server-2 || die "$1: node to pod"
    retry 30 from_control_plane "$worker2_ip" 30080 'server-[12]' || die "$1: NodePort"
    retry 30 from_control_plane "$worker1_ip" 18080 hostport || die "$1: hostPort (portmap)"
    retry 30 masqueraded || die "$1: pod to outside, masqueraded to $worker1_ip"
    ok "$1: pod to pod (same node, across nodes), Service by name, node to pod, NodePort, hostPort, pod to outside"
}

connectivity "steady state"

seen=""
for _ in $(seq 1 20); do
    seen="$seen $(fetch "http://web.$ns.svc.cluster.local/hostname" || true)"
done
for name in server-1 server-2; do
    case $seen in *"$name"*) ;; *) die "the Service never reached $name (saw:$seen)" ;; esac
done
ok "the Service reaches both servers"

step "FORWARD policy DROP on every node"
for node in "${nodes[@]}"; do docker exec "$node" iptables -P FORWARD DROP; done
connectivity "FORWARD DROP"

step "agents restart"
agent_uids() { k -n kube-system get pods -l app.kubernetes.io/name=calyx -o jsonpath='{.items[*].metadata.uid}'; }
old_uids=$(agent_uids)
k -n kube-system delete pod -l app.kubernetes.io/name=calyx --wait=true
# New pods (none of the old UIDs), as many as nodes, each Ready (its /readyz).
new_agents_ready() {
    local uids uid
    uids=$(agent_uids)
    [ "$(wc -w <<<"$uids")" = "${#nodes[@]}" ] || return 1
    for uid in $uids; do case " $old_uids " in *" $uid "*) return 1 ;; esac; done
    k -n kube-system wait --for=condition=Ready pod -l app.kubernetes.io/name=calyx --timeout=5s >/dev/null
}
retry 180 new_agents_ready || die "the restarted agents did not all become ready"
# The new agents reconcile: a route deleted behind their back comes back. Calyx's
# routes are protocol 201; the one to the other worker's block is neither a blackhole
# (this node's blocks) nor through a pod's veth (cyx...).
overlay_routes() {
    docker exec "${workers[0]}" ip route show proto 201 | grep -v -e '^blackhole' -e ' dev cyx'
}
route=$(overlay_routes | head -n1 | awk '{print $1}')
[ -n "$route" ] || die "no overlay route on ${workers[0]}"
docker exec "${workers[0]}" ip route del "$route" proto 201
route_back() { overlay_routes | grep -q "^$route "; }
retry 60 route_back || die "the new agent on ${workers[0]} did not restore the route to $route"
ok "new agents ready; a deleted route to $route came back"
connectivity "after the agents restarted"

step "churn: 30 pods up and down"
baseline=$(in_use)
k -n "$ns" apply -f "$here/churn.yaml"
k -n "$ns" rollout status deploy/churn --timeout=240s
during=$(in_use)
[ "$during" -ge $((baseline + 30)) ] || die "30 more pods but in use went $baseline -> $during"
k -n "$ns" delete deploy/churn --wait=true
churn_gone() { [ -z "$(k -n "$ns" get pods -l app=churn -o name)" ]; }
retry 120 churn_gone || die "churn pods did not go away"
back_to_baseline() { [ "$(in_use)" = "$baseline" ]; }
retry 60 back_to_baseline || die "addresses leaked: $(in_use) in use, $baseline before the churn"
ok "in use $baseline -> $during -> $(in_use)"

k get pods -A -o json > "$work/pods.json"
k -n kube-system exec -i ds/calyx -c agent -- sh -c 'cat > /tmp/pods.json && ipamctl check --pods /tmp/pods.json' \
    < "$work/pods.json" || die "ipamctl check found problems"
ok "ipamctl check is clean against the cluster's pods"

echo "kind suite: passed"
