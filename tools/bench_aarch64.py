"""The `aarch64-boot` benchmark of tools/bench: mote against QEMU on arm64, in emulation.

These x86_64 machines have no arm64 KVM, so both monitors run inside the emulated arm64 host
of tools/emulated-host --arch aarch64 (QEMU's full emulation, EL2 and a GICv3), in one boot of
it: mote (tools/build --arch aarch64) and Debian's arm64 QEMU (`-M virt -accel kvm`), booting
the same test guest (tools/guest-artifacts --arch aarch64: the same Image and initramfs, the
same vCPUs and 128 MiB) to its init's `microvm-init: up`, after which `microvm.poweroff`
resets it and either monitor exits. Runs alternate, mote then QEMU, after one unmeasured pair;
each is timed inside the emulated host by tests/hosted-tool's `time-to-line`, from just before
the monitor's spawn to the console line. Only the ratio and the correctness mean anything: the
times are an emulator's, tens of times those of real hardware.

QEMU: qemu-system-arm:arm64 and the shared libraries its binary needs, found by following the
ELF NEEDED entries (readelf -d) from qemu-system-aarch64 through the packages' Depends, fetched
with `apt-get download` and unpacked with `dpkg -x` into target/bench/aarch64-qemu/ (nothing
is installed); the binary, those libraries and the dynamic loader are packed into
qemu.tar.gz, unpacked in the emulated host and run through the loader
(`./ld-linux-aarch64.so.1 --library-path libs ./qemu-system-aarch64 ...`). It needs no
firmware or data files: -nodefaults -no-user-config, and the kernel is loaded directly.
"""

import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile

QEMU_PACKAGE = "qemu-system-arm:arm64"
QEMU_BINARY = "usr/bin/qemu-system-aarch64"
LOADER = "ld-linux-aarch64.so.1"
# Where the packages keep their shared libraries (bookworm: both, /lib not yet merged).
LIB_DIRS = ("lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu", "lib", "usr/lib")
# Debian names library packages lib*; zlib1g is the old exception. Nothing else is followed
# (not qemu-system-common or -data: the binary needs none of their files with -nodefaults).
LIBRARY_PACKAGES = ("lib", "zlib")
UP_LINE = "microvm-init: up"
GUEST_MIB = 128
WARMUP_PAIRS = 1
VERSION_RUNS = 3  # spawns of `qemu-system-aarch64 --version`
RUN_TIMEOUT_S = 120  # one monitor's run inside the emulated host
# Both kernels get the same command line but for the console: mote's 16550 (its default line
# is "console=ttyS0 panic=1 pci=off"), the virt board's PL011. The guest kernel has no PCI.
MOTE_APPEND = "quiet microvm.poweroff"
QEMU_APPEND = "console=ttyAMA0 panic=1 pci=off quiet microvm.poweroff"


class Aarch64BenchError(Exception):
    pass


def say(message):
    print(f"bench: {message}", file=sys.stderr, flush=True)


def percentile(values, fraction):
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))  # ceil(n * fraction)
    return ordered[int(rank) - 1]


def run(cmd, **kwargs):
    try:
        return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True,
                              **kwargs).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise Aarch64BenchError(f"{shlex.join(cmd)}: {err}") from err


# QEMU for arm64, from Debian's packages.

def candidate_version(package):
    for line in run(["apt-cache", "show", "--no-all-versions", package]).splitlines():
        if line.startswith("Version: "):
            return line.split(" ", 1)[1]
    raise Aarch64BenchError(f"apt-cache knows no {package} (dpkg --add-architecture arm64 "
                            "&& apt-get update, as root)")


def depends(packages):
    """Each package's Depends and Pre-Depends (real packages only, arm64 ones), by package."""
    out = run(["apt-cache", "depends", "--no-recommends", "--no-suggests", "--no-conflicts",
               "--no-breaks", "--no-replaces", "--no-enhances", *packages])
    result, current = {}, None
    for line in out.splitlines():
        if not line.startswith(" "):
            current = line.strip()
            result[current] = []
            continue
        match = re.match(r"\s*\|?(?:Pre)?Depends: ([^<\s]+)$", line)
        if match and current is not None:
            name = match.group(1)
            result[current].append(name if ":" in name else name + ":arm64")
    return result


def download(packages, dest):
    """apt-get download, then dpkg -x of each package into dest/NAME (nothing is installed)."""
    with tempfile.TemporaryDirectory() as scratch:
        run(["apt-get", "download", "-qq", *packages], cwd=scratch, stderr=subprocess.PIPE)
        for deb in os.listdir(scratch):
            path = os.path.join(scratch, deb)
            name = run(["dpkg-deb", "-f", path, "Package"]).strip()
            run(["dpkg", "-x", path, os.path.join(dest, name + ":arm64")])


