"""DDFP: the mixture log-density against the naive repeat formula, the flow, and the cost of a step.

    python benchmarks/bench_ddfp.py mixture [--pixels 20480 --dim 256 --classes 21 --repeat 5 --device cpu]
    python benchmarks/bench_ddfp.py flow    [--pixels 20480 --dim 256 --classes 21 --repeat 3]
    python benchmarks/bench_ddfp.py step    [--config configs/sample_daw_ddfp.yaml --iters 10 --set KEY=VALUE]
    python benchmarks/bench_ddfp.py flow-scaling [--pixels 2560 5120 10240 20480 40960 --dim 32 --classes 2]

`mixture`: component log-densities of N x D features under K unit-covariance
Gaussians, forward + backward (w.r.t. features and means): mitoseg's expansion
|z|^2 - 2 z.mu + |mu|^2 (one matrix product) against the formula that repeats
the feature matrix per component ((N, K, D) intermediate). Time: median of
`--repeat` runs in this process, ratio from this one run. Peak memory: the
growth of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) during one forward + backward, each formula in a fresh
subprocess with the inputs already allocated and glibc's mmap threshold fixed at
64 KiB (freed blocks leave the resident set). Values and gradients compared.

`flow`: the whole density model (FrEIA GLOW flow, `ddfp.blocks` blocks,
`ddfp.hidden` wide, + mixture prior) on the same features: one flow training
step (sampling, noise, forward, backward, clip, Adam), and the perturbation
gradient (forward + backward w.r.t. the input only, on 8 feature maps of about
N pixels in all, in one block).

`step`: a `daw` step, a `ddfp` step (same config, `method.name=ddfp`,
teacher pseudo-labels) and a `daw_ddfp` step, each the trainer's full
`train_step` with data loading, from the flow's start on; for `daw_ddfp` the
time inside the flow training and the perturbation (instrumented, synchronised)
and the model's forward/backward passes alone on the same shapes: the rest of
the step is the share outside the model's passes (target <= 30 %).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mitoseg.semi.flow import (
    DensityModel,
    FlowTrainer,
    UNLABELED,
    density_descending_perturbation,
    mixture_component_log_density,
    mixture_component_log_density_reference,
)

ROOT = Path(__file__).resolve().parent.parent
FORMULAS = {"expansion (mitoseg)": mixture_component_log_density,
            "repeat (naive)": mixture_component_log_density_reference}


def inputs(n: int, d: int, k: int, seed: int = 0, device: str = "cpu"):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=generator).to(device).requires_grad_()
    means = torch.randn(k, d, generator=generator).to(device).requires_grad_()
    weight = torch.randn(n, k, generator=generator).to(device)
    return z, means, weight


def forward_backward(fn, z, means, weight):
    z.grad = means.grad = None
    out = fn(z, means)
    (out * weight).sum().backward()
    return out.detach()


CLOCK = time.perf_counter  # --clock cpu: time.process_time


def synchronize() -> None:
    """Wait for queued GPU work, so that a timing covers it (a no-op without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        synchronize()
        start = CLOCK()
        fn()
        synchronize()
        times.append(CLOCK() - start)
    return sorted(times)[len(times) // 2]


def cuda_peak_growth_mib(fn) -> float:
    """Growth of the CUDA allocator's peak allocation while ``fn`` runs (MiB)."""
    synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_growth_mib(fn) -> float:
    """Growth of the peak resident set while ``fn`` runs (MiB)."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = vm_kib("VmRSS")
    fn()
    return (vm_kib("VmHWM") - before) / 1024


def memory_child(what: str, name: str, n: int, d: int, k: int, hidden: int, blocks: int) -> None:
    """Runs in a fresh process: prints the peak growth of one forward + backward as JSON."""
    torch.manual_seed(0)
    if what == "mixture":
        fn = FORMULAS[name]
        small = inputs(64, d, k)
        forward_backward(fn, *small)  # initialise the libraries on a small problem
        z, means, weight = inputs(n, d, k)
        mib = peak_growth_mib(lambda: forward_backward(fn, z, means, weight))
    else:
        trainer, features, labels, maps, model = flow_setup(n, d, k, hidden, blocks)
        trainer.step(features[:64], labels[:64])  # libraries initialised, the optimizer's state exists
        step = {"train": lambda: trainer.step(features, labels),
                "perturbation": lambda: density_descending_perturbation(maps, lambda f: f, model.log_density, 4.0)}
        mib = peak_growth_mib(step[name])
    print(json.dumps({"mib": mib}))


def measure_memory(what: str, name: str, args) -> float:
    code = ("import sys; sys.path.insert(0, %r); from bench_ddfp import memory_child; "
            "memory_child(%r, %r, %d, %d, %d, %d, %d)" % (str(Path(__file__).parent), what, name, args.pixels,
                                                       args.dim, args.classes, args.hidden, args.blocks))
    # A fixed mmap threshold: every block of 64 KiB or more is mapped and returned on free, so the
    # resident set follows the live tensors (glibc's dynamic threshold would keep freed blocks resident).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536",
           **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])["mib"]


def bench_mixture(args) -> None:
    n, d, k = args.pixels, args.dim, args.classes
    z, means, weight = inputs(n, d, k, device=args.device)
    where = (torch.cuda.get_device_name() if args.device.startswith("cuda")
             else f"{torch.get_num_threads()} threads, {args.clock} clock")
    print(f"features {n} x {d}, K = {k}, float32, {where}; forward + backward")
    results, times, grads = {}, {}, {}
    for name, fn in FORMULAS.items():
        times[name] = median_time(lambda fn=fn: forward_backward(fn, z, means, weight), args.repeat)
        results[name] = forward_backward(fn, z, means, weight)
        grads[name] = (z.grad.clone(), means.grad.clone())
    if args.device.startswith("cuda"):  # the allocator's own peak, in this process
        memory = {name: cuda_peak_growth_mib(lambda fn=fn: forward_backward(fn, z, means, weight))
                  for name, fn in FORMULAS.items()}
    else:
        memory = {name: measure_memory("mixture", name, args) for name in FORMULAS}
    fast, naive = "expansion (mitoseg)", "repeat (naive)"
    print(f"{'formula':>22} | {'time (ms)':>9} | {'peak growth (MiB)':>17}")
    for name in FORMULAS:
        print(f"{name:>22} | {times[name] * 1000:9.1f} | {memory[name]:17.1f}")
    value_diff = (results[fast] - results[naive]).abs().max().item()
    relative = value_diff / results[naive].abs().max().item()
    grad_diff = max((a - b).abs().max().item() / b.abs().max().item() for a, b in zip(grads[fast], grads[naive]))
    torch.testing.assert_close(results[fast], results[naive], rtol=1e-5, atol=1e-3)
    z64, means64 = z.detach().double(), means.detach().double()
    exact = (mixture_component_log_density(z64, means64) - mixture_component_log_density_reference(z64, means64))
    print(f"speed-up {times[naive] / times[fast]:.0f}x (target >= 30x); memory {memory[fast] / memory[naive]:.3f} "
          f"of the naive formula's (target <= 0.1); naive (N, K, D) intermediate: {n * k * d * 4 / 2**20:.0f} MiB")
    print(f"values: max |diff| {value_diff:.2e} (relative {relative:.1e}) in float32, {exact.abs().max().item():.1e} "
          f"in float64; gradients: max relative diff {grad_diff:.1e}")


def flow_setup(n: int, d: int, k: int, hidden: int, blocks: int):
    model = DensityModel(d, k, blocks=blocks, hidden=hidden, seed=0, init="default")
    trainer = FlowTrainer(model, total_steps=1000, max_pixels=n)
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(n, d, generator=generator)
    labels = torch.randint(0, k, (n,), generator=generator)
    labels[torch.rand(n, generator=generator) < 0.5] = UNLABELED  # half labeled, half unlabeled
    side = int(round((n // 8) ** 0.5))
    maps = torch.randn(8, d, side, side, generator=generator)  # ~n pixels as feature maps
    return trainer, features, labels, maps, model


def bench_flow(args) -> None:
    n, d, k = args.pixels, args.dim, args.classes
    trainer, features, labels, maps, model = flow_setup(n, d, k, args.hidden, args.blocks)
    print(f"flow: {args.blocks} GLOW blocks, hidden {args.hidden}, D = {d}, K = {k}; {n} feature vectors "
          f"({(labels == UNLABELED).float().mean().item():.0%} unlabeled), {torch.get_num_threads()} threads, "
          f"{args.clock} clock")
    train_s = median_time(lambda: trainer.step(features, labels), args.repeat)
    pert_s = median_time(lambda: density_descending_perturbation(maps, lambda f: f, model.log_density, 4.0),
                         args.repeat)
    memory = {name: measure_memory("flow", name, args) for name in ("train", "perturbation")}
    print(f"{'':>34} | {'time (ms)':>9} | {'peak growth (MiB)':>17}")
    print(f"{'training step (fwd + bwd + Adam)':>34} | {train_s * 1000:9.1f} | {memory['train']:17.1f}")
    print(f"{'perturbation gradient (fwd + bwd)':>34} | {pert_s * 1000:9.1f} | {memory['perturbation']:17.1f}")


def bench_flow_scaling(args) -> None:
    """The flow's training step and the perturbation's flow pass against the number of feature vectors, at
    the sample config's flow (D = head_channels 32, K = 2, 2 blocks, hidden 256, official init)."""
    from mitoseg.semi.flow import masked_flow_gradient

    print(f"flow: D = {args.dim}, K = {args.classes}, {args.blocks} blocks, hidden {args.hidden}; "
          f"{torch.get_num_threads()} thread(s), {args.clock} clock, median of {args.repeat}")
    print(f"{'vectors':>8} | {'training step (ms)':>18} | {'us / vector':>11} | "
          f"{'perturbation pass (ms)':>22} | {'us / vector':>11}")
    for n in args.pixels:
        model = DensityModel(args.dim, args.classes, blocks=args.blocks, hidden=args.hidden, seed=0)
        trainer = FlowTrainer(model, total_steps=1000, max_pixels=n)
        generator = torch.Generator().manual_seed(0)
        features = torch.randn(n, args.dim, generator=generator)
        labels = torch.randint(0, args.classes, (n,), generator=generator)
        labels[torch.rand(n, generator=generator) < 0.5] = UNLABELED
        train_s = median_time(lambda: trainer.step(features, labels), args.repeat)
        maps = features.T.reshape(1, args.dim, 1, n)
        mask = torch.ones(1, 1, n, dtype=torch.bool)
        pert_s = median_time(lambda: masked_flow_gradient(maps, mask, model.log_density, args.chunk), args.repeat)
        print(f"{n:>8} | {train_s * 1000:18.1f} | {train_s / n * 1e6:11.1f} | {pert_s * 1000:22.1f} | "
              f"{pert_s / n * 1e6:11.1f}")


def bench_step(args) -> None:
    from mitoseg.config import load_config
    from mitoseg.engine.trainer import Trainer

    base = [f"train.val_every={10**9}", f"train.checkpoint_every={10**9}", f"train.inspect_every={10**9}",
            "method.ddfp.start_iter=0"]
    variants = {"daw": ["method.name=daw"], "ddfp": ["method.name=ddfp", "method.pseudo_labels=teacher"],
                "daw_ddfp": []}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in variants.items():
            cfg = load_config(args.config, base + overrides + args.set)
            trainer = Trainer(cfg, Path(tmp) / name, max_iters=args.iters + 2, progress=False)
            batches = trainer.batches(0)
            for _ in range(2):  # warm-up
                trainer.train_step(*next(batches))
                trainer.iteration += 1  # as Trainer.fit: the method's schedule (flow_every) follows it
            timings, mask_ratios = {}, []
            if name == "daw_ddfp":
                trainer.method.timings, trainer.method.clock = timings, CLOCK
            synchronize()
            start = CLOCK()
            for _ in range(args.iters):
                labeled, unlabeled = next(batches)  # data loading (views, CutMix boxes) counts as step cost
                logs = trainer.train_step(labeled, unlabeled)
                trainer.iteration += 1
                mask_ratios.append(logs["mask_ratio"])
            synchronize()
            results[name] = (CLOCK() - start) / args.iters
            if name == "daw_ddfp":
                mask_ratio = float(torch.stack(mask_ratios).mean())
            if name == "daw_ddfp":
                ddfp_timings = {k: v / args.iters for k, v in timings.items()}
                trainer.method.timings = None
                model_s = median_time(lambda: daw_ddfp_passes(trainer, labeled, unlabeled), args.iters)
                if args.profile:
                    profile_step(trainer, batches)
    daw = results["daw"]
    print(f"config {args.config} {' '.join('--set ' + o for o in args.set)}; {args.iters} steps each after "
          f"2 warm-up steps; {torch.get_num_threads()} threads; {args.clock} clock")
    print(f"{'method':>9} | {'ms / step':>9} | {'vs daw':>6}")
    for name, seconds in results.items():
        print(f"{name:>9} | {seconds * 1000:9.0f} | {seconds / daw:5.2f}x")
    step = results["daw_ddfp"]
    flow_ms, pert_ms = ddfp_timings.get("flow_training", 0) * 1000, ddfp_timings.get("perturbation", 0) * 1000
    print(f"daw_ddfp: flow training {flow_ms:.0f} ms + perturbation gradient {pert_ms:.0f} ms per step "
          f"({(flow_ms + pert_ms) / (step * 1000):.0%} of the step); model forward/backward passes alone "
          f"{model_s * 1000:.0f} ms: outside the model's passes {1 - model_s / step:.0%} (target <= 30 %); "
          f"pseudo-labels used (mask ratio): {mask_ratio:.0%}")


def profile_step(trainer, batches, rows: int = 25) -> None:
    """The operators of one daw_ddfp step (data included) by self time, CPU and, on CUDA, GPU."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    cuda = trainer.device.type == "cuda"
    if cuda:
        activities.append(ProfilerActivity.CUDA)
    synchronize()
    with profile(activities=activities) as prof:
        trainer.train_step(*next(batches))
        synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


def daw_ddfp_passes(trainer, labeled, unlabeled) -> None:
    """The model's forward and backward passes of one daw_ddfp step, alone, on the same shapes and under the
    step's autocast (``train.amp``)."""
    from mitoseg.device import autocast

    with autocast(trainer.device, trainer.amp):
        _daw_ddfp_passes(trainer, labeled, unlabeled)


def _daw_ddfp_passes(trainer, labeled, unlabeled) -> None:
    model, teacher = trainer.model, trainer.ema.module
    x, weak = labeled["image"], unlabeled["weak"]
    n_x, n_u = x.shape[0], weak.shape[0] // 2
    size = x.shape[-2:]
    model.eval()
    with torch.no_grad():
        model(weak)  # pseudo-labels (student in eval mode)
        teacher.seg_head.penultimate(teacher.features(torch.cat([x, weak[:n_u]])))  # the flow's features
    model.train()
    features = model.features(torch.cat([x, weak[:n_u]]))
    dropped = F.dropout2d(features[n_x:], 0.5)
    out = model.logits(torch.cat([features, dropped]), size).sum()
    strong = unlabeled["strong1"][:n_u]
    out = out + model(torch.cat([strong, strong])).sum()
    delta = torch.randn_like(features[n_x:]).detach()
    out = out + model.logits(features[n_x:] + delta, size, perturbed=True).sum()
    out.backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    for what in ("mixture", "flow"):
        p = sub.add_parser(what)
        p.add_argument("--pixels", type=int, default=20480)
        p.add_argument("--dim", type=int, default=256)
        p.add_argument("--classes", type=int, default=21)
        p.add_argument("--hidden", type=int, default=256)
        p.add_argument("--blocks", type=int, default=2)
        p.add_argument("--repeat", type=int, default=5 if what == "mixture" else 3)
    sub.choices["mixture"].add_argument("--device", default="cpu", help="cpu or cuda (timings synchronised)")
    p = sub.add_parser("flow-scaling")
    p.add_argument("--pixels", type=int, nargs="+", default=[2560, 5120, 10240, 20480, 40960])
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--chunk", type=int, default=4096, help="method.ddfp.chunk_pixels of the perturbation pass")
    p.add_argument("--repeat", type=int, default=3)
    p = sub.add_parser("step")
    p.add_argument("--config", default=str(ROOT / "configs" / "sample_daw_ddfp.yaml"))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, as `mitoseg train --set` (repeatable)")
    p.add_argument("--profile", action="store_true", help="print the operators of one daw_ddfp step by self time")
    for p in sub.choices.values():
        p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
        p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                       help="cpu: the process's CPU time (with --threads 1: robust on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    {"mixture": bench_mixture, "flow": bench_flow, "flow-scaling": bench_flow_scaling,
     "step": bench_step}[args.what](args)


if __name__ == "__main__":
    main()
