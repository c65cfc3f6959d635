"""What happens around the training steps, as handlers the loop calls at its events (MONAI's / ignite's event
handlers): the run folder and its logs, the log step's one host synchronisation, the time limits, divergence,
validation, inspection, checkpoints and Ctrl-C. ``Trainer.fit`` is the loop; each concern is one class here.

Events, in the order the loop fires them: ``started`` once; per iteration ``iteration_completed``; ``completed``
once when the loop ends normally, ``failed`` when it ends with an exception (Ctrl-C included). Each event calls
the handlers in the order of :func:`default_handlers`, so a handler sees what those before it decided (the log
step's ``done`` before validation, ``best.pt`` before ``data.test`` is scored with it). At a log step :class:`LogStep` gathers every handler's :meth:`Handler.sync_values` (device tensors)
with the step's logs into one ``all_reduce`` and one host transfer, and hands each handler the host values
(:meth:`Handler.synced`), so nothing else synchronises the host with the device during training.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from mitoseg import distributed
from mitoseg.atomic import make_folder, remove_stale_temporaries_in, write_text_atomic
from mitoseg.config import config_to_dict
from mitoseg.engine.logging import NullLogger, RunLogger
from mitoseg.errors import Terminated, TrainingDiverged
from mitoseg.metrics import headline_metric
from mitoseg.runs import BEST, CONFIG, INSPECT, LAST, SUMMARY, json_safe


@dataclass
class Loop:
    """The state of one ``fit``: what the handlers decide and share."""

    start: int  # the iteration the loop started at (a resumed run's)
    logs: dict = field(default_factory=dict)  # the last step's log tensors (on the device)
    done: bool = False  # this iteration is the run's last
    stop: bool = False  # Ctrl-C: stop after this iteration
    logger: RunLogger | NullLogger = field(default_factory=NullLogger)
    postfix: dict = field(default_factory=dict)  # the progress bar's
    diverged: TrainingDiverged | None = None
    timed_out: bool = False  # --max-minutes ended the run
    budget_spent: bool = False  # train.max_minutes ended the run
    saved_on_interrupt: bool = False
    stop_exception: BaseException = field(default_factory=KeyboardInterrupt)  # Ctrl-C's, or SIGTERM's Terminated
    summary: dict | None = None


class Handler:
    """A concern of the training loop, called at its events; every method is optional."""

    def started(self, trainer, loop: Loop) -> None:
        pass

    def sync_values(self, trainer, loop: Loop) -> dict[str, torch.Tensor]:
        """Scalars (device tensors) this handler reads at the log step's one synchronisation."""
        return {}

    def synced(self, trainer, loop: Loop, values: dict) -> None:
        """The log step's host values (averaged over ranks): each handler takes out its own keys."""

    def iteration_completed(self, trainer, loop: Loop) -> None:
        pass

    def completed(self, trainer, loop: Loop) -> None:
        pass

    def failed(self, trainer, loop: Loop, exc: BaseException) -> None:
        pass


def every(iteration: int, interval: int, loop: Loop) -> bool:
    return iteration % interval == 0 or loop.done


class RunFolder(Handler):
    """The run folder: created, temporaries of a killed run removed, the resolved config written, the logs
    (``metrics.jsonl``, TensorBoard) opened and closed (main process only)."""

    def started(self, trainer, loop):
        if not trainer.is_main:
            return
        make_folder(trainer.out_dir, "--out")
        # Temporaries (.NAME.tmp-PID) of a run that was killed while writing: its process is gone.
        for folder in (trainer.out_dir, trainer.out_dir / INSPECT):
            remove_stale_temporaries_in(folder)
        loop.logger = RunLogger(trainer.out_dir, start_iteration=trainer.iteration)
        write_text_atomic(trainer.out_dir / CONFIG, json.dumps(config_to_dict(trainer.cfg), indent=2))

    def completed(self, trainer, loop):
        loop.logger.close()

    def failed(self, trainer, loop, exc):
        loop.logger.close()