def needed(path):
    out = run(["readelf", "-d", "--wide", path])
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def inside(root, path):
    """`path` (under `root`) with its symbolic links followed inside `root`, or None."""
    for _ in range(40):
        if not os.path.islink(path):
            return path if os.path.isfile(path) else None
        target = os.readlink(path)
        if os.path.isabs(target):
            path = os.path.join(root, target.lstrip("/"))
        else:
            path = os.path.normpath(os.path.join(os.path.dirname(path), target))
    return None


def find_library(unpacked, soname):
    """(package, file) of `soname` among the unpacked packages, or None."""
    for package in sorted(os.listdir(unpacked)):
        root = os.path.join(unpacked, package)
        for lib_dir in LIB_DIRS:
            found = inside(root, os.path.join(root, lib_dir, soname))
            if found:
                return package, found
    return None


def closure(unpacked, binary):
    """The libraries `binary` needs, directly or not: ({soname: (package, file)}, missing)."""
    found, missing, todo = {}, set(), list(needed(binary))
    while todo:
        soname = todo.pop()
        if soname in found or soname in missing:
            continue
        hit = find_library(unpacked, soname)
        if hit is None:
            missing.add(soname)
            continue
        found[soname] = hit
        todo.extend(needed(hit[1]))
    return found, missing


def qemu_tarball(repo):
    """target/bench/aarch64-qemu/qemu.tar.gz, made once per QEMU version; returns (path,
    version)."""
    work = os.path.join(repo, "target", "bench", "aarch64-qemu")
    tarball = os.path.join(work, "qemu.tar.gz")
    stamp = os.path.join(work, "stamp")
    version = candidate_version(QEMU_PACKAGE)
    if os.path.isfile(tarball) and os.path.isfile(stamp):
        with open(stamp) as f:
            if f.read().strip() == version:
                return tarball, version
    say(f"fetching {QEMU_PACKAGE} {version} and the libraries it needs (apt-get download, "
        f"dpkg -x into {work}; nothing is installed)")
    shutil.rmtree(work, ignore_errors=True)
    unpacked = os.path.join(work, "packages")
    os.makedirs(unpacked)
    download([QEMU_PACKAGE], unpacked)
    binary = os.path.join(unpacked, QEMU_PACKAGE, QEMU_BINARY)
    # Only the packages whose files the binary loads are followed, one level of Depends at a
    # time, until every NEEDED entry is found.
    while True:
        found, missing = closure(unpacked, binary)
        if LOADER not in found:
            missing.add(LOADER)
        if not missing:
            break
        owners = {QEMU_PACKAGE} | {package for package, _ in found.values()}
        fetched = set(os.listdir(unpacked))
        wanted = sorted({dep for deps in depends(sorted(owners)).values() for dep in deps
                         if dep.startswith(LIBRARY_PACKAGES) and dep not in fetched})
        if not wanted:
            raise Aarch64BenchError("no package left to fetch for " + ", ".join(sorted(missing)))
        say(f"{len(missing)} libraries still missing: fetching {len(wanted)} packages")
        download(wanted, unpacked)
    tmp = tarball + ".tmp"
    with tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
        tar.add(binary, "qemu/qemu-system-aarch64")
        tar.add(found[LOADER][1], "qemu/" + LOADER)
        for soname, (_, path) in sorted(found.items()):
            if soname != LOADER:
                tar.add(path, "qemu/libs/" + soname)
    os.replace(tmp, tarball)
    with open(stamp, "w") as f:
        f.write(version + "\n")
    packages = sorted({package for package, _ in found.values()})
    say(f"{tarball}: {os.path.getsize(tarball) >> 10} KiB, {len(found)} libraries from "
        f"{len(packages)} packages")
    return tarball, version


# The run inside the emulated host.

