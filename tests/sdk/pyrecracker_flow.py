"""pyrecracker's whole flow against mote: its VMManager spawns `sudo firecracker --api-sock …`
(here mote under that name; `sudo` is a shim, the test runs as root inside a network namespace),
configures machine, boot source, root drive and network (it makes the TAP itself), starts the
probe guest, pauses, snapshots, resumes and stops it; a second VMManager loads the snapshot and
the guest carries on where it was. Checked: the API's own account (GET /vm/config, GET /), the
guest's console lines before, during and after each step, the snapshot files.

Environment: MOTE_SDK_WORK (a scratch directory), MOTE_PROBE_KERNEL (the probe guest).
Exit status 0 when every check passed; otherwise the failure on stderr and status 1.
"""

import http.client
import json
import os
import re
import socket
import sys
import time

from pyrecracker.client_types import SnapshotType
from pyrecracker.vm import VMManager

WORK = os.environ["MOTE_SDK_WORK"]
KERNEL = os.environ["MOTE_PROBE_KERNEL"]
# The probe counts slowly for ever: a paused guest stops counting, a restored one carries on.
BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off probe.run=hello,count:100000000:3000000"
MEM_MIB = 128


class Failure(Exception):
    pass


def check(condition, message):
    if not condition:
        raise Failure(message)


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def get(sock, path):
    conn = UnixHTTP(sock)
    try:
        conn.request("GET", path, headers={"Accept": "application/json"})
        answer = conn.getresponse()
        body = answer.read().decode()
        check(answer.status == 200, f"GET {path}: {answer.status} {body}")
        return json.loads(body)
    finally:
        conn.close()


def wait_for_socket(path, log):
    deadline = time.time() + 10
    while not os.path.exists(path):
        if time.time() > deadline:
            raise Failure(f"no API socket at {path} after 10 s; the monitor's output:\n{read(log)}")
        time.sleep(0.01)


# A line of mote's log (its stderr, which the SDK sends to the console's file too): written
# whole, but it may land in the middle of a line of the guest's.
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+ \[[^\]\n]*\][^\n]*\n")


def read(path):
    """The guest's console in the monitor's output file, without the monitor's log lines."""
    try:
        with open(path, errors="replace") as f:
            return LOG_LINE.sub("", f.read())
    except FileNotFoundError:
        return ""


def counts(log):
    return [int(n) for n in re.findall(r"^probe: count=(\d+)", read(log), re.M)]


def wait_for(log, what, timeout=20):
    """Waits until what(console text) is true."""
    deadline = time.time() + timeout
    while True:
        text = read(log)
        if what(text):
            return text
        if time.time() > deadline:
            raise Failure(f"the console of {log} never showed what was awaited:\n{text[-2000:]}")
        time.sleep(0.02)


def manager(sock, log):
    vm = VMManager(socket_path=sock, kernel_image_path=KERNEL, firecracker_logs_path=log)
    wait_for_socket(sock, log)
    vm.host_ip = "172.16.0.1"
    vm.guest_ip = "172.16.0.2"
    vm.host_dev_name = "tap0"
    vm.host_env_cleanup_pause = 0
    return vm


def stopped(vm, sock):
    """pyrecracker's stop: SendCtrlAltDel, then it ends the monitor and removes its socket."""
    vm.stop()
    check(not os.path.exists(sock), f"the socket {sock} is still there after stop()")


def main():
    sock1, log1 = f"{WORK}/fc1.sock", f"{WORK}/fc1.log"
    sock2, log2 = f"{WORK}/fc2.sock", f"{WORK}/fc2.log"
    state, mem = f"{WORK}/snapshot.state", f"{WORK}/snapshot.mem"
    disk = f"{WORK}/rootfs.img"
    with open(disk, "wb") as f:
        f.truncate(1 << 20)

    vm = manager(sock1, log1)
    try:
        vm.boot_args = BOOT_ARGS
        vm.vcpu_count = 1
        vm.mem_size_mib = MEM_MIB
        vm.path_on_host = disk
        vm.is_read_only = False
        vm.guest_mac = "06:00:ac:10:00:02"
        vm.configure()
        config = get(sock1, "/vm/config")
        check(config["boot-source"]["kernel_image_path"] == KERNEL, f"boot source: {config}")
        check(config["machine-config"]["mem_size_mib"] == MEM_MIB, f"machine config: {config}")
        check([d["path_on_host"] for d in config["drives"]] == [disk], f"drives: {config}")
        check([n["host_dev_name"] for n in config["network-interfaces"]] == ["tap0"],
              f"network interfaces: {config}")

        vm.start()
        wait_for(log1, lambda t: "probe: hello" in t and "probe: count=3" in t)
        check(get(sock1, "/")["state"] == "Running", "GET / after start() is not Running")

        vm.pause()
        check(get(sock1, "/")["state"] == "Paused", "GET / after pause() is not Paused")
        time.sleep(0.1)
        at_pause = counts(log1)[-1]
        time.sleep(0.5)
        check(counts(log1)[-1] == at_pause, "the guest went on counting while paused")

        vm.create_snapshot(snapshot_path=state, mem_file_path=mem, snapshot_type=SnapshotType.FULL)
        check(os.path.getsize(state) > 0, "the state file is empty")
        check(os.path.getsize(mem) == MEM_MIB << 20,
              f"the memory file holds {os.path.getsize(mem)} bytes, not {MEM_MIB} MiB")

        vm.resume()
        wait_for(log1, lambda t: counts(log1)[-1] >= at_pause + 2)
        stopped(vm, sock1)
    finally:
        vm._VMManager__host_env.stop_processes()

    # A fresh monitor: its TAP back, the snapshot loaded and resumed; the guest's next line is
    # the one after the last it printed before the snapshot, not a new boot's `probe: hello`.
    vm2 = manager(sock2, log2)
    try:
        vm2.setup_host_networking()
        vm2.load_snapshot(snapshot_path=state, mem_file_path=mem, resume_vm=True)
        wait_for(log2, lambda t: len(counts(log2)) >= 2)
        restored = counts(log2)
        # The pause may have caught the guest in the middle of its next line, whose rest the
        # restored guest prints first: then its first whole line is the one after.
        check(restored[0] in (at_pause + 1, at_pause + 2),
              f"the restored guest printed count={restored[0]} first, not {at_pause + 1}")
        check("probe: hello" not in read(log2), "the restored guest booted anew")
        check(get(sock2, "/")["state"] == "Running", "GET / after the restore is not Running")
        stopped(vm2, sock2)
    finally:
        vm2._VMManager__host_env.stop_processes()
    print(f"pyrecracker: configured, booted, paused at count={at_pause}, snapshotted, resumed, "
          f"stopped; restored and carried on from count={restored[0]}")


if __name__ == "__main__":
    try:
        main()
    except Failure as err:
        print(f"pyrecracker flow failed: {err}", file=sys.stderr)
        sys.exit(1)
