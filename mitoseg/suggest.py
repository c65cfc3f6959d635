"""What to label next: the slices without labels ranked by what labeling them is expected to teach the model.

``mitoseg suggest`` predicts a strided sample of the unlabeled slices under a few test-time views (the
identity and the flips of y, x and both: each view's probabilities mapped back) and scores every slice by

- **DAW's uncertain mass** (``uncertain``): the foreground-candidate pixels (foreground probability at least
  ``CANDIDATE``) whose confidence lies above the mean confidence of DAW's *wrong* pseudo-labels and below its
  step threshold: where the model's pseudo-labels are unreliable. The checkpoint's DAW state gives both
  (a run without DAW: its fixed threshold and 1 / K, chance);
- **predictive entropy** (``entropy``), of the views' mean, normalised by log K, averaged over the slice;
- **view disagreement** (``disagreement``): the mean total-variation distance of each view's probabilities
  from their mean;

the three combined by their ranks among the scored slices (``value``, 0-1). The top ``n`` are then chosen
greedily by value times **novelty**: how far a slice is, in z and in a profile of its appearance and
prediction (intensity percentiles, class shares, entropy, disagreement), from the labeled slices and those
already chosen; no two chosen slices are within ``min_gap`` of each other or of a labeled slice, so the
suggestions are never neighbours.

Memory is one slab of slices times the views; time is the predictions of the scored slices (``stride``
thins them). Pure functions (:func:`slab_scores`, :func:`combined_value`, :func:`choose`) hold the maths.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mitoseg.errors import MitosegError

CANDIDATE = 0.1  # a pixel whose foreground probability reaches this may be foreground
DEFAULT_MAX_SCORED = 48  # the auto stride scores at most this many slices
VIEW_FLIPS = ((), (-1,), (-2,), (-2, -1))  # identity, flip x, flip y, both: each its own inverse
CSV_COLUMNS = ("slice", "rank", "value", "novelty", "uncertain_fraction", "uncertain_pixels", "candidate_pixels",
               "entropy", "disagreement", "foreground", "nearest_labeled", "reason")


@dataclass
class SliceScores:
    """The scores of one slice (see the module docstring)."""

    index: int
    uncertain_pixels: int
    candidate_pixels: int
    entropy: float
    disagreement: float
    foreground: float  # share of the slice predicted foreground
    profile: np.ndarray  # the appearance-and-prediction profile of the novelty term
    value: float = 0.0
    novelty: float = 1.0
    rank: int | None = None
    nearest_labeled: int | None = None
    reason: str = ""

    @property
    def uncertain_fraction(self) -> float:
        return self.uncertain_pixels / max(1, self.candidate_pixels)


@dataclass
class Band:
    """The confidence band of unreliable pseudo-labels: (low, high) = (wrong mode's mean, step threshold)."""

    low: float
    high: float
    source: str  # where the two numbers come from, for the report


@dataclass
class Suggestion:
    chosen: list[SliceScores]
    scored: list[SliceScores]
    band: Band
    labeled: list[int]
    stride: int
    num_slices: int
    views: int
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ the maths


def slab_scores(views: torch.Tensor, images: torch.Tensor, band: Band) -> dict[str, torch.Tensor]:
    """Per-slice scores of a slab: ``views`` (V, n, K, y, x) probabilities of V views mapped back to the slab's
    grid, ``images`` (n, y, x) the normalised slices. Returns tensors of (n,) (and ``profile`` (n, P),
    ``map`` (n, y, x): the per-pixel entropy)."""
    mean = views.mean(0)  # (n, K, y, x)
    k = mean.shape[1]
    confidence, label = mean.max(1)
    foreground = 1.0 - mean[:, 0]
    candidate = foreground >= CANDIDATE
    uncertain = candidate & (confidence > band.low) & (confidence < band.high)
    entropy = -(mean * mean.clamp_min(1e-8).log()).sum(1) / math.log(k)  # (n, y, x), 0-1
    disagreement = 0.5 * (views - mean).abs().sum(2).mean(0)  # (n, y, x): total variation, mean over views
    flat = images.reshape(images.shape[0], -1).float()
    percentiles = torch.quantile(flat[:, :: max(1, flat.shape[1] // 65536)],
                                 torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95]), dim=1).T  # (n, 5)
    shares = mean.mean((2, 3))  # (n, K)
    slice_entropy, slice_disagreement = entropy.mean((1, 2)), disagreement.mean((1, 2))
    profile = torch.cat([percentiles, shares, slice_entropy[:, None], slice_disagreement[:, None]], 1)
    return {"uncertain": uncertain.sum((1, 2)), "candidate": candidate.sum((1, 2)), "entropy": slice_entropy,
            "disagreement": slice_disagreement, "foreground": (label != 0).float().mean((1, 2)),
            "profile": profile, "map": entropy}


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks scaled to 0-1 (ties share their mean rank; one value: 1)."""
    if values.size < 2:
        return np.ones_like(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.arange(values.size)
    for value in np.unique(values):  # ties: a handful of distinct scores at most per tie
        same = values == value
        ranks[same] = ranks[same].mean()
    return ranks / (values.size - 1)


def combined_value(scores: list[SliceScores]) -> np.ndarray:
    """The value of each slice: the mean of its ranks by uncertain pixels, entropy and view disagreement."""
    table = np.array([[s.uncertain_pixels, s.entropy, s.disagreement] for s in scores], dtype=np.float64)
    if table.size == 0:
        return np.zeros(0)
    return np.mean([_ranks(column) for column in table.T], axis=0)


def choose(indices: np.ndarray, value: np.ndarray, profile: np.ndarray, labeled: list[int], n: int,
           num_slices: int, min_gap: int = 2, labeled_profiles: np.ndarray | None = None):
    """Greedy choice of ``n`` slices: each time the largest value x novelty, novelty the mean of the z distance
    (relative to ``num_slices / (2 (labeled + n))``, capped at 1) and the profile distance (relative to the
    median distance between scored slices, capped at 1) to the nearest labeled or chosen slice; slices within
    ``min_gap`` of a labeled or chosen one are never taken. Returns (positions into ``indices`` in the order
    chosen, the novelty of each at its choice)."""
    indices = np.asarray(indices, dtype=np.int64)
    z_scale = max(1.0, num_slices / (2.0 * (len(labeled) + n)))
    scale = profile.std(0) + 1e-8
    normed = profile / scale
    pairwise = np.linalg.norm(normed[:, None] - normed[None], axis=-1)
    f_scale = float(np.median(pairwise[np.triu_indices(len(indices), 1)])) if len(indices) > 1 else 1.0
    f_scale = f_scale if f_scale > 0 else 1.0
    z_near = np.full(len(indices), np.inf)
    f_near = np.full(len(indices), np.inf)
    for z in labeled:
        z_near = np.minimum(z_near, np.abs(indices - z))
    if labeled_profiles is not None and len(labeled_profiles):
        f_near = np.linalg.norm(normed[:, None] - (labeled_profiles / scale)[None], axis=-1).min(1)
    allowed = z_near >= min_gap
    chosen, novelties = [], []
    for _ in range(n):
        novelty = 0.5 * np.minimum(1.0, z_near / z_scale) + 0.5 * np.minimum(1.0, f_near / f_scale)
        score = np.where(allowed, value * novelty, -np.inf)
        if not np.isfinite(score).any():
            break
        best = int(np.argmax(score))
        chosen.append(best)
        novelties.append(float(novelty[best]))
        allowed &= np.abs(indices - indices[best]) >= min_gap
        z_near = np.minimum(z_near, np.abs(indices - indices[best]))
        f_near = np.minimum(f_near, pairwise[best])
    return chosen, novelties


def strided(candidates: list[int], stride: int) -> list[int]:
    """Every ``stride``-th candidate slice (all with 1)."""
    return candidates[::max(1, stride)]


def auto_stride(count: int, max_scored: int = DEFAULT_MAX_SCORED) -> int:
    return max(1, math.ceil(count / max_scored))


def band_from_state(state: dict, cfg) -> Band:
    """DAW's band from a checkpoint's method state, else the method's fixed threshold and chance."""
    daw = (state.get("method") or {}).get("daw") if isinstance(state, dict) else None
    if daw is not None:
        mean = torch.as_tensor(daw["mean"]).float()
        return Band(float(mean[1]), float(torch.as_tensor(daw["threshold"])),
                    "the run's DAW state: the wrong pseudo-labels' mean confidence and the step threshold")
    k = int(cfg.data.num_classes)
    return Band(1.0 / k, float(cfg.method.threshold), f"no DAW state: chance (1/{k}) and method.threshold")


def checkpoint_band(path, cfg) -> Band:
    """:func:`band_from_state` of a model file (a TorchScript export keeps no DAW state)."""
    from mitoseg.runs import is_torchscript_file, load_checkpoint

    return band_from_state({} if is_torchscript_file(path) else load_checkpoint(path), cfg)


def reason(s: SliceScores, band: Band) -> str:
    where = ("; no labeled slice yet" if s.nearest_labeled is None else
             f"; {abs(s.index - s.nearest_labeled)} slices from the nearest labeled one ({s.nearest_labeled})")
    return (f"slice {s.index}: {s.uncertain_fraction:.0%} of its foreground-candidate pixels "
            f"({s.uncertain_pixels:,} of {s.candidate_pixels:,}) fall between the wrong pseudo-labels' mean "
            f"confidence {band.low:.2f} and the threshold {band.high:.2f}; entropy {s.entropy:.3f}, view "
            f"disagreement {s.disagreement:.3f}{where}")


# ------------------------------------------------------------------------------------------------ the run


def labeled_slices(label_volume, slab: int = 16) -> list[int]:
    """Slices of a painted label volume with any nonzero voxel."""
    from mitoseg.instances.components import iter_slabs

    found = []
    for start, stop in iter_slabs(len(label_volume), slab):
        block = np.asarray(label_volume.read(start, stop))
        found += [start + i for i in np.flatnonzero(block.reshape(block.shape[0], -1).any(1))]
    return found


def suggest_volume(segmenter, volume, what: str, n: int = 3, labeled: list[int] | None = None,
                   candidates: list[int] | None = None, stride: int | None = None, views: int = 4,
                   min_gap: int = 2, volume_nm: float | None = None, band: Band | None = None, on_map=None,
                   progress: bool = True, hint: str = "") -> Suggestion:
    """The suggestion for ``volume`` (a reader's volume, or anything with ``read(start, stop)``, ``read_slices``,
    ``len`` and ``shape``) by ``segmenter`` (a :class:`~mitoseg.inference.session.Segmenter`; its TTA is
    replaced by this function's ``views``). ``band``: DAW's (default: chance and the method's threshold).
    ``on_map(index, entropy (y, x))`` is called for every scored slice, in increasing order."""
    from tqdm.auto import tqdm

    from mitoseg.inference.session import Segmenter

    if not 1 <= views <= len(VIEW_FLIPS):
        raise MitosegError(f"--views must be 1 to {len(VIEW_FLIPS)} (identity, flips of x, y, both), got {views}")
    if getattr(segmenter.loaded.model, "spatial_dims", 2) == 3:
        raise MitosegError("a 3-D network: mitoseg suggest ranks the slices of 2-D and 2.5-D models")
    # The views are this function's own: the run's TTA (a mean over the flips, the same under every flip) off.
    cfg = copy.deepcopy(segmenter.cfg)
    cfg.inference.tta = False
    segmenter = Segmenter(segmenter.loaded, cfg)
    band = band or band_from_state({}, cfg)
    labeled = sorted(set(labeled or []))
    num_slices = len(volume)
    pool = [i for i in (candidates if candidates is not None else range(num_slices)) if i not in set(labeled)]
    if not pool:
        raise MitosegError(f"{what}: no slice left to suggest (every candidate slice is labeled)")
    step = stride or auto_stride(len(pool))
    scored_indices = strided(pool, step)
    order = sorted(scored_indices + labeled)  # the labeled slices' profiles feed the novelty term
    prepared = segmenter.prepare(volume, what, volume_nm=volume_nm, hint=hint, indices=order, log=progress)
    predictor = prepared.predictor
    flips = VIEW_FLIPS[:views]
    scored_set = set(scored_indices)
    results: dict[int, dict] = {}
    slab = max(1, int(cfg.inference.slab))
    with torch.inference_mode(), tqdm(total=len(order), desc="suggest", unit="slice", disable=not progress,
                                      leave=False) as bar:
        for start in range(0, len(order), slab):
            stop = min(len(order), start + slab)
            images = torch.from_numpy(prepared.normalization(prepared.read(start, stop)))
            if images.dim() == 3:
                images = images.unsqueeze(1)
            probs = torch.stack([predictor.input_probabilities(images.flip(f).contiguous()).flip(f) if f
                                 else predictor.input_probabilities(images) for f in flips])
            scores = slab_scores(probs.float().cpu(), images[:, images.shape[1] // 2], band)
            for row, index in enumerate(order[start:stop]):
                results[index] = {key: value[row] for key, value in scores.items() if key != "map"}
                if on_map is not None and index in scored_set:
                    on_map(index, scores["map"][row].numpy().astype(np.float32))
            bar.update(stop - start)
    scored = [SliceScores(index=i, uncertain_pixels=int(results[i]["uncertain"]),
                          candidate_pixels=int(results[i]["candidate"]), entropy=float(results[i]["entropy"]),
                          disagreement=float(results[i]["disagreement"]),
                          foreground=float(results[i]["foreground"]),
                          profile=results[i]["profile"].numpy().astype(np.float64)) for i in scored_indices]
    value = combined_value(scored)
    profiles = np.stack([s.profile for s in scored])
    labeled_profiles = np.stack([results[i]["profile"].numpy() for i in labeled]) if labeled else None
    picked, novelties = choose(np.array(scored_indices), value, profiles, labeled, n, num_slices, min_gap,
                               labeled_profiles)
    for s, v in zip(scored, value):
        s.value = float(v)
        s.nearest_labeled = min(labeled, key=lambda z: abs(z - s.index)) if labeled else None
    chosen = []
    for rank, (position, novelty) in enumerate(zip(picked, novelties), start=1):
        s = scored[position]
        s.rank, s.novelty = rank, novelty
        s.reason = reason(s, band)
        chosen.append(s)
    notes = []
    if len(chosen) < n:
        notes.append(f"only {len(chosen)} slices could be suggested: the others are within {min_gap - 1} "
                     f"slice(s) of a labeled or suggested one (--min-gap)")
    return Suggestion(chosen, scored, band, labeled, step, num_slices, views, notes)


def suggest(checkpoint: str, image: str, n: int = 3, labeled: list[int] | None = None,
            candidates: list[int] | None = None, stride: int | None = None, views: int = 4, min_gap: int = 2,
            device: str = "auto", weights: str | None = None, voxel_size=None, map_path: str | None = None,
            overwrite: bool = False, progress: bool = True) -> Suggestion:
    """``mitoseg suggest``: :func:`suggest_volume` of the file ``image`` with the model of ``checkpoint`` (DAW's
    band from its state); with ``map_path``, the per-pixel entropy of every scored slice (0 on the others) is
    written as a float32 volume, slice by slice."""
    from mitoseg.data.readers import VolumeWriter, open_volume
    from mitoseg.data.resample import volume_pixel_nm
    from mitoseg.inference.session import Segmenter

    segmenter = Segmenter.from_file(checkpoint, weights, device)
    band = checkpoint_band(checkpoint, segmenter.cfg)
    with open_volume(image, finite=True) as volume, contextlib.ExitStack() as stack:
        on_map = None
        if map_path is not None:
            plane = volume.shape[1:]
            writer = stack.enter_context(VolumeWriter(map_path, (len(volume), *plane), np.float32,
                                                      overwrite=overwrite))
            written = [0]

            def on_map(index: int, entropy: np.ndarray) -> None:
                for gap in range(written[0], index):  # the slices not scored: 0
                    writer.write(gap, np.zeros((1, *plane), np.float32))
                writer.write(index, entropy[None])
                written[0] = index + 1

        result = suggest_volume(segmenter, volume, image, n, labeled, candidates, stride, views, min_gap,
                                volume_pixel_nm(image, voxel_size), band, on_map, progress,
                                hint="--voxel-size Z Y X (nm per voxel of --image)")
        if map_path is not None:
            for gap in range(written[0], len(volume)):
                writer.write(gap, np.zeros((1, *plane), np.float32))
    return result


def write_scores(suggestion: Suggestion, path: str | Path) -> Path:
    """Every scored slice once, suggested ones with their rank, as CSV (atomically)."""
    import io

    from mitoseg.atomic import write_text_atomic

    buffer = io.StringIO()
    out = csv.writer(buffer)
    out.writerow(CSV_COLUMNS)
    for s in sorted(suggestion.scored, key=lambda s: (s.rank is None, s.rank or 0, -s.value)):
        out.writerow([s.index, s.rank if s.rank is not None else "", f"{s.value:.4f}",
                      f"{s.novelty:.4f}" if s.rank is not None else "", f"{s.uncertain_fraction:.4f}",
                      s.uncertain_pixels, s.candidate_pixels, f"{s.entropy:.5f}", f"{s.disagreement:.5f}",
                      f"{s.foreground:.4f}", "" if s.nearest_labeled is None else s.nearest_labeled, s.reason])
    path = Path(path)
    write_text_atomic(path, buffer.getvalue())
    return path
