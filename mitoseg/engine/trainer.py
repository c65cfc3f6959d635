"""The training loop shared by every dataset and method.

Read top to bottom: ``Trainer.__init__`` builds data (``data.factory.build_train_data``: the trainer never
asks which kind), model, EMA teacher, optimizer and method (or restores them from ``last.pt``);
``Trainer.fit`` runs the iterations. One iteration: draw the batches of this iteration, let the method
compute the loss, step the optimizer and the poly schedule, update the EMA teacher; then the handlers
(:mod:`mitoseg.engine.handlers`): every ``log_every`` log, every ``val_every`` validate and keep the
best weights, every ``checkpoint_every`` write ``last.pt``, and the time limits, divergence and Ctrl-C.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mitoseg.device import amp_dtype, autocast, fast_memory_format, resolve_device
from mitoseg.config import Config, config_to_dict, input_channels, loss_ignore_index, unlabeled_batch_size
from mitoseg.data.factory import build_train_data
from mitoseg.engine.checkpoint import capture_rng_state, restore_rng_state, save_checkpoint, weights_are_finite
from mitoseg import distributed
from mitoseg.engine.ema import ModelEMA
from mitoseg.engine.finetune import (
    PartFreezer,
    describe_initialisation,
    frozen_parameter_count,
    initialise_from_checkpoint,
    read_init_checkpoint,
)
from mitoseg.engine.handlers import Loop, default_handlers
from mitoseg.engine.logging import write_inspection
from mitoseg.errors import MitosegError, TrainingDiverged
from mitoseg.inference.validation import validation_scores
from mitoseg.losses import make_supervised_loss
from mitoseg.methods import StepContext, build_method
from mitoseg.metrics import headline_metric
from mitoseg.networks import build_model
from mitoseg.networks.loading import load_weights
from mitoseg.runs import BEST, INSPECT, LAST, checkpoint_config, load_checkpoint, validated_weights


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model: torch.nn.Module, optim_cfg) -> torch.optim.Optimizer:
    """One parameter group, or for a model with a pretrained backbone (``backbone_parameters()``) two:
    the backbone at ``optim.lr`` and the rest at ``optim.lr * optim.head_lr_multiplier``."""
    params = model.parameters()
    backbone = getattr(model, "backbone_parameters", None)
    if backbone is not None:
        ids = {id(p) for p in backbone()}
        everything = list(model.parameters())
        params = [{"params": [p for p in everything if id(p) in ids]},
                  {"params": [p for p in everything if id(p) not in ids],
                   "lr": optim_cfg.lr * optim_cfg.head_lr_multiplier}]
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(params, lr=optim_cfg.lr, momentum=optim_cfg.momentum,
                               weight_decay=optim_cfg.weight_decay)
    return torch.optim.AdamW(params, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)


def resolve_epochs(cfg: Config, world_size: int) -> Config:
    """``train.epochs`` (natural images) -> ``train.iterations``, in a copy of ``cfg``."""
    if cfg.train.epochs is None:
        return cfg
    import copy

    from mitoseg.data.factory import iterations_per_epoch
    from mitoseg.methods import method_class

    uses_unlabeled = method_class(cfg.method.name).uses_unlabeled
    cfg = copy.deepcopy(cfg)
    cfg.train.iterations = cfg.train.epochs * iterations_per_epoch(cfg, uses_unlabeled, world_size)
    return cfg


def lr_factor(iteration: int, total_iterations: int, optim_cfg, progress: float | None = None) -> float:
    """The learning rate of ``iteration`` as a fraction of ``optim.lr``: a linear warm-up from
    ``warmup_ratio`` to 1 over ``warmup_iters``, then poly or cosine decay to 0 at ``total_iterations``
    (the decay spans the whole run, warm-up included, so a warm-up does not shift the schedule).
    ``progress``: the fraction of the run done, when a time budget (``train.max_minutes``) rather than the
    iterations measures it (:class:`TimeBudget`)."""
    if iteration < optim_cfg.warmup_iters:
        return optim_cfg.warmup_ratio + (1.0 - optim_cfg.warmup_ratio) * iteration / optim_cfg.warmup_iters
    if progress is None:
        progress = iteration / total_iterations
    progress = min(1.0, max(0.0, progress))
    if optim_cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return (1.0 - progress) ** optim_cfg.poly_power


def lr_schedule(optimizer, total_iterations: int, optim_cfg,
                budget: "TimeBudget | None" = None) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(
        it, total_iterations, optim_cfg, budget.progress(it) if budget is not None else None))


class TimeBudget:
    """``train.max_minutes``: the schedule spans a time budget instead of ``train.iterations``.

    The run's wall time (training, validation and checkpoints, summed over resumed sessions) is read at log
    steps only, where it is averaged over the ranks with the logs (so every rank decays its learning rate
    alike and no step waits for the clock); between two log steps the progress of iteration ``i`` is
    extrapolated with this session's mean seconds per iteration, and it never goes back (a validation makes
    the time jump ahead of the extrapolation). The run ends at the first log step at or past the budget, with
    the learning rate at zero from the moment the budget is spent.
    """

    def __init__(self, minutes: float):
        self.seconds = 60.0 * minutes
        self.start: tuple[int, float] | None = None  # (iteration, wall time) of this session's first observation
        self.iteration = 0  # the last observed log step ...
        self.elapsed = 0.0  # ... and the run's wall time then
        self.seconds_per_iteration = 0.0
        self.reached = 0.0  # the largest progress given so far

    def observe(self, iteration: int, elapsed: float) -> None:
        if self.start is None:
            self.start = (iteration, elapsed)
        elif iteration > self.start[0]:
            self.seconds_per_iteration = max(0.0, elapsed - self.start[1]) / (iteration - self.start[0])
        self.iteration, self.elapsed = iteration, elapsed

    def progress(self, iteration: int) -> float:
        estimate = self.elapsed + max(0, iteration - self.iteration) * self.seconds_per_iteration
        self.reached = max(self.reached, min(1.0, estimate / self.seconds))
        return self.reached

    def spent(self) -> bool:
        return self.elapsed >= self.seconds


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = []
    for key in sorted(set(a) | set(b)):
        full = f"{prefix}.{key}" if prefix else key
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += config_differences(va, vb, full)
        elif va != vb:
            keys.append(full)
    return keys


def read_resume_state(out_dir: Path, cfg: Config) -> dict:
    """``OUT/last.pt`` for ``--resume``, refused in one line when missing or when its config differs from ``cfg``."""
    last = out_dir / LAST
    if not last.is_file():
        raise MitosegError(f"--resume: no checkpoint to resume from at {last}")
    state = load_checkpoint(last)
    changed = config_differences(config_to_dict(checkpoint_config(state, last)), config_to_dict(cfg))
    if changed:
        raise MitosegError(f"--resume: the config differs from the one in {last} at {', '.join(changed[:5])}; "
                           "resume with the run's own config (omit --config)")
    return state


class Trainer:
    def __init__(self, cfg: Config, out_dir: str | Path, *, resume: bool = False, max_iters: int | None = None,
                 progress: bool = True, max_minutes: float | None = None):
        self.out_dir = Path(out_dir)
        # A time budget (``mitoseg train --max-minutes``): training stops at the first log step past it.
        self.max_seconds = None if max_minutes is None else 60.0 * max_minutes
        self.dist = distributed.setup(cfg.device)
        self.is_main = self.dist.is_main
        self.progress = progress and self.is_main
        cfg = resolve_epochs(cfg, self.dist.world_size)
        resume_state = read_resume_state(self.out_dir, cfg) if resume else None
        # Fine-tuning reads model.init_from when a run starts, before the data (a wrong path fails fast); a resumed
        # run restores its own last.pt instead and never opens it again (it may have moved since).
        init_state = read_init_checkpoint(cfg) if resume_state is None and cfg.model.init_from else None
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        # Mixed precision: float16 with a gradient scaler on CUDA, bfloat16 (no scaler) on a CPU with native bf16.
        self.amp = amp_dtype(self.device, cfg.train.amp) is not None
        self.total_iterations = cfg.train.iterations
        self.stop_iteration = min(max_iters, cfg.train.iterations) if max_iters else cfg.train.iterations
        seed_everything(cfg.seed)

        num_classes = cfg.data.num_classes
        ignore_index = loss_ignore_index(cfg.train)
        self.ignore_index = ignore_index
        self.method = build_method(cfg, make_supervised_loss(cfg.train)).to(self.device)
        self.unlabeled_batch_size = unlabeled_batch_size(cfg.data)
        self.data = build_train_data(cfg, self.method.uses_unlabeled, self.method.unlabeled_per_batch,
                                     self.total_iterations, self.dist.world_size, log=self.is_main)
        self.has_validation = self.data.validation is not None

        self.init_report: dict | None = resume_state.get("init") if resume_state is not None else None
        self.model = self.build_network(init_state, resumed=resume_state is not None)
        del init_state
        # Made after model.init_from is loaded: the teacher starts as the initialised student.
        self.ema = ModelEMA(self.model, cfg.train.ema_decay, warmup=cfg.train.ema_warmup)
        self.optimizer = make_optimizer(self.model, cfg.optim)
        self.freezer = PartFreezer(self.model, cfg.model.freeze, cfg.model.freeze_iters)
        self.budget = TimeBudget(cfg.train.max_minutes) if cfg.train.max_minutes is not None else None
        self.scheduler = lr_schedule(self.optimizer, self.total_iterations, cfg.optim, self.budget)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype(self.device, cfg.train.amp) == torch.float16)
        # Divergence (train_step): consecutive skipped steps, the iteration that began the streak and whether
        # one of its steps had non-finite inputs. Kept on the device and read at log steps with the logs.
        self.bad_steps = torch.zeros((), dtype=torch.int64, device=self.device)
        self.bad_since = torch.zeros((), dtype=torch.int64, device=self.device)
        self.bad_inputs = torch.zeros((), dtype=torch.bool, device=self.device)
        self._buffers: list[torch.Tensor] | None = None

        self.iteration = 0  # number of completed iterations
        self.best: dict | None = None
        self.last_scores: dict | None = None
        self.previous_wall_time = self.previous_cpu_time = 0.0
        self._start_time: float | None = None
        self._start_cpu = 0.0
        if resume_state is not None:
            self._restore(resume_state, self.out_dir / LAST)
            if self.budget is not None:  # the optimizer's restored learning rate is the one of this wall time
                self.budget.observe(self.iteration, self.previous_wall_time)
        if self.is_main and self.init_report is not None and resume_state is None:
            print(describe_initialisation(self.init_report, num_classes), flush=True)
        if self.is_main and cfg.model.freeze and self.freezer.frozen_at(self.iteration):
            until = (f"until iteration {cfg.model.freeze_iters}" if cfg.model.freeze_iters is not None
                     else "for the whole run")
            count = frozen_parameter_count(self.model, cfg.model.freeze)
            print(f"model.freeze: {', '.join(cfg.model.freeze)} ({count:,} parameters and their BatchNorm "
                  f"statistics) frozen {until}", flush=True)

    def build_network(self, init_state: dict | None, resumed: bool) -> torch.nn.Module:
        """The student on the device: fresh, fine-tuned from ``model.init_from`` (``init_state``; the report goes
        to ``self.init_report``) or, for DeepLabV3+, from a pretrained backbone; the same on every rank. A resumed
        run's weights are restored afterwards (``_restore``)."""
        cfg = self.cfg
        model = build_model(cfg.model, cfg.data.num_classes, input_channels(cfg))
        if init_state is not None:
            self.init_report = initialise_from_checkpoint(model, cfg, init_state)
        if cfg.model.name == "deeplabv3plus" and not resumed and self.init_report is None:
            if cfg.model.pretrained:
                from mitoseg.networks.deeplab import load_pretrained_backbone

                load_pretrained_backbone(model, cfg.model.pretrained)
            elif self.is_main:
                warnings.warn("model.pretrained is not set: the ResNet backbone starts from random weights "
                              "(the papers start from ImageNet weights)", stacklevel=3)
        if self.dist.enabled and self.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = fast_memory_format(model.to(self.device))
        distributed.broadcast_parameters(model)
        return model

    # ------------------------------------------------------------------ state

    def state_dict(self, rng: dict | list[dict] | None = None) -> dict:
        """The whole training state; ``rng``: this process's RNG states, or under torchrun every rank's
        (a list indexed by rank, gathered by :meth:`save`)."""
        return {
            "config": config_to_dict(self.cfg),
            "iteration": self.iteration,
            "model": self.model.state_dict(),
            "ema_model": self.ema.module.state_dict(),
            "ema_n_averaged": torch.tensor(self.ema.n_averaged),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "method": self.method.state_dict(),
            "rng": capture_rng_state(self.device) if rng is None else rng,
            "best": self.best,
            "last_scores": self.last_scores,
            "wall_time_s": self.wall_time(),
            "cpu_time_s": self.cpu_time(),
            "bad_steps": {"count": self.bad_steps, "since": self.bad_since, "inputs": self.bad_inputs},
            "init": self.init_report,
            "pixel_size_nm": self.data.pixel_size_nm,  # the model's working pixel size (predict)
        }

    def _restore(self, state: dict, path: Path) -> None:
        if not weights_are_finite(state["model"], state["ema_model"]):
            raise MitosegError(f"--resume: {path} holds non-finite weights (NaN or inf): its run diverged; train "
                               "again (e.g. with a lower optim.lr)")
        load_weights(self.model, state["model"], path, "model")
        load_weights(self.ema.module, state["ema_model"], path, "EMA model")
        self.ema.n_averaged = int(state["ema_n_averaged"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.method.load_state_dict(state["method"])
        rng = state["rng"]
        if isinstance(rng, list):  # one entry per rank of a torchrun run
            if len(rng) != self.dist.world_size:
                raise MitosegError(f"--resume: {path} was written by {len(rng)} processes; resume it with "
                                   f"as many (torchrun --nproc_per_node), not {self.dist.world_size}")
            rng = rng[self.dist.rank]
        restore_rng_state(rng, self.device)
        self.iteration = int(state["iteration"])
        self.best = state["best"]
        self.last_scores = state.get("last_scores")
        self.previous_wall_time = float(state["wall_time_s"])
        self.previous_cpu_time = float(state.get("cpu_time_s", 0.0))  # older checkpoints did not count it
        bad = state.get("bad_steps")  # absent from checkpoints of mitoseg <= 0.2
        if bad is not None:
            self.bad_steps.copy_(bad["count"])
            self.bad_since.copy_(bad["since"])
            self.bad_inputs.copy_(bad["inputs"])

    def cpu_time(self) -> float:
        """CPU seconds of this process (all its threads) since the run started, summed over resumed sessions."""
        running = time.process_time() - self._start_cpu if self._start_time is not None else 0.0
        return self.previous_cpu_time + running

    def wall_time(self) -> float:
        running = time.perf_counter() - self._start_time if self._start_time is not None else 0.0
        return self.previous_wall_time + running

    def save(self, name: str) -> None:
        # Never a checkpoint of non-finite weights (a step with finite gradients can still overflow them, e.g.
        # at a huge learning rate): the last good last.pt / best.pt stay. Every rank holds the same weights,
        # so every rank stops here together.
        if not weights_are_finite(self.model.state_dict(), self.ema.module.state_dict(),
                                  *[s for s in self.optimizer.state.values()]):
            raise TrainingDiverged(
                f"training diverged at iteration {self.iteration}: the weights became non-finite (NaN or inf); "
                f"likely cause: {self._likely_cause()}{self._kept()}")
        # Under torchrun only rank 0 writes (every rank holds the same weights), but each rank's random
        # generators differ (dropout, flow sampling): they are gathered so that --resume is exact on every rank.
        rng = capture_rng_state(self.device)
        if self.dist.enabled:
            rng = distributed.all_gather_objects(rng)
        if self.is_main:
            save_checkpoint(self.out_dir / name, self.state_dict(rng))

    # ------------------------------------------------------------------- data

    def stream(self, dataset, batch_size: int, start_iteration: int, seed: int):
        """Batches of ``dataset`` for iterations ``start_iteration ..``, on the device.

        Iteration i reads samples ``i * batch_size * ranks + rank * batch_size ..``
        (a sample is a pure function of its index, so resumed runs see the same data).
        """
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=distributed.ShardedIndices(start_iteration, self.total_iterations, batch_size,
                                               self.dist.rank, self.dist.world_size),
            num_workers=self.cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
            # A private generator: creating a loader must not draw from the global torch RNG,
            # or a resumed run's dropout would see a different random stream.
            generator=torch.Generator().manual_seed(seed),
        )
        for batch in loader:
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def schedule_progress(self, iteration: int) -> float:
        """The fraction of the schedule done at ``iteration``: of the time budget, or of train.iterations."""
        if self.budget is not None:
            return self.budget.progress(iteration)
        return iteration / max(1, self.total_iterations)

    def batches(self, start_iteration: int):
        """(labeled, unlabeled or None) per iteration."""
        labeled = self.stream(self.data.labeled, self.cfg.data.batch_size, start_iteration, self.cfg.seed)
        if self.data.unlabeled is None:
            return ((batch, None) for batch in labeled)
        return self._with_unlabeled(labeled, start_iteration)

    def _with_unlabeled(self, labeled, start_iteration: int):
        """The labeled batches with their unlabeled ones, none while the method trains supervised only (its
        warm-up: no unlabeled batch is loaded for those steps). The unlabeled stream starts at the first
        iteration that needs it; iteration i reads the same samples whenever the stream started."""
        unlabeled = None
        for iteration, batch in enumerate(labeled, start_iteration):
            if iteration >= self.total_iterations:
                return  # a time budget ended the schedule (it may have ended inside the warm-up)
            if unlabeled is None:
                if self.method.supervised_only(iteration, self.schedule_progress(iteration)):
                    yield batch, None
                    continue
                # Per iteration unlabeled_batch_size samples, and as many CutMix partners after them unless the
                # method mixes within the batch (method.unlabeled_per_batch).
                unlabeled = self.stream(self.data.unlabeled,
                                        self.method.unlabeled_per_batch * self.unlabeled_batch_size, iteration,
                                        self.cfg.seed + 1)
            yield batch, next(unlabeled)

    # ------------------------------------------------------------- validation

    def eval_models(self) -> dict[str, torch.nn.Module]:
        """The weights validation measures (``train.eval_model``): the EMA teacher, the student, or both."""
        both = {"student": self.model, "ema": self.ema.module}
        choice = self.cfg.train.eval_model
        return both if choice == "best_of" else {choice: both[choice]}

    def validate_model(self, model: torch.nn.Module) -> dict:
        return validation_scores(model, self.data.validation, self.cfg, self.device, self.amp, self.ignore_index,
                                 tta=self.cfg.train.val_tta)

    def validate(self) -> dict:
        """The validation scores of the weights ``train.eval_model`` names (with ``best_of``, of the better of
        student and EMA teacher, and each one's headline score), with ``weights``: which ones they are."""
        by_weights = {name: self.validate_model(model) for name, model in self.eval_models().items()}

        def rank(name: str) -> tuple[float, bool]:
            value = headline_metric(by_weights[name])[1]
            return (-math.inf if math.isnan(value) else value, name == "ema")  # a tie goes to the teacher

        weights = max(by_weights, key=rank)
        scores = {**by_weights[weights], "weights": weights}
        if len(by_weights) > 1:
            metric = headline_metric(scores)[0]
            scores.update({f"{metric}_{name}": headline_metric(s)[1] for name, s in by_weights.items()})
        return scores

    def test(self) -> dict:
        """``data.test`` scored with ``best.pt`` (the weights validation chose, ``train.eval_model``), exactly as
        ``mitoseg evaluate --checkpoint RUN/best.pt --image ... --label ...`` scores it."""
        from mitoseg.inference.evaluation import score_em_volume
        from mitoseg.inference.session import from_state

        state = load_checkpoint(self.out_dir / BEST)
        weights = validated_weights(state)
        loaded = from_state(state, self.out_dir / BEST, weights, self.device)
        test = self.cfg.data.test
        scores = score_em_volume(loaded, loaded.cfg, test.image, test.label, test.slices, test.voxel_size,
                                 progress=self.progress)
        scores.update({"checkpoint": BEST, "weights": weights,
                       "iteration": self.best["iteration"] if self.best is not None else self.iteration})
        return scores

    def inspect(self) -> None:
        ctx = StepContext(student=self.model, teacher=self.ema.module, iteration=self.iteration,
                          total_iterations=self.total_iterations)
        patches = {k: v.to(self.device) for k, v in self.data.inspection.items()}
        arrays = self.method.inspect(ctx, patches)
        write_inspection(self.out_dir / INSPECT, self.iteration, arrays, method=self.cfg.method.name)

    # ------------------------------------------------------------------- loop

    def _running_buffers(self) -> list[torch.Tensor]:
        """The buffers a training forward updates in place (BatchNorm statistics) of the student and of the
        teacher (which a method may run in train mode, DDFP's)."""
        if self._buffers is None:
            self._buffers = [b for module in (self.model, self.ema.module) for b in module.buffers()]
            self._saved_buffers = [b.detach().clone() for b in self._buffers]
        return self._buffers

    @staticmethod
    def _inputs_finite(labeled: dict, unlabeled: dict | None) -> torch.Tensor:
        tensors = [t for batch in (labeled, unlabeled or {}) for t in batch.values() if t.is_floating_point()]
        return torch.stack([torch.isfinite(t).all() for t in tensors]).all()

    def _step_is_bad(self, loss: torch.Tensor) -> torch.Tensor:
        """A device flag: the loss or a gradient is not finite (NaN or inf). Gradients are unscaled (fp16) and
        clipped (``train.grad_clip``) on the way, without a host synchronisation."""
        bad = ~torch.isfinite(loss.detach())
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.scaler.is_enabled():
            # fp16: unscale_ records inf / NaN gradients per device (as GradScaler.step would).
            self.scaler.unscale_(self.optimizer)
            found = self.scaler._per_optimizer_states[id(self.optimizer)]["found_inf_per_device"]
            bad = bad | (torch.stack([f.to(bad.device) for f in found.values()]).sum() > 0)
        if self.cfg.train.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        elif not self.scaler.is_enabled() and params:
            norm = torch.stack([n.to(bad.device) for n in torch._foreach_norm([p.grad for p in params])]).norm()
        else:
            norm = None
        if norm is not None:
            bad = bad | ~torch.isfinite(norm)
        if self.dist.enabled:
            # Each rank's loss is its own: every rank must skip the same steps, or the weights part ways.
            bad = distributed.all_reduce_sum(bad.float().reshape(1)).reshape(()) > 0
        return bad

    def train_step(self, labeled: dict, unlabeled: dict | None) -> dict[str, torch.Tensor]:
        """One iteration. A step whose loss or gradient is not finite is skipped: the weights, the optimizer
        state, the EMA teacher and the BatchNorm statistics the forward touched stay as they were (the learning
        rate schedule moves on with the iteration), and it is counted on the device (``bad_steps``)."""
        if self.freezer.update(self.iteration) and self.is_main:
            tqdm.write(f"iteration {self.iteration}: model.freeze thawed ({', '.join(self.freezer.parts)})")
        if self.iteration == self.method.teacher_restart_iteration():
            self.ema.restart(self.model)
        ctx = StepContext(student=self.model, teacher=self.ema.module, iteration=self.iteration,
                          total_iterations=self.total_iterations, progress=self.schedule_progress(self.iteration))
        self.model.train()
        buffers = self._running_buffers()
        torch._foreach_copy_(self._saved_buffers, buffers)
        inputs_ok = self._inputs_finite(labeled, unlabeled)
        with autocast(self.device, self.amp):
            out = self.method.training_step(ctx, labeled, unlabeled)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        distributed.all_reduce_gradients(self.model.parameters())
        bad = self._step_is_bad(out.loss)
        # The one host synchronisation of a step. Under fp16 AMP it is the one GradScaler.step makes to skip
        # an overflowing step (made here instead, so the flag covers the loss too); on the CPU reading a
        # tensor costs nothing; on CUDA without AMP it is one extra synchronisation per step, the price of
        # skipping a bad step before it reaches the weights and the optimizer state.
        skip = bool(bad)
        if skip:
            torch._foreach_copy_(buffers, self._saved_buffers)
        else:
            self.optimizer.step()
        self.scaler.update()  # fp16: a step with inf / NaN gradients lowers the scale, as with GradScaler.step
        with warnings.catch_warnings():
            # A skipped first step makes torch warn that the schedule moves before the optimizer did: meant.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()
        if self.dist.enabled:
            # BatchNorm statistics of the student and, when a method runs it in train mode (DDFP's teacher), of
            # the teacher: rank 0's everywhere (SyncBatchNorm keeps them equal on GPUs already).
            distributed.broadcast_buffers(self.model)
            distributed.broadcast_buffers(self.ema.module)
        if not skip:
            self.ema.update(self.model)
        # The streak of consecutive bad steps, on the device: read with the logs (Trainer.fit).
        self.bad_since = torch.where(bad & (self.bad_steps == 0), self.iteration + 1, self.bad_since)
        self.bad_inputs = torch.where(bad, self.bad_inputs | ~inputs_ok, torch.zeros_like(self.bad_inputs))
        self.bad_steps = torch.where(bad, self.bad_steps + 1, torch.zeros_like(self.bad_steps))
        return {"loss": out.loss.detach(), **out.logs}

    def _likely_cause(self, inputs: bool | None = None) -> str:
        if inputs is None:
            inputs = bool(self.bad_inputs)
        if inputs:
            return ("non-finite input images (NaN or inf after normalization): check the data (data.train, "
                    "data.unlabeled, data.normalize)")
        lrs = sorted({group["lr"] for group in self.optimizer.param_groups})
        return (f"the learning rate is too high (optim.lr = {self.cfg.optim.lr:g}, now "
                f"{', '.join(f'{lr:g}' for lr in lrs)}): lower it, or set train.grad_clip")

    def _kept(self) -> str:
        kept = [name for name in (LAST, BEST) if (self.out_dir / name).is_file()]
        if not kept:
            return "; no checkpoint of it was written"
        return f"; no checkpoint of it was written, the last good {' and '.join(kept)} in {self.out_dir} " + \
            ("are" if len(kept) > 1 else "is") + " kept"

    def divergence(self, values: dict) -> TrainingDiverged | None:
        """Read at a log step (``values``: the logs with the divergence counters, which are taken out): after
        ``train.max_bad_steps`` consecutive skipped steps, the error that stops training (exit status 3)."""
        count = int(round(values.pop("_bad_steps")))
        since = int(round(values.pop("_bad_since")))
        inputs = values.pop("_bad_inputs") > 0
        if count:
            values["skipped_steps"] = count
        if count < self.cfg.train.max_bad_steps:
            return None
        return TrainingDiverged(
                f"training diverged at iteration {self.iteration}: {count} consecutive steps (from iteration "
                f"{since}) had a non-finite loss or gradient and were skipped (train.max_bad_steps = "
                f"{self.cfg.train.max_bad_steps}); likely cause: {self._likely_cause(inputs)}{self._kept()}")

    def fit(self) -> dict:
        """Train from ``self.iteration`` to ``self.stop_iteration``: each step, then the handlers
        (:mod:`mitoseg.engine.handlers`: logs, time limits, divergence, validation, inspection, checkpoints,
        Ctrl-C); returns the run's summary."""
        self._start_time, self._start_cpu = time.perf_counter(), time.process_time()
        handlers = default_handlers(self)
        loop = Loop(start=self.iteration)
        for handler in handlers:
            handler.started(self, loop)
        try:
            for labeled, unlabeled in self.batches(loop.start):
                if self.iteration >= self.stop_iteration:
                    break
                loop.logs = self.train_step(labeled, unlabeled)
                self.iteration += 1
                loop.done = self.iteration == self.stop_iteration
                for handler in handlers:
                    handler.iteration_completed(self, loop)
        except BaseException as exc:
            for handler in handlers:
                handler.failed(self, loop, exc)
            raise
        for handler in handlers:
            handler.completed(self, loop)
        distributed.barrier()
        return loop.summary
