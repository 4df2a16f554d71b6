"""Diff snapshots (issue 18), part of `tools/bench snapshot`: what a Diff snapshot costs after the
guest wrote 1 % of its memory, against the Full snapshot before it.

Each run boots a 2 GiB probe with dirty-page tracking on (`track_dirty_pages` in
machine-config) that writes a pattern over 256 MiB from 64 MiB (as the restore benchmark's
guest: memory in use, so that the Full snapshot has data to write) and waits for a key
(`kbd`); it is paused and a Full snapshot taken, resumed and sent the key, and it then writes
another pattern (`poke`, another seed) over 1 % of its memory (5243 pages, 20.5 MiB) and waits
again; it is paused and a Diff snapshot taken. Two layouts of the 1 %, a fresh guest each:
  contiguous  5243 pages in one run from 64 MiB (inside the 256 MiB written before);
  spread      one page in every 96 from 64 MiB to 2030 MiB (5243 runs of one page, 682 of them
              inside the 256 MiB: the most extents a diff of this size can have here).
Each snapshot is timed from sending `PUT /snapshot/create` to its 204 (the files written to
the page cache: mote does not sync them; everything dirty is synced before each snapshot and
before the rebase, outside the times, so that one run's write-back does not slow the next),
and its memory file measured as allocated on disk
(`st_blocks` * 512: the files are sparse, zero pages and the pages a diff leaves out are
holes), beside its apparent size. Then `mote snapshot rebase --base-file FULL --diff-file
DIFF` (a new file from the base's data and the diff's, synced, renamed over the base), timed
from spawn to exit. The files are in the system's temporary directory, on a disk here.

Median, fastest and slowest of N runs per layout.
"""

import os
import re
import select
import statistics
import subprocess
import time

import bench_api
from bench_api import say

