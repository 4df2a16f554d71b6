"""The `net` benchmark of tools/bench: virtio-net frames per second through a TAP.

Everything runs inside a network namespace made for the run (`mote-bench-<pid>`, removed at
the end) with one TAP in it, up and without an address: no traffic leaves the namespace.

  guest to host  the probe guest sends COUNT 1514-byte bulk frames (`net-bench:tx:COUNT:BATCH`),
                 one notification per BATCH frames, polling from CPL 3; the TAP hands them to
                 the namespace's stack, which drops them (unknown EtherType), as in the
                 Firecracker measurement the issue quotes.
  host to guest  a sender inside the namespace (python3, an AF_PACKET socket on the TAP, a
                 tight loop of send()) writes 1514-byte frames at the TAP as fast as it can;
                 the probe takes COUNT of them (`net-bench:rx:COUNT:BATCH`), giving its
                 receive buffers back BATCH at a time (one notification per batch when the
                 device asks for one). The TAP drops what the guest cannot take in time, so
                 this is the rate the guest receives, not the rate offered.
Each case is timed from the probe's `net-bench start` line to its `net-bench done` line on
mote's stdout (after a warm-up step of a tenth of the size in the same run); median, slowest
and fastest of N runs. Gbit/s counts the 1514 bytes of each frame.
"""

import os
import re
import statistics
import subprocess
import sys
import time

GUEST_MAC = "06:00:0a:00:00:02"
FRAME_LEN = 1514
FIRECRACKER_KFPS = (120, 140)
TARGET_KFPS = 1.5 * FIRECRACKER_KFPS[1]
RUN_TIMEOUT_S = 120.0
# A monitor driven as Firecracker is (API, config file) logs on stdout by default; the
# benchmarks read the console there, so its log goes to stderr.
LOG_TO_STDERR = ("--log-path", "/dev/stderr", "--show-level")

# key, label, direction, frames, batch
CASES = [
    ("g2h_1", "guest to host, 1 frame per notification", "tx", 400_000, 1),
    ("g2h_32", "guest to host, batches of 32", "tx", 1_000_000, 32),
    ("h2g_1", "host to guest, buffers back one at a time", "rx", 400_000, 1),
    ("h2g_32", "host to guest, buffers back 32 at a time", "rx", 1_000_000, 32),
]

# The host's sender: frames to the guest's MAC, EtherType 0x88b5, kind 1 (data), numbered.
SENDER = r"""
import socket, struct, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("tap0", 0))
dst = bytes.fromhex(sys.argv[1].replace(":", ""))
frame = bytearray(dst + bytes.fromhex("06000a000001") + b"\x88\xb5" + b"\x01\x00"
                  + bytes(4) + bytes(4) + bytes(1514 - 24))
send = s.send
seq = 0
while True:
    struct.pack_into("<I", frame, 16, seq)
    try:
        send(frame)
    except OSError:
        pass
    seq += 1
"""


class NetBenchError(Exception):
    pass


def say(message):
    print(f"bench: {message}", file=sys.stderr, flush=True)


def ip(*args):
    subprocess.run(["ip", *args], check=True, stdout=subprocess.DEVNULL)


class Namespace:
    def __init__(self):
        self.name = f"mote-bench-{os.getpid()}"
        subprocess.run(["ip", "netns", "del", self.name], stderr=subprocess.DEVNULL)
        ip("netns", "add", self.name)
        ip("-n", self.name, "tuntap", "add", "dev", "tap0", "mode", "tap")
        ip("-n", self.name, "link", "set", "tap0", "up")

    def exec(self, *args):
        return ["ip", "netns", "exec", self.name, *args]

    def close(self):
        subprocess.run(["ip", "netns", "del", self.name], stderr=subprocess.DEVNULL)


def one_run(mote, probe, ns, direction, frames, batch):
    """Seconds the measured step took."""
    warm = max(frames // 10, 1000)
    steps = (f"net-init,net-bench:{direction}:{warm}:{batch},"
             f"net-bench:{direction}:{frames}:{batch}")
    cmd = ns.exec(mote, "run", "--kernel", probe, "--append", "probe.run=" + steps,
                  "--net", f"tap=tap0,mac={GUEST_MAC}")
    sender = None
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        if direction == "rx":
            sender = subprocess.Popen(ns.exec(sys.executable, "-c", SENDER, GUEST_MAC),
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        starts, dones = [], []
        deadline = time.monotonic() + RUN_TIMEOUT_S
        for raw in proc.stdout:
            now = time.perf_counter()
            line = raw.decode(errors="replace").strip()
            if "net-bench start" in line:
                starts.append(now)
            elif "net-bench done" in line:
                dones.append((now, line))
            elif "net-bench" in line or "net-init error" in line:
                raise NetBenchError(f"probe: {line}")
            if time.monotonic() > deadline:
                raise NetBenchError("mote ran too long")
        proc.wait(timeout=RUN_TIMEOUT_S)
        if proc.returncode != 0:
            raise NetBenchError(f"mote exited {proc.returncode}: "
                                + proc.stderr.read().decode(errors="replace").strip())
        if len(starts) != 2 or len(dones) != 2:
            raise NetBenchError(f"expected two bench steps, saw {len(starts)} and {len(dones)}")
        done_at, line = dones[1]
        got = int(re.search(r"frames=(\d+)", line).group(1))
        if got != frames:
            raise NetBenchError(f"the guest counted {got} frames, not {frames}")
        return done_at - starts[1]
    finally:
        for p in (sender, proc):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def bench(mote, probe, runs):
    """Runs every case `runs` times; returns (table rows, JSON dict) in tools/bench's shape."""
    if subprocess.run(["sh", "-c", "command -v ip"], stdout=subprocess.DEVNULL).returncode:
        raise NetBenchError("the net benchmark needs ip (iproute2)")
    ns = Namespace()
    results = {}
    try:
        for key, label, direction, frames, batch in CASES:
            rates = []
            for _ in range(runs):
                seconds = one_run(mote, probe, ns, direction, frames, batch)
                rates.append(frames / seconds / 1000)
            results[key] = (label, direction, rates)
            say(f"net {key}: median {statistics.median(rates):.0f} kframes/s "
                f"(runs: {', '.join(f'{r:.0f}' for r in rates)})")
    finally:
        ns.close()

    rows = []
    data = {"bench": "net", "runs": runs, "frame_bytes": FRAME_LEN,
            "firecracker_kframes_per_s": list(FIRECRACKER_KFPS),
            "target_kframes_per_s": TARGET_KFPS}
    for key, (label, direction, rates) in results.items():
        median = statistics.median(rates)
        gbit = median * 1000 * FRAME_LEN * 8 / 1e9
        compared = key == "g2h_1"
        rows.append((label, f"{median:.0f}", f"{min(rates):.0f}-{max(rates):.0f}",
                     f"{gbit:.2f}",
                     f"{FIRECRACKER_KFPS[0]}-{FIRECRACKER_KFPS[1]}" if compared else "",
                     f"{TARGET_KFPS:.0f}" if compared else ""))
        data[f"{key}_kframes_per_s"] = round(median, 1)
        data[f"{key}_gbit_per_s"] = round(gbit, 3)
        data[f"{key}_kframes_per_s_runs"] = [round(r, 1) for r in rates]
    data["meets_targets"] = statistics.median(results["g2h_1"][2]) >= TARGET_KFPS
    return rows, data
