"""Objects in label volumes: connected components found slab by slab in bounded memory, the
post-processing of semantic masks built on them (small-object removal, hole filling), instances,
their measurements and scores.

The defaults of the instance options live here, importable without SciPy (the CLI's parser reads them);
the functions are imported on first use."""

AUTO_MIN_FRACTION = 0.05  # the default minimum object size, as a fraction of the typical object's
SEED_DEPTH = 0.35  # the default seed depth of a split, as a fraction of an object's relief height

_LAZY = {"SlabComponents": "components", "find_components": "components", "label_slab": "components",
         "postprocess_labels": "postprocess"}

__all__ = ["AUTO_MIN_FRACTION", "SEED_DEPTH", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"mitoseg.instances.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'mitoseg.instances' has no attribute {name!r}")
