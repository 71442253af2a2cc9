"""The jitted data-parallel association training step.

One step: uint8 images -> [-1, 1] -> forward with BN in training mode -> association loss
on the *global* batch + L2 weight decay -> grads -> clip by value -> optimizer -> EMA of
the trained params -> anchor-memory update. The state is replicated and donated; the
batch is sharded on the mesh's "data" axis. Features are gathered to every device before
the association, so the result does not depend on the device count.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from upm_jax import parallel
from upm_jax.training import optim
from upm_jax.training.association import associate_with_metrics
from upm_jax.training.state import TrainState, merge_params, under_scopes

BATCH_KEYS = ("image", "track", "camera")


def _keep_frozen(new, old, frozen_scopes):
    """``new`` with every leaf under a frozen scope taken from ``old``."""
    if not frozen_scopes:
        return new
    flat_new = traverse_util.flatten_dict(dict(new))
    flat_old = traverse_util.flatten_dict(dict(old))
    return traverse_util.unflatten_dict(
        {k: flat_old[k] if under_scopes(k, frozen_scopes) else v for k, v in flat_new.items()})


def _check_partition(state: TrainState, frozen_scopes) -> None:
    """Trace-time check that the state was split with the same frozen scopes as the step."""
    trained = traverse_util.flatten_dict(dict(state.params))
    frozen = traverse_util.flatten_dict(dict(state.frozen_params))
    wrong = [k for k in trained if under_scopes(k, frozen_scopes)] + [k for k in frozen if not under_scopes(k, frozen_scopes)]
    if wrong:
        raise ValueError(f"train step: frozen_scopes={frozen_scopes!r} do not match how the state was "
                         f"split (e.g. param {'/'.join(wrong[0])}); create the state with the same "
                         f"frozen_scopes")


def make_train_step(model, optimizer: str, *, mesh, margin: float = 0.5, eta: float = 0.5,
                    weight_decay: float = 4e-5, clip: float = 2.0, ema_decay: float = 0.9999,
                    frozen_scopes):
    """The jitted train step: ``step_fn(state, schedule, batch)`` or
    ``step_fn(state, schedule, batch, dataset)``.

    Host form: batch = {"image": uint8 [B, H, W, 3], "track": int32 [B], "camera": int32 [B]}
    sharded on "data". Resident form: batch = {"index": int32 [B]} sharded on "data" and
    dataset = {"image": uint8 [N, H, W, 3], "track", "camera": int32 [N]} replicated; the
    rows are gathered inside the step. ``schedule``: the run's ``optim.Schedule`` (learning
    rates, decay, boundary and the cross-association start, all traced: runs that differ only
    in them share one compiled step). Returns (new state, metrics) with metrics a flat dict of
    float32 scalars: loss, association_loss, weight_decay, lr, cross_consistent,
    negative_fallback, grad_norm (before clipping). The input state is donated.

    The step is built once per distinct set of arguments (model, optimizer name, mesh and
    the constants), so every trainer with equal settings calls the same jitted function and
    XLA compiles it once per input shape. Cross association is on when state.step >=
    schedule.cross_start. The EMA uses t = state.step (updates made before this one) and
    the params *before* this step's update, as the original graph does: its EMA op reads the
    variables at the start of the session run, before apply_gradients writes them
    (tools/compare_tf1.py measures this). Weight decay covers the conv kernels of trained
    and frozen params (frozen ones add a constant, as the original's regularisation loss
    did; only trained ones get gradient). ``step_fn.train(state, schedule, image, track,
    camera)`` is the step's body before jit (for transformations such as a vmap over runs).
    """
    return _make_train_step(model, optimizer, mesh, float(margin), float(eta),
                            float(weight_decay), float(clip), float(ema_decay),
                            tuple(tuple(s) for s in frozen_scopes))


def _train_body(model, tx, replicated, margin, eta, weight_decay, clip, ema_decay, frozen_scopes):
    """One step of one run before jit (see make_train_step); `replicated`: the sharding the
    global batch's features, tracklets and cameras are constrained to before the association."""

    def train(state: TrainState, schedule: optim.Schedule, image, track, camera):
        _check_partition(state, frozen_scopes)
        images = image.astype(jnp.float32) / 127.5 - 1.0  # [B, H, W, 3]
        track = jax.lax.with_sharding_constraint(track.astype(jnp.int32), replicated)
        camera = jax.lax.with_sharding_constraint(camera.astype(jnp.int32), replicated)
        cross_on = state.step >= schedule.cross_start
        frozen_decay = optim.l2_weight_decay(state.frozen_params, weight_decay)  # constant

        def loss_fn(params):
            variables = {"params": merge_params(params, state.frozen_params),
                         "batch_stats": state.batch_stats}
            feats, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
            feats = jax.lax.with_sharding_constraint(feats, replicated)  # [B, P, D], global batch
            assoc, memory, aux = associate_with_metrics(state.memory, feats, track, camera,
                                                        margin=margin, eta=eta, cross_on=cross_on)
            decay = optim.l2_weight_decay(params, weight_decay) + frozen_decay
            return assoc + decay, (assoc, decay, memory, aux, updates.get("batch_stats", {}))

        (loss, (assoc, decay, memory, aux, batch_stats)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        grad_norm = optax.tree.norm(grads)
        grads = jax.tree.map(lambda g: jnp.clip(g, -clip, clip), grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, schedule=schedule)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state,
            batch_stats=_keep_frozen(batch_stats, state.batch_stats, frozen_scopes),
            ema_params=optim.ema_update(state.ema_params, state.params, state.step, ema_decay),
            memory=memory)
        metrics = {"loss": loss, "association_loss": assoc, "weight_decay": decay,
                   "lr": optim.learning_rate_at(schedule, state.step),
                   "cross_consistent": aux["cross_consistent"],
                   "negative_fallback": aux["negative_fallback"], "grad_norm": grad_norm}
        return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    return train


