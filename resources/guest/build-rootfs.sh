#!/usr/bin/env bash
# Builds the test guest's root file system from Debian's busybox-static and resources/guest/init:
#   OUT/rootfs.ext4        ext4 image (boot with root=/dev/vda)
#   OUT/initramfs.cpio.gz  the same tree as an initramfs
# Usage: build-rootfs.sh OUT_DIR
# Installs busybox-static, e2fsprogs and cpio with apt-get when they are missing (as root).
set -euo pipefail
# mkfs.ext4 lives in /usr/sbin, which an ordinary user's PATH often leaves out.
export PATH="$PATH:/usr/sbin:/sbin"
out=${1:?usage: build-rootfs.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)

missing=()
command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
command -v cpio >/dev/null || missing+=(cpio)
# A dynamically linked busybox (Debian's "busybox" package) would need a libc in the guest.
if [ ! -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then
  missing+=(busybox-static)
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "build-rootfs.sh: install these Debian packages first: ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null && apt-get install -y -qq "${missing[@]}" >/dev/null; }
fi
if ! /bin/busybox true || ldd /bin/busybox >/dev/null 2>&1; then
  echo "build-rootfs.sh: /bin/busybox is not a static busybox: install busybox-static" >&2
  exit 1
fi

tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir -p "$tree/bin" "$tree/sbin" "$tree/usr/bin" "$tree/usr/sbin" "$tree/proc" "$tree/sys" \
         "$tree/dev" "$tree/tmp" "$tree/root" "$tree/etc" "$tree/mnt" "$tree/run" "$tree/var"
cp /bin/busybox "$tree/bin/busybox"
for app in $(/bin/busybox --list); do
  [ "$app" = busybox ] || ln -sf /bin/busybox "$tree/bin/$app"
done
cp "$here/init" "$tree/init"
chmod 755 "$tree/init"
ln -sf /init "$tree/sbin/init"
echo "root::0:0:root:/root:/bin/sh" > "$tree/etc/passwd"
echo "root:x:0:" > "$tree/etc/group"
echo microvm > "$tree/etc/hostname"
mkdir -p "$out"
# Written beside the old ones and renamed, so a reader never sees half an image.
rm -f "$out/rootfs.ext4.tmp" "$out/initramfs.cpio.gz.tmp"
truncate -s 32M "$out/rootfs.ext4.tmp"
mkfs.ext4 -q -F -L rootfs -d "$tree" "$out/rootfs.ext4.tmp"
(cd "$tree" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -9) > "$out/initramfs.cpio.gz.tmp"
mv -f "$out/rootfs.ext4.tmp" "$out/rootfs.ext4"
mv -f "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
echo "built $out/rootfs.ext4 and $out/initramfs.cpio.gz"
