"""Deterministic synthetic EM volumes with mitochondria labels.

:func:`make_em_volume` renders a small FIB-SEM-like stack of neuropil: grey
textured cytoplasm partitioned into cell processes by thin dark membranes,
vesicles and dark blobs as distractors, and mitochondria as darker elongated
bodies with a double outer membrane and cristae. Every structure is a 3-D object
that continues smoothly across slices. :func:`write_sample_data` writes the
train / validation set shipped in ``sample_data/``.

The same ``seed`` gives byte-identical arrays: every random number comes from
one ``numpy.random.default_rng(seed)`` drawn in a fixed order.

Rendering outline (intensities on a 0-255 scale before the imaging step):

* cells: an additively weighted Voronoi partition of a smoothly warped plane
  whose seeds drift slowly with z; each mitochondrion also seeds a cell, so
  membranes run around mitochondria instead of through them. Membranes are
  dark Gaussian ridges about 2 px wide along the cell boundaries.
* cytoplasm: about 158, a per-cell offset (some processes darker), a smooth
  low-frequency texture and a fine granular texture.
* vesicles (dark rim, lighter lumen, radius 4-8 px, some in clusters) and dark
  blobs (about as dark as mitochondria, without membrane or cristae).
* mitochondria: bent superellipsoids, 30-90 px long and 14-30 px wide in-plane,
  spanning several slices with a slight drift; darker matrix, two dark rings of
  outer membrane with a lighter gap, and dark cristae stripes across the short
  axis. The label is the whole body, membrane included. Objects never overlap.
* imaging: per-slice gain and offset, Gaussian blur (sigma 0.75-1.1 px) and
  signal-dependent Gaussian noise, rounded and clipped to uint8.
"""

from __future__ import annotations

import math
import operator
import os
import secrets
from pathlib import Path

import numpy as np
from scipy import ndimage

from mitoseg.errors import MitosegError

TRAIN_SHAPE = (24, 256, 256)
VAL_SHAPE = (8, 256, 256)
SAMPLE_FILES = {
    "train_image": "train_image.tif",
    "train_label": "train_label.tif",
    "val_image": "val_image.tif",
    "val_label": "val_label.tif",
    "readme": "README.md",
}

_CYTO_LEVEL = 158.0
_FRACTION_TARGET = (0.09, 0.13)  # foreground fraction aimed at when num_mitochondria is None
_FRACTION_MAX = 0.15
_MITO_MARGIN = 3  # px kept free around every mitochondrion (in-plane)


# ----------------------------------------------------------------------------- helpers


def _check_shape(shape) -> tuple[int, int, int]:
    try:
        dims = tuple(_index(d) for d in shape)
    except TypeError:
        dims = ()
    if len(dims) != 3 or dims[0] < 1 or min(dims[1:]) < 8:
        raise MitosegError(f"shape must be three integers (z, y, x) with z >= 1 and y, x >= 8, got {shape!r}")
    return dims


def _index(value) -> int:
    """``operator.index`` that also refuses bools (a shape of True is a mistake)."""
    if isinstance(value, bool):
        raise TypeError("bool is not a size")
    return operator.index(value)


def _check_seed(seed) -> int:
    try:
        value = _index(seed)
    except TypeError:
        value = -1
    if value < 0:
        raise MitosegError(f"seed must be a non-negative integer, got {seed!r}")
    return value


