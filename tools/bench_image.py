#!/usr/bin/env python3
"""Container images (`mote run --image`, issue 20): what mote costs on the host between an
image and its guest booting. The guest's own boot is not in it (Linux user space does not run
on a PVM host; in the emulated host timings are an emulator's).

Two images, written here as OCI image layouts: `busybox` (busybox-static and its applets,
one layer) and `python` (the host's /usr/lib/python3 as one gzip layer, thousands of files),
and `python-zstd` (the same layer compressed by the `zstd` tool, level 3: its cold import
beside python's is what decoding zstd instead of gzip costs).

  import (cold)       `mote image import LAYOUT` into an empty store: digests verified, the
                      layers applied, mkfs.ext4 -d, published.
  import (cached)     the same layout again: read, found by its id, nothing built.
  archive (cached)    the layout packed as a tar archive, imported once it is stored: only
                      the archive's small files are unpacked to find the id.
  run prep (cached)   `mote run --image NAME` up to the guest's boot: the store looked up, the
                      root's per-run copy (sparse or reflinked), the control drive and the
                      initramfs with mote-init (mote's log line `container files ready in`).
                      The kernel given does not exist, so mote stops right after.
Median, slowest and fastest of N runs (default 5).

Usage: tools/bench_image.py [--mote PATH] [--runs N]   (as root: owners in the image)
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time


def blob(blobs, data):
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, digest), "wb") as f:
        f.write(data)
    return "sha256:" + digest, len(data)


def compress(layer_tar, how):
    if how == "gzip":
        return gzip.compress(layer_tar, 1)
    if how == "zstd":
        return subprocess.run(["zstd", "-q", "-c", "-3"], input=layer_tar, capture_output=True,
                              check=True).stdout
    return layer_tar


def write_layout(layout, layer_tar, how, config, arch=None):
    """An OCI layout of one layer; `arch` as OCI names it (default: this machine's)."""
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs)
    diff_id = "sha256:" + hashlib.sha256(layer_tar).hexdigest()
    data = compress(layer_tar, how)
    media = "application/vnd.oci.image.layer.v1.tar" + ("" if how == "none" else "+" + how)
    layer_digest, layer_size = blob(blobs, data)
    arch = arch or {"x86_64": "amd64", "aarch64": "arm64"}[os.uname().machine]
    cfg = json.dumps({"architecture": arch, "os": "linux", "config": config,
                      "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    cfg_digest, cfg_size = blob(blobs, cfg)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": cfg_digest, "size": cfg_size},
        "layers": [{"mediaType": media, "digest": layer_digest, "size": layer_size}],
    }).encode()
    man_digest, man_size = blob(blobs, manifest)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion": "1.0.0"}')
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": man_digest, "size": man_size}]}, f)


def tar_of(entries):
    """entries: (name in the image, host path or None for a directory, symlink target)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path, link in entries:
            if link is not None:
                info = tarfile.TarInfo(name)
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            elif path is None:
                info = tarfile.TarInfo(name)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                tar.add(path, arcname=name, recursive=False)
    return out.getvalue()


def busybox_layer(busybox="/bin/busybox"):
    applets = ["sh", "echo", "cat", "ls", "env", "true"]
    entries = [("bin", None, None), ("bin/busybox", busybox, None)]
    entries += [(f"bin/{a}", None, "busybox") for a in applets]
    return tar_of(entries)


def tree_layer(root, prefix):
    entries = [(prefix, None, None)]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        base = prefix if rel == "." else f"{prefix}/{rel}"
        for d in dirnames:
            path = os.path.join(dirpath, d)
            entries.append((f"{base}/{d}", path, os.readlink(path) if os.path.islink(path) else None))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            entries.append((f"{base}/{name}", path, os.readlink(path) if os.path.islink(path) else None))
    return tar_of(entries), len(entries)


def run(cmd):
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = (time.perf_counter() - start) * 1000
    if out.returncode != 0 and "run" not in cmd:
        sys.exit(f"{' '.join(cmd)} failed: {out.stderr}")
    return elapsed, out


def stats(values):
    return {"median": statistics.median(values), "max": max(values), "min": min(values)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mote", default=None)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    mote = args.mote or subprocess.run(
        [os.path.join(os.path.dirname(__file__), "build")], capture_output=True, text=True,
        check=True).stdout.strip()
    work = tempfile.mkdtemp(prefix="mote-bench-image-")
    results = {}
    try:
        python_root = next(p for p in ("/usr/lib/python3", "/usr/lib/python3.11") if os.path.isdir(p))
        python_tar, python_files = tree_layer(python_root, "usr/lib/python3")
        images = {
            "busybox": (busybox_layer(), "none", {"Cmd": ["/bin/sh"]}),
            "python": (python_tar, "gzip", {"Cmd": ["/bin/sh"]}),
        }
        if shutil.which("zstd"):
            images["python-zstd"] = (python_tar, "zstd", {"Cmd": ["/bin/sh"]})
        else:
            print("no zstd tool (Debian's zstd): python-zstd left out")
        print(f"python layer: {python_files} entries, {len(python_tar) >> 20} MiB of tar")
        for name, (layer, how, config) in images.items():
            layout = os.path.join(work, name)
            write_layout(layout, layer, how, config)
            archive = os.path.join(work, name + ".tar")
            with tarfile.open(archive, "w") as tar:
                tar.add(layout, arcname=".")
            cold, cached, cached_archive, prep = [], [], [], []
            for _ in range(args.runs):
                store = os.path.join(work, "store")
                shutil.rmtree(store, ignore_errors=True)
                ms, _ = run([mote, "image", "import", "--name", name, "--store", store, layout])
                cold.append(ms)
                ms, _ = run([mote, "image", "import", "--store", store, layout])
                cached.append(ms)
                ms, _ = run([mote, "image", "import", "--store", store, archive])
                cached_archive.append(ms)
                _, out = run([mote, "run", "--kernel", "/nonexistent", "--store", store,
                              "--image", name])
                found = re.search(r"container files ready in (\d+) us", out.stderr)
                if not found:
                    sys.exit(f"no prep time in mote's log: {out.stderr}")
                prep.append(int(found.group(1)) / 1000)
            results[name] = {"import_cold_ms": stats(cold), "import_cached_ms": stats(cached),
                             "archive_cached_ms": stats(cached_archive),
                             "run_prep_ms": stats(prep)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'image':12} {'what':20} {'median ms':>10} {'max':>8} {'min':>8}")
    for name, rows in results.items():
        for what, s in rows.items():
            print(f"{name:12} {what:20} {s['median']:10.1f} {s['max']:8.1f} {s['min']:8.1f}")
    print(json.dumps({"bench": "image", "runs": args.runs, "results": results}))


if __name__ == "__main__":
    main()
