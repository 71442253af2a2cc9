"""Device mesh and shardings for data-parallel training (one "data" axis over every device).

Which rows of a global batch a process holds comes from the sharding itself
(`addressable_devices_indices_map`), never from the order of `jax.devices()`: a process's
devices need not be neighbours on the mesh.
"""
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


def rows_held(leading_indices, size: int) -> np.ndarray:
    """Ascending rows of [0, size) covered by any of ``leading_indices`` (one slice per
    device: the leading-axis entry of its index). int64 [rows]."""
    held = np.zeros(int(size), bool)
    for index in leading_indices:
        held[index] = True
    return np.flatnonzero(held)


def process_rows(sharding, size: int) -> np.ndarray:
    """Rows of an array with leading axis ``size`` that this process's devices hold under
    ``sharding``, ascending: int64 [rows].

    ``global[process_rows(...)]`` is exactly the local data that
    ``jax.make_array_from_process_local_data`` expects from this process (it maps the
    process's device slices, in ascending order, onto consecutive local rows).
    """
    index_map = sharding.addressable_devices_indices_map((int(size),))
    return rows_held((index[0] for index in index_map.values()), size)


def from_process_rows(sharding, local, size: int):
    """The global jax.Array of leading axis ``size`` from this process's rows
    ``local = global[process_rows(sharding, size)]``."""
    local = np.asarray(local)
    expected = len(process_rows(sharding, size))
    if local.ndim == 0 or local.shape[0] != expected:
        raise ValueError(f"this process holds {expected} of the {size} rows under {sharding}; got "
                         f"local data of shape {local.shape}")
    return jax.make_array_from_process_local_data(sharding, local, (int(size),) + local.shape[1:])


def global_batch(local_tree, mesh: Mesh):
    """Global jax.Arrays sharded on "data" from this process's rows of the batch.

    Each leaf of ``local_tree`` holds ``global[process_rows(batch_sharding(mesh), B)]``
    (all B rows in a single-process run); B must divide evenly over the mesh's devices.
    """
    sharding = batch_sharding(mesh)
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)

    def make(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % local_devices:
            raise ValueError(f"global_batch: this process's batch of shape {x.shape} must have a "
                             f"leading axis divisible by its {local_devices} devices")
        return from_process_rows(sharding, x, x.shape[0] // local_devices * mesh.size)

    return jax.tree.map(make, local_tree)
