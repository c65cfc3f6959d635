"""DAW: the statistics + alignment update against a plain per-class loop, and the cost of a daw step.

    python benchmarks/bench_daw.py update [--size 801 --classes 19 --batch 2 --repeat 7 --device cpu]
    python benchmarks/bench_daw.py step [--config configs/sample_daw.yaml --iters 20 --rounds 3
                                         --set KEY=VALUE --compile]
    python benchmarks/bench_daw.py official --official-daw PATH [--threads 1 --clock cpu --repeat 5 --previous]
    python benchmarks/bench_daw.py scaling [--sizes 101 201 401 801]

`official`: every pass of the DAW update of a training step from the logits (labeled B x K x S x S,
unlabeled with the CutMix partners 2B x K x S x S) to the pseudo-labels and their weights, the official
code (`optimal_threshold` of github.com/yuisuen/DAW, read from the checkout at PATH, with its softmaxes,
`distribution_alignment` and max / argmax as its daw.py runs them) against `DAWState.update_logits`;
identical thresholds, Gaussians, alignment means, confidences, pseudo-labels and weights are asserted
(within float32 rounding), the ratio is printed. `scaling`: mitoseg's update against the number of pixels.

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

from mitoseg.semi.daw import DAWState, gaussian_crossing, max_and_argmax

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
    from mitoseg.device import autocast

    cfg = load_config(args.config, [f"train.val_every={10**9}", f"train.checkpoint_every={10**9}",
                                    f"train.inspect_every={10**9}", *args.set])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run", max_iters=args.rounds * args.iters + 3, progress=False)
        batches = trainer.batches(0)
        if args.compile:
            # The student's network through TorchInductor (the same parameters: the optimiser and the EMA
            # see no difference); every shape and mode of the step compiles during the warm-up.
            trainer.model.encoder_decoder = torch.compile(trainer.model.encoder_decoder)

        def step():
            labeled, unlabeled = next(batches)  # data loading (views, CutMix boxes) counts as step cost
            trainer.train_step(labeled, unlabeled)
            trainer.iteration += 1  # as Trainer.fit
            return labeled, unlabeled

        warm_up = time.perf_counter()
        for _ in range(3):  # warm-up
            step()
        warm_up = time.perf_counter() - warm_up
        rounds = []
        for _ in range(args.rounds):  # the fastest round of --iters steps: other work only ever adds time
            start = CLOCK()
            for _ in range(args.iters):
                labeled, unlabeled = step()
            rounds.append((CLOCK() - start) / args.iters)
        step_s = min(rounds)

        # The model's passes of one daw step, alone, on the same shapes, under the step's mixed precision.
        model = trainer.model
        x, weak = labeled["image"], unlabeled["weak"]
        n_u = weak.shape[0] // 2
        strong = unlabeled["strong1"][:n_u]

        def passes():
            with autocast(trainer.device, trainer.amp):
                model.eval()
                with torch.no_grad():
                    model(weak[n_u:])
                model.train()
                features = model.features(torch.cat([x, weak[:n_u]]))
                perturbed = F.dropout2d(features[x.shape[0]:], 0.5)
                out = model.logits(torch.cat([features, perturbed]), x.shape[-2:]).float().sum()
                out = out + model(torch.cat([strong, strong])).float().sum()
            out.backward()
            model.zero_grad(set_to_none=True)

        passes()
        model_s = float("inf")
        for _ in range(args.rounds):
            start = CLOCK()
            for _ in range(args.iters):
                passes()
            model_s = min(model_s, (CLOCK() - start) / args.iters)
    print(f"{args.config}: {torch.get_num_threads()} thread(s), {'CPU' if CLOCK is time.process_time else 'wall'} "
          f"time, fastest of {args.rounds} rounds of {args.iters} steps")
    print(f"warm-up (3 steps{', compiling' if args.compile else ''}): {warm_up:.1f} s wall")
    print(f"daw step: {step_s * 1000:.0f} ms; model forward/backward alone: {model_s * 1000:.0f} ms; "
          f"outside the model: {100 * (1 - model_s / step_s):.0f} % (target <= 30 %)")


# ------------------------------------------------------------- the official code


def load_official_class(path: str):
    """The official ``optimal_threshold`` class of a checkout of github.com/yuisuen/DAW (``daw.py``), taken out
    of the file by its syntax tree (the file's imports need the authors' datasets and models), made to run on
    the CPU in one process: ``.cuda()`` is the identity and ``dist.all_reduce`` a no-op (one rank)."""
    import ast
    import types

    source = (Path(path) / "daw.py").read_text()
    tree = ast.parse(source)
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "optimal_threshold"), None)
    if node is None:
        raise SystemExit(f"{path}/daw.py: no class optimal_threshold")
    namespace = {"torch": torch, "F": F, "dist": types.SimpleNamespace(all_reduce=lambda t, *a, **k: t)}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(Path(path) / "daw.py"), "exec"), namespace)
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *args, **kwargs: self  # this benchmark process only
    return namespace["optimal_threshold"]


def official_inputs(batch: int, k: int, size: int, seed: int = 0):
    """Logits of a labeled batch and of an unlabeled batch with its CutMix partners, labels with 255 on a
    padded band (the official code's ignore masks mark the same pixels), unlabeled padding likewise."""
    generator = torch.Generator().manual_seed(seed)
    labeled = torch.randn(batch, k, size, size, generator=generator) * 3
    unlabeled = torch.randn(2 * batch, k, size, size, generator=generator) * 3
    target = torch.randint(0, k, (batch, size, size), generator=generator)
    # About half the labeled pixels predicted right, as a network in training: the argmax of the logits.
    right = torch.rand(batch, size, size, generator=generator) < 0.5
    target = torch.where(right, labeled.argmax(1), target)
    pad = size - size // 8
    target[:, :, pad:] = 255
    label_ignore = torch.where(target == 255, 255, 0)
    unlabeled_ignore = torch.zeros(2 * batch, size, size, dtype=torch.long)
    unlabeled_ignore[:, pad:, :] = 255
    return labeled, target, label_ignore, unlabeled, unlabeled_ignore


def official_update(ot, labeled, target, label_ignore, unlabeled, unlabeled_ignore):
    """Every pass of the official training step (daw.py, main) from the logits to the pseudo-labels and their
    weights: softmaxes, ``update_align``, ``distribution_alignment``, max / argmax, ``update_prob_t``."""
    n = unlabeled.shape[0] // 2
    pred_u_w = unlabeled[:n].softmax(dim=1)
    pred_u_w_mix = unlabeled[n:].softmax(dim=1)
    ot.update_align(labeled.softmax(dim=1).detach().clone(), torch.cat([pred_u_w, pred_u_w_mix], dim=0),
                    label_ignore.clone(), unlabeled_ignore.clone())
    pred_u_w = ot.distribution_alignment(pred_u_w)
    pred_u_w_mix = ot.distribution_alignment(pred_u_w_mix)
    conf_u_w, mask_u_w = pred_u_w.max(dim=1)[0], pred_u_w.argmax(dim=1)
    conf_u_w_mix, mask_u_w_mix = pred_u_w_mix.max(dim=1)[0], pred_u_w_mix.argmax(dim=1)
    thresh, _, _, _ = ot.update_prob_t(labeled.detach().clone(), target.clone(), label_ignore.clone())
    confidence = torch.cat([conf_u_w, conf_u_w_mix])
    return confidence, torch.cat([mask_u_w, mask_u_w_mix]), confidence >= thresh


def mitoseg_update(state, labeled, target, unlabeled, valid):
    """mitoseg's training-step update from the same logits (``DAWState.update_logits``)."""
    _, confidence, pseudo = state.update_logits(labeled, target, unlabeled, valid, ignore_index=255)
    return confidence, pseudo, confidence >= state.threshold


def previous_update(state, labeled, target, unlabeled, valid):
    """mitoseg's update before issue 18 (softmaxes, ``update`` on probabilities, alignment in place, max and
    argmax of the aligned probabilities), for reference."""
    probs = unlabeled.softmax(dim=1)
    state.update(labeled.softmax(dim=1), target, probs, valid, ignore_index=255)
    probs = state.align(probs, in_place=True)
    confidence, pseudo = max_and_argmax(probs, state.workspace(probs))
    return confidence, pseudo, confidence >= state.threshold


def timed(fn, repeat: int, device: torch.device = torch.device("cpu")):
    fn()  # warm-up (and the first of the identical updates)
    elapsed, result = [], None
    for _ in range(repeat):
        synchronize(device)
        start = CLOCK()
        result = fn()
        synchronize(device)
        elapsed.append(CLOCK() - start)
    return min(elapsed), result


def compare_outputs(official, ot, ours, state, unlabeled) -> None:
    """The same threshold, Gaussians, alignment means, confidences, pseudo-labels and weights within float32
    rounding (a pixel whose confidence lies within rounding of the threshold, or whose two best aligned
    classes tie within rounding, may differ)."""
    conf_o, label_o, weight_o = official
    conf_m, label_m, weight_m = ours
    tau = float(state.threshold)
    assert abs(tau - float(ot.thres)) < 1e-5, (tau, ot.thres)
    assert abs(float(state.safe_threshold) - float(ot.thres_safe)) < 1e-5
    sigma = state.var.sqrt()
    for got, expected in ((state.mean[0], ot.pos_mean), (state.mean[1], ot.neg_mean),
                          (sigma[0], ot.pos_std), (sigma[1], ot.neg_std)):
        assert abs(float(got) - float(expected)) < 1e-5, (float(got), float(expected))
    torch.testing.assert_close(state.labeled_class_mean, ot.lb_prob_t.flatten(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.unlabeled_class_mean, ot.ulb_prob_t.flatten(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conf_m, conf_o, rtol=1e-5, atol=1e-6)
    differ = label_m != label_o
    if differ.any():  # only where the two classes' aligned probabilities tie within float32 rounding
        logits = unlabeled.movedim(1, -1)[differ].float()
        shift = (state.labeled_class_mean / state.unlabeled_class_mean.clamp_min(1e-8)).log()
        aligned = (logits + shift).double().softmax(dim=-1)
        gap = (aligned.gather(1, label_m[differ][:, None]) - aligned.gather(1, label_o[differ][:, None])).abs()
        assert float(gap.max()) < 1e-6, f"pseudo-labels differ by {float(gap.max())}"
    near = (conf_o - tau).abs() < 1e-5
    assert torch.equal(weight_m & ~near, weight_o & ~near), "weights differ away from the threshold"
    print(f"identical outputs: threshold {tau:.6f} (official {float(ot.thres):.6f}), "
          f"{int(differ.sum())} of {conf_o.numel()} pseudo-labels differ (ties within rounding), "
          f"weights equal except {int(near.sum())} pixels within 1e-5 of the threshold")


def bench_official(args) -> None:
    k, b, s = args.classes, args.batch, args.size
    official_cls = load_official_class(args.official_daw)
    device = torch.device(args.device)
    labeled, target, label_ignore, unlabeled, unlabeled_ignore = (
        t.to(device) for t in official_inputs(b, k, s))
    valid = unlabeled_ignore != 255
    print(f"logits: labeled {tuple(labeled.shape)}, unlabeled {tuple(unlabeled.shape)}; "
          f"{torch.get_num_threads()} thread(s), {'CPU' if CLOCK is time.process_time else 'wall'} time, "
          f"fastest of {args.repeat}")

    ot = official_cls(num_classes=k, ema_p=0.99, alpha=1.0, world_size=1)
    t_official, official = timed(lambda: official_update(ot, labeled, target, label_ignore, unlabeled,
                                                         unlabeled_ignore), args.repeat, device)
    state = DAWState(k, device=device)
    t_ours, ours = timed(lambda: mitoseg_update(state, labeled, target, unlabeled, valid), args.repeat, device)
    compare_outputs(official, ot, ours, state, unlabeled)
    rows = [("official optimal_threshold + its softmaxes, alignment, max/argmax", t_official),
            ("mitoseg DAWState.update_logits", t_ours)]
    if args.previous:
        previous = DAWState(k, device=device)
        t_previous, _ = timed(lambda: previous_update(previous, labeled, target, unlabeled, valid),
                                 args.repeat, device)
        rows.append(("mitoseg before issue 18 (softmax + update + align + max)", t_previous))
    for name, seconds in rows:
        print(f"{name:>66}: {seconds * 1000:8.1f} ms")
    print(f"speed-up over the official code: {t_official / t_ours:.1f}x (target >= 10x)")


def bench_scaling(args) -> None:
    """mitoseg's update against the number of pixels (labeled B x K x S x S, unlabeled 2B x K x S x S)."""
    k, b = args.classes, args.batch
    print(f"{'size':>6} {'pixels (lab + unl)':>20} {'ms':>8} {'ns / pixel':>11}")
    for size in args.sizes:
        labeled, target, _, unlabeled, unlabeled_ignore = official_inputs(b, k, size)
        state = DAWState(k)
        seconds, _ = timed(lambda: mitoseg_update(state, labeled, target, unlabeled, unlabeled_ignore != 255),
                           args.repeat)
        pixels = 3 * b * size * size
        print(f"{size:>6} {pixels:>20} {seconds * 1000:8.1f} {seconds / pixels * 1e9:11.2f}")


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
    step.add_argument("--rounds", type=int, default=3, help="the fastest of this many rounds of --iters steps")
    step.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                      help="config overrides, e.g. train.amp=false (float32)")
    step.add_argument("--compile", action="store_true", help="torch.compile the student's network first")
    official = sub.add_parser("official", help="against the official DAW code on the same logits")
    official.add_argument("--official-daw", required=True, metavar="PATH",
                          help="a checkout of github.com/yuisuen/DAW (its daw.py)")
    official.add_argument("--previous", action="store_true", help="also time mitoseg's update before issue 18")
    scaling = sub.add_parser("scaling", help="mitoseg's update against the number of pixels")
    scaling.add_argument("--sizes", type=int, nargs="+", default=[101, 201, 401, 801])
    for p in (official, scaling):
        p.add_argument("--size", type=int, default=801)
        p.add_argument("--classes", type=int, default=19)
        p.add_argument("--batch", type=int, default=2)
        p.add_argument("--repeat", type=int, default=5)
        p.add_argument("--device", default="cpu", help="cpu or cuda (timings synchronised)")
    for p in (update, step, official, scaling):
        p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
        p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                       help="wall: elapsed time; cpu: this process's CPU time (use with --threads 1)")
    args = parser.parse_args()
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        CLOCK = time.process_time
    {"update": bench_update, "step": bench_step, "official": bench_official, "scaling": bench_scaling}[args.what](args)


if __name__ == "__main__":
    main()
