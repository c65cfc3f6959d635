"""Time and peak memory of `mitoseg instances` against scikit-image's whole-volume `label`.

    python benchmarks/bench_instances.py --slices 16 64 256 --size 2048 --out /tmp/bench_instances
    python benchmarks/bench_instances.py --parts --slices 64 --size 1024 --kind small --repeats 2
    python benchmarks/bench_instances.py --parts --slices 256 --size 2048 --repeats 2

``--parts``: the time of each part of `mitoseg instances` through its API, in one process per repeat: the 3-D
components (``segment_instances``: read the mask, label each slab once, join the slabs, map the pieces to
their ids in the scratch volume) and the measurements (``measure_objects``: counts, centroids, boxes,
marching-cubes surfaces), against scikit-image's ``label`` of the same Zarr array read whole; min and median
of the repeats, and the labels compared (equal up to the numbering: mitoseg numbers objects by their first
voxel, as ``scipy.ndimage.label``). ``--kind small``: about 400 small balls (radius 3-6) instead of the
mitochondria-like ellipsoids.

A synthetic prediction (uint8, 0 / 1) of SLICES x SIZE x SIZE voxels with mitochondria-like
ellipsoids (elongated, some touching) is written slab by slab to a Zarr array (the volume is
never whole in memory). Then, each in a fresh process whose peak resident memory is read from
the kernel (`ru_maxrss` of the child, and the peaks of its anonymous and file-backed parts, RssAnon and
RssFile of /proc/self/status sampled every 20 ms):

- `mitoseg instances` (3-D components slab by slab, measurements, uint32 ids to Zarr);
- scikit-image: the whole volume read into memory, `skimage.measure.label` (face connectivity),
  `regionprops` areas (the count and voxel counts only: no surfaces).

The object counts must agree. mitoseg's peak memory should not grow with the volume;
scikit-image's grows with it (the volume and its int64 labels).
"""

from __future__ import annotations

import argparse
import os
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SKIMAGE = """
import sys, time, json, numpy as np, zarr
from skimage.measure import label
start = time.perf_counter()
volume = zarr.open(sys.argv[1], mode="r")[...]
labels = label(volume > 0, connectivity=1)
counts = np.bincount(labels.ravel())[1:]
print(json.dumps({"objects": int(labels.max()), "voxels": int(counts.sum()), "seconds": time.perf_counter() - start}))
"""


PARTS = """
import os, sys, time, json, tempfile, numpy as np, zarr
from mitoseg.data.scratch import scratch_volumes
from mitoseg.instances.measure import measure_objects
from mitoseg.instances.segment import InstanceOptions, segment_instances
volume = zarr.open(sys.argv[1], mode="r")
start = time.perf_counter()
with scratch_volumes(tempfile.gettempdir()) as scratch:
    # BENCH_OPTIONS=default: the command's defaults (the minimum size from the data: sizes counted as well)
    options = InstanceOptions() if os.environ.get("BENCH_OPTIONS") == "default" else InstanceOptions(min_voxels=0)
    ids, count, *_ = segment_instances(lambda s, e: volume[s:e] != 0, volume.shape, options, scratch=scratch)
    segmented = time.perf_counter()
    measure_objects(ids, count)
    measured = time.perf_counter()
    digest = 0
    if len(sys.argv) > 2:  # compare with skimage's labels: the same partition, numbered by first voxel
        from skimage.measure import label
        whole = label(volume[...] != 0, connectivity=1)
        mine = np.asarray(ids[:])
        digest = int(np.array_equal(mine, whole.astype(np.uint32)))
print(json.dumps({"objects": count, "segment_s": segmented - start, "measure_s": measured - segmented,
                  "equal": digest}))
"""

SKIMAGE_LABEL = """
import sys, time, json, numpy as np, zarr
from skimage.measure import label
start = time.perf_counter()
labels = label(zarr.open(sys.argv[1], mode="r")[...] != 0, connectivity=1)
print(json.dumps({"objects": int(labels.max()), "seconds": time.perf_counter() - start}))
"""


