#!/usr/bin/env bash
# Builds the Calyx image without any registry: a Debian root filesystem made from
# Debian's packages (mmdebstrap, the machine's own apt sources), imported into podman,
# with the static binaries copied in, stripped.
#   e2e/image/build.sh <dir with calyx, calyx-agent, ipamctl> <image reference>
set -euo pipefail
bin_dir=$1
image=$2
root=$(cd "$(dirname "$0")/../.." && pwd)
work=$root/target/image
mkdir -p "$work"

# Only what the agent runs: ip, iptables (both backends), nft, ipset, conntrack.
packages=iproute2,iptables,nftables,ipset,conntrack
base_tag=localhost/calyx-base:bookworm-$(echo "$packages" | sha1sum | cut -c1-8)
if ! podman image exists "$base_tag"; then
	echo "building the base $base_tag from Debian packages"
	rm -f "$work/base.tar"
	mmdebstrap --quiet --variant=minbase --include="$packages" \
		--dpkgopt='path-exclude=/usr/share/doc/*' \
		--dpkgopt='path-exclude=/usr/share/man/*' \
		--dpkgopt='path-exclude=/usr/share/locale/*' \
		--dpkgopt='path-exclude=/usr/share/info/*' \
		--customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*' \
		bookworm "$work/base.tar"
	podman import --quiet "$work/base.tar" "$base_tag" >/dev/null
	rm -f "$work/base.tar"
fi

stage=$work/stage
rm -rf "$stage"
mkdir -p "$stage"
for b in calyx calyx-agent ipamctl; do
	if ! ldd "$bin_dir/$b" 2>&1 | grep -qE 'not a dynamic executable|statically linked'; then
		echo "$bin_dir/$b is not static (make static builds them)" >&2
		exit 1
	fi
	strip -o "$stage/$b" "$bin_dir/$b"
done
cp "$root/e2e/image/Containerfile" "$stage/Containerfile"
podman build --quiet --build-arg BASE="$base_tag" -t "$image" -f "$stage/Containerfile" "$stage" >/dev/null
echo "built $image ($(podman image inspect --format '{{.Size}}' "$image") bytes)"
