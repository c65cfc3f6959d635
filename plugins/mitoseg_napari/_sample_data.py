"""Sample data: the synthetic EM volume behind ``sample_data/`` and the tests, with its labels."""

from __future__ import annotations

SAMPLE_SHAPE = (16, 256, 256)


def make_sample_data(shape: tuple[int, int, int] = SAMPLE_SHAPE, seed: int = 0) -> list[tuple]:
    """A FIB-SEM-like uint8 volume (z, y, x) and its mitochondria labels (0 / 1), as napari layer data."""
    from mitoseg.data.synthetic import make_em_volume

    image, label = make_em_volume(shape, seed=seed)
    meta = {"mitoseg": {"role": "sample", "seed": seed}}
    return [
        (image, {"name": "synthetic EM", "colormap": "gray", "metadata": meta}, "image"),
        (label, {"name": "synthetic EM labels", "opacity": 0.4, "metadata": meta}, "labels"),
    ]
