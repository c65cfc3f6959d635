"""``mitoseg predict --dask``: a volume predicted block by block on the workers of a Dask cluster.

The volume is cut into blocks (``--dask-chunk Z Y X``, whole slabs in z). A block is read with the sliding
windows that reach into it (a halo of about half a window at overlap 0.5, at most one window less a pixel),
each window placed where the single-process prediction places it on whole slices, so a block's values are
those of ``mitoseg predict`` within float rounding, at the seams too
(:meth:`mitoseg.inference.VolumePredictor.block_slabs`: the same predictor, TTA and 2.5-D context; a 3-D
model's slabs keep their halo of half a window of slices). With a working pixel size (``data.pixel_size``)
the windows are placed on the model's grid of the whole slice and the block is read with the input pixels
they and the resampling filter reach (the halo in input pixels: the window span times the factor, plus the
filter's support); the resampling of a block is the same rows of the whole slice's. Each worker loads the model once (a per-process
cache) and writes its blocks straight into the temporary Zarr store of the output; the output is moved into
place (:class:`~mitoseg.data.readers.VolumeWriter`) only when every block is written, so it is complete or
absent. Output Zarr chunks are the blocks' y-x tiles, one slice deep: no two blocks share a chunk.

A lost worker's blocks are computed again by the others (the scheduler reschedules them; a block rewrites
whole chunks, so a half-written one is simply overwritten); a block that raises is retried once.
Post-processing (``--min-object-voxels``, ``--fill-holes``) needs the whole volume and runs here, slab by
slab, on the written labels before they are moved into place.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from mitoseg.errors import MitosegError

DEFAULT_TILE = 1024  # y, x of a block when --dask-chunk is not given
_RETRIES = 1

# ---------------------------------------------------------------------------- addresses and blocks


# A scheduler that answers does so within a second or two; one that does not is refused after this long (Dask's
# default would wait 30 s).
CONNECT_TIMEOUT_S = 5

def parse_address(text: str) -> tuple[str, Any]:
    """``local:N`` -> ("local", N); ``tcp://HOST:PORT`` (or another scheme Dask speaks) -> ("address", text)."""
    text = text.strip()
    if text.startswith("local:"):
        count = text[len("local:"):]
        if not count.isdigit() or int(count) < 1:
            raise MitosegError(f"--dask {text}: local:N needs a number of worker processes N >= 1")
        return "local", int(count)
    scheme, sep, rest = text.partition("://")
    if sep and scheme.isidentifier() and rest:
        return "address", text
    raise MitosegError(f"--dask {text}: expected local:N (N worker processes on this machine) or the address of "
                       "a running scheduler, e.g. tcp://HOST:8786")


def plan_blocks(shape: tuple[int, int, int], chunk: tuple[int, int, int]) -> list[tuple[tuple[int, int], ...]]:
    """The blocks ``((z0, z1), (y0, y1), (x0, x1))`` tiling a volume of ``shape`` by ``chunk``."""
    axes = [[(s, min(s + c, n)) for s in range(0, n, c)] for n, c in zip(shape, chunk)]
    return [(z, y, x) for z in axes[0] for y in axes[1] for x in axes[2]]


def block_shape(shape: tuple[int, int, int], chunk: tuple[int, ...] | None, slab: int) -> tuple[int, int, int]:
    """``--dask-chunk`` (default: one slab of 1024 x 1024), z rounded up to whole slabs, clipped to the volume."""
    z, y, x = chunk if chunk is not None else (slab, DEFAULT_TILE, DEFAULT_TILE)
    if min(z, y, x) < 1:
        raise MitosegError(f"--dask-chunk needs three positive sizes Z Y X, got {z} {y} {x}")
    z = math.ceil(z / slab) * slab
    return min(z, shape[0]), min(y, shape[1]), min(x, shape[2])


# ---------------------------------------------------------------------------- the workers' side


@dataclass(frozen=True)
class BlockJob:
    """What every block task needs (small: paths, settings; the model is loaded by each worker)."""

    checkpoint: str
    weights: str | None
    device: str
    cfg: Any  # mitoseg.config.Config with the command's inference settings
    input: str
    shape: tuple[int, int, int]
    normalization: Any  # mitoseg.data.transforms.Normalization of the whole volume
    labels: Any  # ZarrBlockTarget
    probabilities: Any  # ZarrBlockTarget or None
    label_dtype: str
    torch_threads: int | None
    token: str  # one per command: a worker keeps one model, that of the running command
    scale: float = 1.0  # the input resampled by this factor for the model (data.pixel_size), 1: its own grid


