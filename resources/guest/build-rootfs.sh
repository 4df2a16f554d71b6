#!/usr/bin/env bash
# Builds the test guest's root file system from Debian's busybox-static and resources/guest/init:
#   OUT/rootfs.ext4        ext4 image (boot with root=/dev/vda)
#   OUT/initramfs.cpio.gz  the same tree as an initramfs
# Usage: build-rootfs.sh OUT_DIR [BUSYBOX]
# BUSYBOX: the static busybox binary to put in the guest (default: this machine's /bin/busybox).
# Another architecture's (tools/guest-artifacts --arch aarch64 passes Debian's
# busybox-static:arm64) is never run here: its applet list is read out of the binary.
# Installs busybox-static, e2fsprogs and cpio with apt-get when they are missing (as root).
set -euo pipefail
# mkfs.ext4 lives in /usr/sbin, which an ordinary user's PATH often leaves out.
export PATH="$PATH:/usr/sbin:/sbin"
out=${1:?usage: build-rootfs.sh OUT_DIR [BUSYBOX]}
busybox=${2:-}
here=$(cd "$(dirname "$0")" && pwd)

missing=()
command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
command -v cpio >/dev/null || missing+=(cpio)
# A dynamically linked busybox (Debian's "busybox" package) would need a libc in the guest.
if [ -z "$busybox" ] && { [ ! -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; }; then
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
if [ -z "$busybox" ]; then
  if ! /bin/busybox true || ldd /bin/busybox >/dev/null 2>&1; then
    echo "build-rootfs.sh: /bin/busybox is not a static busybox: install busybox-static" >&2
    exit 1
  fi
  busybox=/bin/busybox
  applets=$(/bin/busybox --list)
else
  [ -f "$busybox" ] || { echo "build-rootfs.sh: $busybox: no such file" >&2; exit 1; }
  # A program interpreter (PT_INTERP) would need a C library the guest does not have.
  if readelf -lW "$busybox" 2>/dev/null | grep -q 'program interpreter'; then
    echo "build-rootfs.sh: $busybox is dynamically linked: use Debian's busybox-static" >&2
    exit 1
  fi
  # busybox keeps its applet names as one sorted run of NUL-terminated strings that starts
  # "[", "[[" and ends with an empty one: read them without running the binary. (awk reads
  # to the end: an early exit would kill tr with SIGPIPE, a failure under pipefail.)
  applets=$(LC_ALL=C tr '\0' '\n' < "$busybox" | awk '
    !done && prev == "[" && $0 == "[[" { on = 1; print "[" }
    on && $0 == "" { on = 0; done = 1 }
    on { print }
    { prev = $0 }')
  for app in sh mount devmem base64 reboot setsid cttyhack; do
    grep -qxF "$app" <<<"$applets" ||
      { echo "build-rootfs.sh: no applet list found in $busybox (no $app)" >&2; exit 1; }
  done
fi

tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir -p "$tree/bin" "$tree/sbin" "$tree/usr/bin" "$tree/usr/sbin" "$tree/proc" "$tree/sys" \
         "$tree/dev" "$tree/tmp" "$tree/root" "$tree/etc" "$tree/mnt" "$tree/run" "$tree/var"
cp "$busybox" "$tree/bin/busybox"
chmod 755 "$tree/bin/busybox"
for app in $applets; do
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
