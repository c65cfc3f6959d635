"""DeepLabV3+ ResNet-101: seconds per training step of the natural-image methods.

    python benchmarks/bench_deeplab.py [--methods daw daw_ddfp] [--crop 321] [--batch 2] [--steps 3]
                                       [--device auto|cpu|cuda] [--json OUT.json] [--sync-debug]

One step is the trainer's ``Trainer.train_step`` (the method's forward passes, backward,
SGD with the head at 10x, poly schedule, EMA update; AMP on CUDA) on synthetic batches of
the shapes the Pascal configs produce: ``--batch`` labeled images and ``--batch`` unlabeled
images plus as many CutMix partners, ``--crop`` pixels square, 21 classes, the
configs' network (ResNet-101, output stride 16, deep stem, 256-channel decoder and head).
Data loading is excluded (measure it with the real data set). The DDFP flow is active
from the first step (``ddfp.start_iter = 0``). Time: median over ``--steps`` steps after
one warm-up step, synchronised on CUDA. For scale: the official DDFP Pascal log shows
0.82 s per iteration (4 GPUs, crop 513, batch 4 per GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mitoseg.config import load_config
from mitoseg.methods import build_method
from mitoseg.losses import make_supervised_loss


def synthetic_batches(batch: int, crop: int, classes: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labeled = {"image": torch.randn(batch, 3, crop, crop, generator=g),
               "label": torch.randint(0, classes, (batch, crop, crop), generator=g)}
    labeled["label"][:, :8] = 255
    n = 2 * batch
    unlabeled = {"weak": torch.randn(n, 3, crop, crop, generator=g),
                 "strong1": torch.randn(n, 3, crop, crop, generator=g),
                 "strong2": torch.randn(n, 3, crop, crop, generator=g),
                 "box1": (torch.rand(n, crop, crop, generator=g) > 0.7).to(torch.uint8),
                 "box2": (torch.rand(n, crop, crop, generator=g) > 0.7).to(torch.uint8),
                 "valid": torch.ones(n, crop, crop, dtype=torch.bool)}
    return ({k: v.to(device) for k, v in labeled.items()}, {k: v.to(device) for k, v in unlabeled.items()})


class _StepOnly:
    """The parts of :class:`mitoseg.engine.trainer.Trainer` one step touches, without data sets."""

    def __init__(self, cfg, device: torch.device):
        from mitoseg import distributed
        from mitoseg.engine.ema import ModelEMA
        from mitoseg.engine.trainer import Trainer, lr_schedule, make_optimizer
        from mitoseg.device import amp_dtype
        from mitoseg.networks import build_model

        self.cfg, self.device = cfg, device
        self.amp = amp_dtype(device, cfg.train.amp) is not None
        self.iteration, self.total_iterations = 0, cfg.train.iterations
        self.dist = distributed.DistInfo()
        self.method = build_method(cfg, make_supervised_loss(cfg.train)).to(device)
        self.model = build_model(cfg.model, cfg.data.num_classes).to(device)
        self.ema = ModelEMA(self.model, cfg.train.ema_decay, warmup=cfg.train.ema_warmup)
        self.optimizer = make_optimizer(self.model, cfg.optim)
        self.scheduler = lr_schedule(self.optimizer, self.total_iterations, cfg.optim)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype(device, cfg.train.amp) == torch.float16)
        self.train_step = Trainer.train_step.__get__(self)


def host_synchronisations(fn) -> dict[str, int]:
    """The calls in ``fn`` that make the host wait for the GPU (torch's sync debug mode), by source line."""
    import traceback
    import warnings

    torch.cuda.synchronize()
    found: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message).lower():
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename
                      and "warnings.py" not in f.filename]
            where = f"{frames[-1].filename.split('/')[-1]}:{frames[-1].lineno}" if frames else filename
            found[where] = found.get(where, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return found


def measure(method: str, args, device: torch.device) -> dict:
    overrides = [f"method.name={method}", f"data.crop_size={args.crop}", f"data.batch_size={args.batch}",
                 f"data.unlabeled_batch_size={args.batch}", "method.ddfp.start_iter=0", "model.pretrained=null",
                 "train.epochs=null", "train.iterations=1000"]
    if method == "ddfp":
        overrides.append("method.pseudo_labels=teacher")
    cfg = load_config(args.config, overrides)
    torch.manual_seed(0)
    step = _StepOnly(cfg, device)
    labeled, unlabeled = synthetic_batches(args.batch, args.crop, cfg.data.num_classes, device)
    times = []
    for i in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        logs = step.train_step(labeled, unlabeled)
        float(logs["loss"])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i > 0:
            times.append(time.perf_counter() - start)
        step.iteration += 1
    result = {"method": method, "device": str(device), "crop": args.crop, "batch": args.batch,
              "seconds_per_step": round(statistics.median(times), 3), "steps": times,
              "threads": torch.get_num_threads()}
    if device.type == "cuda" and args.sync_debug:
        result["host_syncs_per_step"] = host_synchronisations(lambda: step.train_step(labeled, unlabeled))
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        torch.cuda.reset_peak_memory_stats(device)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="pascal_daw_ddfp")  # a built-in config name or a YAML file
    parser.add_argument("--methods", nargs="+", default=["daw", "daw_ddfp"])
    parser.add_argument("--crop", type=int, default=321)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--sync-debug", action="store_true",
                        help="CUDA: after the timed steps, list the calls of one step that wait for the GPU")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    results = []
    for method in args.methods:
        result = measure(method, args, device)
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