def write_small_objects(path: Path, slices: int, size: int, count: int = 400, seed: int = 0, slab: int = 16) -> int:
    """About ``count`` balls of radius 3-6 voxels (a mask of many small objects); returns the foreground count."""
    rng = np.random.default_rng(seed)
    centres = np.column_stack([rng.uniform(0, slices, count), rng.uniform(0, size, count), rng.uniform(0, size, count)])
    radii = np.repeat(rng.uniform(3, 6, count)[:, None], 3, axis=1)
    return write_ellipsoids(path, slices, size, centres, radii, np.zeros(count), slab)


def write_volume(path: Path, slices: int, size: int, seed: int = 0, slab: int = 16) -> int:
    """Ellipsoids (semi-axes 6-20 voxels, random orientation of the long axis in y-x) at about one per
    40^3 voxels; returns the foreground voxel count."""
    rng = np.random.default_rng(seed)
    count = int(slices * size * size / 40 ** 3)
    centres = np.column_stack([rng.uniform(0, slices, count), rng.uniform(0, size, count), rng.uniform(0, size, count)])
    radii = np.column_stack([rng.uniform(6, 12, count), rng.uniform(6, 10, count), rng.uniform(10, 20, count)])
    angles = rng.uniform(0, np.pi, count)
    return write_ellipsoids(path, slices, size, centres, radii, angles, slab)


def write_ellipsoids(path: Path, slices: int, size: int, centres: np.ndarray, radii: np.ndarray, angles: np.ndarray,
                     slab: int = 16) -> int:
    """A uint8 Zarr mask of ellipsoids (centres and semi-axes (z, y, x), the long axis turned by ``angles`` in
    y-x), written slab by slab; returns the foreground voxel count."""
    import zarr

    array = zarr.create_array(store=str(path), shape=(slices, size, size), dtype=np.uint8,
                              chunks=(slab, 256, 256), overwrite=True)
    total = 0
    for start in range(0, slices, slab):
        stop = min(start + slab, slices)
        block = np.zeros((stop - start, size, size), np.uint8)
        near = np.flatnonzero((centres[:, 0] + radii[:, 0] > start) & (centres[:, 0] - radii[:, 0] < stop))
        for i in near:
            cz, cy, cx = centres[i]
            rz, ry, rx = radii[i]
            reach = int(np.ceil(max(ry, rx))) + 1
            z0, z1 = max(start, int(cz - rz)), min(stop, int(cz + rz) + 1)
            y0, y1 = max(0, int(cy) - reach), min(size, int(cy) + reach + 1)
            x0, x1 = max(0, int(cx) - reach), min(size, int(cx) + reach + 1)
            if z0 >= z1 or y0 >= y1 or x0 >= x1:
                continue
            zz, yy, xx = np.mgrid[z0:z1, y0:y1, x0:x1]
            c, s = np.cos(angles[i]), np.sin(angles[i])
            u, v = c * (xx - cx) + s * (yy - cy), -s * (xx - cx) + c * (yy - cy)
            inside = ((zz - cz) / rz) ** 2 + (v / ry) ** 2 + (u / rx) ** 2 <= 1
            block[z0 - start:z1 - start, y0:y1, x0:x1] |= inside.astype(np.uint8)
        array[start:stop] = block
        total += int(block.sum())
    return total


PEAK = """
import resource, runpy, sys, threading, time
peaks = {"RssAnon": 0, "RssFile": 0}
done = threading.Event()

def sample():
    # The kernel's split of resident memory, every 20 ms: anonymous (the process's own arrays) and
    # file-backed (pages of mapped files, which the kernel can write back and drop).
    while not done.is_set():
        with open("/proc/self/status") as status:
            for line in status:
                key = line.split(":")[0]
                if key in peaks:
                    peaks[key] = max(peaks[key], int(line.split()[1]))
        time.sleep(0.02)

threading.Thread(target=sample, daemon=True).start()
sys.argv = sys.argv[1:]
try:
    if sys.argv[0] == "-c":
        code, sys.argv = sys.argv[1], ["-c", *sys.argv[2:]]
        exec(code, {"__name__": "__main__"})
    else:
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
finally:
    done.set()
    print("PEAK_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, peaks["RssAnon"], peaks["RssFile"],
          file=sys.stderr)
"""