_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()
LOADS = {"count": 0}  # models this process has loaded (the tests check: once per worker)


def worker_predictor(job: BlockJob):
    """This process's predictor for ``job``: the model is loaded on the first block and kept."""
    key = (job.token, job.checkpoint, job.weights, job.device, job.scale)
    with _CACHE_LOCK:
        if key not in _CACHE:
            import torch

            from mitoseg.inference.session import Segmenter, load_model

            _CACHE.clear()  # a worker serving a new command drops the previous one's model
            if job.torch_threads:
                torch.set_num_threads(job.torch_threads)
            segmenter = Segmenter(load_model(job.checkpoint, weights=job.weights, device=job.device), job.cfg)
            _CACHE[key] = segmenter.predictor(job.scale)
            LOADS["count"] += 1
        return _CACHE[key]


def _load_model(job: BlockJob) -> int:
    """Run on every worker before the blocks: its predictor loaded and warmed up (one forward pass)."""
    try:
        worker_predictor(job).warm()
    except MitosegError as exc:
        raise _on_worker(exc) from None
    return os.getpid()


def _on_worker(exc: MitosegError) -> MitosegError:
    """A worker's one-line error, saying which machine raised it (a path the client sees may be missing there)."""
    import socket

    return MitosegError(f"{exc} (on the Dask worker on {socket.gethostname()}, pid {os.getpid()})")


class _Window:
    """A volume seen through a y-x window, with what :class:`~mitoseg.data.readers.SliceReader` calls."""

    def __init__(self, volume, rows: slice, cols: slice):
        self.volume, self.rows, self.cols = volume, rows, cols

    def __len__(self) -> int:
        return len(self.volume)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.volume.read_region(start, stop, self.rows, self.cols)

    def read_slices(self, indices) -> np.ndarray:
        wanted = np.asarray(indices, dtype=np.int64)
        low, high = int(wanted.min()), int(wanted.max()) + 1
        return self.read(low, high)[wanted - low]


def predict_block(job: BlockJob, block: tuple[tuple[int, int], ...]) -> dict:
    """Predict one block and write its labels (and probabilities) into the output store; runs on a worker.
    Its one-line errors say which machine raised them (a path the client sees may be missing there)."""
    try:
        return _predict_block(job, block)
    except MitosegError as exc:
        raise _on_worker(exc) from None


def _predict_block(job: BlockJob, block: tuple[tuple[int, int], ...]) -> dict:
    from mitoseg.data.readers import SliceReader, open_volume
    from mitoseg.inference import labels_from_probabilities

    started = time.perf_counter()
    predictor = worker_predictor(job)
    z, rows, cols = block
    context = job.cfg.data.context_slices
    labels_array = job.labels.open()
    probs_array = job.probabilities.open() if job.probabilities is not None else None
    with open_volume(job.input, finite=True) as volume:
        if tuple(volume.shape) != tuple(job.shape):
            raise MitosegError(f"{job.input}: shape {volume.shape} on this worker, {job.shape} on the client: "
                               "workers must see the same file")

        def read(start: int, stop: int, r: slice, c: slice) -> np.ndarray:
            return SliceReader(_Window(volume, r, c), context=context).read(start, stop)

        for start, stop, probs in predictor.block_slabs(read, job.shape, job.normalization, z, rows, cols):
            r, c = slice(*rows), slice(*cols)
            job.labels.write(start, r, c, labels_from_probabilities(probs, np.dtype(job.label_dtype)),
                             array=labels_array)
            if probs_array is not None:
                job.probabilities.write(start, r, c, probs.cpu().numpy().astype(np.float16), array=probs_array)
    return {"block": block, "seconds": time.perf_counter() - started, "pid": os.getpid()}


# ---------------------------------------------------------------------------- the client's side


