"""The `mmds` benchmark of tools/bench: what the metadata service answers, and what looking
for it costs every other frame.

Everything runs inside a network namespace made for the run (bench_net's: one TAP, up,
without an address); mote is driven through its API (`mote --api-sock`): the probe guest,
eth0 on tap0, `PUT /mmds/config` (V1) for eth0 and a small store.

  requests/s, one connection
             the probe (`mmds-bench:COUNT:keep`) sends COUNT `GET /latest/meta-data/instance-id`
             on one TCP connection, each after the previous answer (its own ARP, TCP and HTTP,
             polling from CPL 3); timed from `mmds-bench start` to `mmds-bench done`, after a
             warm-up step of a tenth.
  requests/s, fresh connections
             the same, each request on its own connection (SYN, request, answer, FIN).
  TX path with MMDS on eth0
             `net-bench:tx:500000:32` (1514-byte frames to broadcast, a notification per 32)
             with MMDS configured on eth0, so that every frame is looked at for the MMDS
             address, against the same without MMDS, alternately, N runs each; the median of
             the back-to-back pairs' ratios (with over without) is the added cost, within noise
             when the middle half of the pairs' ratios holds 1.
Median, slowest and fastest of N runs.
"""

import os
import re
import statistics
import subprocess
import tempfile
import time

import bench_api
from bench_api import say

import bench_net

RUN_TIMEOUT_S = 120.0
KEEP_REQUESTS = 5000
FRESH_REQUESTS = 1000
TX_FRAMES = 500_000
DATA = {"latest": {"meta-data": {"instance-id": "i-0123456789abcdef0", "zone": "z1"}}}

DONE = re.compile(r"^probe: (mmds|net)-bench done (?:requests|frames)=(\d+)(?: ok=(\d+))?")
FAILURE = re.compile(r"\b(error|panic|timeout)\b")


class MmdsBenchError(Exception):
    pass


def api(sock, method, path, body):
    """One request to mote's API; raises unless 2xx."""
    status, _ = bench_api.api(sock, method, path, body, 10)
    if not 200 <= status < 300:
        raise MmdsBenchError(f"{method} {path}: answered {status}")


def one_run(mote, probe, ns, directory, steps, with_mmds):
    """Seconds from the second `… start` line to the second `… done` line, and that line."""
    sock = os.path.join(directory, "api.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    proc = subprocess.Popen(ns.exec(mote, "--api-sock", sock, *bench_net.LOG_TO_STDERR), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise MmdsBenchError("mote's API socket never appeared")
            time.sleep(0.002)
        api(sock, "PUT", "/boot-source", {
            "kernel_image_path": probe,
            "boot_args": f"console=ttyS0 reboot=k panic=1 pci=off probe.run={steps}"})
        api(sock, "PUT", "/network-interfaces/eth0", {
            "iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": bench_net.GUEST_MAC})
        if with_mmds:
            api(sock, "PUT", "/mmds/config", {"network_interfaces": ["eth0"]})
            api(sock, "PUT", "/mmds", DATA)
        api(sock, "PUT", "/actions", {"action_type": "InstanceStart"})
        starts, dones = [], []
        for raw in proc.stdout:
            now = time.perf_counter()
            line = raw.decode(errors="replace").strip()
            if line.endswith("-bench start"):
                starts.append(now)
            elif DONE.match(line):
                dones.append((now, line))
            elif FAILURE.search(line):
                raise MmdsBenchError(f"the probe reported {line!r}")
            if time.monotonic() > deadline + RUN_TIMEOUT_S:
                raise MmdsBenchError("mote ran too long")
        proc.wait(timeout=RUN_TIMEOUT_S)
        if proc.returncode != 0:
            raise MmdsBenchError(f"mote exited {proc.returncode}: "
                                 + proc.stderr.read().decode(errors="replace").strip())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if len(starts) != 2 or len(dones) != 2:
        raise MmdsBenchError(f"expected two bench steps, saw {len(starts)} and {len(dones)}")
    done_at, line = dones[1]
    return done_at - starts[1], DONE.match(line)


def requests_per_s(mote, probe, ns, directory, count, mode):
    warm = max(count // 10, 10)
    steps = f"net-init,mmds-bench:{warm}:{mode},mmds-bench:{count}:{mode}"
    seconds, match = one_run(mote, probe, ns, directory, steps, True)
    if int(match.group(2)) != count or int(match.group(3)) != count:
        raise MmdsBenchError(f"{mode}: {match.group(0)!r}, expected {count} answered 200")
    return count / seconds


def frames_per_s(mote, probe, ns, directory, with_mmds):
    steps = f"net-init,net-bench:tx:{TX_FRAMES // 10}:32,net-bench:tx:{TX_FRAMES}:32"
    seconds, match = one_run(mote, probe, ns, directory, steps, with_mmds)
    if int(match.group(2)) != TX_FRAMES:
        raise MmdsBenchError(f"tx: {match.group(0)!r}")
    return TX_FRAMES / seconds / 1000


def percentile(values, fraction):
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))
    return ordered[int(rank) - 1]