def _smooth_noise(rng: np.random.Generator, shape, sigma) -> np.ndarray:
    """Gaussian-filtered white noise with zero mean and unit std, float32.

    Wide in-plane filters are computed on a coarse grid and upsampled (cubic),
    which is much faster than filtering at full resolution.
    """
    depth, height, width = shape
    sz, sy, sx = sigma
    step = max(1, int(min(sy, sx) // 3))
    pad = 3
    coarse = (depth, -(-height // step) + 2 * pad, -(-width // step) + 2 * pad)
    noise = rng.standard_normal(coarse, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, (sz, sy / step, sx / step), mode="wrap")
    if step > 1:
        noise = ndimage.zoom(noise, (1, step, step), order=1, mode="nearest")
    off = pad * step
    noise = noise[:, off:off + height, off:off + width]
    noise -= noise.mean()
    std = noise.std()
    return noise / std if std > 0 else noise


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


class _Mito:
    """Geometry of one mitochondrion: a bent superellipsoid drifting with z."""

    def __init__(self, rng: np.random.Generator, shape):
        depth, height, width = shape
        self.length = rng.uniform(30.0, 90.0)
        self.a = self.length / 2.0  # semi-axes in-plane (long, short)
        self.b = min(rng.uniform(7.0, 15.0), 0.8 * self.a)
        self.c = rng.uniform(3.5, 9.0)  # z semi-axis in slices
        self.zc = rng.uniform(-0.5, depth - 0.5)
        self.yc = rng.uniform(0.0, height - 1.0)
        self.xc = rng.uniform(0.0, width - 1.0)
        self.vy, self.vx = rng.normal(0.0, 0.6, 2)  # drift in px per slice
        theta = rng.uniform(0.0, math.pi)
        self.cos, self.sin = math.cos(theta), math.sin(theta)
        self.bend = rng.uniform(-0.3, 0.3) * self.b / self.a**2
        self.p = rng.uniform(2.0, 2.6)  # in-plane superellipse exponent (2 = ellipse)
        self.q = rng.uniform(2.5, 4.0)  # z profile exponent (larger = more cylindrical)
        # appearance
        self.darkness = rng.uniform(28.0, 42.0)
        self.ring = rng.uniform(50.0, 70.0)
        self.period = rng.uniform(6.0, 10.0)
        self.tilt = rng.uniform(-0.3, 0.3)
        self.phase = rng.uniform(0.0, 1.0)
        self.zphase = rng.uniform(-0.08, 0.08)
        self.cristae = rng.uniform(45.0, 65.0)
        self.gap = rng.uniform(2.0, 10.0)  # px of cytoplasm between body and its cell membrane

    def scale(self, z):
        """In-plane size factor of the body at slice z (0 outside its z extent)."""
        t = np.minimum(np.abs((np.asarray(z, dtype=np.float32) - self.zc) / self.c), 1.0)
        return (1.0 - t**self.q) ** (1.0 / self.q)

    def coords(self, z, y, x):
        """Rotated coordinates (u along the long axis, v across) and the normalised radius."""
        dy = y - (self.yc + self.vy * (z - self.zc))
        dx = x - (self.xc + self.vx * (z - self.zc))
        u = dx * self.cos + dy * self.sin
        v = dy * self.cos - dx * self.sin
        vb = v - self.bend * u * u
        r = ((np.abs(u) / self.a) ** self.p + (np.abs(vb) / self.b) ** self.p) ** (1.0 / self.p)
        return u, v, r

    def box(self, shape, margin):
        """Slices of the volume that contain the body dilated by margin, or None if empty."""
        depth, height, width = shape
        z0 = max(0, math.floor(self.zc - self.c))
        z1 = min(depth, math.ceil(self.zc + self.c) + 1)
        if z0 >= z1:
            return None
        reach = self.a + 0.3 * self.b + margin + 2
        dz = np.array([z0 - self.zc, z1 - 1 - self.zc])
        ys = self.yc + self.vy * dz
        xs = self.xc + self.vx * dz
        y0, y1 = max(0, math.floor(ys.min() - reach)), min(height, math.ceil(ys.max() + reach) + 1)
        x0, x1 = max(0, math.floor(xs.min() - reach)), min(width, math.ceil(xs.max() + reach) + 1)
        if y0 >= y1 or x0 >= x1:
            return None
        return slice(z0, z1), slice(y0, y1), slice(x0, x1)

    def body(self, box):
        zz, yy, xx = np.ogrid[box[0], box[1], box[2]]
        zz = zz.astype(np.float32)
        u, v, r = self.coords(zz, yy.astype(np.float32), xx.astype(np.float32))
        inside = r <= self.scale(zz)
        stripe = (u + self.tilt * v) / self.period + self.phase + self.zphase * (zz - self.zc)
        return inside, stripe


def _place_mitochondria(rng, shape, num):
    """Non-overlapping mitochondria: instance ids (int16), cristae phase field, objects."""
    depth, height, width = shape
    total = depth * height * width
    inst = np.zeros(shape, np.int16)
    occupied = np.zeros(shape, bool)  # bodies dilated by the margin
    phase = np.zeros(shape, np.float32)
    mitos: list[_Mito] = []
    target = rng.uniform(*_FRACTION_TARGET)
    max_attempts = 60 * num + 20 if num is not None else 400
    disk = np.hypot(*np.mgrid[-_MITO_MARGIN:_MITO_MARGIN + 1, -_MITO_MARGIN:_MITO_MARGIN + 1]) <= _MITO_MARGIN
    dilation = np.zeros((3,) + disk.shape, bool)
    dilation[1] = disk
    dilation[0, _MITO_MARGIN, _MITO_MARGIN] = dilation[2, _MITO_MARGIN, _MITO_MARGIN] = True
    count = 0
    for _ in range(max_attempts):
        if num is not None and len(mitos) == num:
            break
        if num is None and count >= target * total:
            break
        mito = _Mito(rng, shape)
        box = mito.box(shape, _MITO_MARGIN)
        if box is None:
            continue
        inside, stripe = mito.body(box)
        size = int(inside.sum())
        if size < 20 or occupied[box][inside].any():
            continue
        if num is None and count + size > _FRACTION_MAX * total:
            continue
        mitos.append(mito)
        count += size
        inst[box][inside] = len(mitos)
        phase[box][inside] = stripe[inside]
        occupied[box] |= ndimage.binary_dilation(inside, dilation)
    if num is not None and len(mitos) < num:
        raise MitosegError(f"could not place {num} non-overlapping mitochondria in a volume of shape "
                           f"{tuple(shape)}; ask for fewer or a larger volume")
    return inst, phase, occupied, mitos


def _cells(rng, shape, mitos):
    """Cell id per voxel and distance (px) to the nearest cell boundary."""
    depth, height, width = shape
    margin = 48
    area = (height + 2 * margin) * (width + 2 * margin)
    n = max(3, int(round(area / rng.uniform(1600.0, 2600.0))))
    p0 = np.stack([rng.uniform(-margin, height + margin, n), rng.uniform(-margin, width + margin, n)], 1)
    vel = rng.normal(0.0, 0.4, (n, 2)).astype(np.float32)
    weight = rng.uniform(0.0, 12.0, n).astype(np.float32)
    warp_y = 6.0 * _smooth_noise(rng, shape, (6.0, 20.0, 20.0))
    warp_x = 6.0 * _smooth_noise(rng, shape, (6.0, 20.0, 20.0))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cell = np.empty(shape, np.int32)
    boundary = np.empty(shape, np.float32)
    zmid = (depth - 1) / 2.0
    for z in range(depth):
        wy, wx = yy + warp_y[z], xx + warp_x[z]
        pos = (p0 + vel * (z - zmid)).astype(np.float32)
        # nearest and second-nearest seed, seed by seed (np.partition over seeds is slow)
        first = np.full((height, width), np.inf, np.float32)
        second = np.full((height, width), np.inf, np.float32)
        nearest = np.zeros((height, width), np.int32)
        for i in range(n + len(mitos)):
            if i < n:
                d = np.hypot(wy - pos[i, 0], wx - pos[i, 1]) - weight[i]
            else:
                mito = mitos[i - n]
                _, _, r = mito.coords(np.float32(z), yy, xx)
                d = (r - mito.scale(z)) * np.float32(math.sqrt(mito.a * mito.b)) - np.float32(mito.gap)
            closer = d < first
            np.minimum(second, np.maximum(first, d), out=second)
            np.minimum(first, d, out=first)
            nearest[closer] = i
        cell[z] = nearest
        f = second - first
        gy, gx = np.gradient(f)
        grad = np.clip(ndimage.maximum_filter(np.hypot(gy, gx), size=3), 0.5, 2.0)
        boundary[z] = f / grad
    return cell, boundary, n


def _render_spheres(rng, shape, occupied, delta, count, kind):
    """Add vesicles or dark blobs to ``delta`` where nothing else is; returns their mask."""
    depth, height, width = shape
    placed = np.zeros(shape, bool)
    centres = []
    if kind == "vesicle":
        n_clusters = rng.poisson(4.0 * height * width / 65536)
        clusters = [(rng.uniform(0, depth), rng.uniform(0, height), rng.uniform(0, width), rng.integers(8, 20))
                    for _ in range(n_clusters)]
    else:
        clusters = []
    plan = [(None, count)] + [((cz, cy, cx), int(k)) for cz, cy, cx, k in clusters]
    for cluster, k in plan:
        done = 0
        for _ in range(3 * k):
            if done == k:
                break
            if cluster is None:
                zc, yc, xc = rng.uniform(0, depth), rng.uniform(0, height), rng.uniform(0, width)
            else:
                zc = cluster[0] + rng.normal(0, 1.5)
                yc, xc = cluster[1] + rng.normal(0, 14), cluster[2] + rng.normal(0, 14)
            if kind == "vesicle":
                ry = rx = rng.uniform(4.0, 8.0)
                theta = 0.0
                rz = rng.uniform(1.5, 3.5)
                rim, lumen = rng.uniform(45.0, 70.0), rng.uniform(0.0, 15.0)
            else:
                ry = rng.uniform(5.0, 14.0)
                rx = ry * rng.uniform(0.5, 1.0)
                theta = rng.uniform(0.0, math.pi)
                rz = rng.uniform(2.0, 6.0)
                rim, lumen = 0.0, -rng.uniform(55.0, 85.0)
            # z counts about 4 px per slice when keeping objects apart
            if any((4 * (zc - z)) ** 2 + (yc - y) ** 2 + (xc - x) ** 2 < (r + ry + 2) ** 2 for z, y, x, r in centres):
                continue
            reach = ry + 3
            box = (slice(max(0, math.floor(zc - rz)), min(depth, math.ceil(zc + rz) + 1)),
                   slice(max(0, math.floor(yc - reach)), min(height, math.ceil(yc + reach) + 1)),
                   slice(max(0, math.floor(xc - reach)), min(width, math.ceil(xc + reach) + 1)))
            if any(s.start >= s.stop for s in box):
                continue
            zz, yy, xx = np.ogrid[box[0], box[1], box[2]]
            scale = np.sqrt(np.clip(1.0 - ((zz - zc) / rz) ** 2, 0.0, 1.0))
            dy, dx = yy - yc, xx - xc
            u = dx * math.cos(theta) + dy * math.sin(theta)
            v = dy * math.cos(theta) - dx * math.sin(theta)
            rn = np.hypot(u / rx, v / ry)  # normalised radius
            edge = (scale - rn) * min(rx, ry)  # ~ px inside the (scaled) outline, negative outside
            footprint = (edge > -2.5) & (scale > 0)
            if not footprint.any() or occupied[box][footprint].any():
                continue
            shade = lumen * _sigmoid(edge / 0.7) - rim * np.exp(-0.5 * (edge / 0.8) ** 2)
            delta[box] += np.where(scale > 0, shade, 0.0).astype(np.float32)
            placed[box] |= footprint
            centres.append((zc, yc, xc, ry))
            done += 1
    return placed


# ----------------------------------------------------------------------------- public API


def make_em_volume(shape: tuple[int, int, int] = (16, 256, 256), seed: int = 0, *,
                   num_mitochondria: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic FIB-SEM-like volume and its mitochondria label.

    Args:
        shape: (z, y, x) size in voxels; z >= 1, y and x >= 8.
        seed: non-negative integer; the same seed gives byte-identical arrays.
        num_mitochondria: exactly this many mitochondria (each at least partly
            inside the volume). By default they are added until about 9-13 % of
            voxels are foreground (never more than 15 %).

    Returns:
        ``(image, label)``, both uint8 arrays of ``shape``; label is 0 for
        background and 1 for mitochondrion (membrane included).

    Raises:
        MitosegError: a bad shape, seed or num_mitochondria, or mitochondria
            that do not fit.
    """
    shape = _check_shape(shape)
    seed = _check_seed(seed)
    if num_mitochondria is not None:
        try:
            count = _index(num_mitochondria)
        except TypeError:
            count = -1
        if count < 0:
            raise MitosegError(f"num_mitochondria must be a non-negative integer or None, got {num_mitochondria!r}")
        num_mitochondria = count
    rng = np.random.default_rng(seed)
    depth, height, width = shape
    area_scale = height * width / 65536

    inst, stripe, occupied, mitos = _place_mitochondria(rng, shape, num_mitochondria)
    mask = inst > 0

    # cytoplasm: cell offsets, low-frequency and granular texture
    cell, boundary, n_cells = _cells(rng, shape, mitos)
    offsets = rng.normal(0.0, 6.0, n_cells + len(mitos)).astype(np.float32)
    dark = rng.random(n_cells) < 0.2
    offsets[:n_cells][dark] -= rng.uniform(12.0, 24.0, int(dark.sum())).astype(np.float32)
    cytoplasm = _CYTO_LEVEL + offsets[cell] + 7.0 * _smooth_noise(rng, shape, (3.0, 24.0, 24.0))
    image = cytoplasm + 8.0 * _smooth_noise(rng, shape, (0.7, 1.1, 1.1))
    # sparse dark specks (ribosomes, microtubule cross-sections)
    image -= 18.0 * np.clip(_smooth_noise(rng, shape, (0.5, 0.9, 0.9)) - 2.0, 0.0, None)

    # cell membranes: dark ridges ~2 px wide, strength varying slowly along them
    strength = rng.uniform(65.0, 80.0) * (1.0 + 0.15 * _smooth_noise(rng, shape, (3.0, 16.0, 16.0)))
    image -= strength * np.exp(-0.5 * (boundary / 1.0) ** 2)

    # distractors
    delta = np.zeros(shape, np.float32)
    _render_spheres(rng, shape, occupied, delta, rng.poisson(40 * area_scale), "vesicle")
    _render_spheres(rng, shape, occupied, delta, rng.poisson(8 * area_scale) + 1, "blob")
    image += delta

    # mitochondria: darker matrix, double outer membrane, cristae
    if mitos:
        depth_in = ndimage.distance_transform_edt(mask, sampling=(1e3, 1.0, 1.0)).astype(np.float32) - 0.5
        wobble = 0.15 * _smooth_noise(rng, shape, (1.0, 4.0, 4.0))
        extent = np.clip((_smooth_noise(rng, shape, (1.0, 5.0, 5.0)) + 0.9) / 0.8, 0.0, 1.0)
        matrix = 6.0 * _smooth_noise(rng, shape, (0.7, 1.5, 1.5))
        ids = inst[mask] - 1
        darkness = np.array([m.darkness for m in mitos], np.float32)[ids]
        ring = np.array([m.ring for m in mitos], np.float32)[ids]
        cristae = np.array([m.cristae for m in mitos], np.float32)[ids]
        d = depth_in[mask]
        rings = np.exp(-0.5 * ((d - 0.7) / 0.5) ** 2) + np.exp(-0.5 * ((d - 3.0) / 0.5) ** 2)
        stripes = (0.5 + 0.5 * np.cos(2 * np.pi * (stripe[mask] + wobble[mask]))) ** 6
        fade = np.clip((d - 3.6) / 1.2, 0.0, 1.0)
        image[mask] = (cytoplasm[mask] - darkness + matrix[mask] - ring * rings
                       - cristae * stripes * fade * extent[mask])

    # imaging: per-slice gain/offset, blur, signal-dependent noise
    gain = 1.0 + rng.normal(0.0, 0.05, depth)
    offset = rng.normal(0.0, 4.0, depth)
    sigma = rng.uniform(0.75, 1.1, depth)
    for z in range(depth):
        image[z] = (image[z] - 150.0) * gain[z] + 150.0 + offset[z]
        image[z] = ndimage.gaussian_filter(image[z], sigma[z])
    image += rng.standard_normal(shape, dtype=np.float32) * np.sqrt(9.0 + 0.4 * np.clip(image, 0.0, None))
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image, mask.astype(np.uint8)


def _derived_seeds(seed: int) -> tuple[int, int]:
    train, val = np.random.SeedSequence(seed).spawn(2)
    return int(train.generate_state(1)[0]), int(val.generate_state(1)[0])


_README = """\
# mitoseg sample data (synthetic)

Synthetic FIB-SEM-like volumes of neuropil with mitochondria labels, made by
`mitoseg.data.synthetic.make_em_volume` (no real data). Regenerate with
`mitoseg sample-data sample_data/ --seed {seed} --overwrite`.

| file | shape (z, y, x) | dtype | content |
|---|---|---|---|
| train_image.tif | {train} | uint8 | EM-like image |
| train_label.tif | {train} | uint8 | 0 = background, 1 = mitochondrion |
| val_image.tif | {val} | uint8 | EM-like image |
| val_label.tif | {val} | uint8 | 0 = background, 1 = mitochondrion |

Seed {seed} (train volume seed {train_seed}, validation volume seed {val_seed}).
The images show grey textured cytoplasm, thin dark cell membranes, vesicles and
dark blobs (not mitochondria), and mitochondria: darker elongated bodies with a
double outer membrane and cristae, each spanning several slices. The label
covers the whole mitochondrion including its membrane.
"""


def _write_atomic(path: Path, write) -> None:
    """``write(tmp)`` to a hidden temporary file next to ``path``, then move it into place."""
    # a fresh name rather than tempfile.mkstemp, whose 0600 mode would stick to the result
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_sample_data(out_dir, seed: int = 0, overwrite: bool = False) -> dict[str, Path]:
    """Write the synthetic sample set into ``out_dir``.

    Files: ``train_image.tif`` / ``train_label.tif`` (24 x 256 x 256) and
    ``val_image.tif`` / ``val_label.tif`` (8 x 256 x 256), uint8, zlib
    compressed, from two seeds derived from ``seed``, plus a ``README.md``.
    Each file is written to a temporary file in ``out_dir`` and moved into place.

    Returns:
        paths by key: ``train_image``, ``train_label``, ``val_image``,
        ``val_label``, ``readme``.

    Raises:
        MitosegError: an output exists and ``overwrite`` is False (nothing is
            written then), or ``out_dir`` cannot be created or written.
    """
    import tifffile

    seed = _check_seed(seed)
    out = Path(out_dir)
    paths = {key: out / name for key, name in SAMPLE_FILES.items()}
    if out.exists() and not out.is_dir():
        raise MitosegError(f"{out} exists and is not a directory")
    if not overwrite:
        existing = [str(p) for p in paths.values() if p.exists() or p.is_symlink()]
        if existing:
            verb = "exists" if len(existing) == 1 else "exist"
            raise MitosegError(f"{', '.join(existing)} already {verb}; pass --overwrite to replace the sample "
                               "data")
    train_seed, val_seed = _derived_seeds(seed)
    volumes = {}
    for split, shape, split_seed in (("train", TRAIN_SHAPE, train_seed), ("val", VAL_SHAPE, val_seed)):
        volumes[f"{split}_image"], volumes[f"{split}_label"] = make_em_volume(shape, split_seed)
    readme = _README.format(seed=seed, train=TRAIN_SHAPE, val=VAL_SHAPE, train_seed=train_seed, val_seed=val_seed)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for key, array in volumes.items():
            _write_atomic(paths[key], lambda tmp, a=array: tifffile.imwrite(
                tmp, a, photometric="minisblack", compression="zlib"))
        _write_atomic(paths["readme"], lambda tmp: Path(tmp).write_text(readme, encoding="utf-8"))
    except OSError as exc:
        raise MitosegError(f"cannot write sample data to {out}: {exc.strerror or exc}") from exc
    return paths
