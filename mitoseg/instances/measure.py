"""Per-object measurements of an instance volume, slab by slab.

Voxel counts, centroids, bounding boxes and mean foreground probabilities are
accumulated slice by slice (``numpy.bincount`` with weights, ``scipy.ndimage.find_objects``),
so memory is bounded by a slab; the surface area of each object is that of its
marching-cubes mesh (scikit-image, in the voxel size's units), computed within its
bounding box. Volumes and areas are in um^3 / um^2 when the voxel size is known
(nm per voxel, z, y, x), else in voxel units.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from mitoseg.atomic import remove_stale_temporaries, write_atomic, write_text_atomic
from mitoseg.errors import MitosegError
from mitoseg.instances.components import iter_slabs

COLUMNS = ("id", "voxels", "volume", "surface_area", "sphericity", "z_extent", "touches_border",
           "centroid_z", "centroid_y", "centroid_x", "bbox_z0", "bbox_y0", "bbox_x0", "bbox_z1", "bbox_y1",
           "bbox_x1", "mean_probability")


@dataclass
class Measurements:
    """One row per object (``rows``: dicts keyed by :data:`COLUMNS`), the units and the volume's size."""

    rows: list[dict]
    volume_unit: str  # "um^3", or "voxels" (a count) without a voxel size
    area_unit: str
    length_unit: str  # of the centroids: "um" or "voxel"
    total_voxels: int
    removed_note: str = ""  # what the minimum object size removed (mitoseg.instances.run.removed_note)

    def summary(self) -> str:
        """count, median / mean volume, total volume fraction: one line."""
        if not self.rows:
            return "0 objects"
        volumes = np.array([row["volume"] for row in self.rows])
        fraction = sum(row["voxels"] for row in self.rows) / max(1, self.total_voxels)
        return (f"{len(self.rows)} objects; volume median {np.median(volumes):.4g} {self.volume_unit}, "
                f"mean {volumes.mean():.4g} {self.volume_unit}; {100 * fraction:.3g} % of the volume")


def surface_area(mask: np.ndarray, spacing) -> float:
    """Area of the marching-cubes surface of a bool (z, y, x) mask at level 0.5 (padded, so it is closed)."""
    from skimage.measure import marching_cubes, mesh_surface_area

    padded = np.pad(mask, 1).astype(np.float32)
    verts, faces, _, _ = marching_cubes(padded, level=0.5, spacing=tuple(float(s) for s in spacing))
    return float(mesh_surface_area(verts, faces))