@contextlib.contextmanager
def connect(address: str):
    """A ``distributed.Client``: of a new LocalCluster of N worker processes (``local:N``, closed at the end)
    or of the running scheduler at ``address``."""
    try:
        import dask
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise MitosegError("--dask needs dask.distributed: pip install 'mitoseg[dask]' "
                           "(or pip install 'dask[distributed]')") from exc
    kind, value = parse_address(address)
    with contextlib.ExitStack() as stack:
        if kind == "local":
            # One thread per worker process: the workers share the machine's cores between them.
            # ":0": a free port for the scheduler's web server (and dashboard, with bokeh), never a clash.
            with dask.config.set({SPAWN_ENVIRON: worker_environment()}):
                cluster = stack.enter_context(LocalCluster(n_workers=value, threads_per_worker=1, processes=True,
                                                           dashboard_address=":0", silence_logs=logging.ERROR))
            client = stack.enter_context(Client(cluster))
        else:
            try:
                client = stack.enter_context(Client(value, timeout=f"{CONNECT_TIMEOUT_S}s"))
            except (OSError, TimeoutError) as exc:
                raise MitosegError(f"--dask {value}: cannot reach the scheduler ({exc})") from exc
        yield client


SPAWN_ENVIRON = "distributed.nanny.pre-spawn-environ"


def worker_environment() -> dict:
    """Dask's environment for new worker processes without ``MALLOC_TRIM_THRESHOLD_``: its 64 KiB makes glibc
    give every freed tensor's pages back to the system, so each slab's tensors come back as fresh pages, and a
    worker predicted a slab 1.5x slower than a plain process (2.5 s against 3.7 s for 8 x 512 x 512 here). The
    one-thread settings of numerical libraries stay (the workers' torch threads are set per command)."""
    import dask

    return {key: value for key, value in (dask.config.get(SPAWN_ENVIRON, default=None) or {}).items()
            if key != "MALLOC_TRIM_THRESHOLD_"}


def _import_mitoseg() -> str:
    import mitoseg.inference  # noqa: F401  (torch, MONAI: the first block would pay for them)

    return mitoseg.__version__


def warm_up(client) -> None:
    """Import mitoseg on the workers there are now (later ones import it with their first block): a worker
    environment without mitoseg is one clear error before any block runs."""
    try:
        client.run(_import_mitoseg)
    except ImportError as exc:
        raise MitosegError(f"the Dask workers cannot import mitoseg ({exc}); install it in their environment "
                           "(the same version as here)") from None


def _torch_threads(kind: str, workers: int) -> int | None:
    """Local workers split this machine's cores; a remote cluster's workers keep their own setting."""
    if kind != "local":
        return None
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _running_blocks(prefix: str, dask_worker=None) -> int:
    """On a worker: how many tasks whose key starts with ``prefix`` are still executing (a cancelled task
    runs to its end: a thread cannot be stopped)."""
    tasks = getattr(getattr(dask_worker, "state", None), "tasks", {})
    return sum(1 for key, task in list(tasks.items())
               if str(key).startswith(prefix) and getattr(task, "state", "") in ("executing", "cancelled",
                                                                                  "long-running"))


