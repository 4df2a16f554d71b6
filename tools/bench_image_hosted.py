#!/usr/bin/env python3
"""Container images (`mote run --image`, issue 20) from import to the program's first output:
the import on this machine (real timings: digests, layers, mkfs.ext4 -d), then cached runs of
the stored image inside the emulated host of tools/emulated-host (an emulator's timings: for
correctness and proportions only, never as a machine's speed).

The image is bench_image.py's `busybox` one (busybox-static and a few applets, one layer),
with the busybox of the emulated host's architecture (Debian's busybox-static:arm64 for
aarch64, as tools/guest-artifacts fetches it), imported here with `mote image import
--platform linux/ARCH` (the emulated host has no mkfs.ext4), its root shrunk to its data plus
16 MiB so that it enters the emulated host through its initramfs. There, each run is
`mote run --image bench:1 -- echo first-output`, timed by tests/hosted-tool's `time-to-line`
from just before mote's spawn to the console line `first-output` and to mote's exit; the first
run is the store's first use there. A cached run rebuilds nothing: the store is looked up, the
root copied (sparse), the control drive and initramfs written, the guest booted.

Usage: tools/bench_image_hosted.py [--arch x86_64|aarch64] [--runs N]   (as root)
Prints a table and one JSON line.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_image  # noqa: E402  (beside this script)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = "first-output"
RUN_TIMEOUT_S = 120
OCI_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
# Cargo variables an outer cargo could leak into the builds started here.
CARGO_ENV = ("CARGO_TARGET_DIR", "CARGO_BUILD_TARGET", "RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS",
             "CARGO_BUILD_RUSTFLAGS")


def say(message):
    print(f"bench: {message}", file=sys.stderr, flush=True)


def output(cmd, cwd=REPO):
    env = {k: v for k, v in os.environ.items() if k not in CARGO_ENV}
    return subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, text=True,
                          check=True).stdout.strip()


def built(arch):
    """(mote and mote-init for `arch`, this machine's mote, guest kernel, busybox, hosted-tool)."""
    say(f"building mote for {arch} and this machine (tools/build)")
    mote = output([os.path.join(REPO, "tools", "build"), "--arch", arch]).splitlines()[-1]
    host_mote = output([os.path.join(REPO, "tools", "build")]).splitlines()[-1]
    say(f"the {arch} test guest's kernel (tools/guest-artifacts --arch {arch})")
    output([os.path.join(REPO, "tools", "guest-artifacts"), "--arch", arch])
    if arch == "x86_64":
        kernel = os.path.join(REPO, "target", "guest", "vmlinux")
        busybox = "/bin/busybox"
    else:
        guest = os.path.join(REPO, "target", "guest", "aarch64")
        kernel = os.path.join(guest, "Image")
        busybox = os.path.join(guest, "busybox-static-arm64", "bin", "busybox")
    target = f"{arch}-unknown-linux-musl"
    say(f"tests/hosted-tool for {arch}")
    tool_dir = os.path.join(REPO, "target", "hosted-tool")
    output(["cargo", "build", "--release", "--quiet", "--target", target,
            "--config", f'target.{target}.linker="rust-lld"', "--target-dir", tool_dir],
           cwd=os.path.join(REPO, "tests", "hosted-tool"))
    tool = os.path.join(tool_dir, target, "release", "hosted-tool")
    mote_init = os.path.join(os.path.dirname(mote), "mote-init")
    for path in (mote, mote_init, host_mote, kernel, busybox, tool):
        if not os.path.isfile(path):
            sys.exit(f"no {path}")
    return mote, mote_init, host_mote, kernel, busybox, tool


def shrink(image):
    """The ext4 at `image` cut to its data plus 16 MiB (4 KiB blocks), holes and all."""
    subprocess.run(["e2fsck", "-fy", image], capture_output=True, check=False)
    out = subprocess.run(["resize2fs", "-P", image], capture_output=True, text=True).stdout
    found = re.search(r"minimum size of the filesystem: (\d+)", out)
    if not found:
        sys.exit(f"resize2fs -P says no minimum: {out}")
    blocks = int(found.group(1)) + 4096
    subprocess.run(["resize2fs", image, str(blocks)], capture_output=True, check=True)
    os.truncate(image, blocks * 4096)


def stats(values):
    return {"median": statistics.median(values), "max": max(values), "min": min(values)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="x86_64", choices=sorted(OCI_ARCH))
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    os.environ["PATH"] += ":/usr/sbin:/sbin"
    mote, mote_init, host_mote, kernel, busybox, tool = built(args.arch)
    work = tempfile.mkdtemp(prefix="mote-bench-image-hosted-")
    try:
        layout, store = os.path.join(work, "layout"), os.path.join(work, "store")
        bench_image.write_layout(layout, bench_image.busybox_layer(busybox), "none",
                                 {"Cmd": ["/bin/sh"]}, OCI_ARCH[args.arch])
        start = time.perf_counter()
        subprocess.run([host_mote, "image", "import", "--platform", f"linux/{OCI_ARCH[args.arch]}",
                        "--name", "bench:1", "--store", store, layout],
                       capture_output=True, check=True)
        import_ms = (time.perf_counter() - start) * 1000
        (image_id,) = os.listdir(os.path.join(store, "images"))
        stored = os.path.join(store, "images", image_id)
        shrink(os.path.join(stored, "rootfs.ext4"))
        run = ["./hosted-tool", "time-to-line", LINE, str(RUN_TIMEOUT_S), "./mote", "run",
               "--kernel", os.path.basename(kernel), "--store", "store", "--image", "bench:1",
               "--", "echo", LINE]
        script = f"""
i=1
while [ $i -le {args.runs} ]; do
  {shlex.join(run)} >out 2>&1
  echo "image-run: run=$i $(grep '^time-to-line:' out | tail -n1)"
  grep -q 'line-ms=[0-9].*status=0$' out || sed "s/^/image-run: output $i| /" out
  i=$((i + 1))
done
"""
        files = [(mote, "mote"), (mote_init, "mote-init"), (tool, "hosted-tool"),
                 (kernel, os.path.basename(kernel))]
        files += [(os.path.join(stored, f), f"store/images/{image_id}/{f}")
                  for f in ("rootfs.ext4", "image.json")]
        cmd = [os.path.join(REPO, "tools", "emulated-host"), "--arch", args.arch,
               "--timeout", str(60 + args.runs * RUN_TIMEOUT_S)]
        for src, dest in files:
            cmd += ["--file", f"{src}:{dest}"]
        say(f"{args.runs} cached runs in the emulated {args.arch} host")
        result = subprocess.run([*cmd, "--", script], stdin=subprocess.DEVNULL,
                                capture_output=True, text=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first, exits, failures = [], [], []
    for line in result.stdout.splitlines():
        found = re.search(r"^image-run: run=(\d+) time-to-line: line-ms=([\d.]+) "
                          r"exit-ms=([\d.]+) status=0$", line)
        if found:
            first.append(float(found.group(2)))
            exits.append(float(found.group(3)))
        elif line.startswith("image-run:"):
            failures.append(line)
    if len(first) != args.runs:
        sys.exit(f"{len(first)} of {args.runs} runs worked:\n{result.stdout}\n{result.stderr}")
    results = {"import_ms": import_ms, "first_output_ms": stats(first),
               "exit_ms": stats(exits), "first_run_first_output_ms": first[0],
               "first_output_ms_runs": first, "failures": failures}
    print(f"import here (real): {import_ms:.1f} ms")
    print(f"{'in the emulated ' + args.arch + ' host':32} {'median ms':>10} {'max':>8} {'min':>8}")
    for what, key in (("cached run to first output", "first_output_ms"),
                      ("cached run to mote's exit", "exit_ms")):
        s = results[key]
        print(f"{what:32} {s['median']:10.0f} {s['max']:8.0f} {s['min']:8.0f}")
    print(f"first run there (the store's first use) to first output: {first[0]:.0f} ms")
    print(json.dumps({"bench": "image-hosted", "arch": args.arch, "runs": args.runs,
                      "where": "import: this machine; runs: tools/emulated-host (an emulator's "
                               "timings)", "results": results}))


if __name__ == "__main__":
    main()
