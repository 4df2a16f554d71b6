"""microheart's flow against mote, as far as mote and this host let it go.

1. `MicroVM.start()` as it is: microheart finds `firecracker` (mote under that name) and the
   kernel (the probe, as `vmlinux-probe`) in its cache folder, makes its TAP and NAT rule (inside
   the test's network namespace), writes its config file and spawns
   `firecracker --api-sock … --config-file … --enable-pci`. mote has no PCI transport and refuses
   that flag by name, so start() must fail at once with mote's reason (not hang, not boot), and
   clean up after itself. Past that flag microheart would wait for SSH into a Linux guest, which
   this host's KVM cannot run (user space needs the emulated host), so:
2. the same VM with microheart's own config document (`MicroVM.config()`, the probe's steps added
   to its boot arguments) and microheart's own TAP setup, spawned with microheart's argv less
   `--enable-pci`: the guest prints microheart's boot arguments (`probe.run=…cmdline`), and
   microheart's API client reads the machine config, the whole VM config, pauses and resumes the
   guest; then the guest ends itself and `MicroVM.clean()` removes the TAP, the NAT rule and the
   record.

Environment: MOTE_SDK_WORK (scratch; MICROHEART_HOME points into it), MOTE_PROBE_KERNEL.
Exit status 0 when every check passed; otherwise the failure on stderr and status 1.
"""

import json
import os
import re
import subprocess
import sys
import time

WORK = os.environ["MOTE_SDK_WORK"]
os.environ["MICROHEART_HOME"] = os.path.join(WORK, "microheart")

from microheart import api, assets, net  # noqa: E402  (MICROHEART_HOME first)
from microheart.vm import MicroVM  # noqa: E402

KERNEL = os.environ["MOTE_PROBE_KERNEL"]
# Counts long enough for the API calls below, then the probe resets and mote ends with status 0.
STEPS = "hello,cmdline,count:150:300000"


class Failure(Exception):
    pass


def check(condition, message):
    if not condition:
        raise Failure(message)


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


def nat_rules():
    out = subprocess.run(["iptables", "-w", "-t", "nat", "-S", "POSTROUTING"], text=True,
                         capture_output=True, check=True).stdout
    return [line for line in out.splitlines() if "MASQUERADE" in line]


def main():
    home = assets.cache_dir()
    os.symlink(subprocess.run(["sh", "-c", "command -v firecracker"], text=True,
                              capture_output=True, check=True).stdout.strip(),
               home / "firecracker")
    os.symlink(KERNEL, home / "vmlinux-probe")
    disk = os.path.join(WORK, "base.ext4")
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    key = os.path.join(WORK, "vm_key")
    open(key, "w").close()

    # 1. The SDK's own start(): refused by mote because of --enable-pci.
    vm = MicroVM("probe", rootfs=disk, key=key, vcpu=1, mem_mib=128)
    try:
        vm.start(wait=20)
        raise Failure("MicroVM.start() succeeded: mote accepted --enable-pci")
    except RuntimeError as err:
        text = str(err)
        check(text.startswith("Firecracker stopped:"), f"start() failed otherwise: {text}")
        check("--enable-pci" in text, f"mote's refusal does not name --enable-pci: {text}")
    check(vm.rec is None, "start() left its registry record behind")
    check(not nat_rules(), f"start() left its NAT rule behind: {nat_rules()}")

    # 2. The rest of microheart's flow, with its argv less --enable-pci.
    vm.registry.create(vm.name)
    try:
        vm.dir.mkdir(parents=True, exist_ok=True)
        disk_copy = vm.dir / "rootfs.ext4"
        subprocess.run(["cp", disk, str(disk_copy)], check=True)
        net.up(vm.tap, vm.host_ip)
        config = vm.config(disk_copy)
        config["boot-source"]["boot_args"] += f" probe.run={STEPS}"
        cfg = vm.dir / "vm_config.json"
        cfg.write_text(json.dumps(config, indent=2))
        with open(vm.console, "w") as log:
            proc = subprocess.Popen([str(assets.firecracker_path()), "--api-sock", vm.sock,
                                     "--config-file", str(cfg)],
                                    stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.time() + 10
            while "probe: count=1\n" not in read(vm.console):
                check(proc.poll() is None, f"mote ended early:\n{vm.tail()}")
                check(time.time() < deadline, f"the guest did not start counting:\n{vm.tail()}")
                time.sleep(0.01)
            console = read(vm.console)
            check("probe: hello" in console, f"no hello on the console:\n{console}")
            cmdline = re.search(r"^probe: cmdline=(.*)$", console, re.M)
            check(cmdline and f"microheart.ip={vm.guest_ip}/30" in cmdline.group(1)
                  and "microheart.name=probe" in cmdline.group(1),
                  f"microheart's boot arguments did not reach the guest:\n{console}")

            machine = vm.machine_config()
            check(machine["vcpu_count"] == 1 and machine["mem_size_mib"] == 128,
                  f"GET /machine-config through microheart: {machine}")
            full = api.request(vm.sock, "GET", "/vm/config")
            check([n["host_dev_name"] for n in full["network-interfaces"]] == [vm.tap],
                  f"GET /vm/config: {full}")
            check([d["path_on_host"] for d in full["drives"]] == [str(disk_copy)],
                  f"GET /vm/config: {full}")
            check(api.request(vm.sock, "PATCH", "/vm", {"state": "Paused"}) is None,
                  "PATCH /vm Paused answered with a body")
            check(api.request(vm.sock, "GET", "/")["state"] == "Paused", "not Paused")
            api.request(vm.sock, "PATCH", "/vm", {"state": "Resumed"})
            check(api.request(vm.sock, "GET", "/")["state"] == "Running", "not Running")

            status = proc.wait(timeout=60)
            check(status == 0, f"mote ended with status {status}:\n{vm.tail()}")
            check("probe: count=150" in read(vm.console), f"the guest did not finish:\n{vm.tail()}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        vm.clean()
    check(vm.rec is None and not vm.dir.exists(), "clean() left the VM's record or folder")
    check(not nat_rules(), f"clean() left the NAT rule behind: {nat_rules()}")
    print("microheart: start() refused for --enable-pci; its config file booted the probe, its "
          "API client read and paused it, clean() removed everything")


if __name__ == "__main__":
    try:
        main()
    except Failure as err:
        print(f"microheart flow failed: {err}", file=sys.stderr)
        sys.exit(1)