def bench(mote, probe, runs):
    """Returns (table rows, JSON dict) in tools/bench's shape."""
    ns = bench_net.Namespace()
    keep, fresh, plain, checked = [], [], [], []
    try:
        with tempfile.TemporaryDirectory(prefix="mote-bench-mmds-") as directory:
            for run in range(runs):
                keep.append(requests_per_s(mote, probe, ns, directory, KEEP_REQUESTS, "keep"))
                fresh.append(requests_per_s(mote, probe, ns, directory, FRESH_REQUESTS,
                                            "fresh"))
                for with_mmds in ((False, True) if run % 2 == 0 else (True, False)):
                    rate = frames_per_s(mote, probe, ns, directory, with_mmds)
                    (checked if with_mmds else plain).append(rate)
                say(f"mmds run {run + 1}: {keep[-1]:.0f} and {fresh[-1]:.0f} requests/s, "
                    f"tx {plain[-1]:.0f} / {checked[-1]:.0f} kframes/s")
    except bench_net.NetBenchError as err:
        raise MmdsBenchError(str(err)) from err
    finally:
        ns.close()
    pairs = [c / p for c, p in zip(checked, plain)]
    ratio = statistics.median(pairs)
    low, high = percentile(pairs, 0.25), percentile(pairs, 0.75)
    med = statistics.median
    rows = [
        ("requests/s, one connection", f"{med(keep):.0f}", f"{min(keep):.0f}-{max(keep):.0f}"),
        ("requests/s, a fresh connection each", f"{med(fresh):.0f}",
         f"{min(fresh):.0f}-{max(fresh):.0f}"),
        ("TX kframes/s without MMDS", f"{med(plain):.0f}", f"{min(plain):.0f}-{max(plain):.0f}"),
        ("TX kframes/s with MMDS on eth0", f"{med(checked):.0f}",
         f"{min(checked):.0f}-{max(checked):.0f}"),
        ("TX with/without, median of pairs", f"{ratio:.3f}", f"{low:.3f}-{high:.3f}"),
    ]
    data = {
        "bench": "mmds", "runs": runs,
        "guest": "probe, 1 vCPU, 128 MiB, polling from CPL 3",
        "keep_requests_per_s": round(med(keep)), "keep_runs": [round(r) for r in keep],
        "fresh_requests_per_s": round(med(fresh)), "fresh_runs": [round(r) for r in fresh],
        "tx_kframes_per_s_without_mmds": round(med(plain), 1),
        "tx_kframes_per_s_with_mmds": round(med(checked), 1),
        "tx_pair_ratio": round(ratio, 4),
        "tx_pair_ratio_p25": round(low, 4),
        "tx_pair_ratio_p75": round(high, 4),
        "tx_within_noise": low <= 1 <= high,
        "loadavg_at_end": [round(load, 2) for load in os.getloadavg()],
    }
    return rows, data
