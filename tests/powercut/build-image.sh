#!/usr/bin/env bash
# Builds the power-cut guest's root file system into OUT (a new directory):
#   OUT/rootfs.img   ext4, debootstrap --variant=minbase bookworm with
#                    linux-image-amd64 and iproute2, init = tests/powercut/init
#   OUT/vmlinuz, OUT/initrd.img   the kernel and initramfs to boot it with
# Run by scripts/powercut.sh, which caches OUT by a hash of this file and of
# init. Needs root (debootstrap), debootstrap and e2fsprogs.
set -Eeuo pipefail
OUT=${1:?usage: build-image.sh OUT}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# The host's own Debian mirror (the image is Debian 12 like the host).
mirror() {
    local uri
    uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    if [[ -z "$uri" ]]; then
        uri=$(awk '$1 == "deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    fi
    [[ -n "$uri" ]] || { echo "build-image: no Debian mirror in the host's apt sources" >&2; exit 1; }
    echo "$uri"
}

mkdir -p "$OUT"
ROOT="$OUT/root"
rm -rf "$ROOT"
debootstrap --variant=minbase --include=linux-image-amd64,iproute2,kmod,initramfs-tools \
    bookworm "$ROOT" "$(mirror)"
# Only what the guest needs to boot: drop caches and documentation.
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/usr/share/doc "$ROOT"/usr/share/man \
    "$ROOT"/usr/share/locale
install -m 0755 "$HERE/init" "$ROOT/sbin/dcs-powercut-init"
mkdir -p "$ROOT/data"
cp "$ROOT"/boot/vmlinuz-* "$OUT/vmlinuz"
cp "$ROOT"/boot/initrd.img-* "$OUT/initrd.img"
chmod 0644 "$OUT/vmlinuz" "$OUT/initrd.img"
rm -f "$OUT/rootfs.img"
mkfs.ext4 -q -F -L dcs-root -d "$ROOT" "$OUT/rootfs.img" 1G
rm -rf "$ROOT"
