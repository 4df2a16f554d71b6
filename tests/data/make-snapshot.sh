#!/usr/bin/env bash
# Writes a snapshot for tests/data/snapshot-vN with the mote binary given (build it at the
# commit whose format the snapshot is to have): the probe guest counting
# (`probe.run=hello,count:1000:3000000`, 1 vCPU, 32 MiB, an entropy device), paused right
# after `probe: count=2`. OUT gets `state` and `mem.gz`.
#
# Usage: tests/data/make-snapshot.sh MOTE PROBE OUT
set -euo pipefail
mote=$1 probe=$2 out=$3
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$out"
cat > "$work/vm.json" <<JSON
{"boot-source": {"kernel_image_path": "$probe",
                 "boot_args": "console=ttyS0 reboot=k panic=1 pci=off probe.run=hello,count:1000:3000000"},
 "machine-config": {"vcpu_count": 1, "mem_size_mib": 32},
 "entropy": {}}
JSON
"$mote" --api-sock "$work/api.sock" --config-file "$work/vm.json" >"$work/console" 2>"$work/log" &
pid=$!
for _ in $(seq 1 500); do
  grep -q '^probe: count=2$' "$work/console" && break
  sleep 0.01
done
api() { curl -sS --fail-with-body --unix-socket "$work/api.sock" -X "$1" "http://localhost$2" -d "$3"; }
api PATCH /vm '{"state": "Paused"}'
grep -q '^probe: count=3$' "$work/console" && { echo "paused too late: count=3 was out" >&2; exit 1; }
api PUT /snapshot/create \
  "{\"snapshot_type\": \"Full\", \"snapshot_path\": \"$work/state\", \"mem_file_path\": \"$work/mem\"}"
cp "$work/state" "$out/state"
gzip -9c "$work/mem" > "$out/mem.gz"
echo "wrote $out/state and $out/mem.gz"
