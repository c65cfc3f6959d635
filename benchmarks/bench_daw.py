"""DAW: the statistics + alignment update against a plain per-class loop, and the cost of a daw step.

    python benchmarks/bench_daw.py update [--size 801 --classes 19 --batch 2 --repeat 7 --device cpu]
    python benchmarks/bench_daw.py step [--config configs/sample_daw.yaml --iters 20]

`update`: one DAW update on a Cityscapes-sized batch (labeled B x K x S x S, unlabeled
batch + CutMix partner 2B x K x S x S): Gaussian statistics and threshold from the
labeled batch, per-class alignment means, aligned unlabeled probabilities.
mitoseg's vectorised version is timed against the per-class loop written the
plain way (masked_select and a mean per class, a Python membership check per
class), results compared for equality, ratio from one run (the fastest of
--repeat calls of each).

`step`: a `daw` training step against the model's forward and backward passes
alone on the same shapes; the rest (views, CutMix, weighting, alignment, data
loading) is the overhead share.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mitoseg.semi.daw import DAWState, gaussian_crossing

ROOT = Path(__file__).resolve().parent.parent
CLOCK = time.perf_counter  # --clock cpu: time.process_time (robust on a shared machine, with --threads 1)


class PerClassLoopDAW:
    """The plain per-class implementation (as in the paper's public code, on the CPU)."""

    def __init__(self, k: int, device: torch.device | str = "cpu", momentum: float = 0.99):
        self.k, self.m = k, momentum
        self.pos_mean = self.neg_mean = 1.0 / k
        self.pos_var = self.neg_var = 0.5
        self.threshold = 0.95
        self.lab = torch.ones(k, device=device) / k
        self.unl = torch.ones(k, device=device) / k

    def update(self, lab_probs, target, unl_probs):
        lab_conf, lab_idx = lab_probs.max(1)
        unl_conf, unl_idx = unl_probs.max(1)
        lab_classes = torch.unique(lab_idx)
        unl_classes = torch.unique(unl_idx)
        for k in range(self.k):
            if k in lab_classes:
                self.lab[k] = self.m * self.lab[k] + (1 - self.m) * torch.masked_select(lab_conf, lab_idx == k).mean()
            if k in unl_classes:
                self.unl[k] = self.m * self.unl[k] + (1 - self.m) * torch.masked_select(unl_conf, unl_idx == k).mean()
        pos = torch.masked_select(lab_conf, lab_idx == target)
        neg = torch.masked_select(lab_conf, lab_idx != target)
        if pos.numel() >= 10:
            self.pos_mean = self.m * self.pos_mean + (1 - self.m) * pos.mean()
            self.pos_var = self.m * self.pos_var + (1 - self.m) * pos.var()
        if neg.numel() >= 10:
            self.neg_mean = self.m * self.neg_mean + (1 - self.m) * neg.mean()
            self.neg_var = self.m * self.neg_var + (1 - self.m) * neg.var()
        tau = gaussian_crossing(torch.as_tensor(self.pos_mean), torch.as_tensor(self.pos_var).sqrt(),
                                torch.as_tensor(self.neg_mean), torch.as_tensor(self.neg_var).sqrt())
        if torch.isfinite(tau):
            self.threshold = float(tau.clamp(1.0 / self.k, 1.0))
        aligned = unl_probs * (self.lab / self.unl).view(1, -1, 1, 1)
        return aligned / aligned.sum(1, keepdim=True)


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a timing covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_update(args) -> None:
    torch.manual_seed(0)
    device = torch.device(args.device)
    b, k, s = args.batch, args.classes, args.size
    lab = torch.softmax(torch.randn(b, k, s, s) * 3, 1).to(device)
    unl = torch.softmax(torch.randn(2 * b, k, s, s) * 3, 1).to(device)
    target = torch.randint(0, k, (b, s, s)).to(device)
    gib = (lab.numel() + unl.numel()) * 4 / 2**30
    print(f"batch: labeled {tuple(lab.shape)}, unlabeled {tuple(unl.shape)} ({gib:.2f} GiB of float32 probabilities)")

    # Both keep their state across calls, as across training steps, and see the same updates.
    state, ref = DAWState(k, device=device), PerClassLoopDAW(k, device)
    copies = [unl.clone()]  # ours aligns in place, as the training step does

    def ours():
        probs = copies.pop()
        state.update(lab, target, probs)
        return state, state.align(probs, in_place=True)

    def loop():
        return ref, ref.update(lab, target, unl)

    times = {}
    for name, fn in (("vectorised (mitoseg)", ours), ("per-class loop", loop)):
        fn()  # warm-up (and the first of the identical updates)
        elapsed = []
        for _ in range(args.repeat):
            copies.append(unl.clone())  # untimed: the step's own probabilities
            synchronize(device)
            start = CLOCK()
            result = fn()
            synchronize(device)
            elapsed.append(CLOCK() - start)
        times[name] = min(elapsed)  # as timeit: noise from other work only ever adds time
        if name.startswith("vectorised"):
            state, aligned = result
        else:
            ref, ref_aligned = result
    torch.testing.assert_close(state.labeled_class_mean, ref.lab)
    torch.testing.assert_close(state.unlabeled_class_mean, ref.unl)
    torch.testing.assert_close(aligned, ref_aligned)
    assert abs(state.threshold.item() - ref.threshold) < 1e-5
    assert abs(state.mean[0].item() - float(ref.pos_mean)) < 1e-6
    for name, seconds in times.items():
        print(f"{name:>22}: {seconds * 1000:8.1f} ms")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"speed-up: {times['per-class loop'] / times['vectorised (mitoseg)']:.1f}x (identical results; {where})")


