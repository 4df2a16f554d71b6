# Shell helpers for the emulated-host tests (tests/hosted.rs), sourced by each test's script
# inside the emulated host (busybox sh, in /work, as root). The harness puts beside it: mote,
# the guest kernel ($KERNEL, below), guest.cpio.gz (the test guest's initramfs with hosted-tool in /bin), rootfs.ext4
# and hosted-tool.
set -u
export PATH=/work:$PATH

# wait_for FILE PATTERN [SECONDS]: until FILE has a line matching PATTERN (grep -E);
# otherwise says so, shows the file's end, and fails.
wait_for() {
  local file=$1 pattern=$2 limit=${3:-60} waited=0
  # A guest's console ends its lines with CR LF.
  while ! { [ -f "$file" ] && tr -d '\r' <"$file" | grep -qE "$pattern"; }; do
    if [ "$waited" -ge $((limit * 10)) ]; then
      echo "wait_for: no '$pattern' in $file after $limit s; it ends with:"
      tail -n 20 "$file" 2>/dev/null
      return 1
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
}

# whole_lines FILE: FILE's lines without their CRs, leaving out a last line that is still
# being written (no newline yet): a running guest can be cut off in the middle of a number.
whole_lines() {
  local copy
  copy=$(mktemp)
  cat "$1" >"$copy"
  if [ -n "$(tail -c1 "$copy")" ]; then
    sed '$d' "$copy" | tr -d '\r'
  else
    tr -d '\r' <"$copy"
  fi
  rm -f "$copy"
}

# latest FILE PREFIX: the last number printed right after PREFIX in FILE (0 when none).
latest() {
  local n
  n=$(grep -o "$2[0-9][0-9]*" "$1" 2>/dev/null | tail -n1 | sed "s/^$2//")
  echo "${n:-0}"
}

# wait_count FILE PREFIX N [SECONDS]: until latest FILE PREFIX is at least N; otherwise fails.
wait_count() {
  local file=$1 prefix=$2 want=$3 limit=${4:-60} waited=0
  while [ "$(latest "$file" "$prefix")" -lt "$want" ]; do
    if [ "$waited" -ge $((limit * 10)) ]; then
      echo "wait_count: $prefix reached $(latest "$file" "$prefix"), not $want, in $limit s"
      return 1
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
}

# guest_cmd SHELL-COMMAND: the microvm.cmd= argument that makes the guest's init run it.
guest_cmd() {
  printf 'microvm.cmd=%s' "$(printf '%s' "$1" | base64 -w0)"
}

# fail MESSAGE: report and end the test's script with status 1.
fail() {
  echo "FAIL: $*"
  exit 1
}

# The guest's console output is short and its kernel quiet: each line crosses two emulated
# UARTs.
GUEST_ARGS="quiet"

# The guest kernel the harness put beside mote: an ELF vmlinux on x86_64, an Image on arm64.
case "$(uname -m)" in
  aarch64) KERNEL=Image ;;
  *) KERNEL=vmlinux ;;
esac
