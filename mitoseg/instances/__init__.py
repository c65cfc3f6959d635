"""Objects in label volumes: connected components found slab by slab in bounded memory, and the
post-processing of semantic masks built on them (small-object removal, hole filling)."""

from mitoseg.instances.components import SlabComponents, find_components, label_slab
from mitoseg.instances.postprocess import postprocess_labels

__all__ = ["SlabComponents", "find_components", "label_slab", "postprocess_labels"]