class ProgressBar(Handler):
    """tqdm over the iterations, with the last loss and validation score."""

    def started(self, trainer, loop):
        self.bar = tqdm(total=trainer.stop_iteration, initial=loop.start, desc="train", unit="it",
                        disable=not trainer.progress, dynamic_ncols=True)

    def iteration_completed(self, trainer, loop):
        self.bar.update(1)
        self.bar.set_postfix(loop.postfix, refresh=False)

    def completed(self, trainer, loop):
        self.bar.close()

    def failed(self, trainer, loop, exc):
        self.bar.close()


class Interrupt(Handler):
    """Ctrl-C (:class:`InterruptRequest`): the iteration in progress ends, ``last.pt`` is written there and the
    run stops (exit status 130). Under torchrun the ranks agree at a log step, so all stop at the same one."""

    def __init__(self):
        self.request = InterruptRequest()

    def started(self, trainer, loop):
        self.request.__enter__()

    def iteration_completed(self, trainer, loop):
        # A log step may set it too (another rank's Ctrl-C): see synced.
        loop.stop = loop.stop or (self.request.requested and not trainer.dist.enabled)
        if self.request.requested:
            loop.stop_exception = self.request.exception()

    def sync_values(self, trainer, loop):
        if not trainer.dist.enabled:
            return {}
        return {"_interrupt": torch.tensor(float(self.request.requested), device=trainer.device)}

    def synced(self, trainer, loop, values):
        loop.stop = loop.stop or values.pop("_interrupt", 0.0) > 0

    def completed(self, trainer, loop):
        self.request.__exit__(None, None, None)

    def failed(self, trainer, loop, exc):
        self.request.__exit__(None, None, None)
        if isinstance(exc, KeyboardInterrupt):
            what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
            where = "last.pt is saved at this iteration" if loop.saved_on_interrupt else \
                "stopped at once, without saving"
            tqdm.write(f"{what} at iteration {trainer.iteration}; {where}: continue with --resume --out "
                       f"{trainer.out_dir}")


class LogStep(Handler):
    """Every ``train.log_every`` iterations and at the last: the one host synchronisation of a logged step. The
    step's logs and every handler's :meth:`~Handler.sync_values` are averaged over the ranks and moved to the host
    together; each handler then reads its own values (:meth:`~Handler.synced`), in handler order."""

    def __init__(self, handlers: list[Handler]):
        self.handlers = handlers

    def iteration_completed(self, trainer, loop):
        if not every(trainer.iteration, trainer.cfg.train.log_every, loop):
            return
        extra = {}
        for handler in self.handlers:
            extra.update(handler.sync_values(trainer, loop))
        tensors = [v.float().reshape(()) for v in (*loop.logs.values(), *extra.values())]
        stacked = distributed.all_reduce_mean(torch.stack(tensors))
        values = dict(zip([*loop.logs, *extra], stacked.tolist()))
        for handler in self.handlers:
            handler.synced(trainer, loop, values)


class TimeBudget(Handler):
    """``train.max_minutes``: the run's wall time observed at log steps (averaged over ranks); once the budget is
    spent, this iteration is the run's last and the learning rate is zero (:class:`~mitoseg.engine.trainer.
    TimeBudget` holds the schedule's clock)."""

    def sync_values(self, trainer, loop):
        return {"_wall_time": torch.tensor(trainer.wall_time(), device=trainer.device)}

    def synced(self, trainer, loop, values):
        budget = trainer.budget
        budget.observe(trainer.iteration, values.pop("_wall_time"))
        if budget.spent() and not loop.done:
            loop.done = loop.budget_spent = True
            trainer.stop_iteration = trainer.total_iterations = trainer.iteration
            # The step's extrapolated progress may have fallen short of 1 (a slow last stretch): the schedule's
            # end, zero, is what last.pt records.
            for group in trainer.optimizer.param_groups:
                group["lr"] = 0.0