def _wait_until_idle(client, prefix: str, timeout: float = 60.0) -> None:
    """After a failure: wait until no block of ours is still running on any worker (it could write into the
    temporary store as it is deleted; a write into a deleted store is refused, see ZarrBlockTarget)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            running = client.run(_running_blocks, prefix)
        except Exception:
            return
        if not any(running.values()):
            return
        time.sleep(0.2)


def run_blocks(client, job: BlockJob, blocks: list, progress: bool = True) -> list[dict]:
    """Submit one task per block, wait for all (Dask's progress bar), and return their reports; the first
    error is raised (after the other blocks are cancelled and none of ours is running any more)."""
    from distributed import progress as dask_progress
    from distributed import wait

    prefix = f"mitoseg-block-{uuid.uuid4().hex[:8]}-"
    keys = [f"{prefix}{i}" for i in range(len(blocks))]
    futures = client.map(predict_block, [job] * len(blocks), blocks, key=keys, retries=_RETRIES, pure=False)
    done = False
    try:
        if progress:
            dask_progress(futures, interval="0.5s")
            print(flush=True)  # the bar ends without a newline
        else:
            wait(futures)
        reports = client.gather(futures)
        done = True
        return reports
    finally:
        if not done:
            client.cancel(futures)
            _wait_until_idle(client, prefix)


def predict_with_dask(address: str, checkpoint: str, weights: str | None, device: str, cfg, input_spec: str,
                      output: str, probabilities: str | None, label_dtype, overwrite: bool,
                      chunk: tuple[int, int, int] | None = None, voxel_size=None, ngff_version: str | None = None,
                      progress: bool = True, scale: float = 1.0) -> dict:
    """``mitoseg predict --dask``: labels (and probabilities) of ``input_spec`` written to Zarr outputs by the
    workers of the cluster at ``address``; post-processed here when ``cfg.inference`` asks for it. Returns
    a summary (blocks, workers, seconds). ``scale``: the factor the input is resampled by for the model
    (:func:`mitoseg.inference.session.input_scale`); each block is read with the input pixels its model-grid
    windows and the resampling filter need (:meth:`~mitoseg.inference.VolumePredictor.block_slabs`)."""
    from mitoseg.data.readers import VolumeWriter, open_volume
    from mitoseg.inference.session import volume_normalization
    from mitoseg.instances.postprocess import postprocess_labels

    kind, _ = parse_address(address)
    started = time.perf_counter()
    with open_volume(input_spec, finite=True) as volume:
        shape = tuple(volume.shape)
        normalization = volume_normalization(volume, cfg, what=input_spec)
    num_classes = cfg.data.num_classes
    block = block_shape(shape, chunk, cfg.inference.slab)
    blocks = plan_blocks(shape, block)
    tile = block[1:]
    with contextlib.ExitStack() as stack:
        labels_out = stack.enter_context(VolumeWriter(output, shape, label_dtype, overwrite=overwrite,
                                                      voxel_size=voxel_size, labels=True,
                                                      ngff_version=ngff_version, tile=tile))
        probs_out = None
        if probabilities:
            probs_out = stack.enter_context(VolumeWriter(probabilities, (shape[0], num_classes, *shape[1:]),
                                                         np.float16, overwrite=overwrite, voxel_size=voxel_size,
                                                         ngff_version=ngff_version, tile=tile))
        labels_target = labels_out.block_target()
        probs_target = probs_out.block_target() if probs_out is not None else None
        # The cluster closes (local) or our blocks stop (remote) before a failed output is deleted.
        client = stack.enter_context(connect(address))
        warm_up(client)
        workers = len(client.nthreads())
        job = BlockJob(checkpoint=os.path.abspath(checkpoint), weights=weights, device=device, cfg=cfg,
                       input=_absolute_spec(input_spec), shape=shape, normalization=normalization,
                       labels=labels_target, probabilities=probs_target,
                       label_dtype=np.dtype(label_dtype).str, torch_threads=_torch_threads(kind, workers),
                       token=uuid.uuid4().hex, scale=float(scale))
        # Every worker loads the model and sets its convolutions up once, together, before the first block
        # (a worker that joins later does so with its first block).
        client.run(_load_model, job)
        if progress:
            dashboard = f"; dashboard {client.dashboard_link}" if importlib.util.find_spec("bokeh") else ""
            print(f"dask: {len(blocks)} blocks of {block[0]} x {block[1]} x {block[2]} on {workers} worker(s) at "
                  f"{client.scheduler.address}{dashboard}", flush=True)
        submitted = time.perf_counter()
        reports = run_blocks(client, job, blocks, progress=progress)
        predicted = time.perf_counter() - submitted
        if progress:
            print(f"dask: {len(blocks)} blocks in {predicted:.1f} s "
                  f"({math.prod(shape) / max(predicted, 1e-9) / 1e6:.2f} Mvoxel/s)", flush=True)
        inference = cfg.inference
        if inference.min_object_voxels > 0 or inference.fill_holes:
            array = labels_target.open()

            def put(start: int, labels: np.ndarray) -> None:
                array[start:start + labels.shape[0]] = labels

            postprocess_labels(lambda s, e: np.asarray(array[s:e]), put, shape[0], inference.min_object_voxels,
                               inference.fill_holes, slab=inference.slab, progress=progress)
        labels_out.finish_blocks()
        if probs_out is not None:
            probs_out.finish_blocks()
        # Leaving the block closes the client / cluster first, then moves the outputs into place.
    return {"blocks": len(blocks), "block": block, "workers": workers, "seconds": time.perf_counter() - started,
            "predict_seconds": predicted, "block_seconds": sum(r["seconds"] for r in reports)}


def _absolute_spec(spec: str) -> str:
    """``spec`` with an absolute file part: workers may run in another directory."""
    from mitoseg.data.readers import split_spec

    file, inner = split_spec(spec)
    return os.path.abspath(file) + (f":/{inner}" if inner else "")
