"""The `rate-limiter` benchmark of tools/bench: what an idle rate limiter costs (issue 16).

An idle limiter has both buckets (bandwidth and ops) configured ten times above the rate the
case reaches unlimited, refilled every 100 ms: every request or frame goes through the
limiter's arithmetic (refill, check, take) and its bucket never runs dry, so it never throttles
(the run's metrics must say so: no throttled event). Each case runs without a limiter and with
the idle one alternately in the same minutes (which goes first alternates too, so that neither
always meets a warmer host), N runs of each. The table gives both medians and the ratio, as
the median of the N pairs' ratios (idle limiter over none; a pair ran back to back, so it saw
much the same load on a shared host), which should be within noise: the middle half of the
pairs' ratios (25th to 75th percentile) should hold 1. The spread of the runs without a
limiter (slowest to fastest, over the median) is shown too.

  blk 4 KiB, depth 1 and 32
             `blk-bench` 4 KiB reads moving 256 MiB of a 256 MiB file of random data in
             /dev/shm, after a 32 MiB warm-up step, as `tools/bench blk` does; the drive's
             `rate_limiter` is the idle one. kIOPS.
  net        `net-bench` 1514-byte frames in batches of 32, through a TAP in a network
             namespace made for the run (`tools/bench_net.py`'s): guest to host with an idle
             `tx_rate_limiter`, host to guest (a flooding AF_PACKET sender) with an idle
             `rx_rate_limiter`. kframes/s.

mote runs as a spawner would run it: `mote --no-api --config-file FILE --metrics-path FILE`,
1 vCPU and 128 MiB. Each case is timed from the probe's second `… start` line to its second
`… done` line on mote's stdout.
"""

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import bench_net

GUEST_MIB = 128
BLK_DIR = "/dev/shm"
BLK_FILE_MIB = 256
BLK_WARMUP_MIB = 32
RUN_TIMEOUT_S = 120.0
# How far above the unlimited rate the idle buckets are, and their refill time.
HEADROOM = 10
REFILL_MS = 100

