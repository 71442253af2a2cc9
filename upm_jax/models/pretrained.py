"""Strict merge of a ported-weights file into a model's ``backbone`` params."""
from typing import Any, Dict, Optional

import jax
import numpy as np
from flax import traverse_util
from flax.core import FrozenDict, unfreeze

from upm_jax.porting.weights_file import WeightsFileError, load_weights


class PretrainedMismatchError(ValueError):
    """The weights file does not fit the model (missing, unexpected or mis-shaped names)."""


def _as_leaf(value: np.ndarray, like: Any):
    """``value`` in the dtype of ``like``, on ``like``'s devices/sharding when it is a jax.Array."""
    value = np.asarray(value, dtype=like.dtype)
    if isinstance(like, jax.Array):
        return jax.device_put(value, like.sharding)
    return value


def load_pretrained(variables, path: str, backbone: Optional[str] = None):
    """Return ``variables`` with ``params['backbone']`` replaced by the weights in ``path``.

    The file must supply every backbone param (conv kernels, BN scale/bias) with the model's
    shape and nothing else; otherwise one error lists every missing, unexpected and mis-shaped
    name. ``backbone``: the model's backbone name, which the file's metadata must name too.
    Weights must be finite real floats (``WeightsFileError`` otherwise). BN moving
    statistics (``batch_stats``) and head params are left as they are.
    """
    was_frozen = isinstance(variables, FrozenDict)
    variables = unfreeze(variables) if was_frozen else dict(variables)
    if "params" not in variables or "backbone" not in variables["params"]:
        raise PretrainedMismatchError(
            "load_pretrained needs model variables with a params['backbone'] subtree; got "
            f"collections {sorted(variables)}")
    loaded, meta = load_weights(path)
    if backbone is not None and meta["backbone"] != backbone:
        raise PretrainedMismatchError(
            f"pretrained weights {path} are for backbone {meta['backbone']!r} (from "
            f"{meta.get('source', '?')}) but the model's backbone is {backbone!r}; port the "
            f"{backbone} checkpoint (python -m upm_jax.porting) or set config.model.backbone")
    params = dict(variables["params"])
    model_flat: Dict[str, Any] = {
        "backbone/" + "/".join(k): v
        for k, v in traverse_util.flatten_dict(unfreeze(params["backbone"])).items()}
    missing = sorted(set(model_flat) - set(loaded))
    unexpected = sorted(set(loaded) - set(model_flat))
    misshaped = sorted(k for k in set(model_flat) & set(loaded)
                       if tuple(loaded[k].shape) != tuple(model_flat[k].shape))
    if missing or unexpected or misshaped:
        lines = [f"pretrained weights {path} (backbone {meta.get('backbone')!r}, from "
                 f"{meta.get('source', '?')}) do not fit the model: {len(missing)} missing, "
                 f"{len(unexpected)} unexpected, {len(misshaped)} mis-shaped"]
        lines += [f"  missing:     {k} {tuple(model_flat[k].shape)}" for k in missing]
        lines += [f"  unexpected:  {k} {tuple(loaded[k].shape)}" for k in unexpected]
        lines += [f"  mis-shaped:  {k} file {tuple(loaded[k].shape)} model "
                  f"{tuple(model_flat[k].shape)}" for k in misshaped]
        raise PretrainedMismatchError("\n".join(lines))
    new_backbone = traverse_util.unflatten_dict(
        {tuple(k.split("/")[1:]): _as_leaf(loaded[k], v) for k, v in model_flat.items()})
    params["backbone"] = new_backbone
    variables["params"] = params
    return FrozenDict(variables) if was_frozen else variables


__all__ = ["load_pretrained", "PretrainedMismatchError", "WeightsFileError"]
