#!/usr/bin/env bash
# Runs a script inside a throwaway VM booting Debian's stock kernel (which has IPVS and
# the dummy link type, unlike the dev machines' kernel), and exits with its status.
#
#   e2e/vm/run.sh [--mem MiB] [--timeout S] [--rw DIR]... SCRIPT [ARGS...]
#
# The guest sees this machine's root filesystem read-only (9p) under a tmpfs overlay,
# so every binary built here runs there as is (build on the host: compiling under
# software emulation is slow); --rw directories are shared writable at the same path.
# SCRIPT runs as root in the guest with the IPVS modules loaded. Exit status: the
# script's own; 125 when the VM could not boot or did not finish in time (a failure,
# never a skip: CI must not pass on a VM that did not run).
# Needs (Debian): qemu-system-x86 linux-image-amd64 busybox-static. Uses software
# emulation (TCG): a KVM guest hangs at boot on these machines (nested).
set -euo pipefail
mem=3072; timeout=1500; rw=()
while [ $# -gt 0 ]; do
  case "$1" in
    --mem) mem=$2; shift 2;;
    --timeout) timeout=$2; shift 2;;
    --rw) rw+=("$(realpath "$2")"); shift 2;;
    *) break;;
  esac
done
[ $# -ge 1 ] || { echo "usage: $0 [--mem MiB] [--timeout S] [--rw DIR]... SCRIPT [ARGS...]" >&2; exit 2; }
script=$(realpath "$1"); shift
# The guest's /tmp and /run are its own tmpfs: a working directory there (a CI clone in
# /tmp, say) is shared into the guest at the same path.
case "$PWD/" in /tmp/*|/run/*|/var/run/*) rw+=("$PWD");; esac

fail() { echo "vm: $*" >&2; exit 125; }
kernel=$(ls /boot/vmlinuz-*-amd64 2>/dev/null | sort -V | tail -n1 || true)
[ -n "$kernel" ] || fail "no Debian kernel in /boot (apt-get install linux-image-amd64)"
command -v qemu-system-x86_64 >/dev/null || fail "no qemu (apt-get install qemu-system-x86)"
[ -x /bin/busybox ] || fail "no /bin/busybox (apt-get install busybox-static)"
kver=${kernel#/boot/vmlinuz-}

# The initramfs: busybox, the modules that mount the host's root, and an init that
# mounts it under an overlay, loads IPVS, runs the script and powers off. Cached per
# kernel version and per version of this file.
self_sum=$(sha1sum "$0" | cut -c1-12)
cache=/var/tmp/calyx-vm/$kver-$self_sum
if [ ! -f "$cache/initrd.gz" ]; then
  tmp=$(mktemp -d); root=$tmp/root
  mkdir -p "$root"/{bin,sbin,mods,proc,sys,dev,lower,upper,newroot}
  cp /bin/busybox "$root/bin/"
  mods=()
  for m in virtio_pci 9pnet_virtio 9p overlay; do
    while read -r f; do
      b=$(basename "$f"); b=${b%.ko*}
      case " ${mods[*]} " in *" $b "*) continue;; esac
      mods+=("$b"); cp "$f" "$root/mods/$b.ko"
      case "$f" in *.xz) mv "$root/mods/$b.ko" "$root/mods/$b.ko.xz"; xz -d "$root/mods/$b.ko.xz";; esac
    done < <(modprobe -S "$kver" --show-depends "$m" | awk '$1 == "insmod" {print $2}')
  done
  cat > "$root/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in ${mods[*]}; do insmod /mods/\$m.ko; done
# The marker on a line of its own: the script's last output may lack a newline.
finish() { echo; echo "CALYX-VM-EXIT \$1"; poweroff -f; }
# The host's root is read-only here and does not change during a run: cached, so a
# file read many times (ipset reads /etc/protocols once per entry) is not a 9p round
# trip each time, as it is not from a real node's disk.
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower || finish 125
mount -t tmpfs -o size=70% upper /upper && mkdir -p /upper/u /upper/w
mount -t overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w overlay /newroot || finish 125
for d in proc sys dev; do mount --move /\$d /newroot/\$d; done
mkdir -p /newroot/dev/pts; mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmp /newroot/tmp; mount -t tmpfs run /newroot/run
i=0
for dir in \$(sed -n 's/.*calyx_rw=\([^ ]*\).*/\1/p' /newroot/proc/cmdline | tr ',' ' '); do
  mkdir -p /newroot\$dir
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 rw\$i /newroot\$dir || finish 125
  i=\$((i + 1))
done
mkdir -p /newroot/run/calyx-vm
mount -t 9p -o trans=virtio,version=9p2000.L,ro job /newroot/run/calyx-vm || finish 125
hostname calyx-vm
chroot /newroot /bin/sh /run/calyx-vm/job.sh
finish \$?
INIT
  chmod +x "$root/init"
  # The kernel's on-demand module loads call /sbin/modprobe in the initramfs root:
  # hand them to the guest root's modprobe.
  printf '#!/bin/sh\nexec /bin/chroot /newroot /sbin/modprobe "$@"\n' > "$root/sbin/modprobe"
  chmod +x "$root/sbin/modprobe"
  mkdir -p "$(dirname "$cache")"; rm -rf "$cache.new"; mkdir -p "$cache.new"
  (cd "$root" && find . | cpio -o -H newc 2>/dev/null | gzip -1) > "$cache.new/initrd.gz"
  rm -rf "$cache"; mv "$cache.new" "$cache"; rm -rf "$tmp"
fi

# The job: load what IPVS mode uses (the first service of a scheduler fails while its
# module loads on demand), then the script, from the directory we are in.
job=$(mktemp -d /var/tmp/calyx-vm-job.XXXXXX)
trap 'rm -rf "$job"' EXIT
{
  echo 'export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root'
  printf 'export CI=%q CALYX_IN_VM=1\n' "${CI:-}"
  for m in ip_vs ip_vs_rr ip_vs_wrr ip_vs_lc ip_vs_sh ip_vs_mh dummy nf_conntrack; do
    echo "modprobe $m || { echo 'vm: modprobe $m failed'; exit 125; }"
  done
  printf 'cd %q || exit 125\n' "$PWD"
  printf 'exec /bin/bash /run/calyx-vm/script.sh'; printf ' %q' "$@"; echo
} > "$job/job.sh"
# The script travels with the job: the guest's /tmp is its own.
cp "$script" "$job/script.sh"

args=(-accel tcg -cpu max -m "$mem" -smp 2 -nographic -no-reboot -kernel "$kernel" -initrd "$cache/initrd.gz"
  -virtfs "local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap"
  -virtfs "local,path=$job,mount_tag=job,security_model=passthrough,readonly=on")
for i in "${!rw[@]}"; do
  args+=(-virtfs "local,path=${rw[$i]},mount_tag=rw$i,security_model=passthrough,multidevs=remap")
done
rwlist=$(IFS=,; echo "${rw[*]}")
console=$job/console
set +e
# The console goes to the terminal as it comes (a long suite shows progress) and to a
# file, where the exit marker is read.
timeout "$timeout" qemu-system-x86_64 "${args[@]}" \
  -append "console=ttyS0 quiet loglevel=1 panic=-1 calyx_rw=$rwlist init=/init" \
  < /dev/null 2>&1 | tee "$console" |
  sed -u -n -e '/CALYX-VM-EXIT/d' -e '/Booting from ROM/,$p' |
  sed -u -e 's/\r$//' -e 's/\x1b\[[0-9;?]*[a-zA-Z]//g' -e 's/\x1bc//g' -e 's/^Booting from ROM\.*//'
qemu=${PIPESTATUS[0]}
set -e
code=$(sed -n 's/.*CALYX-VM-EXIT \([0-9]*\).*/\1/p' "$console" | tail -n1)
if [ -z "$code" ]; then
  fail "the VM did not finish (qemu exit $qemu; 124 means the ${timeout} s timeout)"
fi
exit "$code"
