"""TrainState, its creation on a mesh, and the jitted data-parallel association train step.

One step (design.md 3.5): uint8 images -> [-1, 1] -> forward with BN in training mode ->
association loss on the *global* batch + L2 weight decay -> grads -> clip by value ->
optimizer -> EMA of the trained params -> anchor-memory update. The state is replicated
and donated; the batch is sharded on the mesh's "data" axis. Features are gathered to
every device before the association, so the result does not depend on the device count.
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from upm_jax import optim, sharding
from upm_jax.association import AnchorMemory, associate_with_metrics
from upm_jax.models import load_pretrained

BATCH_KEYS = ("image", "track", "camera")


@flax.struct.dataclass
class TrainState:
    """Everything one training run carries from step to step (a pytree orbax can save).

    params: trained params; frozen_params: params under the frozen scopes (never updated);
    batch_stats: BN moving statistics (those under frozen scopes are never updated);
    ema_params: EMA of ``params`` (for extraction, with frozen_params and batch_stats);
    memory: the anchor memory; rng: a raw uint32 [2] key, for stochastic layers.
    """

    step: jax.Array  # int32 []
    params: Any
    frozen_params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any
    memory: AnchorMemory
    rng: jax.Array


def _under(key: Tuple[str, ...], scopes) -> bool:
    return any(tuple(key[:len(s)]) == tuple(s) for s in scopes)


def split_frozen(tree, frozen_scopes: Sequence[Sequence[str]]):
    """(trained, frozen): the leaves of a nested dict outside / under any frozen path prefix."""
    flat = traverse_util.flatten_dict(dict(tree))
    trained = {k: v for k, v in flat.items() if not _under(k, frozen_scopes)}
    frozen = {k: v for k, v in flat.items() if _under(k, frozen_scopes)}
    return traverse_util.unflatten_dict(trained), traverse_util.unflatten_dict(frozen)


def merge_params(trained, frozen):
    """Inverse of ``split_frozen``."""
    flat = traverse_util.flatten_dict(dict(trained))
    flat.update(traverse_util.flatten_dict(dict(frozen)))
    return traverse_util.unflatten_dict(flat)


def _keep_frozen(new, old, frozen_scopes):
    """``new`` with every leaf under a frozen scope taken from ``old``."""
    if not frozen_scopes:
        return new
    flat_new = traverse_util.flatten_dict(dict(new))
    flat_old = traverse_util.flatten_dict(dict(old))
    return traverse_util.unflatten_dict(
        {k: flat_old[k] if _under(k, frozen_scopes) else v for k, v in flat_new.items()})


def init_variables(model, rng, *, image_shape, mesh, pretrained=None):
    """The model's initial variables, replicated on ``mesh`` (the one place a model is
    initialised: training states, the untrained network's features, shape queries).

    ``pretrained``: a ported weights file merged strictly into the backbone
    (``upm_jax.models.load_pretrained``); the merged tree is placed replicated again, so
    later jits see one device set whatever the device count.
    """
    height, width = image_shape
    replicated = sharding.replicated(mesh)

    def init(key):
        return model.init(key, jnp.zeros((1, height, width, 3), jnp.float32), train=False)

    variables = jax.jit(init, out_shardings=replicated)(rng)
    if pretrained:
        variables = jax.device_put(
            load_pretrained(variables, pretrained, backbone=model.backbone_name), replicated)
    return variables


def abstract_variables(model, *, image_shape, mesh):
    """Shapes, dtypes and (replicated) shardings of ``init_variables``, computing nothing."""
    height, width = image_shape
    replicated = sharding.replicated(mesh)
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, height, width, 3), jnp.float32), train=False))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        shapes)


def create_train_state(model, rng, *, image_shape, tx, memory: AnchorMemory, mesh,
                       pretrained=None, frozen_scopes=None) -> TrainState:
    """Initial TrainState, replicated on ``mesh``.

    The variables come from ``init_variables`` (with the ``pretrained`` backbone when
    given); the state is built from them by one jit with replicated out_shardings.
    ``frozen_scopes`` defaults to ``model.frozen_scopes``. The EMA starts at the initial
    params.
    """
    frozen_scopes = tuple(model.frozen_scopes if frozen_scopes is None else frozen_scopes)
    replicated = sharding.replicated(mesh)
    rng = jnp.asarray(rng)
    if rng.dtype != jnp.uint32 or rng.shape != (2,):
        raise ValueError(f"create_train_state: rng must be a raw key (jax.random.PRNGKey), uint32 [2]; "
                         f"got {rng.dtype} {rng.shape}")

    def build(variables, memory, key):
        params, frozen = split_frozen(variables["params"], frozen_scopes)
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, frozen_params=frozen,
            batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
            # a real copy: the step donates the state, and one buffer cannot be donated twice
            ema_params=jax.tree.map(lambda p: p + jnp.zeros_like(p), params),
            memory=memory, rng=key)

    variables = init_variables(model, rng, image_shape=image_shape, mesh=mesh,
                               pretrained=pretrained)
    abstract_state = jax.eval_shape(build, variables, memory, rng)
    out_shardings = jax.tree.map(lambda _: replicated, abstract_state)
    return jax.jit(build, out_shardings=out_shardings)(variables, memory, rng)


def _check_partition(state: TrainState, frozen_scopes) -> None:
    """Trace-time check that the state was split with the same frozen scopes as the step."""
    trained = traverse_util.flatten_dict(dict(state.params))
    frozen = traverse_util.flatten_dict(dict(state.frozen_params))
    wrong = [k for k in trained if _under(k, frozen_scopes)] + [k for k in frozen if not _under(k, frozen_scopes)]
    if wrong:
        raise ValueError(f"train step: frozen_scopes={frozen_scopes!r} do not match how the state was "
                         f"split (e.g. param {'/'.join(wrong[0])}); create the state with the same "
                         f"frozen_scopes")


def make_train_step(model, tx: optax.GradientTransformation, schedule, *, mesh, margin: float = 0.5,
                    eta: float = 0.5, weight_decay: float = 4e-5, clip: float = 2.0,
                    ema_decay: float = 0.9999, cross_start_step: int, frozen_scopes):
    """The jitted train step: ``step_fn(state, batch)`` or ``step_fn(state, batch, dataset)``.

    Host form: batch = {"image": uint8 [B, H, W, 3], "track": int32 [B], "camera": int32 [B]}
    sharded on "data". Resident form: batch = {"index": int32 [B]} sharded on "data" and
    dataset = {"image": uint8 [N, H, W, 3], "track", "camera": int32 [N]} replicated; the
    rows are gathered inside the step. Returns (new state, metrics) with metrics a flat dict
    of float32 scalars: loss, association_loss, weight_decay, lr, cross_consistent,
    negative_fallback, grad_norm (before clipping). The input state is donated.

    cross association is on when state.step >= cross_start_step (traced, no recompiles).
    The EMA uses t = state.step (updates made before this one) and the params *before* this
    step's update, as the original graph does: its EMA op reads the variables at the start of
    the session run, before apply_gradients writes them (tools/compare_tf1.py measures this).
    Weight decay covers the conv kernels of trained and frozen params (frozen ones add a
    constant, as the original's regularisation loss did; only trained ones get gradient).
    """
    frozen_scopes = tuple(tuple(s) for s in frozen_scopes)
    replicated = sharding.replicated(mesh)
    data = sharding.batch_sharding(mesh)
    num_devices = mesh.devices.size

    def train(state: TrainState, image, track, camera):
        _check_partition(state, frozen_scopes)
        images = image.astype(jnp.float32) / 127.5 - 1.0  # [B, H, W, 3]
        track = jax.lax.with_sharding_constraint(track.astype(jnp.int32), replicated)
        camera = jax.lax.with_sharding_constraint(camera.astype(jnp.int32), replicated)
        cross_on = state.step >= cross_start_step
        frozen_decay = optim.l2_weight_decay(state.frozen_params, weight_decay)  # constant

        def loss_fn(params):
            variables = {"params": merge_params(params, state.frozen_params),
                         "batch_stats": state.batch_stats}
            feats, updates = model.apply(variables, images, train=True, mutable=["batch_stats"],
                                         rngs={"dropout": jax.random.fold_in(state.rng, state.step)})
            feats = jax.lax.with_sharding_constraint(feats, replicated)  # [B, P, D], global batch
            assoc, memory, aux = associate_with_metrics(state.memory, feats, track, camera,
                                                        margin=margin, eta=eta, cross_on=cross_on)
            decay = optim.l2_weight_decay(params, weight_decay) + frozen_decay
            return assoc + decay, (assoc, decay, memory, aux, updates.get("batch_stats", {}))

        (loss, (assoc, decay, memory, aux, batch_stats)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        grad_norm = optax.tree.norm(grads)
        grads = jax.tree.map(lambda g: jnp.clip(g, -clip, clip), grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state,
            batch_stats=_keep_frozen(batch_stats, state.batch_stats, frozen_scopes),
            ema_params=optim.ema_update(state.ema_params, state.params, state.step, ema_decay),
            memory=memory)
        metrics = {"loss": loss, "association_loss": assoc, "weight_decay": decay,
                   "lr": jnp.asarray(schedule(state.step), jnp.float32),
                   "cross_consistent": aux["cross_consistent"],
                   "negative_fallback": aux["negative_fallback"], "grad_norm": grad_norm}
        return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    def host_step(state, image, track, camera):
        return train(state, image, track, camera)

    def resident_step(state, index, dataset):
        index = index.astype(jnp.int32)
        return train(state, dataset["image"][index], dataset["track"][index], dataset["camera"][index])

    host_jit = jax.jit(host_step, in_shardings=(replicated, data, data, data),
                       out_shardings=(replicated, replicated), donate_argnums=(0,))
    resident_jit = jax.jit(resident_step, in_shardings=(replicated, data, replicated),
                           out_shardings=(replicated, replicated), donate_argnums=(0,))

    def check_batch(size, where):
        if size % num_devices:
            raise ValueError(f"train step: {where} has a global batch of {size}, which is not divisible "
                             f"by the {num_devices} devices of the mesh")

    def step_fn(state: TrainState, batch, dataset=None):
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
            return host_jit(state, image, batch["track"], batch["camera"])
        if "index" not in batch:
            raise ValueError(f"train step with a resident dataset needs batch['index']; got {sorted(batch)}")
        missing = [k for k in BATCH_KEYS if k not in dataset]
        if missing:
            raise ValueError(f"train step: resident dataset lacks {missing}; got {sorted(dataset)}")
        if dataset["image"].dtype != jnp.uint8:
            raise ValueError(f"train step: dataset['image'] must be uint8, got {dataset['image'].dtype}")
        check_batch(batch["index"].shape[0], "batch['index']")
        return resident_jit(state, batch["index"], {k: dataset[k] for k in BATCH_KEYS})

    def lower(state: TrainState, batch, dataset=None):
        """The lowered XLA computation of one step (for cost analysis and compilation)."""
        if dataset is None:
            return host_jit.lower(state, batch["image"], batch["track"], batch["camera"])
        return resident_jit.lower(state, batch["index"], {k: dataset[k] for k in BATCH_KEYS})

    step_fn.lower = lower
    return step_fn
