"""Device mesh and shardings for data-parallel training (one "data" axis over every device)."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """1-D mesh with axis "data" over ``devices`` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (the train state)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over "data"."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicate(tree, mesh: Mesh):
    """Place a pytree of host or device arrays replicated on the mesh."""
    return jax.device_put(tree, replicated(mesh))


def global_batch(local_tree, mesh: Mesh):
    """Global jax.Arrays sharded on "data" from this process's rows of the batch.

    Each leaf of ``local_tree`` holds this process's contiguous slice of the global batch
    (all rows in a single-process run); the global batch size must divide evenly over the
    mesh's devices.
    """
    sharding = batch_sharding(mesh)
    per_process = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)

    def make(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % per_process:
            raise ValueError(f"global_batch: this process's batch of shape {x.shape} must have a "
                             f"leading axis divisible by its {per_process} devices")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(make, local_tree)