# key, label, device, probe steps (a warm-up step, then the timed one), what the timed step
# moves (requests or frames), unit, the unlimited rate to size the idle buckets on (per
# second: requests or frames, and bytes).
CASES = [
    ("blk_4k_d1", "blk 4 KiB reads, depth 1 (kIOPS)", "blk",
     f"blk-init,blk-bench:read:8:{BLK_WARMUP_MIB}:1,blk-bench:read:8:{BLK_FILE_MIB}:1",
     (BLK_FILE_MIB << 20) // 4096, "kIOPS", (400_000, 400_000 * 4096)),
    ("blk_4k_d32", "blk 4 KiB reads, depth 32 (kIOPS)", "blk",
     f"blk-init,blk-bench:read:8:{BLK_WARMUP_MIB}:32,blk-bench:read:8:{BLK_FILE_MIB}:32",
     (BLK_FILE_MIB << 20) // 4096, "kIOPS", (400_000, 400_000 * 4096)),
    ("net_g2h_32", "net guest to host, batches of 32 (kframes/s)", "tx",
     "net-init,net-bench:tx:50000:32,net-bench:tx:500000:32",
     500_000, "kframes/s", (1_500_000, 1_500_000 * 1514)),
    ("net_h2g_32", "net host to guest, batches of 32 (kframes/s)", "rx",
     "net-init,net-bench:rx:30000:32,net-bench:rx:300000:32",
     300_000, "kframes/s", (1_500_000, 1_500_000 * 1514)),
]

BLK_DONE = re.compile(r"^probe: blk-bench done requests=(\d+) errors=(\d+)$")
NET_DONE = re.compile(r"^probe: net-bench done frames=(\d+)\b")
FAILURE = re.compile(r"\b(error|panic|timeout)\b")  # not "errors=N"


class RateLimitBenchError(Exception):
    pass


def say(message):
    print(f"bench: {message}", file=sys.stderr, flush=True)


def idle_limiter(rate):
    """Buckets HEADROOM times above `rate` (requests, bytes a second), refilled every
    REFILL_MS: never empty at the rate the case reaches."""
    per_refill = 1000 // REFILL_MS
    ops, nbytes = rate
    return {
        "bandwidth": {"size": HEADROOM * nbytes // per_refill, "refill_time": REFILL_MS},
        "ops": {"size": HEADROOM * ops // per_refill, "refill_time": REFILL_MS},
    }


def config(probe, steps, device, image, limiter):
    boot = {"kernel_image_path": probe,
            "boot_args": f"console=ttyS0 reboot=k panic=1 pci=off probe.run={steps}"}
    result = {"boot-source": boot,
              "machine-config": {"vcpu_count": 1, "mem_size_mib": GUEST_MIB}}
    if device == "blk":
        drive = {"drive_id": "rootfs", "path_on_host": image, "is_root_device": True,
                 "is_read_only": False}
        if limiter:
            drive["rate_limiter"] = limiter
        result["drives"] = [drive]
    else:
        eth0 = {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": bench_net.GUEST_MAC}
        if limiter:
            eth0[f"{device}_rate_limiter"] = limiter
        result["network-interfaces"] = [eth0]
    return result


def throttled(metrics_path, device):
    """Throttled events the run's metrics counted for its device (every line summed)."""
    names = {"blk": ("block", "rate_limiter_throttled_events"),
             "tx": ("net", "tx_rate_limiter_throttled"),
             "rx": ("net", "rx_rate_limiter_throttled")}
    section, field = names[device]
    total = 0
    with open(metrics_path) as f:
        for line in f:
            total += json.loads(line).get(section, {}).get(field, 0)
    return total


def one_run(mote, probe, case, image, ns, directory, limited):
    """Seconds the timed step of `case` took, with the idle limiter or without one."""
    key, _, device, steps, moved, _, rate = case
    limiter = idle_limiter(rate) if limited else None
    config_path = os.path.join(directory, "config.json")
    metrics_path = os.path.join(directory, "metrics.json")
    if os.path.exists(metrics_path):
        os.unlink(metrics_path)
    with open(config_path, "w") as f:
        json.dump(config(probe, steps, device, image, limiter), f)
    cmd = [mote, "--no-api", "--config-file", config_path, "--metrics-path", metrics_path,
           *bench_net.LOG_TO_STDERR]
    if ns is not None:
        cmd = ns.exec(*cmd)
    what = f"{key} ({'idle limiter' if limited else 'no limiter'})"
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    sender = None
    try:
        if device == "rx":
            sender = subprocess.Popen(ns.exec(sys.executable, "-c", bench_net.SENDER,
                                              bench_net.GUEST_MAC),
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        starts, dones = [], []
        deadline = time.monotonic() + RUN_TIMEOUT_S
        for raw in proc.stdout:
            now = time.perf_counter()
            line = raw.decode(errors="replace").strip()
            if line.endswith("-bench start"):
                starts.append(now)
            elif BLK_DONE.match(line) or NET_DONE.match(line):
                dones.append((now, line))
            elif FAILURE.search(line):
                raise RateLimitBenchError(f"{what}: the probe reported {line!r}")
            if time.monotonic() > deadline:
                raise RateLimitBenchError(f"{what}: mote ran too long")
        proc.wait(timeout=RUN_TIMEOUT_S)
        if proc.returncode != 0:
            raise RateLimitBenchError(f"{what}: mote exited {proc.returncode}: "
                                      + proc.stderr.read().decode(errors="replace").strip())
    finally:
        for p in (sender, proc):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    if len(starts) != 2 or len(dones) != 2:
        raise RateLimitBenchError(f"{what}: expected two bench steps, saw {len(starts)} "
                                  f"starts and {len(dones)} ends")
    done_at, line = dones[1]
    match = BLK_DONE.match(line) or NET_DONE.match(line)
    if int(match.group(1)) != moved or (device == "blk" and match.group(2) != "0"):
        raise RateLimitBenchError(f"{what}: {line!r}, expected {moved} without errors")
    if limited and throttled(metrics_path, device):
        raise RateLimitBenchError(f"{what}: the idle limiter throttled; raise HEADROOM")
    return done_at - starts[1]


def percentile(values, fraction):
    """Nearest-rank percentile (as tools/bench's)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))
    return ordered[int(rank) - 1]


def make_random_file(mib):
    fd, path = tempfile.mkstemp(prefix="mote-bench-rl-", suffix=".img", dir=BLK_DIR)
    try:
        with os.fdopen(fd, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(1 << 20))
    except BaseException:
        os.unlink(path)
        raise
    return path


def bench(mote, probe, runs):
    """Runs every case `runs` times without and with the idle limiter, alternately; returns
    (table rows, JSON dict) in tools/bench's shape."""
    if not os.path.isdir(BLK_DIR):
        raise RateLimitBenchError(f"no {BLK_DIR} (tmpfs) for the blk cases' file")
    say(f"rate-limiter: writing {BLK_FILE_MIB} MiB of random data to {BLK_DIR}")
    image = make_random_file(BLK_FILE_MIB)
    ns = None
    measured = {}
    try:
        ns = bench_net.Namespace()
        with tempfile.TemporaryDirectory(prefix="mote-bench-rl-") as directory:
            for case in CASES:
                key, label, device, _, moved, _, _ = case
                case_ns = None if device == "blk" else ns
                say(f"rate-limiter: {label}: {runs} runs without and {runs} with an idle limiter")
                rates = {False: [], True: []}
                for run in range(runs):
                    # Alternate which goes first, so that neither always follows the other.
                    for limited in ((False, True) if run % 2 == 0 else (True, False)):
                        seconds = one_run(mote, probe, case, image, case_ns, directory, limited)
                        rates[limited].append(moved / seconds / 1000)
                measured[key] = rates
                say(f"rate-limiter: {key}: none {statistics.median(rates[False]):.0f}, "
                    f"idle limiter {statistics.median(rates[True]):.0f}")
    except bench_net.NetBenchError as err:
        raise RateLimitBenchError(str(err)) from err
    finally:
        os.unlink(image)
        if ns is not None:
            ns.close()

    rows = []
    data = {"bench": "rate-limiter", "runs": runs, "headroom": HEADROOM,
            "refill_time_ms": REFILL_MS,
            "guest": f"probe, 1 vCPU, {GUEST_MIB} MiB, polling from CPL 3",
            # On a shared host the load says how far to trust the figures.
            "loadavg_at_end": [round(load, 2) for load in os.getloadavg()]}
    within = True
    for key, label, *_ in CASES:
        none, idle = measured[key][False], measured[key][True]
        none_median, idle_median = statistics.median(none), statistics.median(idle)
        pairs = [i / n for i, n in zip(idle, none)]
        ratio = statistics.median(pairs)
        low, high = percentile(pairs, 0.25), percentile(pairs, 0.75)
        spread = (max(none) - min(none)) / none_median
        ok = low <= 1 <= high
        within = within and ok
        rows.append((label, f"{none_median:.0f}", f"{min(none):.0f}-{max(none):.0f}",
                     f"{idle_median:.0f}", f"{min(idle):.0f}-{max(idle):.0f}",
                     f"{ratio:.3f}", f"{low:.3f}-{high:.3f}", f"{spread:.2f}"))
        data.update({
            f"{key}_none_median": round(none_median, 1),
            f"{key}_none_runs": [round(r, 1) for r in none],
            f"{key}_idle_limiter_median": round(idle_median, 1),
            f"{key}_idle_limiter_runs": [round(r, 1) for r in idle],
            f"{key}_ratio": round(ratio, 4),
            f"{key}_ratio_of_medians": round(idle_median / none_median, 4),
            f"{key}_pair_ratio_p25": round(low, 4),
            f"{key}_pair_ratio_p75": round(high, 4),
            f"{key}_none_spread": round(spread, 4),
            f"{key}_within_noise": ok,
        })
    data["meets_targets"] = within
    return rows, data
