"""Strict merge of a ported-weights file into a model's ``backbone`` params (and, for the
ImageNet network in inference mode, its BatchNorm moving statistics)."""
from typing import Any, Dict, Optional

import jax
import numpy as np
from flax import traverse_util
from flax.core import FrozenDict, unfreeze

from upm_jax.porting.weights_file import STATS_PREFIX, WeightsFileError, load_weights

# Where the ImageNet network runs in inference mode (what needs the moving statistics).
INFERENCE_USES = "config.eval.initial, config.train.anchor_init='features'"


class PretrainedMismatchError(ValueError):
    """The weights file does not fit the model (missing, unexpected or mis-shaped names)."""


def _as_leaf(value: np.ndarray, like: Any):
    """``value`` in the dtype of ``like``, on ``like``'s devices/sharding when it is a jax.Array."""
    value = np.asarray(value, dtype=like.dtype)
    if isinstance(like, jax.Array):
        return jax.device_put(value, like.sharding)
    return value


def load_pretrained(variables, path: str, backbone: Optional[str] = None, *,
                    moving_stats: bool = False):
    """Return ``variables`` with ``params['backbone']`` replaced by the weights in ``path``.

    The file must supply every backbone param (conv kernels, BN scale/bias) with the model's
    shape and nothing else; otherwise one error lists every missing, unexpected and mis-shaped
    name. ``backbone``: the model's backbone name, which the file's metadata must name too.
    Weights must be finite real floats (``WeightsFileError`` otherwise). Head params are
    left as they are. ``moving_stats``: also replace ``batch_stats['backbone']`` by the
    checkpoint's BatchNorm moving statistics (the ImageNet network in inference mode; a
    training run starts from 0/1 and leaves them out), with the same strict merge; a file
    ported without them is a WeightsFileError saying to port it again.
    """
    was_frozen = isinstance(variables, FrozenDict)
    variables = unfreeze(variables) if was_frozen else dict(variables)
    if "params" not in variables or "backbone" not in variables["params"]:
        raise PretrainedMismatchError(
            "load_pretrained needs model variables with a params['backbone'] subtree; got "
            f"collections {sorted(variables)}")
    loaded, stats, meta = load_weights(path)
    if backbone is not None and meta["backbone"] != backbone:
        raise PretrainedMismatchError(
            f"pretrained weights {path} are for backbone {meta['backbone']!r} (from "
            f"{meta.get('source', '?')}) but the model's backbone is {backbone!r}; port the "
            f"{backbone} checkpoint (python -m upm_jax.porting) or set config.model.backbone")
    params = dict(variables["params"])
    params["backbone"] = _merge_strict(params["backbone"], loaded, "backbone/", path, meta,
                                       "weights")
    variables["params"] = params
    if moving_stats:
        if not stats:
            raise WeightsFileError(
                f"pretrained weights file {path} holds no BatchNorm moving statistics (it was "
                "ported by an earlier version), which the ImageNet network in inference mode "
                f"needs ({INFERENCE_USES}); port the checkpoint again with python -m "
                "upm_jax.porting")
        batch_stats = dict(variables.get("batch_stats", {}))
        if "backbone" not in batch_stats:
            raise PretrainedMismatchError("the model has no batch_stats['backbone'] subtree for "
                                          f"the moving statistics of {path}")
        batch_stats["backbone"] = _merge_strict(
            batch_stats["backbone"], {STATS_PREFIX + k: v for k, v in stats.items()},
            STATS_PREFIX + "backbone/", path, meta, "moving statistics")
        variables["batch_stats"] = batch_stats
    return FrozenDict(variables) if was_frozen else variables


def _merge_strict(subtree, loaded, prefix, path, meta, what):
    """`subtree` (the model's) with every leaf replaced by `loaded[prefix + path]`; one
    PretrainedMismatchError lists every missing, unexpected and mis-shaped name."""
    model_flat: Dict[str, Any] = {
        prefix + "/".join(k): v for k, v in traverse_util.flatten_dict(unfreeze(subtree)).items()}
    missing = sorted(set(model_flat) - set(loaded))
    unexpected = sorted(set(loaded) - set(model_flat))
    misshaped = sorted(k for k in set(model_flat) & set(loaded)
                       if tuple(loaded[k].shape) != tuple(model_flat[k].shape))
    if missing or unexpected or misshaped:
        lines = [f"pretrained {what} {path} (backbone {meta.get('backbone')!r}, from "
                 f"{meta.get('source', '?')}) do not fit the model: {len(missing)} missing, "
                 f"{len(unexpected)} unexpected, {len(misshaped)} mis-shaped"]
        lines += [f"  missing:     {k} {tuple(model_flat[k].shape)}" for k in missing]
        lines += [f"  unexpected:  {k} {tuple(loaded[k].shape)}" for k in unexpected]
        lines += [f"  mis-shaped:  {k} file {tuple(loaded[k].shape)} model "
                  f"{tuple(model_flat[k].shape)}" for k in misshaped]
        raise PretrainedMismatchError("\n".join(lines))
    return traverse_util.unflatten_dict(
        {tuple(k[len(prefix):].split("/")): _as_leaf(loaded[k], v) for k, v in model_flat.items()})


__all__ = ["load_pretrained", "PretrainedMismatchError", "WeightsFileError"]