def bench_step(args) -> None:
    from mitoseg.config import load_config
    from mitoseg.engine.trainer import Trainer

    cfg = load_config(args.config, [f"train.val_every={10**9}", f"train.checkpoint_every={10**9}",
                                    f"train.inspect_every={10**9}"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run", max_iters=args.iters + 3, progress=False)
        batches = trainer.batches(0)
        for _ in range(3):  # warm-up
            trainer.train_step(*next(batches))
        start = CLOCK()
        for _ in range(args.iters):
            labeled, unlabeled = next(batches)  # data loading (views, CutMix boxes) counts as step cost
            trainer.train_step(labeled, unlabeled)
        step_s = (CLOCK() - start) / args.iters

        # The model's passes of one daw step, alone, on the same shapes.
        model = trainer.model
        x, weak = labeled["image"], unlabeled["weak"]
        n_u = weak.shape[0] // 2
        strong = unlabeled["strong1"][:n_u]

        def passes():
            model.eval()
            with torch.no_grad():
                model(weak)
            model.train()
            features = model.features(torch.cat([x, weak[:n_u]]))
            perturbed = F.dropout2d(features[x.shape[0]:], 0.5)
            out = model.logits(torch.cat([features, perturbed]), x.shape[-2:]).sum()
            out = out + model(torch.cat([strong, strong])).sum()
            out.backward()
            model.zero_grad(set_to_none=True)

        passes()
        start = CLOCK()
        for _ in range(args.iters):
            passes()
        model_s = (CLOCK() - start) / args.iters
    print(f"daw step: {step_s * 1000:.0f} ms; model forward/backward alone: {model_s * 1000:.0f} ms; "
          f"outside the model: {100 * (1 - model_s / step_s):.0f} % (target <= 30 %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    update = sub.add_parser("update")
    update.add_argument("--size", type=int, default=801)
    update.add_argument("--classes", type=int, default=19)
    update.add_argument("--batch", type=int, default=2)
    update.add_argument("--repeat", type=int, default=7)
    update.add_argument("--device", default="cpu", help="cpu or cuda (timings synchronised)")
    step = sub.add_parser("step")
    step.add_argument("--config", default=str(ROOT / "configs" / "sample_daw.yaml"))
    step.add_argument("--iters", type=int, default=20)
    for p in (update, step):
        p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
        p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                       help="wall: elapsed time; cpu: this process's CPU time (use with --threads 1)")
    args = parser.parse_args()
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        CLOCK = time.process_time
    bench_update(args) if args.what == "update" else bench_step(args)


if __name__ == "__main__":
    main()
