#!/bin/sh
# Firecracker's getting-started sequence (its docs/getting-started.md: "Configuring and starting
# the microVM"), the same curl calls in the same order, against the monitor at $API_SOCKET, with
# the probe guest as $KERNEL. Each call must answer 204 with no body; the first failure stops
# the script with the call, the status and the body on stderr.
#
# Environment: API_SOCKET, KERNEL, ROOTFS, LOGFILE, TAP_DEV, KERNEL_BOOT_ARGS.
set -eu

out=$(mktemp)
trap 'rm -f "$out"' EXIT

# curl ARGS...: runs curl -s with ARGS, writing the body to $out; the status must be 204.
expect_204() {
  code=$(curl -s -o "$out" -w '%{http_code}' "$@") || { echo "curl $* failed" >&2; exit 1; }
  if [ "$code" != 204 ] || [ -s "$out" ]; then
    echo "curl $*: status $code, body: $(cat "$out")" >&2
    exit 1
  fi
}

FC_MAC="06:00:AC:10:00:02"

# Set log file
expect_204 -X PUT --unix-socket "${API_SOCKET}" \
  --data "{\"log_path\": \"${LOGFILE}\", \"level\": \"Debug\", \"show_level\": true, \"show_log_origin\": true}" \
  "http://localhost/logger"

# Set boot source
expect_204 -X PUT --unix-socket "${API_SOCKET}" \
  --data "{\"kernel_image_path\": \"${KERNEL}\", \"boot_args\": \"${KERNEL_BOOT_ARGS}\"}" \
  "http://localhost/boot-source"

# Set rootfs
expect_204 -X PUT --unix-socket "${API_SOCKET}" \
  --data "{\"drive_id\": \"rootfs\", \"path_on_host\": \"${ROOTFS}\", \"is_root_device\": true, \"is_read_only\": false}" \
  "http://localhost/drives/rootfs"

# Set the machine configuration (the guide's earlier form, with its headers; its -i left out:
# the status is what is checked here)
expect_204 -X PUT --unix-socket "${API_SOCKET}" 'http://localhost/machine-config' \
  -H 'Accept: application/json' -H 'Content-Type: application/json' \
  -d '{"vcpu_count": 2, "mem_size_mib": 256}'

# Set network interface
expect_204 -X PUT --unix-socket "${API_SOCKET}" \
  --data "{\"iface_id\": \"net1\", \"guest_mac\": \"$FC_MAC\", \"host_dev_name\": \"$TAP_DEV\"}" \
  "http://localhost/network-interfaces/net1"

# API requests are handled asynchronously, it is important the configuration is
# set, before `InstanceStart`.
sleep 0.015s

# Start microVM
expect_204 -X PUT --unix-socket "${API_SOCKET}" \
  --data "{\"action_type\": \"InstanceStart\"}" \
  "http://localhost/actions"
