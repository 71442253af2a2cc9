"""Datasets: raw-layout readers, split handling, synthetic data and the input pipeline.

Readers and tables need only NumPy/SciPy/Pillow; the pipeline functions import JAX on use.
"""
from upm_jax.data.images import decode_resize, resize_bilinear_tf1
from upm_jax.data.readers import (LAYOUTS, SplitPlan, check_split_spec, inspect_disk, load_dataset,
                                  protocol_frames, protocol_training_sets, resolve_splits,
                                  tracklets_on_disk)
from upm_jax.data.table import DatasetError, FrameTable, ReidDataset


_PIPELINE = ("batch_indices", "RawFrames", "Loading", "StepBatches", "OrderedBatches",
             "train_batches", "load_resident", "shared_frames", "ordered_batches",
             "resident_batches", "auto_workers", "frame_source", "input_from_config")


def __getattr__(name):
    """Lazily exposes the JAX-based pipeline so readers stay importable without JAX."""
    if name in _PIPELINE:
        import importlib
        return getattr(importlib.import_module("upm_jax.data.pipeline"), name)
    raise AttributeError(f"module 'upm_jax.data' has no attribute {name!r}")


__all__ = ["DatasetError", "FrameTable", "LAYOUTS", "ReidDataset", "decode_resize",
           "SplitPlan", "check_split_spec", "inspect_disk", "load_dataset",
           "protocol_frames", "protocol_training_sets", "resize_bilinear_tf1", "resolve_splits", "tracklets_on_disk",
           *_PIPELINE]
