"""TF-slim checkpoint names -> Flax backbone paths: an explicit rule table, and the port itself.

The params restored are what the originals restored from ImageNet: conv weights and
BatchNorm gamma/beta. The BatchNorm moving statistics are kept as a separate group of the
weights file (``batch_stats/...``): training starts from 0/1 and re-estimates them, as the
originals did, but the ImageNet network in inference mode (the untrained network's
features, anchors initialised from features) needs them. Everything else in the released
checkpoints is deliberately skipped: classifier heads, optimiser slots and EMA shadows, the
global step and ResNet's ``mean_rgb``. A name no rule covers is an error. NumPy/stdlib only.
"""
import re
from typing import Dict, List, NamedTuple, Optional

import numpy as np

from upm_jax.porting.checkpoint import CheckpointReader
from upm_jax.porting.weights_file import STATS_PREFIX, save_weights

BACKBONES = ("mobilenet_v1", "resnet_v1_50")
SCOPES = {"mobilenet_v1": "MobilenetV1", "resnet_v1_50": "resnet_v1_50"}


class Rule(NamedTuple):
    """``pattern`` (re.fullmatch) -> ``target`` (re template of the Flax path), or skip (None)."""

    pattern: str
    target: Optional[str]
    reason: str = ""


class PortError(ValueError):
    """The checkpoint cannot be ported (unknown backbone or names no rule covers)."""


_COMMON_SKIPS = [
    Rule(r".+/(ExponentialMovingAverage|RMSProp|RMSProp_1)", None, "optimiser slot / EMA shadow"),
    Rule(r"global_step", None, "training step counter"),
]

RULES: Dict[str, List[Rule]] = {
    "mobilenet_v1": _COMMON_SKIPS + [
        Rule(r"MobilenetV1/(Conv2d_0|Conv2d_\d+_pointwise)/weights", r"backbone/\1/kernel"),
        Rule(r"MobilenetV1/(Conv2d_\d+_depthwise)/depthwise_weights",
             r"backbone/\1/depthwise_kernel"),
        Rule(r"MobilenetV1/(Conv2d_0|Conv2d_\d+_(?:depthwise|pointwise))/BatchNorm/gamma",
             r"backbone/\1/BatchNorm/scale"),
        Rule(r"MobilenetV1/(Conv2d_0|Conv2d_\d+_(?:depthwise|pointwise))/BatchNorm/beta",
             r"backbone/\1/BatchNorm/bias"),
        Rule(r"MobilenetV1/(Conv2d_0|Conv2d_\d+_(?:depthwise|pointwise))/BatchNorm/moving_mean",
             r"batch_stats/backbone/\1/BatchNorm/mean"),
        Rule(r"MobilenetV1/(Conv2d_0|Conv2d_\d+_(?:depthwise|pointwise))/BatchNorm/"
             r"moving_variance", r"batch_stats/backbone/\1/BatchNorm/var"),
        Rule(r"MobilenetV1/Logits/.+", None, "ImageNet classifier"),
    ],
    "resnet_v1_50": _COMMON_SKIPS + [
        Rule(r"resnet_v1_50/conv1/weights", r"backbone/conv1/kernel"),
        Rule(r"resnet_v1_50/(block\d)/(unit_\d+)/bottleneck_v1/(conv[123]|shortcut)/weights",
             r"backbone/\1/\2/\3/kernel"),
        Rule(r"resnet_v1_50/conv1/BatchNorm/gamma", r"backbone/conv1/BatchNorm/scale"),
        Rule(r"resnet_v1_50/conv1/BatchNorm/beta", r"backbone/conv1/BatchNorm/bias"),
        Rule(r"resnet_v1_50/(block\d)/(unit_\d+)/bottleneck_v1/(conv[123]|shortcut)"
             r"/BatchNorm/gamma", r"backbone/\1/\2/\3/BatchNorm/scale"),
        Rule(r"resnet_v1_50/(block\d)/(unit_\d+)/bottleneck_v1/(conv[123]|shortcut)"
             r"/BatchNorm/beta", r"backbone/\1/\2/\3/BatchNorm/bias"),
        Rule(r"resnet_v1_50/conv1/BatchNorm/moving_mean", r"batch_stats/backbone/conv1/BatchNorm/mean"),
        Rule(r"resnet_v1_50/conv1/BatchNorm/moving_variance",
             r"batch_stats/backbone/conv1/BatchNorm/var"),
        Rule(r"resnet_v1_50/(block\d)/(unit_\d+)/bottleneck_v1/(conv[123]|shortcut)"
             r"/BatchNorm/moving_mean", r"batch_stats/backbone/\1/\2/\3/BatchNorm/mean"),
        Rule(r"resnet_v1_50/(block\d)/(unit_\d+)/bottleneck_v1/(conv[123]|shortcut)"
             r"/BatchNorm/moving_variance", r"batch_stats/backbone/\1/\2/\3/BatchNorm/var"),
        Rule(r"resnet_v1_50/logits/.+", None, "ImageNet classifier"),
        Rule(r"resnet_v1_50/mean_rgb", None, "input mean (inputs are scaled to [-1, 1])"),
    ],
}