def child(args: list[str]) -> tuple[float, dict, str]:
    """(seconds, peak memory in MiB: ``rss`` (ru_maxrss), ``anon`` and ``file`` (sampled), stdout) of
    ``python ARGS`` run in its own process."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stderr[-2000:]}")
    line = next(line for line in result.stderr.splitlines() if line.startswith("PEAK_KIB"))
    rss, anon, file = (int(v) / 1024 for v in line.split()[1:])
    return seconds, {"rss": rss, "anon": anon, "file": file}, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_instances"))
    parser.add_argument("--skip-skimage", action="store_true")
    parser.add_argument("--parts", action="store_true", help="time the parts through the API (see above)")
    parser.add_argument("--kind", choices=["ellipsoids", "small"], default="ellipsoids")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compare", action="store_true", help="--parts: check the labels equal skimage's")
    parser.add_argument("--options", choices=["all", "default"], default="all",
                        help="--parts: every component kept (min_voxels 0, as label), or the command's defaults "
                             "(the minimum size from the data)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.parts:
        parts(args)
        return
    rows = []
    for slices in sorted(args.slices):
        volume = args.out / f"pred_{slices}.zarr"
        foreground = write_volume(volume, slices, args.size)
        output = args.out / f"inst_{slices}.zarr"
        seconds, peak, out = child(["mitoseg", "instances", "--prediction", str(volume), "--output", str(output),
                                    "--overwrite", "--no-progress"])
        objects = int(out.strip().splitlines()[-1].split()[0])
        rows.append({"tool": "mitoseg instances", "slices": slices, "objects": objects, "seconds": seconds,
                     **{f"peak_{k}_mib": v for k, v in peak.items()}, "foreground": foreground})
        print(json.dumps(rows[-1]), flush=True)
    if not args.skip_skimage:
        for slices in sorted(args.slices):
            seconds, peak, out = child(["-c", SKIMAGE, str(args.out / f"pred_{slices}.zarr")])
            result = json.loads(out)
            rows.append({"tool": "skimage label", "slices": slices, "objects": result["objects"], "seconds": seconds,
                         **{f"peak_{k}_mib": v for k, v in peak.items()}})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| tool | volume | objects | seconds | peak resident (MiB) | peak anonymous (MiB) "
          "| peak file-backed (MiB) |\n| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['tool']} | {row['slices']} x {args.size} x {args.size} | {row['objects']} | "
              f"{row['seconds']:.0f} | {row['peak_rss_mib']:.0f} | {row['peak_anon_mib']:.0f} | "
              f"{row['peak_file_mib']:.0f} |")


def parts(args) -> None:
    import statistics

    for slices in sorted(args.slices):
        volume = args.out / f"{args.kind}_{slices}_{args.size}.zarr"
        if not volume.exists():
            (write_small_objects if args.kind == "small" else write_volume)(volume, slices, args.size)
        runs = {"segment_s": [], "measure_s": [], "label_s": []}
        objects = set()
        for repeat in range(args.repeats):  # alternated, so both see the same machine
            extra = ["compare"] if args.compare and repeat == 0 else []
            if args.options == "default":
                os.environ["BENCH_OPTIONS"] = "default"
                extra = []
            _, _, out = child(["-c", PARTS, str(volume), *extra])
            mine = json.loads(out)
            if extra:
                assert mine["equal"] == 1, "the labels differ from skimage's"
            _, _, out = child(["-c", SKIMAGE_LABEL, str(volume)])
            theirs = json.loads(out)
            objects |= {mine["objects"], theirs["objects"]}
            runs["segment_s"].append(mine["segment_s"])
            runs["measure_s"].append(mine["measure_s"])
            runs["label_s"].append(theirs["seconds"])
        if args.options == "default":  # the default minimum size may remove objects: the counts differ
            objects = {max(objects)}
        assert len(objects) == 1, f"object counts differ: {objects}"
        row = {"kind": args.kind, "options": args.options, "volume": f"{slices} x {args.size} x {args.size}", "objects": objects.pop(),
               **{f"{k}_min": min(v) for k, v in runs.items()},
               **{f"{k}_median": statistics.median(v) for k, v in runs.items()}}
        row["components_over_label"] = row["segment_s_min"] / row["label_s_min"]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