RUN_TIMEOUT_S = 60.0
GUEST_MIB = 2048
PAGE = 4096
TOUCH_AT_KIB = 64 << 10
# 1 % of 2 GiB, in pages (rounded up).
TOUCH_PAGES = -(-GUEST_MIB * 256 // 100)
SPREAD_STRIDE = 96  # pages: the last one written is at 64 MiB + 5242 * 96 pages = 2030 MiB
BASE_AT_KIB = 64 << 10
BASE_PAGES = 256 * 256  # 256 MiB written before the Full snapshot
BASE_SEED = 5
SEED = 7
LAYOUTS = (("contiguous", 1), ("spread", SPREAD_STRIDE))


class DiffBenchError(Exception):
    pass


def api(sock_path, method, path, body):
    """One request; (status, ms from sending it to the whole answer)."""
    return bench_api.api(sock_path, method, path, body, RUN_TIMEOUT_S)


def ok(sock_path, method, path, body):
    status, elapsed = api(sock_path, method, path, body)
    if status != 204:
        raise DiffBenchError(f"{method} {path}: answered {status}")
    return elapsed


class Console:
    """mote's stdout, read line by line while it runs."""

    def __init__(self, proc):
        self.proc, self.partial, self.lines = proc, b"", []

    def wait_for(self, prefix):
        """The next line that starts with `prefix` (lines before it are passed over)."""
        deadline = time.monotonic() + RUN_TIMEOUT_S
        fd = self.proc.stdout.fileno()
        while True:
            while self.lines:
                line = self.lines.pop(0).decode(errors="replace").strip()
                if line.startswith(prefix):
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                raise DiffBenchError(f"the probe never printed {prefix!r}")
            ready, _, _ = select.select([fd], [], [], min(left, 0.5))
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise DiffBenchError("mote's console closed")
            *lines, self.partial = (self.partial + chunk).split(b"\n")
            self.lines.extend(lines)


def allocated(path):
    return os.stat(path).st_blocks * 512


def one_run(mote, probe, directory, layout, stride, index):
    """One guest: (Full ms, Diff ms, Full allocated bytes, Diff allocated bytes, Diff
    apparent bytes, rebase ms, the diff's extents as rebase counted them)."""
    sock_path = os.path.join(directory, f"diff-{layout}-{index}.sock")
    full_state, full_mem = (os.path.join(directory, f"diff-{layout}-{index}-full.{kind}")
                            for kind in ("state", "mem"))
    diff_state, diff_mem = (os.path.join(directory, f"diff-{layout}-{index}-diff.{kind}")
                            for kind in ("state", "mem"))
    steps = (f"poke:{BASE_AT_KIB}:{BASE_PAGES}:{BASE_SEED},kbd:8,"
             f"poke:{TOUCH_AT_KIB}:{TOUCH_PAGES}:{SEED}:{stride},kbd:8,spin")
    proc = subprocess.Popen([mote, "--api-sock", sock_path], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    console = Console(proc)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not os.path.exists(sock_path):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise DiffBenchError("mote --api-sock did not make its socket")
            time.sleep(0.001)
        time.sleep(0.01)
        ok(sock_path, "PUT", "/boot-source", {
            "kernel_image_path": probe,
            "boot_args": f"console=ttyS0 reboot=k panic=1 pci=off probe.run={steps}"})
        ok(sock_path, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": GUEST_MIB,
                                                 "track_dirty_pages": True})
        ok(sock_path, "PUT", "/actions", {"action_type": "InstanceStart"})
        console.wait_for("probe: poke ")
        console.wait_for("probe: kbd: waiting")
        ok(sock_path, "PATCH", "/vm", {"state": "Paused"})
        os.sync()  # the previous run's files written back: each snapshot starts alike
        full_ms = ok(sock_path, "PUT", "/snapshot/create", {
            "snapshot_type": "Full", "snapshot_path": full_state, "mem_file_path": full_mem})
        ok(sock_path, "PATCH", "/vm", {"state": "Resumed"})
        ok(sock_path, "PUT", "/actions", {"action_type": "SendCtrlAltDel"})
        poked = console.wait_for("probe: poke ")
        if not poked.endswith(f"pages={TOUCH_PAGES}"):
            raise DiffBenchError(f"the probe wrote something else: {poked}")
        console.wait_for("probe: kbd: waiting")
        ok(sock_path, "PATCH", "/vm", {"state": "Paused"})
        os.sync()
        diff_ms = ok(sock_path, "PUT", "/snapshot/create", {
            "snapshot_type": "Diff", "snapshot_path": diff_state, "mem_file_path": diff_mem})
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    sizes = allocated(full_mem), allocated(diff_mem), os.path.getsize(diff_mem)
    os.sync()
    start = time.perf_counter_ns()
    rebase = subprocess.run([mote, "snapshot", "rebase", "--base-file", full_mem,
                             "--diff-file", diff_mem], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    rebase_ms = (time.perf_counter_ns() - start) / 1e6
    if rebase.returncode != 0:
        raise DiffBenchError(f"mote snapshot rebase exited {rebase.returncode}: "
                             f"{rebase.stderr.strip()}")
    found = re.search(r"(\d+) bytes in (\d+) extents", rebase.stdout)
    if not found:
        raise DiffBenchError(f"mote snapshot rebase said {rebase.stdout.strip()!r}")
    for path in (full_state, full_mem, diff_state, diff_mem):
        if os.path.exists(path):
            os.unlink(path)
    return (full_ms, diff_ms, *sizes, rebase_ms, int(found.group(2)), int(found.group(1)))


def mib(size):
    return round(size / (1 << 20), 1)


def bench(mote, probe, directory, runs):
    """(rows, results) for `tools/bench snapshot`."""
    say(f"snapshot: Diff after writing 1 % of a {GUEST_MIB} MiB probe ({TOUCH_PAGES} pages), "
        f"{runs} runs of each layout")
    rows = []
    results = {"diff_runs": runs, "diff_touched_pages": TOUCH_PAGES}
    for layout, stride in LAYOUTS:
        one_run(mote, probe, directory, layout, stride, "warm-up")
        samples = [one_run(mote, probe, directory, layout, stride, index)
                   for index in range(runs)]
        full_ms, diff_ms, full_bytes, diff_bytes, diff_len, rebase_ms, extents, data = (
            list(column) for column in zip(*samples))
        prefix = f"diff_{layout}"
        for name, values in (("full_ms", full_ms), ("diff_ms", diff_ms),
                             ("rebase_ms", rebase_ms)):
            results[f"{prefix}_{name}_median"] = round(statistics.median(values), 2)
            results[f"{prefix}_{name}_min"] = round(min(values), 2)
            results[f"{prefix}_{name}_max"] = round(max(values), 2)
        results[f"{prefix}_full_allocated_bytes"] = statistics.median(full_bytes)
        results[f"{prefix}_diff_allocated_bytes"] = statistics.median(diff_bytes)
        results[f"{prefix}_diff_apparent_bytes"] = statistics.median(diff_len)
        results[f"{prefix}_diff_extents"] = statistics.median(extents)
        results[f"{prefix}_diff_data_bytes"] = statistics.median(data)
        ratio = statistics.median(diff_bytes) / statistics.median(full_bytes)
        results[f"{prefix}_diff_over_full_allocated"] = round(ratio, 3)
        for label, values in ((f"Full snapshot, {layout} (ms)", full_ms),
                              (f"Diff snapshot after 1 % {layout} (ms)", diff_ms),
                              (f"mote snapshot rebase, {layout} (ms)", rebase_ms)):
            rows.append((f"{label}, median", round(statistics.median(values), 2), "", ""))
            rows.append(("  min-max (ms)", f"{min(values):.1f}-{max(values):.1f}", "", ""))
        rows.append((f"Full memory file, {layout}, on disk (MiB)",
                     mib(statistics.median(full_bytes)), "", ""))
        rows.append((f"Diff memory file, {layout}, on disk (MiB)",
                     mib(statistics.median(diff_bytes)), "", ""))
        rows.append(("  its data as rebase counts it (MiB, extents)",
                     f"{mib(statistics.median(data))}, {int(statistics.median(extents))}",
                     "", ""))
        rows.append(("  Diff / Full on disk", round(ratio, 3), "", ""))
    return rows, results
