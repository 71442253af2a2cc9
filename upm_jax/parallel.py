"""Devices and processes: the data-parallel mesh, its shardings, which rows of a batch
this process holds, and joining one JAX runtime across processes (hosts).

Which rows of a global batch a process holds comes from the sharding itself
(`addressable_devices_indices_map`), never from the order of `jax.devices()`: a process's
devices need not be neighbours on the mesh.

Multi-process launchers, in the order `initialize` recognises them:

- `JAX_COORDINATOR_ADDRESS` (host:port of process 0) with `JAX_NUM_PROCESSES` and
  `JAX_PROCESS_ID`: passed to `jax.distributed.initialize` explicitly (JAX itself reads
  only the address from the environment), every local device used unless
  `JAX_LOCAL_DEVICE_IDS` says otherwise;
- SLURM (`srun`, SLURM_STEP_NUM_TASKS > 1), Open MPI (`mpirun`, OMPI_COMM_WORLD_SIZE > 1) and
  multi-host TPU slices (TPU_WORKER_HOSTNAMES with several hosts): JAX detects
  coordinator, count and id itself.

CPU processes exchange collectives through gloo, so a multi-process run works (and is
tested) without accelerators.

When one process stops, the others must not wait for it in a collective, and JAX's own
reaction (its coordination service aborts every process with a fatal-error dump when one
stops sending heartbeats) names nothing useful. So the service runs in JAX's recoverable
mode (a dead process is not fatal to the others), and `watch_stops` checks from a
background thread, every second, what the service knows: a process that stops on its own
(bad input, a signal outside training, an unexpected error) has announced it in the
service's key-value store (`announce_stop`) and is named with its reason; a process that
left without finishing and without a word (SIGKILL, a crash) is found when the service
drops it from the live processes, HEARTBEAT_TIMEOUT_S after its last heartbeat. A process
that finishes cleanly says so first, and the processes end together (`finish`: in the
recoverable mode JAX's shutdown no longer waits for all, and the process hosting the
service must leave last). A collective that fails because a process is gone breaks at
once in the others (`lost_process_message`).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
# The leading axis of splits trained side by side (config.train.parallel_splits).
SPLIT_AXIS = "split"


def make_mesh(devices=None) -> Mesh:
    """1-D mesh with axis "data" over ``devices`` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def split_mesh(mesh: Mesh, num_splits: int) -> Mesh:
    """The mesh of ``num_splits`` splits trained side by side on ``mesh``'s devices: axes
    ("split", "data") of shape (S, D / S) with S = gcd(num_splits, D), in ``mesh``'s device
    order. Each group of D / S devices holds num_splits / S whole splits and shares their
    batches on "data" as one split's step does; S = D puts whole splits on each device (no
    data parallelism), S = 1 is the data-parallel step of every split."""
    devices = np.asarray(mesh.devices).reshape(-1)
    groups = int(np.gcd(int(num_splits), devices.size))
    return Mesh(devices.reshape(groups, devices.size // groups), (SPLIT_AXIS, DATA_AXIS))


def split_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (split) axis split over "split" of a ``split_mesh``, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(SPLIT_AXIS))


def split_batch_sharding(mesh: Mesh) -> NamedSharding:
    """[splits, batch] over ("split", "data") of a ``split_mesh``."""
    return NamedSharding(mesh, PartitionSpec(SPLIT_AXIS, DATA_AXIS))


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


JAX_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# Seconds without heartbeats after which JAX's coordination service declares a process
# dead and ends the others (JAX's default is 100 s).
HEARTBEAT_TIMEOUT_S = 10
# The coordination-service keys of a process that stops on its own (`announce_stop`) and
# of one that finished cleanly (`finish`).
_STOPPED_KEY = "upm_jax/stopped"
_FINISHED_KEY = "upm_jax/finished/"
# Seconds between two looks of `watch_stops`.
_WATCH_INTERVAL_S = 1.0
# Words of the errors a collective raises when another process is gone.
_LOST_PROCESS_WORDS = ("Gloo", "Connection reset by peer", "Connection closed by peer",
                       "heartbeat", "coordination service", "Socket closed")
MODES = ("auto", "yes", "no")


class DistributedError(RuntimeError):
    """This process cannot join the multi-process run; the message names what is missing."""


def detect_launcher(environ=None) -> str | None:
    """'jax', 'slurm', 'openmpi' or 'tpu' when a launcher started several processes that
    must join one runtime; None for a single process."""
    environ = os.environ if environ is None else environ
    if any(environ.get(name) for name in JAX_VARIABLES):
        return "jax"
    for launcher, name in (("slurm", "SLURM_STEP_NUM_TASKS"), ("openmpi", "OMPI_COMM_WORLD_SIZE")):
        value = environ.get(name, "")
        if value.isdigit() and int(value) > 1:
            return launcher
    if len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "tpu"
    return None


def jax_arguments(environ=None) -> dict:
    """coordinator_address, num_processes and process_id from the JAX_* variables."""
    environ = os.environ if environ is None else environ
    missing = [name for name in JAX_VARIABLES if not environ.get(name)]
    if missing:
        raise DistributedError(
            f"multi-process launch through JAX_* variables: {', '.join(missing)} not set; every "
            f"process needs all of {', '.join(JAX_VARIABLES)} (process 0's host:port, the number "
            "of processes, and this process's id 0..count-1)")
    address = environ["JAX_COORDINATOR_ADDRESS"]
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DistributedError(f"JAX_COORDINATOR_ADDRESS={address!r}: expected host:port of "
                               "process 0, e.g. node001:12345")
    numbers = {}
    for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        value = environ[name].strip()
        if not value.isdigit():
            raise DistributedError(f"{name}={environ[name]!r}: expected a non-negative integer")
        numbers[name] = int(value)
    count, index = numbers["JAX_NUM_PROCESSES"], numbers["JAX_PROCESS_ID"]
    if count < 1 or index >= count:
        raise DistributedError(f"JAX_PROCESS_ID={index} with JAX_NUM_PROCESSES={count}: expected "
                               "1 <= processes and 0 <= id < processes")
    return {"coordinator_address": address, "num_processes": count, "process_id": index}


def check_coordinator(arguments, timeout_s: float) -> None:
    """Fails clearly where JAX would abort the process: process 0 cannot bind the
    coordinator's port, or another process finds no coordinator within `timeout_s`."""
    host, _, port = arguments["coordinator_address"].rpartition(":")
    host, port = host.strip("[]"), int(port)
    if arguments["process_id"] == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("", port))
            except OSError as e:
                raise DistributedError(
                    f"JAX_COORDINATOR_ADDRESS={arguments['coordinator_address']}: process 0 "
                    f"cannot listen on port {port} ({e.strerror}); choose a free port") from e
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=min(5.0, timeout_s)).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedError(
                    f"no coordinator at JAX_COORDINATOR_ADDRESS={arguments['coordinator_address']}"
                    f" after {timeout_s:g} s ({e.strerror or e}): start process 0 "
                    "(JAX_PROCESS_ID=0) on that host with the same address") from e
            time.sleep(0.5)