@functools.lru_cache(maxsize=16)
def _make_train_step(model, optimizer, mesh, margin, eta, weight_decay, clip, ema_decay,
                     frozen_scopes):
    tx = optim.make_optimizer(optimizer)
    replicated = parallel.replicated(mesh)
    data = parallel.batch_sharding(mesh)
    num_devices = mesh.devices.size

    train = _train_body(model, tx, replicated, margin, eta, weight_decay, clip, ema_decay,
                        frozen_scopes)

    def train_step(state, schedule, image, track, camera):
        return train(state, schedule, image, track, camera)

    def resident_train_step(state, schedule, index, dataset):
        index = index.astype(jnp.int32)
        return train(state, schedule, dataset["image"][index], dataset["track"][index],
                     dataset["camera"][index])

    host_jit = jax.jit(train_step, in_shardings=(replicated, replicated, data, data, data),
                       out_shardings=(replicated, replicated), donate_argnums=(0,))
    resident_jit = jax.jit(resident_train_step, in_shardings=(replicated, replicated, data, replicated),
                           out_shardings=(replicated, replicated), donate_argnums=(0,))

    def check_batch(size, where):
        if size % num_devices:
            raise ValueError(f"train step: {where} has a global batch of {size}, which is not divisible "
                             f"by the {num_devices} devices of the mesh")

    def step_fn(state: TrainState, schedule: optim.Schedule, batch, dataset=None):
        if not isinstance(schedule, optim.Schedule):
            raise TypeError(f"train step: the second argument must be the run's optim.Schedule, "
                            f"got {type(schedule).__name__}")
        if dataset is None:
            missing = [k for k in BATCH_KEYS if k not in batch]
            if missing:
                raise ValueError(f"train step: batch lacks {missing}; expected keys {list(BATCH_KEYS)} "
                                 f"(or {{'index'}} plus a resident dataset); got {sorted(batch)}")
            image = batch["image"]
            if image.dtype != jnp.uint8 or image.ndim != 4 or image.shape[-1] != 3:
                raise ValueError(f"train step: batch['image'] must be uint8 [B, H, W, 3], "
                                 f"got {image.dtype} {tuple(image.shape)}")
            check_batch(image.shape[0], "batch['image']")
            return host_jit(state, schedule, image, batch["track"], batch["camera"])
        if "index" not in batch:
            raise ValueError(f"train step with a resident dataset needs batch['index']; got {sorted(batch)}")
        missing = [k for k in BATCH_KEYS if k not in dataset]
        if missing:
            raise ValueError(f"train step: resident dataset lacks {missing}; got {sorted(dataset)}")
        if dataset["image"].dtype != jnp.uint8:
            raise ValueError(f"train step: dataset['image'] must be uint8, got {dataset['image'].dtype}")
        check_batch(batch["index"].shape[0], "batch['index']")
        return resident_jit(state, schedule, batch["index"], {k: dataset[k] for k in BATCH_KEYS})

    def lower(state: TrainState, schedule: optim.Schedule, batch, dataset=None):
        """The lowered XLA computation of one step (for cost analysis and compilation); the
        arguments may be jax.ShapeDtypeStructs carrying shardings (ahead-of-time compiles)."""
        if dataset is None:
            return host_jit.lower(state, schedule, batch["image"], batch["track"], batch["camera"])
        return resident_jit.lower(state, schedule, batch["index"],
                                  {k: dataset[k] for k in BATCH_KEYS})

    step_fn.lower = lower
    step_fn.train = train
    return step_fn


SPLIT_TABLE_KEYS = ("rows", "track", "camera")


