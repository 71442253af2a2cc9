"""The TrainState and the one place a model's variables and training state are created
on a mesh (shapes first, then replicated out_shardings).

Frozen parameters (the originals' never-trained GAM relation layers) live in a second
tree, `frozen_params`, so that the optimizer and the EMA see only what is trained.
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp
from flax import traverse_util

from upm_jax import parallel
from upm_jax.models import load_pretrained
from upm_jax.training.association import AnchorMemory


@flax.struct.dataclass
class TrainState:
    """Everything one training run carries from step to step (a pytree orbax can save).

    params: trained params; frozen_params: params under the frozen scopes (never updated);
    batch_stats: BN moving statistics (those under frozen scopes are never updated);
    ema_params: EMA of ``params`` (for extraction, with frozen_params and batch_stats);
    memory: the anchor memory.
    """

    step: jax.Array  # int32 []
    params: Any
    frozen_params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any
    memory: AnchorMemory


def under_scopes(key: Tuple[str, ...], scopes) -> bool:
    """Whether the flattened param path `key` lies under any of the path prefixes `scopes`."""
    return any(tuple(key[:len(s)]) == tuple(s) for s in scopes)


def split_frozen(tree, frozen_scopes: Sequence[Sequence[str]]):
    """(trained, frozen): the leaves of a nested dict outside / under any frozen path prefix."""
    flat = traverse_util.flatten_dict(dict(tree))
    trained = {k: v for k, v in flat.items() if not under_scopes(k, frozen_scopes)}
    frozen = {k: v for k, v in flat.items() if under_scopes(k, frozen_scopes)}
    return traverse_util.unflatten_dict(trained), traverse_util.unflatten_dict(frozen)


def merge_params(trained, frozen):
    """Inverse of ``split_frozen``."""
    flat = traverse_util.flatten_dict(dict(trained))
    flat.update(traverse_util.flatten_dict(dict(frozen)))
    return traverse_util.unflatten_dict(flat)


def init_variables(model, rng, *, image_shape, mesh, pretrained=None, inference=False):
    """The model's initial variables, replicated on ``mesh`` (the one place a model is
    initialised: training states, the untrained network's features, shape queries).

    ``pretrained``: a ported weights file merged strictly into the backbone
    (``upm_jax.models.load_pretrained``); the merged tree is placed replicated again, so
    later jits see one device set whatever the device count. ``inference``: the network
    will run in inference mode, so the backbone's BatchNorm takes the file's moving
    statistics too (training starts from 0/1 instead, as the originals did).
    """
    height, width = image_shape
    replicated = parallel.replicated(mesh)

    def init(key):
        return model.init(key, jnp.zeros((1, height, width, 3), jnp.float32), train=False)

    variables = jax.jit(init, out_shardings=replicated)(rng)
    if pretrained:
        variables = jax.device_put(
            load_pretrained(variables, pretrained, backbone=model.backbone_name,
                            moving_stats=inference), replicated)
    return variables


def abstract_variables(model, *, image_shape, mesh):
    """Shapes, dtypes and (replicated) shardings of ``init_variables``, computing nothing."""
    height, width = image_shape
    replicated = parallel.replicated(mesh)
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, height, width, 3), jnp.float32), train=False))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        shapes)


def _state_builder(tx, frozen_scopes):
    """(variables, memory) -> the initial TrainState (traced by create_train_state and, for
    shapes only, by abstract_train_state)."""

    def build(variables, memory):
        params, frozen = split_frozen(variables["params"], frozen_scopes)
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, frozen_params=frozen,
            batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
            # a real copy: the step donates the state, and one buffer cannot be donated twice
            ema_params=jax.tree.map(lambda p: p + jnp.zeros_like(p), params),
            memory=memory)

    return build


def create_train_state(model, rng, *, image_shape, tx, memory: AnchorMemory, mesh,
                       pretrained=None, frozen_scopes=None) -> TrainState:
    """Initial TrainState, replicated on ``mesh``.

    The variables come from ``init_variables`` (with the ``pretrained`` backbone when
    given); the state is built from them by one jit with replicated out_shardings.
    ``frozen_scopes`` defaults to ``model.frozen_scopes``. The EMA starts at the initial
    params.
    """
    frozen_scopes = tuple(model.frozen_scopes if frozen_scopes is None else frozen_scopes)
    replicated = parallel.replicated(mesh)
    rng = jnp.asarray(rng)
    if rng.dtype != jnp.uint32 or rng.shape != (2,):
        raise ValueError(f"create_train_state: rng must be a raw key (jax.random.PRNGKey), uint32 [2]; "
                         f"got {rng.dtype} {rng.shape}")
    build = _state_builder(tx, frozen_scopes)
    variables = init_variables(model, rng, image_shape=image_shape, mesh=mesh,
                               pretrained=pretrained)
    abstract_state = jax.eval_shape(build, variables, memory)
    out_shardings = jax.tree.map(lambda _: replicated, abstract_state)
    return jax.jit(build, out_shardings=out_shardings)(variables, memory)


def abstract_train_state(model, *, image_shape, tx, memory, mesh, frozen_scopes=None) -> TrainState:
    """Shapes, dtypes and (replicated) shardings of ``create_train_state``'s result, computing
    and allocating nothing (the state of an ahead-of-time compile for another platform's
    mesh). ``memory``: an AnchorMemory of arrays or of jax.ShapeDtypeStructs."""
    frozen_scopes = tuple(model.frozen_scopes if frozen_scopes is None else frozen_scopes)
    replicated = parallel.replicated(mesh)
    variables = abstract_variables(model, image_shape=image_shape, mesh=mesh)
    shapes = jax.eval_shape(_state_builder(tx, frozen_scopes), variables, memory)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        shapes)