def initialize(mode: str = "auto", *, timeout_s: int = 300, environ=None) -> bool:
    """Joins the multi-process runtime as `mode` says; True when it did.

    'auto': when a launcher (see `detect_launcher`) started several processes; 'yes':
    always (failing when no launcher is recognised); 'no': never. Call before any JAX
    computation. Raises DistributedError naming what is missing or why joining failed
    (a JAX_* variable unset or malformed, the coordinator unreachable for `timeout_s`
    seconds). Processes that never arrive still end in JAX's own abort after `timeout_s`.
    """
    if mode not in MODES:
        raise DistributedError(f"--distributed={mode!r}: expected one of {MODES}")
    launcher = detect_launcher(environ)
    if mode == "no" or (mode == "auto" and launcher is None):
        return False
    if launcher is None:
        raise DistributedError(
            "--distributed=yes but no multi-process launcher found: set "
            f"{', '.join(JAX_VARIABLES)} on every process, or start under SLURM (srun), "
            "Open MPI (mpirun) or on a multi-host TPU slice")
    arguments = {}
    if launcher == "jax":
        arguments = jax_arguments(environ)
        check_coordinator(arguments, timeout_s)
        # no cluster detection on top: under SLURM it would limit each process to the one GPU
        # of its local task id; given JAX_* the user decides (JAX_LOCAL_DEVICE_IDS, else all)
        arguments["cluster_detection_method"] = "deactivate"
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_recoverability", True)   # see the module docstring
    try:
        jax.distributed.initialize(**arguments, initialization_timeout=int(timeout_s),
                                   heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
    except (RuntimeError, ValueError, TypeError) as e:
        where = ", ".join(f"{k}={v}" for k, v in arguments.items()) or "detected by JAX"
        raise DistributedError(f"could not join the multi-process run ({launcher} launch, "
                               f"{where}): {e}") from e
    return True


def _client():
    """The coordination service's client of this process (None in a single-process run)."""
    from jax._src import distributed  # noqa: PLC0415  (orbax reads the client there too)

    return distributed.global_state.client


def key_value_set(key: str, value: str) -> bool:
    """Writes `key` in the coordination service's store unless it is set; False when it
    was (or there is no service)."""
    client = _client()
    if client is None:
        return False
    try:
        client.key_value_set(key, value)
    except Exception:  # noqa: BLE001  (already set, or the service is gone)
        return False
    return True


def key_value_get(key: str) -> str | None:
    """The value of `key` in the coordination service's store, or None (unset, no service)."""
    client = _client()
    if client is None:
        return None
    try:
        return client.key_value_try_get(key)
    except Exception:  # noqa: BLE001  (NOT_FOUND, or the service is gone)
        return None


def announce_stop(status: int, line: str) -> None:
    """Tells the other processes that this one stops with `status`, and why (`line`)."""
    key_value_set(_STOPPED_KEY, json.dumps({"process": jax.process_index(), "status": status,
                                            "line": line}))


def stopped_process() -> dict | None:
    """The announcement of a process that stopped ({process, status, line}), or None."""
    value = key_value_get(_STOPPED_KEY)
    return json.loads(value) if value else None


# Seconds the processes wait for each other at the end (process 0 may still evaluate).
END_TIMEOUT_S = 3600


def finish() -> None:
    """Ends a multi-process run normally: tells the others this process is not lost, waits
    until every process is done, and on process 0 (which hosts the coordination service)
    until the others have disconnected. Raises (a JAX runtime error) when a process stopped
    meanwhile."""
    client = _client()
    if client is None:
        return
    key_value_set(_FINISHED_KEY + str(jax.process_index()), "1")
    client.wait_at_barrier("upm_jax/end", END_TIMEOUT_S * 1000)
    if jax.process_index() == 0:   # each other process disconnects as it exits
        everyone = list(range(jax.process_count()))

        def others_gone():
            while set(client.get_live_nodes(everyone)) != {0}:
                time.sleep(0.1)

        waiter = threading.Thread(target=others_gone, daemon=True)
        waiter.start()
        waiter.join(timeout=60)


def watch_stops(on_stop) -> None:
    """Calls `on_stop({"status", "line"[, "process"]})` from a background thread when
    another process announced that it stops, or left without finishing and without a
    word (see the module docstring); the thread ends then, or with the client."""
    client, me, count = _client(), jax.process_index(), jax.process_count()
    if client is None:
        return

    def watch():
        while True:
            try:   # returns once every live process asked (each process's watcher does)
                alive = set(client.get_live_nodes(list(range(count))))
            except Exception:  # noqa: BLE001  (the client shut down: this process ends)
                return
            announcement = stopped_process()
            if announcement is not None and announcement["process"] != me:
                on_stop(announcement)
                return
            lost = [i for i in range(count) if i not in alive
                    and key_value_get(_FINISHED_KEY + str(i)) is None]
            if lost:
                on_stop({"status": 1, "line": (
                    f"process {lost[0]} of {count} stopped without a word (killed or crashed: "
                    f"no heartbeat for {HEARTBEAT_TIMEOUT_S} s); stopping this process too")})
                return
            time.sleep(_WATCH_INTERVAL_S)

    threading.Thread(target=watch, name="upm_jax stop watcher", daemon=True).start()


def lost_process_message(error: BaseException) -> str | None:
    """When `error` is a collective or coordination failure caused by another process
    being gone, one line saying so; else None."""
    text = str(error)
    if jax.process_count() < 2 or not any(word in text for word in _LOST_PROCESS_WORDS):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return (f"another process of this run stopped without a word (killed or crashed): "
            f"this process lost contact with it ({first[:200]})")