def make_split_train_step(model, optimizer: str, *, mesh, margin: float = 0.5, eta: float = 0.5,
                          weight_decay: float = 4e-5, clip: float = 2.0,
                          ema_decay: float = 0.9999, frozen_scopes):
    """The jitted step of several splits trained side by side:
    ``step_fn(state, schedule, index, tables, image)``.

    Every split's step is ``make_train_step``'s body, vmapped over a leading split axis G of
    the state, the schedule, the batch and the split's frame table; the frames are shared.
    ``mesh``: a ``parallel.split_mesh`` (axes "split", "data"): the split axis is sharded on
    "split" and each split's batch on "data", so a group of devices holds whole splits and
    shares their batches as one split's step shares its batch. Arguments:
    state: a TrainState whose every leaf has the leading axis G; schedule: an
    ``optim.Schedule`` of [G] values; index: int32 [G, B], positions in each split's table;
    tables: {"rows": int32 [G, N] (each position's row of ``image``), "track", "camera":
    int32 [G, N]}; image: uint8 [R, H, W, 3] replicated, the frames of all the splits.
    Returns (new state, metrics of [G] float32 values, replicated); the state is donated.
    """
    return _make_split_train_step(model, optimizer, mesh, float(margin), float(eta),
                                  float(weight_decay), float(clip), float(ema_decay),
                                  tuple(tuple(s) for s in frozen_scopes))


@functools.lru_cache(maxsize=16)
def _make_split_train_step(model, optimizer, mesh, margin, eta, weight_decay, clip, ema_decay,
                           frozen_scopes):
    if tuple(mesh.axis_names) != (parallel.SPLIT_AXIS, parallel.DATA_AXIS):
        raise ValueError(f"split train step: the mesh must come from parallel.split_mesh (axes "
                         f"{(parallel.SPLIT_AXIS, parallel.DATA_AXIS)}), got {mesh.axis_names}")
    # the body of one split: its batch replicated over its group's "data" devices, with the
    # split axis manual (each group runs its own splits)
    manual = mesh.abstract_mesh.update_axis_types({parallel.SPLIT_AXIS: AxisType.Manual})
    train = _train_body(model, optim.make_optimizer(optimizer), NamedSharding(manual, P()),
                        margin, eta, weight_decay, clip, ema_decay, frozen_scopes)
    splits = parallel.split_sharding(mesh)
    batches = parallel.split_batch_sharding(mesh)
    replicated = parallel.replicated(mesh)
    data_devices = mesh.shape[parallel.DATA_AXIS]

    def one_split(state, schedule, index, rows, track, camera, image):
        index = index.astype(jnp.int32)  # [B] positions in this split's table
        return train(state, schedule, image[rows[index]], track[index], camera[index])

    # Each group of devices runs the vmapped body on its own splits (manual over "split",
    # the body's "data" sharding left to the partitioner). A plain vmap with the split axis
    # sharded by the partitioner computed wrong features on XLA:CPU (jax 0.10.2): the
    # vmapped convolutions of a split-sharded batch, checked in tests/test_parallel_splits.py.
    local = jax.shard_map(
        jax.vmap(one_split, in_axes=(0, 0, 0, 0, 0, 0, None)), mesh=mesh,
        in_specs=(P(parallel.SPLIT_AXIS),) * 6 + (P(),),
        out_specs=(P(parallel.SPLIT_AXIS), P(parallel.SPLIT_AXIS)),
        axis_names={parallel.SPLIT_AXIS})

    def split_train_step(state, schedule, index, tables, image):
        return local(state, schedule, index, tables["rows"], tables["track"], tables["camera"],
                     image)

    jitted = jax.jit(split_train_step,
                     in_shardings=(splits, splits, batches, splits, replicated),
                     # the metrics replicated: every process reads every split's
                     out_shardings=(splits, replicated), donate_argnums=(0,))

    def check(index, tables, image):
        missing = [k for k in SPLIT_TABLE_KEYS if k not in tables]
        if missing:
            raise ValueError(f"split train step: tables lack {missing}; got {sorted(tables)}")
        if image.dtype != jnp.uint8 or image.ndim != 4:
            raise ValueError(f"split train step: image must be uint8 [R, H, W, 3], got "
                             f"{image.dtype} {tuple(image.shape)}")
        if index.ndim != 2 or index.shape[1] % data_devices:
            raise ValueError(f"split train step: index must be [splits, batch] with the batch "
                             f"divisible by the {data_devices} devices of the mesh's "
                             f"'{parallel.DATA_AXIS}' axis, got {tuple(index.shape)}")
        return {k: tables[k] for k in SPLIT_TABLE_KEYS}

    def step_fn(state: TrainState, schedule: optim.Schedule, index, tables, image):
        if not isinstance(schedule, optim.Schedule):
            raise TypeError(f"split train step: the second argument must be an optim.Schedule, "
                            f"got {type(schedule).__name__}")
        return jitted(state, schedule, index, check(index, tables, image), image)

    def lower(state: TrainState, schedule: optim.Schedule, index, tables, image):
        """The lowered XLA computation (arguments may be jax.ShapeDtypeStructs)."""
        return jitted.lower(state, schedule, index, check(index, tables, image), image)

    step_fn.lower = lower
    return step_fn