def measure_objects(ids, count: int, voxel_size_nm=None,
                    read_probability: Callable[[int, int], np.ndarray] | None = None, slab: int = 16,
                    progress: bool = False) -> Measurements:
    """Measurements of objects 1..``count`` of ``ids`` (a (z, y, x) integer array or memory map).

    ``voxel_size_nm``: (z, y, x) nm per voxel, or None (voxel units); ``read_probability(start, stop)``:
    the foreground probability of those slices, for each object's mean.
    """
    num_slices, height, width = ids.shape
    spacing = np.asarray(voxel_size_nm if voxel_size_nm is not None else (1.0, 1.0, 1.0), dtype=np.float64)
    n = count + 1
    voxels = np.zeros(n, dtype=np.int64)
    sums = np.zeros((3, n))
    probability = np.zeros(n) if read_probability is not None else None
    boxes = np.zeros((n, 6), dtype=np.int64)
    boxes[:, :3] = np.iinfo(np.int64).max
    yy, xx = np.mgrid[:height, :width]
    for start, stop in tqdm(list(iter_slabs(num_slices, slab)), desc="measure", unit="slab", disable=not progress,
                            leave=False):
        block = np.asarray(ids[start:stop])
        prob = np.asarray(read_probability(start, stop), dtype=np.float64) if probability is not None else None
        for i, plane in enumerate(block):
            flat = plane.ravel()
            counted = np.bincount(flat, minlength=n)
            voxels += counted
            sums[0] += counted * (start + i)
            sums[1] += np.bincount(flat, weights=yy.ravel(), minlength=n)
            sums[2] += np.bincount(flat, weights=xx.ravel(), minlength=n)
            if prob is not None:
                probability += np.bincount(flat, weights=prob[i].ravel(), minlength=n)
        for label, box in enumerate(ndimage.find_objects(block, max_label=count), start=1):
            if box is None:
                continue
            low = [box[0].start + start, box[1].start, box[2].start]
            high = [box[0].stop + start, box[1].stop, box[2].stop]
            boxes[label, :3] = np.minimum(boxes[label, :3], low)
            boxes[label, 3:] = np.maximum(boxes[label, 3:], high)
        del block, prob  # before the next slab is read
    known = voxel_size_nm is not None
    voxel_volume = float(np.prod(spacing)) / 1e9 if known else 1.0  # nm^3 -> um^3
    area_scale = 1e-6 if known else 1.0  # nm^2 -> um^2
    length_scale = spacing / 1000.0 if known else np.ones(3)
    rows = []
    for label in tqdm(range(1, n), desc="surfaces", unit="object", disable=not progress, leave=False):
        if voxels[label] == 0:
            continue
        z0, y0, x0, z1, y1, x1 = (int(v) for v in boxes[label])
        mask = np.asarray(ids[z0:z1, y0:y1, x0:x1]) == label
        volume = voxels[label] * voxel_volume
        area = surface_area(mask, spacing) * area_scale
        centroid = sums[:, label] / voxels[label]
        rows.append({
            "id": label, "voxels": int(voxels[label]), "volume": volume, "surface_area": area,
            # pi^(1/3) (6 V)^(2/3) / A: 1 for a ball, less for any other shape
            "sphericity": math.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / area if area > 0 else float("nan"),
            "z_extent": z1 - z0,
            "touches_border": bool(z0 == 0 or y0 == 0 or x0 == 0 or z1 == num_slices or y1 == height or x1 == width),
            "centroid_z": centroid[0] * length_scale[0], "centroid_y": centroid[1] * length_scale[1],
            "centroid_x": centroid[2] * length_scale[2],
            "bbox_z0": z0, "bbox_y0": y0, "bbox_x0": x0, "bbox_z1": z1, "bbox_y1": y1, "bbox_x1": x1,
            "mean_probability": probability[label] / voxels[label] if probability is not None else None,
        })
    unit = "um" if known else "voxel"
    # Without a voxel size a volume is a count of voxels, not a cube of some length.
    return Measurements(rows=rows, volume_unit="um^3" if known else "voxels", area_unit=f"{unit}^2",
                        length_unit=unit,
                        total_voxels=int(np.prod(ids.shape)))


def write_table(measurements: Measurements, path: str | Path) -> Path:
    """The per-object table as CSV (or Parquet for a ``.parquet`` path, with pyarrow), written to a
    temporary file of this process (``.NAME.tmp-PID``; those of killed runs removed first) and renamed. Column names carry the units (``volume_um3``, ``centroid_z_um``, ...)."""
    path = Path(path)
    unit = {"um^3": "um3", "voxels": "voxels"}[measurements.volume_unit]
    area = {"um^2": "um2", "voxel^2": "voxel2"}[measurements.area_unit]
    length = measurements.length_unit
    names = {"volume": f"volume_{unit}", "surface_area": f"surface_area_{area}",
             "centroid_z": f"centroid_z_{length}", "centroid_y": f"centroid_y_{length}",
             "centroid_x": f"centroid_x_{length}"}
    columns = [c for c in COLUMNS if c != "mean_probability" or
               any(row["mean_probability"] is not None for row in measurements.rows)]
    header = [names.get(c, c) for c in columns]
    remove_stale_temporaries(path)
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise MitosegError(f"{path}: writing Parquet needs pyarrow (pip install pyarrow); or name a .csv "
                               "file") from exc
        table = pa.table({name: [row[c] for row in measurements.rows] for name, c in zip(header, columns)})
        write_atomic(path, lambda handle: pq.write_table(table, handle))
    else:
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(header)
        for row in measurements.rows:
            writer.writerow([_cell(row[c]) for c in columns])
        write_text_atomic(path, text.getvalue())
    return path


def _cell(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return value