def script(runs, vcpus):
    """The emulated host's command: every run's result on a line `aarch64-boot: ...`."""
    mote = ["./mote", "run", "--kernel", "Image", "--initrd", "initramfs.cpio.gz",
            "--vcpus", str(vcpus), "--memory", str(GUEST_MIB), "--append", MOTE_APPEND]
    qemu = ["./qemu/" + LOADER, "--library-path", "./qemu/libs", "./qemu/qemu-system-aarch64",
            "-M", "virt,gic-version=3", "-accel", "kvm", "-cpu", "host",
            "-m", str(GUEST_MIB), "-smp", str(vcpus), "-nodefaults", "-no-user-config",
            "-display", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", "Image", "-initrd", "initramfs.cpio.gz", "-append", QEMU_APPEND]
    time_to_line = ["./hosted-tool", "time-to-line", UP_LINE, str(RUN_TIMEOUT_S)]
    return f"""
tar -xzf qemu.tar.gz || exit 1
echo "aarch64-boot: cpus=$(grep -c ^processor /proc/cpuinfo) kvm=$([ -c /dev/kvm ] && echo yes)"
echo "aarch64-boot: qemu-version=$({shlex.join(qemu[:4])} --version | head -n1)"
one() {{ # MONITOR RUN WARMUP
  if [ "$1" = mote ]; then
    {shlex.join(time_to_line + mote)} >out 2>&1
  else
    {shlex.join(time_to_line + qemu)} >out 2>&1
  fi
  echo "aarch64-boot: monitor=$1 run=$2 warmup=$3 $(grep '^time-to-line:' out | tail -n1)"
  grep -q 'line-ms=[0-9].*status=0$' out || sed "s/^/aarch64-boot: output $1 $2| /" out
}}
i=1
while [ $i -le {WARMUP_PAIRS} ]; do one mote $i 1; one qemu $i 1; i=$((i + 1)); done
# What QEMU's start costs before it does anything: the loader, its libraries, its own set-up.
for i in $(seq {VERSION_RUNS}); do
  {shlex.join(time_to_line[:2])} "QEMU emulator" {RUN_TIMEOUT_S} \\
    {shlex.join(qemu[:4])} --version >out 2>&1
  echo "aarch64-boot: qemu-version-run $(grep '^time-to-line:' out)"
done
i=1
while [ $i -le {runs} ]; do one mote $i 0; one qemu $i 0; i=$((i + 1)); done
echo "aarch64-boot: done"
"""


RESULT = re.compile(r"aarch64-boot: monitor=(\w+) run=(\d+) warmup=([01]) ?(.*)$")


def parse_run(rest):
    """(milliseconds to the line, to the exit, None) or (None, None, why it failed)."""
    fields = dict(re.findall(r"([\w-]+)=(\S+)", rest))
    if "line-ms" not in fields:
        return None, None, "no result from time-to-line"
    if fields["line-ms"] == "none":
        return None, None, f"no `{UP_LINE}` line (status {fields.get('status')})"
    if fields.get("status") != "0":
        return None, None, f"reached the line but exited with status {fields.get('status')}"
    return float(fields["line-ms"]), float(fields["exit-ms"]), None


def summary(values):
    if not values:
        return None, None
    return round(statistics.median(values), 1), round(percentile(values, 0.9), 1)


def bench(repo, mote, hosted_tool, guest_dir, runs, vcpus):
    """Runs the set in one emulated-host boot; returns (table rows, JSON dict) in
    tools/bench's shape, and the failures (a list of strings)."""
    tarball, qemu_version = qemu_tarball(repo)
    files = [(mote, "mote"), (hosted_tool, "hosted-tool"),
             (os.path.join(guest_dir, "Image"), "Image"),
             (os.path.join(guest_dir, "initramfs.cpio.gz"), "initramfs.cpio.gz"),
             (tarball, "qemu.tar.gz")]
    # The emulated host boots in about 10 s and unpacks QEMU in 3 s, a pair of runs takes
    # 3-5 s; a hung run costs RUN_TIMEOUT_S.
    timeout = 300 + (runs + WARMUP_PAIRS) * 2 * 40
    cmd = [os.path.join(repo, "tools", "emulated-host"), "--arch", "aarch64",
           "--smp", str(vcpus), "--timeout", str(timeout)]
    for src, dest in files:
        cmd += ["--file", f"{src}:{dest}"]
    cmd += ["--", script(runs, vcpus)]
    say(f"aarch64-boot: {runs} runs each of mote and QEMU (after {WARMUP_PAIRS} unmeasured "
        f"pair), {vcpus} vCPU(s), inside one emulated arm64 host with {vcpus} CPU(s); about "
        f"{30 + (runs + WARMUP_PAIRS) * 5} s; the output comes at the end")
    log = os.path.join(repo, "target", "bench", f"aarch64-boot-{vcpus}vcpu.log")
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace")
    with open(log, "w") as f:
        f.write(proc.stdout)
    if proc.returncode != 0 or "aarch64-boot: done" not in proc.stdout:
        tail = "\n".join(proc.stdout.splitlines()[-30:])
        raise Aarch64BenchError(f"the emulated host's run failed (status {proc.returncode}; "
                                f"all of its output in {log}):\n{tail}")

    times = {"mote": ([], []), "qemu": ([], [])}
    by_run = {}  # (monitor, run) -> ms to the line, for the pairs
    version_ms = []
    failures, seen = [], set()
    for line in proc.stdout.splitlines():
        if line.startswith("aarch64-boot: qemu-version-run "):
            line_ms, exit_ms, why = parse_run(line.split(" ", 2)[2])
            if why:
                failures.append(f"qemu --version: {why}")
            else:
                version_ms.append(exit_ms)
            continue
        if line.startswith("aarch64-boot: output "):
            say(line)
            continue
        match = RESULT.match(line)
        if not match:
            continue
        monitor, index, warmup, rest = match.groups()
        seen.add((monitor, int(index), warmup == "1"))
        line_ms, exit_ms, why = parse_run(rest)
        label = f"{monitor} {'warm-up ' if warmup == '1' else ''}run {index}"
        if why:
            failures.append(f"{label}: {why}")
        elif warmup == "0":
            by_run[monitor, int(index)] = line_ms
            times[monitor][0].append(line_ms)
            times[monitor][1].append(exit_ms)
    for monitor in times:
        for index in range(1, runs + 1):
            if (monitor, index, False) not in seen:
                failures.append(f"{monitor} run {index}: no result line")
    for failure in failures:
        say(f"aarch64-boot: FAILED {failure}")

    mote_line, qemu_line = times["mote"][0], times["qemu"][0]
    mote_median, mote_p90 = summary(mote_line)
    qemu_median, qemu_p90 = summary(qemu_line)
    mote_exit, _ = summary(times["mote"][1])
    qemu_exit, _ = summary(times["qemu"][1])
    ratio = round(qemu_median / mote_median, 2) if mote_line and qemu_line else None
    ratio_p90 = round(qemu_p90 / mote_p90, 2) if mote_line and qemu_line else None
    # Each QEMU run over the mote run just before it: the load of the moment (these cores are
    # shared) weighs on both alike.
    pairs = [by_run["qemu", i] / by_run["mote", i] for i in range(1, runs + 1)
             if ("mote", i) in by_run and ("qemu", i) in by_run]
    pair_ratio = round(statistics.median(pairs), 2) if pairs else None
    version_median, _ = summary(version_ms)
    version = re.search(r"qemu-version=(.*)$", proc.stdout, re.M)
    failed = {m: sum(1 for f in failures if f.startswith(m + " ")) for m in times}
    results = {
        "bench": "aarch64-boot",
        "runs": runs,
        "warmup_pairs": WARMUP_PAIRS,
        "vcpus": vcpus,
        "guest": f"test guest (Image + initramfs), {vcpus} vCPU(s), {GUEST_MIB} MiB",
        "where": f"emulated arm64 host (tools/emulated-host --arch aarch64 --smp {vcpus}): "
                 "emulator timings, for correctness and the ratio only",
        "qemu_package": f"{QEMU_PACKAGE} {qemu_version}",
        "qemu_version": version.group(1).strip() if version else None,
        "mote_up_ms_median": mote_median,
        "mote_up_ms_p90": mote_p90,
        "qemu_up_ms_median": qemu_median,
        "qemu_up_ms_p90": qemu_p90,
        "ratio_qemu_over_mote_median": ratio,
        "ratio_qemu_over_mote_p90": ratio_p90,
        "ratio_qemu_over_mote_pairs_median": pair_ratio,
        "ratio_qemu_over_mote_pairs": [round(r, 2) for r in pairs],
        "mote_exit_ms_median": mote_exit,
        "qemu_exit_ms_median": qemu_exit,
        "qemu_version_exit_ms_median": version_median,
        "mote_up_ms_runs": mote_line,
        "qemu_up_ms_runs": qemu_line,
        "mote_failures": failed["mote"],
        "qemu_failures": failed["qemu"],
        "failures": failures,
    }

    def cell(value):
        return "-" if value is None else value

    def ratio_of(a, b):
        return "-" if a is None or b is None else f"{a / b:.2f}"

    rows = [
        (f"start to `{UP_LINE}`, median (ms)", cell(mote_median), cell(qemu_median),
         cell(ratio)),
        (f"start to `{UP_LINE}`, p90 (ms)", cell(mote_p90), cell(qemu_p90), cell(ratio_p90)),
        (f"start to `{UP_LINE}`, min-max (ms)",
         f"{min(mote_line):.0f}-{max(mote_line):.0f}" if mote_line else "-",
         f"{min(qemu_line):.0f}-{max(qemu_line):.0f}" if qemu_line else "-", ""),
        ("median of the pairs' ratios", "", "", cell(pair_ratio)),
        ("start to exit, median (ms)", cell(mote_exit), cell(qemu_exit),
         ratio_of(qemu_exit, mote_exit)),
        ("QEMU's start: `--version` to exit, median (ms)", "", cell(version_median), ""),
        ("runs that reached the line and exited 0", f"{len(mote_line)}/{runs}",
         f"{len(qemu_line)}/{runs}", ""),
    ]
    return rows, results, failures
