"""FLOP/s of each network's training step on one CPU core: bfloat16 autocast forward + backward.

    python benchmarks/bench_network.py                 # the networks of the shipped configs and the screen
    python benchmarks/bench_network.py --threads 2     # both cores
    python benchmarks/bench_network.py --convs         # bare 3x3 convolutions of 16-384 channels: the ceiling

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products of the
forward and backward pass; BatchNorm, activations and the loss are not counted but take their time); time is
the process's CPU time per step, the median of ``--repeat`` steps after two warm-up steps. On a CPU without
native bfloat16 the step runs in float32 (as ``train.amp`` does there).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from mitoseg.config import config_from_dict
from mitoseg.device import amp_dtype, fast_memory_format
from mitoseg.networks import build_model

UNET = {"name": "unet", "channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 2,
        "feature_channels": 32, "head_channels": 32}


def wide(channels, stem, blocks=1, features=None):
    return {"name": "wide_unet", "channels": channels, "strides": [2] * (len(channels) - 1), "stem": stem,
            "num_res_units": blocks, "feature_channels": features or channels[0], "head_channels": 64}


# (label, model keys, patch size, batch size)
NETWORKS = [
    ("unet 16-128 (lucchi_cpu before)", UNET, 128, 4),
    ("unet 16-128", UNET, 256, 4),
    ("wide_unet stem 2, 64-256", wide([64, 128, 192, 256], 2), 128, 4),
    ("wide_unet stem 2, 64-256", wide([64, 128, 192, 256], 2), 256, 4),
    ("wide_unet stem 4, 96-256", wide([96, 128, 192, 256], 4, features=96), 256, 4),
    ("wide_unet stem 4, 128-384", wide([128, 192, 256, 384], 4, features=128), 256, 4),
]


def cpu_step_seconds(step, repeat: int) -> float:
    for _ in range(2):
        step()
    times = []
    for _ in range(repeat):
        start = time.process_time()
        step()
        times.append(time.process_time() - start)
    return statistics.median(times)  # CPU seconds of all threads: FLOPs / this = FLOP/s per core


def network_step(model_keys: dict, patch: int, batch: int):
    cfg = config_from_dict({"model": model_keys, "data": {"patch_size": [patch, patch], "train": {"image": "x"}},
                            "inference": {"roi_size": [patch, patch]}})
    model = fast_memory_format(build_model(cfg.model, 2).train())
    x = torch.randn(batch, 1, patch, patch).contiguous(memory_format=torch.channels_last)
    dtype = amp_dtype(torch.device("cpu"), True)

    def step():
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
        logits.float().square().mean().backward()

    return step


def conv_step(channels: int, size: int, batch: int = 4):
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
    dtype = amp_dtype(torch.device("cpu"), True)

    def step():
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            y = conv(x)
        y.float().sum().backward()

    return step


def flops_of(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--convs", action="store_true", help="bare 3x3 convolutions instead of the networks")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), autocast {amp_dtype(torch.device('cpu'), True)}")
    if args.convs:
        print("| 3x3 conv | size | GFLOP / step | CPU ms / step | GFLOP/s per core |\n|---|---|---|---|---|")
        for channels, size in ((16, 256), (32, 128), (64, 128), (128, 64), (256, 32), (384, 16)):
            step = conv_step(channels, size)
            flops, seconds = flops_of(step), cpu_step_seconds(step, args.repeat)
            print(f"| {channels} -> {channels} | {size} | {flops / 1e9:.1f} | {seconds * 1e3:.0f} | "
                  f"{flops / seconds / 1e9:.0f} |", flush=True)
        return
    print("| network | patch x batch | GFLOP / step | CPU ms / step | GFLOP/s per core |\n|---|---|---|---|---|")
    for label, keys, patch, batch in NETWORKS:
        step = network_step(keys, patch, batch)
        flops, seconds = flops_of(step), cpu_step_seconds(step, args.repeat)
        print(f"| {label} | {patch} x {batch} | {flops / 1e9:.1f} | {seconds * 1e3:.0f} | "
              f"{flops / seconds / 1e9:.0f} |", flush=True)


if __name__ == "__main__":
    main()
