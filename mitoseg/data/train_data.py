"""What a training run draws from, whatever the kind of data: one :class:`TrainData`, built by the factory of
``data.kind`` (:func:`mitoseg.data.factory.build_train_data`), so the trainer never asks which kind it trains on."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainData:
    """The labeled stream, the unlabeled stream (semi-supervised methods; None otherwise), a fixed batch of
    unlabeled inputs for the inspection files (``{"image": (N, C, ...)}``, with ``"label"`` when known), what
    validation scores (:func:`mitoseg.inference.validation.validation_scores` knows each kind; None: no
    validation) and the model's working pixel size in nm (EM with ``data.pixel_size``; stored in checkpoints).
    Each stream's sample ``i`` is a pure function of ``(seed, i)``: sample ``i`` of iteration ``n`` is
    ``n * batch + j``, which makes a resumed run bit-exact."""

    labeled: object  # torch Dataset
    unlabeled: object | None = None
    inspection: dict | None = None
    validation: object | None = None
    pixel_size_nm: float | None = None
