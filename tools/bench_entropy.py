"""The `entropy` benchmark of tools/bench: how fast the virtio-rng device fills a guest's
requests (issue 16).

  requests of 64 bytes, and of 4 KiB
             `mote run --kernel PROBE --entropy`: the probe (`rng-bench:0:LEN:COUNT`) makes
             COUNT requests of LEN bytes, each waited for before the next (polling from CPL 3),
             after a warm-up of a tenth as many; timed from `rng-bench start` to
             `rng-bench done`.
             64 bytes shows the per-request cost (what Linux's hwrng reads are: 64 bytes
             each time it tops up its pool), 4 KiB the throughput.
  host getrandom, 4 KiB
             the ceiling: Python's `os.getrandom` of 4 KiB in a loop on the host, the call
             the device makes for each request.
Median, slowest and fastest of N runs.
"""

import os
import re
import statistics
import subprocess
import sys
import time

RUN_TIMEOUT_S = 120.0
CASES = ((64, 100_000), (4096, 50_000))
DONE = re.compile(r"^probe: rng-bench done bytes=(\d+)")


class EntropyBenchError(Exception):
    pass


def say(message):
    print(f"bench: {message}", file=sys.stderr, flush=True)


def one_run(mote, probe, length, count):
    """Seconds for the timed step, and the bytes it got."""
    warm = max(count // 10, 10)
    steps = f"rng-bench:0:{length}:{count}:{warm}"
    cmd = [mote, "run", "--kernel", probe, "--entropy", "--append", f"probe.run={steps}"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    started = done = None
    got = 0
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        for raw in proc.stdout:
            now = time.perf_counter()
            line = raw.decode(errors="replace").strip()
            if line == "probe: rng-bench start":
                started = now
            elif (match := DONE.match(line)) is not None:
                done, got = now, int(match.group(1))
            elif "error" in line or "panic" in line:
                raise EntropyBenchError(f"the probe reported {line!r}")
            if time.monotonic() > deadline:
                raise EntropyBenchError("mote ran too long")
        proc.wait(timeout=RUN_TIMEOUT_S)
        if proc.returncode != 0:
            raise EntropyBenchError(f"mote exited {proc.returncode}: "
                                    + proc.stderr.read().decode(errors="replace").strip())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if started is None or done is None:
        raise EntropyBenchError("no rng-bench start and done lines from the probe")
    if got != length * count:
        raise EntropyBenchError(f"{count} requests of {length} bytes got {got} bytes")
    return done - started


def host_getrandom_mib_per_s(seconds=0.5):
    """The host's getrandom of 4 KiB at a time, for as long as `seconds`."""
    calls = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(256):
            os.getrandom(4096)
        calls += 256
    return calls * 4096 / elapsed / (1 << 20)


def bench(mote, probe, runs):
    """Returns (table rows, JSON dict) in tools/bench's shape."""
    rates = {length: [] for length, _ in CASES}
    host = []
    for run in range(runs):
        for length, count in CASES:
            seconds = one_run(mote, probe, length, count)
            rates[length].append((count / seconds, count * length / seconds / (1 << 20)))
        host.append(host_getrandom_mib_per_s())
        say(f"entropy run {run + 1}: "
            + ", ".join(f"{length} B: {rates[length][-1][0] / 1000:.0f} k requests/s "
                        f"{rates[length][-1][1]:.0f} MiB/s" for length, _ in CASES)
            + f"; host getrandom {host[-1]:.0f} MiB/s")
    med = statistics.median
    rows = []
    data = {"bench": "entropy", "runs": runs,
            "guest": "probe, 1 vCPU, 128 MiB, polling from CPL 3"}
    for length, _ in CASES:
        requests = [r for r, _ in rates[length]]
        mib = [m for _, m in rates[length]]
        rows.append((f"{length}-byte requests, k requests/s", f"{med(requests) / 1000:.0f}",
                     f"{min(requests) / 1000:.0f}-{max(requests) / 1000:.0f}"))
        rows.append((f"{length}-byte requests, MiB/s", f"{med(mib):.0f}",
                     f"{min(mib):.0f}-{max(mib):.0f}"))
        data[f"requests_per_s_{length}"] = round(med(requests))
        data[f"mib_per_s_{length}"] = round(med(mib), 1)
        data[f"mib_per_s_{length}_runs"] = [round(m, 1) for m in mib]
    rows.append(("host getrandom, 4 KiB calls, MiB/s", f"{med(host):.0f}",
                 f"{min(host):.0f}-{max(host):.0f}"))
    data["host_getrandom_mib_per_s"] = round(med(host), 1)
    data["loadavg_at_end"] = [round(load, 2) for load in os.getloadavg()]
    return rows, data