class Plan(NamedTuple):
    """How every checkpoint name is handled: restored (-> Flax path: a param, or under
    STATS_PREFIX a moving statistic), skipped (-> reason)."""

    backbone: str
    restore: Dict[str, str]
    skip: Dict[str, str]


def detect_backbone(names) -> str:
    """'mobilenet_v1' or 'resnet_v1_50' from the checkpoint's variable scopes."""
    found = sorted(b for b, scope in SCOPES.items()
                   if any(n.startswith(scope + "/") for n in names))
    if len(found) != 1:
        raise PortError(f"cannot tell the backbone from the checkpoint names: found scopes "
                        f"{[SCOPES[b] for b in found]}, expected exactly one of "
                        f"{sorted(SCOPES.values())}; pass --backbone")
    return found[0]


def plan(names, backbone: str = "auto") -> Plan:
    """Apply the rule table to ``names``; every name must be covered by exactly one outcome."""
    names = sorted(names)
    if backbone == "auto":
        backbone = detect_backbone(names)
    if backbone not in RULES:
        raise PortError(f"unknown backbone {backbone!r}; expected 'auto' or one of {BACKBONES}")
    restore, skip, unmatched = {}, {}, []
    for name in names:
        for rule in RULES[backbone]:
            m = re.fullmatch(rule.pattern, name)
            if m is None:
                continue
            if rule.target is None:
                skip[name] = rule.reason
            else:
                restore[name] = m.expand(rule.target)
            break
        else:
            unmatched.append(name)
    if unmatched:
        found = [b for b, scope in SCOPES.items() if any(n.startswith(scope + "/") for n in names)]
        hint = (f" (the names look like a {found[0]} checkpoint)"
                if len(found) == 1 and found[0] != backbone else "")
        raise PortError(f"{len(unmatched)} checkpoint name(s) are not covered by the "
                        f"{backbone} rule table{hint}:\n" + "\n".join("  " + n for n in unmatched))
    targets: Dict[str, str] = {}
    for name, target in restore.items():
        if target in targets:
            raise PortError(f"{name!r} and {targets[target]!r} both map to {target!r}")
        targets[target] = name
    return Plan(backbone, restore, skip)


def convert(reader: CheckpointReader, backbone: str = "auto"):
    """Read the restored tensors of ``reader`` -> (plan, params: Flax path -> float32 array,
    moving statistics: path from the batch_stats root -> float32 array)."""
    p = plan(reader.tensors, backbone)
    params, stats = {}, {}
    for name, target in sorted(p.restore.items()):
        value = reader.read(name)
        if value.dtype.kind != "f":
            raise PortError(f"{reader.prefix}: {name!r} has dtype {value.dtype}; expected float")
        if target.startswith(STATS_PREFIX):
            stats[target[len(STATS_PREFIX):]] = value.astype(np.float32)
        else:
            params[target] = value.astype(np.float32)
    return p, params, stats


def port_checkpoint(prefix: str, out: str, backbone: str = "auto") -> Plan:
    """Port the TF-slim checkpoint at ``prefix`` to the weights file ``out`` (.npz)."""
    reader = CheckpointReader(prefix)
    p, params, stats = convert(reader, backbone)
    save_weights(out, params, backbone=p.backbone, source=f"{prefix} ({reader.format})",
                 stats=stats)
    return p
