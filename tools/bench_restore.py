"""Restore to first useful work (issue 18), part of `tools/bench snapshot`: the File backend
(a private mapping of the memory file) beside the Uffd backend with the tests' page-fault
handler (`hosted-tool uffd-handler`, tests/common/uffd_handler.rs, a process of its own that
serves each fault with UFFDIO_COPY from its own private mapping of the memory file), and
mote's own pager (the Lazy backend) without a working set (`working_set_ms` 0, no STATE.ws:
every page on demand or by prefetch) and with one (`Lazy+ws`: STATE.ws recorded once by a
restore that read the pattern, then copied in before the vCPUs run on every timed restore).

The guest: a 2 GiB probe that wrote a pattern over 256 MiB (`poke`), snapshotted while it waits
for a key (`kbd`). Each run spawns `mote --api-sock` (and, for Uffd, the handler), then times
from sending `PUT /snapshot/load` (resume_vm) to the guest's `peek … match=yes` line for M MiB
of the pattern: the load, the key (`SendCtrlAltDel`, sent as soon as the load answers) and the
guest reading every word of M MiB it had not touched since the restore. M = 16 and 256. The
memory file stays in the page cache between runs (a warm cache, as a host restoring one snapshot
often has); the page cache is not dropped, since other work shares this machine.

Median, fastest and slowest of N runs per case, and the handler's fault count for Uffd.
"""

import json
import os
import re
import select
import socket
import statistics
import subprocess
import sys
import time

RUN_TIMEOUT_S = 60.0
GUEST_MIB = 2048
PATTERN_AT_KIB = 64 << 10
PATTERN_MIB = 256
TOUCH_MIB = (16, 256)
SEED = 5
PAGE = 4096

PEEK = re.compile(r"^probe: peek at=\S+ pages=(\d+) match=(yes|no)")
FAULTS = re.compile(r"uffd-handler: faults=(\d+)")


class RestoreBenchError(Exception):
    pass


def say(message):
    print(f"bench: {message}", file=sys.stderr, flush=True)


def api(sock_path, method, path, body):
    """One request; (status, ms from sending it to the whole answer)."""
    data = json.dumps(body).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(RUN_TIMEOUT_S)
        sock.connect(sock_path)
        start = time.perf_counter_ns()
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                     f"application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
        return status, (time.perf_counter_ns() - start) / 1e6


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


def stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def make_snapshot(mote, probe, directory):
    """The 2 GiB probe with its pattern, snapshotted at its key wait: (state, memory file)."""
    sock_path = os.path.join(directory, "restore-source.sock")
    state = os.path.join(directory, "restore-state")
    mem = os.path.join(directory, "restore-mem")
    # Each run reads one of the sizes (the first peek step that size's run waits for).
    steps = (f"poke:{PATTERN_AT_KIB}:{PATTERN_MIB * 256}:{SEED},kbd:8,"
             + ",".join(f"peek:{PATTERN_AT_KIB}:{mib * 256}:{SEED}" for mib in TOUCH_MIB)
             + ",spin")
    proc = subprocess.Popen([mote, "--api-sock", sock_path], stdin=subprocess.DEVNULL,
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


def one_run(mote, tool, directory, state, mem, backend, touch_mib, index):
    """ms from sending the load to the guest's match for `touch_mib` MiB; the handler's
    faults (None for File)."""
    sock_path = os.path.join(directory, f"restore-{index}.sock")
    handler_sock = os.path.join(directory, f"handler-{index}.sock")
    for path in (sock_path, handler_sock):
        if os.path.exists(path):
            os.unlink(path)
    handler = None
    if backend == "Uffd":
        handler = subprocess.Popen([tool, "uffd-handler", handler_sock, mem],
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
        path = mem
    proc = subprocess.Popen([mote, "--api-sock", sock_path], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    pages = touch_mib * 256
    try:
        wait_for_path(sock_path, proc, "mote")
        body = {"snapshot_path": state, "resume_vm": True,
                "mem_backend": {"backend_type": backend, "backend_path": path}}
        if backend.startswith("Lazy"):
            # No recording in a timed run: Lazy has no working set, Lazy+ws loads its own.
            body["mem_backend"] = {"backend_type": "Lazy", "backend_path": path,
                                   "working_set_ms": 0}
        start = time.perf_counter_ns()
        status, _ = api(sock_path, "PUT", "/snapshot/load", body)
        if status != 204:
            raise RestoreBenchError(f"{backend} load answered {status}")
        ok(sock_path, "PUT", "/actions", {"action_type": "SendCtrlAltDel"})

        def matched(line):
            found = PEEK.match(line)
            return found is not None and int(found.group(1)) == pages

        line = read_until(proc, matched)
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


def record_working_set(mote, directory, state, mem):
    """One Lazy restore that records the working set of a guest reading the whole pattern
    (the window is the default second); returns its size in pages."""
    ws = working_set_path(state)
    if os.path.exists(ws):
        os.unlink(ws)
    sock_path = os.path.join(directory, "restore-record.sock")
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    proc = subprocess.Popen([mote, "--api-sock", sock_path], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        wait_for_path(sock_path, proc, "mote")
        ok(sock_path, "PUT", "/snapshot/load", {
            "snapshot_path": state, "resume_vm": True,
            "mem_backend": {"backend_type": "Lazy", "backend_path": mem}})
        ok(sock_path, "PUT", "/actions", {"action_type": "SendCtrlAltDel"})
        pages = PATTERN_MIB * 256
        read_until(proc, lambda line: (found := PEEK.match(line)) is not None
                   and int(found.group(1)) == pages)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not os.path.exists(ws):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RestoreBenchError("no working set was recorded")
            time.sleep(0.01)
    finally:
        stop(proc)
    # The header (48 bytes), 4 bytes a page, the CRC (8).
    return (os.path.getsize(ws) - 56) // 4


def bench(mote, probe, tool, directory, runs):
    """(rows, results) for `tools/bench snapshot`."""
    say(f"snapshot: restore to work, a {GUEST_MIB} MiB probe with {PATTERN_MIB} MiB written")
    state, mem = make_snapshot(mote, probe, directory)
    rows = []
    results = {"restore_runs": runs}
    for touch in TOUCH_MIB:
        for backend in ("File", "Uffd", "Lazy", "Lazy+ws"):
            if backend == "Lazy" and os.path.exists(working_set_path(state)):
                os.unlink(working_set_path(state))
            if backend == "Lazy+ws":
                ws_pages = record_working_set(mote, directory, state, mem)
                results["restore_working_set_pages"] = ws_pages
                rows.append(("working set recorded (pages)", ws_pages, "", ""))
            say(f"snapshot: {runs} runs of restore to {touch} MiB read, {backend}")
            one_run(mote, tool, directory, state, mem, backend, touch, 0)  # warm-up
            measured = [one_run(mote, tool, directory, state, mem, backend, touch, i)
                        for i in range(runs)]
            times = [ms for ms, _ in measured]
            median = round(statistics.median(times), 2)
            key = f"restore_to_{touch}mib_read_ms_{backend.lower().replace('+', '_')}"
            results[f"{key}_median"] = median
            results[f"{key}_min"] = round(min(times), 2)
            results[f"{key}_max"] = round(max(times), 2)
            label = f"restore + read {touch} MiB, {backend}, median (ms)"
            rows.append((label, median, "", ""))
            rows.append(("  min-max (ms)", f"{min(times):.1f}-{max(times):.1f}", "", ""))
            if backend == "Uffd":
                faults = statistics.median(f for _, f in measured)
                results[f"restore_to_{touch}mib_read_uffd_faults"] = faults
                rows.append(("  faults the handler served, median", int(faults), "", ""))
    return rows, results
