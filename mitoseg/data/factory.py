"""The training data of a config, by ``data.kind``: EM volumes (:mod:`mitoseg.data.em`) or Pascal VOC /
Cityscapes (:mod:`mitoseg.data.natural`), each giving one :class:`~mitoseg.data.train_data.TrainData`; and the
checks of every data path a config names (:func:`check_paths_exist`), which the CLI runs before it imports
torch (nothing heavy is imported here at module level)."""

from __future__ import annotations

from pathlib import Path

from mitoseg.config import unlabeled_batch_size
from mitoseg.data.train_data import TrainData
from mitoseg.errors import MitosegError


def build_train_data(cfg, uses_unlabeled: bool, unlabeled_per_batch: int, iterations: int, world_size: int = 1,
                     log: bool = True) -> TrainData:
    """The :class:`TrainData` of ``cfg`` for a run of ``iterations`` over ``world_size`` processes; a method that
    ``uses_unlabeled`` draws ``unlabeled_per_batch`` unlabeled batches per step (CutMix partners). ``log``: say
    what was resampled (the main process)."""
    batch = cfg.data.batch_size
    unlabeled_batch = unlabeled_batch_size(cfg.data)
    labeled_length = iterations * batch * world_size
    unlabeled_length = iterations * unlabeled_per_batch * unlabeled_batch * world_size
    if cfg.data.kind == "em":
        from mitoseg.data.em import build_em_data

        return build_em_data(cfg, uses_unlabeled, labeled_length, unlabeled_length, log)
    from mitoseg.data.natural import build_natural_data

    return build_natural_data(cfg, uses_unlabeled, labeled_length, unlabeled_length, log)


def iterations_per_epoch(cfg, uses_unlabeled: bool, world_size: int = 1) -> int:
    """The iterations of one epoch (``train.epochs``), defined by natural-image datasets (UniMatch's epochs)."""
    if cfg.data.kind == "em":
        raise MitosegError("config key 'train.epochs': EM volumes have no epochs; set train.iterations")
    from mitoseg.data.natural import iterations_per_epoch as natural_epoch

    return natural_epoch(cfg, uses_unlabeled, world_size)


def check_paths_exist(cfg) -> None:
    """Every data file named by the config (a :class:`~mitoseg.config.Config`) must exist (the error names key
    and path)."""
    if cfg.model.pretrained and Path(cfg.model.pretrained).is_dir():
        raise MitosegError(f"config key 'model.pretrained': {cfg.model.pretrained} is a directory; name a .pth file")
    if cfg.model.pretrained and not Path(cfg.model.pretrained).is_file():
        raise MitosegError(f"config key 'model.pretrained': file not found: {cfg.model.pretrained}")
    if cfg.data.kind != "em":
        from mitoseg.data.natural import check_natural_paths

        check_natural_paths(cfg)
        return
    volumes = [("data.train", cfg.data.train)]
    for key in ("val", "test"):
        if getattr(cfg.data, key) is not None:
            volumes.append((f"data.{key}", getattr(cfg.data, key)))
    for i, vol in enumerate(cfg.data.unlabeled or []):
        volumes.append((f"data.unlabeled[{i}]", vol))
    for key, vol in volumes:
        for part in ("image", "label"):
            spec = getattr(vol, part)
            if not spec:
                continue
            file_part = spec.split(":/", 1)[0] if ":/" in spec else spec
            if not Path(file_part).exists():
                raise MitosegError(f"config key '{key}.{part}': file not found: {file_part}")
