"""mitoseg: semi-supervised segmentation of mitochondria in electron-microscopy volumes."""

__version__ = "0.1.0"
