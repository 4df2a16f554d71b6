"""What the benchmark scripts share: their `say` and one request to mote's API socket.

Imported by tools/bench_restore.py, tools/bench_diff.py and tools/bench_mmds.py (they run
from tools/, so it is on their path).
"""

import json
import socket
import sys
import time


def say(message):
    print(f"bench: {message}", file=sys.stderr, flush=True)


def api(sock_path, method, path, body, timeout_s):
    """One request; (status, ms from sending it to the whole head of the answer). Status 0
    when the answer is not HTTP."""
    data = json.dumps(body).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
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
