# Calyx: build, test, lab, bench. Privileged targets (test, lab, bench-*) need root.
SHELL := /bin/bash
CARGO ?= cargo
RELEASE := target/release
# Static binaries (musl): they run on any Linux host, whatever its glibc.
MUSL := x86_64-unknown-linux-musl
STATIC := target/$(MUSL)/release
# The release's version (the workspace's); the image tag and the manifest follow it.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
IMAGE ?= localhost/calyx:$(VERSION)

# Debian packages the tests and the lab use.
DEB_PACKAGES := iproute2 iptables ipset nftables conntrack iputils-ping netcat-openbsd \
	tcpdump iperf3 util-linux ethtool etcd-server etcd-client containernetworking-plugins \
	podman containerd runc busybox-static catatonit python3-venv protobuf-compiler \
	musl-tools mmdebstrap binutils qemu-system-x86 linux-image-amd64 ipvsadm

.PHONY: all build release static deps test test-unit test-runtimes test-image test-vm lint fmt bench bench-cni bench-policy \
	bench-ipam bench-agent bench-proxy bench-proxy-vm lab lab-down image e2e-kind clean

all: build

build:
	$(CARGO) build --workspace

release:
	$(CARGO) build --workspace --release

# Installs what is missing; a no-op when everything is there.
deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@rustup target list --installed 2>/dev/null | grep -qx $(MUSL) || rustup target add $(MUSL)

# calyx, calyx-agent and ipamctl, statically linked (what the image ships).
static: deps
	$(CARGO) build --release --target $(MUSL) -p calyx-cni -p calyx-ipam -p calyx-agent --bins

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# Everything: lint, unit tests, privileged namespace tests, real runtimes, the image.
test: deps lint
	$(CARGO) build --workspace
	$(CARGO) test --workspace
	$(MAKE) test-runtimes
	$(MAKE) test-image
	$(MAKE) test-vm

test-unit:
	$(CARGO) test --workspace --lib --bins

# podman (CNI backend) and containerd's CRI plugin drive the plugin for real: the
# static binary, the one the image ships.
test-runtimes: static
	e2e/runtimes/run.sh $(STATIC)/calyx

# IPVS mode, its netlink and ipset layers, inside a VM booting Debian's kernel (this
# machine's has no IPVS and no dummy links): one boot for every scenario.
test-vm: static
	$(CARGO) build --workspace
	e2e/vm/run.sh --timeout 1500 e2e/vm/suite.sh \
		"$$($(CARGO) test --no-run --message-format=json -p calyx-dataplane --features firewall --test ipvs | e2e/vm/test-binary)" \
		"$$($(CARGO) test --no-run --message-format=json -p calyx-agent --test proxy | e2e/vm/test-binary)"

bench: bench-cni bench-ipam bench-agent bench-proxy bench-policy

bench-cni: deps release
	$(RELEASE)/bench-cni --calyx $(RELEASE)/calyx

bench-ipam: deps release
	$(RELEASE)/bench-ipam

bench-agent: deps release
	$(RELEASE)/bench-agent --plugin $(RELEASE)/calyx --agent $(RELEASE)/calyx-agent

bench-policy: deps release
	$(RELEASE)/bench-policy --plugin $(RELEASE)/calyx --agent $(RELEASE)/calyx-agent

bench-proxy: deps release
	$(RELEASE)/bench-proxy --plugin $(RELEASE)/calyx --agent $(RELEASE)/calyx-agent

# IPVS mode needs the VM: nftables and ipvs measured side by side in one boot.
bench-proxy-vm: deps release
	e2e/vm/run.sh --timeout 3000 --mem 6144 e2e/vm/bench-proxy.sh $(RELEASE)

lab: deps release
	$(RELEASE)/calyx-lab up --plugin $(RELEASE)/calyx --agent $(RELEASE)/calyx-agent

lab-down: release
	$(RELEASE)/calyx-lab down

# The image, built here from Debian's packages and the static binaries (no registry).
image: static
	e2e/image/build.sh $(STATIC) $(IMAGE)

# The image run as the DaemonSet runs it (containers, env and mounts read from
# manifests/), with podman on the lab's node namespaces: install, pods through the
# installed plugin, upgrade, uninstall.
test-image: image
	CALYX_IMAGE=$(IMAGE) $(CARGO) test -p calyx-e2e --test image -- --ignored --nocapture

# Calyx on a real cluster: needs docker (with its daemon), kind, kubectl and registry
# access (not available on the dev machines). KEEP=1 keeps the cluster.
e2e-kind:
	e2e/kind/run.sh

clean:
	$(CARGO) clean
