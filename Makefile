# Calyx: build, test, lab, bench. Privileged targets (test, lab, bench-*) need root.
SHELL := /bin/bash
CARGO ?= cargo
RELEASE := target/release

# Debian packages the tests and the lab use.
DEB_PACKAGES := iproute2 iptables ipset nftables conntrack iputils-ping netcat-openbsd \
	tcpdump iperf3 util-linux ethtool etcd-server etcd-client containernetworking-plugins \
	podman containerd runc busybox-static catatonit python3-venv protobuf-compiler

.PHONY: all build release deps test test-unit test-runtimes lint fmt bench bench-cni bench-ipam bench-agent bench-proxy \
	lab lab-down image e2e-kind clean

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

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# Everything: lint, unit tests, privileged namespace tests, real runtimes.
test: deps lint
	$(CARGO) build --workspace
	$(CARGO) test --workspace
	$(MAKE) test-runtimes

test-unit:
	$(CARGO) test --workspace --lib --bins

# podman (CNI backend) and containerd's CRI plugin drive the plugin for real.
test-runtimes: release
	e2e/runtimes/run.sh $(RELEASE)/calyx

bench: bench-cni bench-ipam bench-agent bench-proxy

bench-cni: deps release
	$(RELEASE)/bench-cni --calyx $(RELEASE)/calyx

bench-ipam: deps release
	$(RELEASE)/bench-ipam

bench-agent: deps release
	$(RELEASE)/bench-agent --plugin $(RELEASE)/calyx --agent $(RELEASE)/calyx-agent

bench-proxy: deps release
	$(RELEASE)/bench-proxy --plugin $(RELEASE)/calyx --agent $(RELEASE)/calyx-agent

lab: deps release
	$(RELEASE)/calyx-lab up --plugin $(RELEASE)/calyx --agent $(RELEASE)/calyx-agent

lab-down: release
	$(RELEASE)/calyx-lab down

# Needs a container engine with registry access (not available on the dev machines).
image:
	$${ENGINE:-podman} build -t calyx:latest -f Containerfile .

# Calyx on a real cluster: needs docker (with its daemon), kind, kubectl and registry
# access (not available on the dev machines). KEEP=1 keeps the cluster.
e2e-kind:
	e2e/kind/run.sh

clean:
	$(CARGO) clean
