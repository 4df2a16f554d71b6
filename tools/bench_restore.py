"""Restore to first useful work (issue 18), part of `tools/bench snapshot`: the File backend
(a private mapping of the memory file) beside the Uffd backend with the tests' page-fault
handler (`hosted-tool uffd-handler`, tests/common/uffd_handler.rs, a process of its own that
serves each fault with UFFDIO_COPY from its own private mapping of the memory file), and
mote's own pager (the Lazy backend) without a working set (`working_set_ms` 0, no STATE.ws:
every page on demand or by prefetch) and with one (`Lazy+ws`: STATE.ws recorded once by a
restore that read the pattern, then copied in before the vCPUs run on every timed restore).

The guest: a 2 GiB probe that wrote a pattern over 256 MiB (`poke`), snapshotted while it waits
for a key (`kbd`); one snapshot per M, whose guest reads M MiB of the pattern after the key and
then spins, so that its working set is what the guest touches (M = 16 and 256). Each run spawns
`mote --api-sock` (and, for Uffd, the handler), then times from sending `PUT /snapshot/load`
(resume_vm) to the guest's `peek … match=yes` line: the load, the key (`SendCtrlAltDel`, sent as
soon as the load answers) and the guest reading every word of M MiB it had not touched since the
restore. Lazy and Lazy+ws restore the same snapshot: Lazy through a copy of its state file that
has no `.ws` beside it.

Two page-cache states, labelled, in one run:
  warm  the snapshot's files stay in the page cache between runs (a host restoring one snapshot
        often);
  cold  `sync; echo 3 > /proc/sys/vm/drop_caches` before each timed load (after mote and the
        handler are up, so their own binaries' start-up is not what is timed): the memory file,
        state file and working set come from the disk. The files are in the system's temporary
        directory, which must be on a disk, not tmpfs (checked). Needs root; without it the
        cold case is left out, and said so. The disk's own ceiling: GNU dd of the same M MiB of
        the memory file with the cache dropped, buffered (the kernel's readahead, as a fault
        gets) and with O_DIRECT in 1 MiB reads.
The backends alternate run by run (File, Uffd, Lazy, Lazy+ws, then the next run), so that
other work on the machine falls on all of them alike. The issue's goal: with a cold cache,
Lazy+ws at least 2x faster than File (`restore_cold_file_over_lazy_ws_*`, medians' ratio).

Median, fastest and slowest of N runs per case, the handler's fault count for Uffd, and, on a
host that is itself a VM handing free memory back to its hypervisor, how much it handed back
during the runs (fresh memory is then slow to touch: docs/benchmarks.md).
"""

import os
import re
import select
import shutil
import socket
import statistics
import subprocess
import time

import bench_api
from bench_api import say

RUN_TIMEOUT_S = 60.0
GUEST_MIB = 2048
PATTERN_AT_KIB = 64 << 10
PATTERN_MIB = 256
TOUCH_MIB = (16, 256)
SEED = 5
PAGE = 4096
BACKENDS = ("File", "Uffd", "Lazy", "Lazy+ws")
# The recording restore's window for each M: every page the guest reads faults on its own
# while it lasts (the prefetch waits for its end), 50-120 us each on this PVM host: 256 MiB in
# 3.5-8 s.
RECORD_WINDOW_MS = {16: 2000, 256: 12000}
# Issue 18: with the page cache cold, restore to work with the working set at least twice as
# fast as File.
COLD_TARGET_RATIO = 2.0

PEEK = re.compile(r"^probe: peek at=\S+ pages=(\d+) match=(yes|no)")
FAULTS = re.compile(r"uffd-handler: faults=(\d+)")


class RestoreBenchError(Exception):
    pass


def api(sock_path, method, path, body):
    """One request; (status, ms from sending it to the whole answer)."""
    return bench_api.api(sock_path, method, path, body, RUN_TIMEOUT_S)


def ok(sock_path, method, path, body):
    status, _ = api(sock_path, method, path, body)
    if status != 204:
        raise RestoreBenchError(f"{method} {path}: answered {status}")


def wait_for_path(path, proc, what):
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(path)
            return
        except (FileNotFoundError, ConnectionRefusedError):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RestoreBenchError(f"{what} did not take connections")
            time.sleep(0.0005)


def mote_cmd(mote, sock_path):
    """`mote --api-sock`, its log lines in a file beside the socket: in API mode mote logs to
    stdout (as Firecracker does), which is also the guest's console, and a line logged while
    the guest prints (the prefetch's "fully resident" as the guest reports its read) lands in
    the middle of the guest's line, so that the peek line is never matched and the run looks
    hung while the guest spins after its report."""
    return [mote, "--api-sock", sock_path, "--log-path", sock_path + ".log"]


def stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def make_snapshot(mote, probe, directory, touch_mib):
    """The 2 GiB probe with its pattern, snapshotted at its key wait, that reads `touch_mib` MiB
    after the key: (state, memory file)."""
    sock_path = os.path.join(directory, f"restore-source-{touch_mib}.sock")
    state = os.path.join(directory, f"restore-state-{touch_mib}")
    mem = os.path.join(directory, f"restore-mem-{touch_mib}")
    steps = (f"poke:{PATTERN_AT_KIB}:{PATTERN_MIB * 256}:{SEED},kbd:8,"
             f"peek:{PATTERN_AT_KIB}:{touch_mib * 256}:{SEED},spin")
    proc = subprocess.Popen(mote_cmd(mote, sock_path), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        wait_for_path(sock_path, proc, "mote")
        ok(sock_path, "PUT", "/boot-source", {
            "kernel_image_path": probe,
            "boot_args": f"console=ttyS0 reboot=k panic=1 pci=off probe.run={steps}"})
        ok(sock_path, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": GUEST_MIB})
        ok(sock_path, "PUT", "/actions", {"action_type": "InstanceStart"})
        read_until(proc, lambda line: line.startswith("probe: kbd: waiting"))
        ok(sock_path, "PATCH", "/vm", {"state": "Paused"})
        ok(sock_path, "PUT", "/snapshot/create",
           {"snapshot_type": "Full", "snapshot_path": state, "mem_file_path": mem})
    finally:
        stop(proc)
    return state, mem


def read_until(proc, done):
    """Reads mote's stdout line by line until `done(line)`; returns that line."""
    partial = b""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    fd = proc.stdout.fileno()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RestoreBenchError("the probe never printed what was awaited")
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            raise RestoreBenchError("mote's console closed")
        partial += chunk
        *lines, partial = partial.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace").strip()
            if done(line):
                return line


def drop_caches():
    """Writes back and drops the whole page cache (root only)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as knob:
        knob.write("3\n")


def one_run(mote, tool, directory, snap, backend, touch_mib, cold, index):
    """ms from sending the load to the guest's match for `touch_mib` MiB; the handler's
    faults (None but for Uffd). `snap`: the Snap to restore; `cold`: drop the page cache
    just before the load."""
    sock_path = os.path.join(directory, f"restore-{index}.sock")
    handler_sock = os.path.join(directory, f"handler-{index}.sock")
    for path in (sock_path, handler_sock):
        if os.path.exists(path):
            os.unlink(path)
    handler = None
    if backend == "Uffd":
        handler = subprocess.Popen([tool, "uffd-handler", handler_sock, snap.mem],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True)
        # Its socket listens once it exists (bind and listen are one call); connecting to
        # check would be taken as the monitor.
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not os.path.exists(handler_sock):
            if handler.poll() is not None or time.monotonic() > deadline:
                raise RestoreBenchError("the handler did not start")
            time.sleep(0.0005)
        path = handler_sock
    else:
        path = snap.mem
    proc = subprocess.Popen(mote_cmd(mote, sock_path), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    pages = touch_mib * 256
    try:
        wait_for_path(sock_path, proc, "mote")
        body = {"snapshot_path": snap.state, "resume_vm": True,
                "mem_backend": {"backend_type": backend, "backend_path": path}}
        if backend.startswith("Lazy"):
            # No recording in a timed run: Lazy restores through the state file's copy that
            # has no working set, Lazy+ws through the one beside which it was recorded.
            state = snap.state if backend == "Lazy+ws" else snap.state_without_ws
            body = {"snapshot_path": state, "resume_vm": True,
                    "mem_backend": {"backend_type": "Lazy", "backend_path": path,
                                    "working_set_ms": 0}}
        if cold:
            drop_caches()
        start = time.perf_counter_ns()
        status, _ = api(sock_path, "PUT", "/snapshot/load", body)
        if status != 204:
            raise RestoreBenchError(f"{backend} load answered {status}")
        ok(sock_path, "PUT", "/actions", {"action_type": "SendCtrlAltDel"})

        def matched(line):
            found = PEEK.match(line)
            return found is not None and int(found.group(1)) == pages

        try:
            line = read_until(proc, matched)
        except RestoreBenchError as err:
            raise RestoreBenchError(f"{backend}, {touch_mib} MiB, {'cold' if cold else 'warm'}: "
                                    f"{err}") from err
        elapsed = (time.perf_counter_ns() - start) / 1e6
        if "match=yes" not in line:
            raise RestoreBenchError(f"{backend}: the guest read other bytes: {line}")
    finally:
        stop(proc)
    faults = None
    if handler is not None:
        out, _ = handler.communicate(timeout=RUN_TIMEOUT_S)
        found = FAULTS.search(out)
        if not found:
            raise RestoreBenchError(f"the handler did not report: {out!r}")
        faults = int(found.group(1))
    return elapsed, faults


def working_set_path(state):
    return state + ".ws"


def record_working_set(mote, directory, state, mem, touch_mib):
    """One Lazy restore that records the working set of the guest reading `touch_mib` MiB
    (a window long enough for every page of it to fault one by one: the prefetch waits for
    the window's end); returns its size in pages."""
    ws = working_set_path(state)
    if os.path.exists(ws):
        os.unlink(ws)
    sock_path = os.path.join(directory, "restore-record.sock")
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    proc = subprocess.Popen(mote_cmd(mote, sock_path), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        wait_for_path(sock_path, proc, "mote")
        start = time.monotonic()
        ok(sock_path, "PUT", "/snapshot/load", {
            "snapshot_path": state, "resume_vm": True,
            "mem_backend": {"backend_type": "Lazy", "backend_path": mem,
                            "working_set_ms": RECORD_WINDOW_MS[touch_mib]}})
        ok(sock_path, "PUT", "/actions", {"action_type": "SendCtrlAltDel"})
        pages = touch_mib * 256
        read_until(proc, lambda line: (found := PEEK.match(line)) is not None
                   and int(found.group(1)) == pages)
        if time.monotonic() - start > RECORD_WINDOW_MS[touch_mib] / 1000:
            raise RestoreBenchError(f"reading {touch_mib} MiB took longer than the "
                                    f"{RECORD_WINDOW_MS[touch_mib]} ms recording window")
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not os.path.exists(ws):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RestoreBenchError("no working set was recorded")
            time.sleep(0.01)
    finally:
        stop(proc)
    # The header (48 bytes), 4 bytes a page, the CRC (8).
    return (os.path.getsize(ws) - 56) // 4


class Snap:
    """One snapshot of the benchmark: its state file, a copy of it with no working set beside
    it (for Lazy), and its memory file."""

    def __init__(self, state, mem):
        self.state, self.mem = state, mem
        self.state_without_ws = state + "-nows"
        shutil.copyfile(state, self.state_without_ws)


def on_tmpfs(directory):
    """Whether `directory` is on tmpfs (or ramfs): its pages are the page cache itself."""
    best, fstype = "", ""
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            _, point, kind, *_ = line.split()
            point = point.replace("\\040", " ")
            real = os.path.realpath(directory)
            if (real == point or real.startswith(point.rstrip("/") + "/")) and \
                    len(point) > len(best):
                best, fstype = point, kind
    return fstype in ("tmpfs", "ramfs"), best, fstype


PAGE_REPORTING = "/sys/module/page_reporting/parameters"


def reported_kib():
    """The KiB of free memory this (virtual) host has handed back to its hypervisor so far
    (free page reporting), or None where it does not. Memory handed back is given again at
    its next first touch, slowly: fresh memory then costs every backend that fills anonymous
    memory (Uffd, Lazy) far more than File, whose page cache the disk fills."""
    try:
        with open(os.path.join(PAGE_REPORTING, "reported_kib")) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def dd_ms(mem, touch_mib, direct):
    """ms for GNU dd to read the memory file's `touch_mib` MiB of the pattern with the page
    cache dropped: buffered (readahead, as faults get) or O_DIRECT, in 1 MiB reads."""
    drop_caches()
    flags = ["iflag=direct"] if direct else []
    start = time.perf_counter_ns()
    subprocess.run(["dd", f"if={mem}", "of=/dev/null", "bs=1M", f"skip={PATTERN_AT_KIB >> 10}",
                    f"count={touch_mib}", *flags], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return (time.perf_counter_ns() - start) / 1e6


def summary(times):
    return round(statistics.median(times), 2), round(min(times), 2), round(max(times), 2)


def bench(mote, probe, tool, directory, runs):
    """(rows, results) for `tools/bench snapshot`."""
    say(f"snapshot: restore to work, a {GUEST_MIB} MiB probe with {PATTERN_MIB} MiB written")
    tmpfs, mount_point, fstype = on_tmpfs(directory)
    caches = ["warm"]
    skipped = None
    if os.geteuid() != 0:
        skipped = "not root: the page cache cannot be dropped"
    elif tmpfs:
        skipped = f"{directory} is on {fstype} ({mount_point}): no disk to read from"
    else:
        caches.append("cold")
    if skipped:
        say(f"snapshot: restore to work with a cold page cache left out: {skipped}")
    rows = []
    results = {"restore_runs": runs, "restore_cold_measured": skipped is None,
               "restore_files_on": f"{mount_point} ({fstype})"}
    reported_before = reported_kib()
    if skipped:
        results["restore_cold_skipped"] = skipped
        rows.append(("cold page cache: left out", "", "", ""))
        rows.append((f"  ({skipped})", "", "", ""))
    snaps = {}
    for touch in TOUCH_MIB:
        snap = Snap(*make_snapshot(mote, probe, directory, touch))
        ws_pages = record_working_set(mote, directory, snap.state, snap.mem, touch)
        results[f"restore_{touch}mib_working_set_pages"] = ws_pages
        rows.append((f"working set recorded, {touch} MiB read (pages)", ws_pages, "", ""))
        snaps[touch] = snap
    medians = {}
    for cache in caches:
        cold = cache == "cold"
        for touch in TOUCH_MIB:
            snap = snaps[touch]
            say(f"snapshot: {runs} runs of restore to {touch} MiB read, {cache} page cache, "
                f"each of {', '.join(BACKENDS)} in turn")
            for backend in BACKENDS:  # warm-up
                one_run(mote, tool, directory, snap, backend, touch, cold, 0)
            measured = {backend: [] for backend in BACKENDS}
            for index in range(runs):
                for backend in BACKENDS:
                    measured[backend].append(
                        one_run(mote, tool, directory, snap, backend, touch, cold, index))
            prefix = "restore_cold" if cold else "restore"
            for backend in BACKENDS:
                times = [ms for ms, _ in measured[backend]]
                median, low, high = summary(times)
                medians[cache, touch, backend] = median
                key = f"{prefix}_to_{touch}mib_read_ms_{backend.lower().replace('+', '_')}"
                results[f"{key}_median"] = median
                results[f"{key}_min"] = low
                results[f"{key}_max"] = high
                rows.append((f"{cache}: restore + read {touch} MiB, {backend}, median (ms)",
                             median, "", ""))
                rows.append(("  min-max (ms)", f"{low:.1f}-{high:.1f}", "", ""))
                if backend == "Uffd":
                    faults = statistics.median(f for _, f in measured[backend])
                    results[f"{prefix}_to_{touch}mib_read_uffd_faults"] = faults
                    rows.append(("  faults the handler served, median", int(faults), "", ""))
            if cold:
                ratio = round(medians[cache, touch, "File"] / medians[cache, touch, "Lazy+ws"], 2)
                results[f"restore_cold_file_over_lazy_ws_{touch}mib"] = ratio
                rows.append((f"cold: File / Lazy+ws, {touch} MiB (medians)", ratio,
                             f">= {COLD_TARGET_RATIO:g}", ""))
                for direct in (False, True):
                    times = [dd_ms(snap.mem, touch, direct) for _ in range(runs)]
                    median, low, high = summary(times)
                    name = "direct" if direct else "buffered"
                    results[f"restore_cold_dd_{touch}mib_{name}_ms_median"] = median
                    results[f"restore_cold_dd_{touch}mib_{name}_ms_min"] = low
                    results[f"restore_cold_dd_{touch}mib_{name}_ms_max"] = high
                    rows.append((f"cold: disk, dd {touch} MiB of the memory file, {name} (ms)",
                                 median, "", ""))
                    rows.append(("  min-max (ms)", f"{low:.1f}-{high:.1f}", "", ""))
    reported_after = reported_kib()
    if reported_before is not None and reported_after is not None:
        # On such a host the figures swing with how much of the memory each run gets was
        # handed back just before (docs/benchmarks.md, issue 18's third pass).
        reported = round((reported_after - reported_before) / 1024)
        results["restore_host_free_pages_reported_mib"] = reported
        rows.append(("host: free memory handed back to its hypervisor meanwhile (MiB)",
                     reported, "", ""))
    if not skipped:
        results["restore_cold_target_ratio"] = COLD_TARGET_RATIO
        results["restore_cold_meets_target"] = all(
            results[f"restore_cold_file_over_lazy_ws_{touch}mib"] >= COLD_TARGET_RATIO
            for touch in TOUCH_MIB)
    return rows, results
