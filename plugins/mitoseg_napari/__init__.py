"""napari plugin for mitoseg: open EM volumes and runs, train, predict, inspect pseudo-labels, evaluate.

The contributions are declared in ``napari.yaml`` (npe2 manifest, entry point
``napari.manifest``); napari imports the modules named there only when a
contribution is used, so importing this package does not import napari, Qt
or torch.

=============================  ==================================================
``_reader``                    TIFF / HDF5 / Zarr volumes, slice folders, mitoseg
                               run folders and ``inspect/iter_*.npz|json`` files
``_sample_data``               the synthetic EM volume with its labels
``_predict_widget``            sliding-window prediction in a worker thread
``_inspector_widget``          pseudo-label inspector over a run's inspection files
``_plots``                     its matplotlib dock (histograms, Gaussians, curves)
``_evaluate_widget``           IoU / Dice table and false positive / negative layer
``_objects``                   3-D objects of a mask and their measurements for layers
``_objects_widget``            the Objects dock: per-object table, volume histogram
``_train_widget``              the Train widget: label, train (a subprocess), watch,
                               correct, Continue (fine-tune), the rounds' history
``_training``                  its side without Qt: round folders, configs, process
``launch``                     ``mitoseg view RUN [--image VOLUME]``
=============================  ==================================================
"""

__all__ = ["__version__"]

try:
    from mitoseg import __version__
except ImportError:  # pragma: no cover - the plugin ships with mitoseg
    __version__ = "0+unknown"