class TimeLimit(Handler):
    """``mitoseg train --max-minutes``: the first log step past the limit ends the run as if it were the last
    iteration (validation, inspection, ``last.pt``); the schedule still spans ``train.iterations``, so
    ``--resume`` continues."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = 0.0  # set when the loop starts

    def started(self, trainer, loop):
        self.start = time.perf_counter()

    def sync_values(self, trainer, loop):
        elapsed = time.perf_counter() - self.start
        return {"_timeout": torch.tensor(float(elapsed >= self.seconds), device=trainer.device)}

    def synced(self, trainer, loop, values):
        if values.pop("_timeout", 0.0) > 0 and not loop.done:
            loop.done = loop.timed_out = True
            trainer.stop_iteration = trainer.iteration

    def completed(self, trainer, loop):
        if loop.timed_out and trainer.is_main:
            tqdm.write(f"time limit of {self.seconds / 60:g} minutes reached at iteration {trainer.iteration}; "
                       f"last.pt is saved: continue with --resume --out {trainer.out_dir}")


class Divergence(Handler):
    """Skipped steps (a non-finite loss or gradient), counted on the device by the step and read at log steps:
    ``train.max_bad_steps`` consecutive ones stop training (:class:`~mitoseg.errors.TrainingDiverged`, exit
    status 3) after the log step is written."""

    def sync_values(self, trainer, loop):
        return {"_bad_steps": trainer.bad_steps, "_bad_since": trainer.bad_since, "_bad_inputs": trainer.bad_inputs}

    def synced(self, trainer, loop, values):
        loop.diverged = trainer.divergence(values)

    def iteration_completed(self, trainer, loop):
        if loop.diverged is not None:
            raise loop.diverged


class Metrics(Handler):
    """The log step's values (and the learning rate) into ``metrics.jsonl`` / TensorBoard, the method's notices
    (once each) on the terminal, the loss on the progress bar."""

    def synced(self, trainer, loop, values):
        values["lr"] = trainer.optimizer.param_groups[0]["lr"]
        loop.logger.log_train(trainer.iteration, values)
        if trainer.is_main:
            for line in trainer.method.notices(trainer.iteration, values):
                tqdm.write(line)
        loop.postfix["loss"] = f"{values['loss']:.4f}"


class Validation(Handler):
    """Every ``train.val_every`` iterations and at the last: the validation scores into the logs; the best one
    writes ``best.pt``. Without validation data, the final weights become ``best.pt``."""

    def iteration_completed(self, trainer, loop):
        if not trainer.has_validation or not every(trainer.iteration, trainer.cfg.train.val_every, loop):
            return
        scores = trainer.validate()
        # When in the run this validation happened (the x axis of accuracy-per-minute curves; summed over resumes).
        scores["wall_time_s"], scores["cpu_time_s"] = trainer.wall_time(), trainer.cpu_time()
        trainer.last_scores = scores
        name, value = headline_metric(scores)
        loop.logger.log_validation(trainer.iteration, scores)
        best = trainer.best
        first = best is None
        if best is None or (not math.isnan(value) and value > best["value"]) or math.isnan(best["value"]):
            trainer.best = {"iteration": trainer.iteration, "metric": name, "value": value, "scores": scores}
            trainer.save(BEST)
        loop.postfix[name] = f"{value:.4f}"
        if trainer.is_main and not trainer.progress:
            # --no-progress (a log file, a scheduler): a line per validation, so a long run is seen to move.
            note = ("; the first scores are low while the network starts to learn, and rise with the iterations"
                    if first and loop.start == 0 else "")
            print(f"iteration {trainer.iteration}/{trainer.total_iterations}: validation {name} {value:.4f} "
                  f"({scores.get('weights', trainer.cfg.train.eval_model)} weights; best "
                  f"{trainer.best['value']:.4f} at iteration {trainer.best['iteration']}){note}", flush=True)

    def completed(self, trainer, loop):
        if not trainer.has_validation:
            trainer.save(BEST)


class Inspection(Handler):
    """Every ``train.inspect_every`` iterations and at the last: the method's pseudo-label arrays of the fixed
    inspection batch into ``inspect/`` (semi-supervised methods, main process)."""

    def iteration_completed(self, trainer, loop):
        if trainer.data.inspection is not None and trainer.is_main and \
                every(trainer.iteration, trainer.cfg.train.inspect_every, loop):
            trainer.inspect()


class Checkpoints(Handler):
    """``last.pt`` every ``train.checkpoint_every`` iterations, at the last and on Ctrl-C (which then stops the
    loop: ``--resume`` continues from it exactly as an uninterrupted run would have)."""

    def iteration_completed(self, trainer, loop):
        if every(trainer.iteration, trainer.cfg.train.checkpoint_every, loop) or loop.stop:
            trainer.save(LAST)
        if loop.stop:
            loop.saved_on_interrupt = True
            raise loop.stop_exception


class Summary(Handler):
    """When the loop ends: ``data.test`` scored with ``best.pt``, and ``summary.json``."""

    def completed(self, trainer, loop):
        test = None
        if trainer.cfg.data.test is not None and trainer.is_main:
            test = trainer.test()
            loop.logger.log_test(trainer.iteration, test)
        loop.summary = {
            "method": trainer.cfg.method.name,
            "iterations": trainer.iteration,
            "total_iterations": trainer.total_iterations,
            "completed": trainer.iteration >= trainer.total_iterations,
            "wall_time_s": round(trainer.wall_time(), 3),
            "cpu_time_s": round(trainer.cpu_time(), 3),
            "device": str(trainer.device),
            "final": trainer.last_scores,
            "best": trainer.best,
            "test": test,
            "init": trainer.init_report,
            "time_limit_reached": loop.timed_out,
            "budget_spent": loop.budget_spent,
        }
        if trainer.is_main:
            write_text_atomic(trainer.out_dir / SUMMARY, json.dumps(json_safe(loop.summary), indent=2))


def default_handlers(trainer) -> list[Handler]:
    """The handlers of a training run, in the order they are called."""
    synced: list[Handler] = [Interrupt()]
    if trainer.budget is not None:
        synced.append(TimeBudget())
    if trainer.max_seconds is not None:
        synced.append(TimeLimit(trainer.max_seconds))
    synced += [Divergence(), Metrics()]
    # RunFolder last: it opens the logs when the run starts (before any iteration) and closes them after every
    # other handler has finished with them (Summary logs data.test's scores).
    return [*synced[:1], LogStep(synced), *synced[1:], Validation(), ProgressBar(), Inspection(), Checkpoints(),
            Summary(), RunFolder()]


class InterruptRequest:
    """Ctrl-C (SIGINT) or SIGTERM (a scheduler's stop) during training as a request: the loop finishes the iteration
    it is in, saves last.pt there and stops (exit status 130, or 143 for SIGTERM); a second signal stops at once.
    Only the main thread can install signal handlers: elsewhere (a napari worker, say) the signals keep their
    meaning."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "InterruptRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                previous = signal.getsignal(signum)
                if previous is signal.SIG_IGN:  # a background job's ignored Ctrl-C stays ignored
                    continue
                self._previous[signum] = previous if previous is not None else signal.SIG_DFL
                signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise self.exception()
        self.requested, self.signum = True, signum
        name = "SIGTERM" if signum == signal.SIGTERM else "interrupt"
        tqdm.write(f"{name}: saving last.pt at the end of this iteration (a second one stops at once)")

    def exception(self) -> KeyboardInterrupt:
        """What stops the loop: :class:`~mitoseg.errors.Terminated` for SIGTERM, else KeyboardInterrupt."""
        return Terminated() if self.signum == signal.SIGTERM else KeyboardInterrupt()

    def __exit__(self, *exc_info) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
