"""The top-level re-id model (backbone + head) and ``build_model``, the name -> model registry."""
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from upm_jax.models import mobilenet_v1, resnet_v1
from upm_jax.models.heads import GAM_DIM, DALHead, GlobalHead, LocalHead
from upm_jax.models.layers import CONV_IMPLS

HEADS = ("dal", "local", "global")
COMPUTE_DTYPES = (jnp.float32, jnp.bfloat16)
# Precision of the model's matrix products and convolutions (jax.default_matmul_precision):
# 'highest' computes float32 as float32 everywhere; 'default' lets TPUs use one bfloat16
# pass and GPUs TensorFloat-32; 'high' three bfloat16 passes on TPUs (TensorFloat-32 on
# GPUs). XLA:CPU computes float32 in every case.
MATMUL_PRECISIONS = ("default", "high", "highest")


class BackboneSpec(NamedTuple):
    """What the model needs to know about a backbone (its init and BN settings feed the GAM)."""

    make: Callable[..., nn.Module]  # (depth_multiplier, dtype, bn_decay, conv_impl, name) -> module
    channels: Callable[[float], int]  # depth_multiplier -> channels of the final map
    kernel_init: Callable[[], Callable]
    bn_decay: float
    bn_epsilon: float
    dal_pooling: str
    has_depth_multiplier: bool


BACKBONES: Dict[str, BackboneSpec] = {
    "mobilenet_v1": BackboneSpec(
        make=lambda dm, dtype, bn_decay, conv_impl, name: mobilenet_v1.MobileNetV1(
            dm, dtype=dtype, bn_decay=bn_decay, conv_impl=conv_impl, name=name),
        channels=lambda dm: mobilenet_v1.scaled_depth(1024, dm),
        kernel_init=mobilenet_v1.kernel_init,
        bn_decay=mobilenet_v1.BN_DECAY,
        bn_epsilon=mobilenet_v1.BN_EPSILON,
        dal_pooling="slim_avgpool",
        has_depth_multiplier=True,
    ),
    "resnet_v1_50": BackboneSpec(
        make=lambda dm, dtype, bn_decay, conv_impl, name: resnet_v1.ResNetV1_50(
            dtype=dtype, bn_decay=bn_decay, conv_impl=conv_impl, name=name),
        channels=lambda dm: 2048,
        kernel_init=resnet_v1.kernel_init,
        bn_decay=resnet_v1.BN_DECAY,
        bn_epsilon=resnet_v1.BN_EPSILON,
        dal_pooling="mean",
        has_depth_multiplier=False,
    ),
}


class ReidModel(nn.Module):
    """Backbone (submodule ``backbone``) + feature head (submodule ``head``).

    ``__call__(images [B, H, W, 3] in [-1, 1], train, return_endpoints)`` returns float32
    features [B, P, D], and with ``return_endpoints=True`` also the backbone's endpoint maps
    (dict name -> [B, h, w, C], float32). Build it with ``build_model``.
    """

    backbone_name: str
    head_name: str
    n_part: int = 8
    depth_multiplier: float = 1.0
    dtype: Any = jnp.float32
    train_relation: bool = False
    bn_decay: Optional[float] = None  # None: the backbone's slim value (0.9997 / 0.997)
    conv_impl: str = "auto"   # layers.CONV_IMPLS: per platform, or XLA's convolution everywhere
    matmul_precision: str = "highest"   # MATMUL_PRECISIONS

    @property
    def frozen_scopes(self) -> Tuple[Tuple[str, ...], ...]:
        """Path prefixes whose params and batch_stats training must never update."""
        if self.head_name == "global" and not self.train_relation:
            return (("head", "Logits"),)
        return ()

    @property
    def num_parts(self) -> int:
        """P of the [B, P, D] features."""
        return 1 if self.head_name == "dal" else self.n_part

    @property
    def feature_dim(self) -> int:
        """D of the [B, P, D] features."""
        if self.head_name == "global":
            return GAM_DIM
        return BACKBONES[self.backbone_name].channels(self.depth_multiplier)

    @nn.compact
    def __call__(self, images, train: bool = False, return_endpoints: bool = False):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3] (NHWC, RGB), got shape {images.shape}")
        # every product and convolution of the model is traced at this precision
        with jax.default_matmul_precision(self.matmul_precision):
            spec = BACKBONES[self.backbone_name]
            bn_decay = spec.bn_decay if self.bn_decay is None else self.bn_decay
            fmap, endpoints = spec.make(self.depth_multiplier, self.dtype, bn_decay,
                                        self.conv_impl, "backbone")(images, train)
            if self.head_name == "dal":
                head = DALHead(spec.dal_pooling, name="head")
            elif self.head_name == "local":
                head = LocalHead(self.n_part, name="head")
            else:
                head = GlobalHead(self.n_part, spec.kernel_init(), bn_decay, spec.bn_epsilon,
                                  self.train_relation, self.dtype, self.conv_impl, name="head")
            feats = head(fmap, train).astype(jnp.float32)  # [B, P, D]
            if return_endpoints:
                return feats, {k: v.astype(jnp.float32) for k, v in endpoints.items()}
            return feats


def build_model(backbone: str = "mobilenet_v1", head: str = "dal", *, n_part: int = 8,
                depth_multiplier: float = 1.0, dtype=jnp.float32,
                train_relation: bool = False, bn_decay: Optional[float] = None,
                conv_impl: str = "auto", matmul_precision: str = "highest") -> ReidModel:
    """Validate the settings and build the model (see ``ReidModel``).

    backbone: 'mobilenet_v1' | 'resnet_v1_50'; head: 'dal' (P = 1) | 'local' (LAM) | 'global'
    (GAM); n_part: stripes for local/global; depth_multiplier: MobileNet width (ResNet: 1.0);
    dtype: compute dtype (params stay float32); train_relation: train the GAM relation layers
    instead of keeping them frozen at their initialisation (the originals' behaviour);
    bn_decay: BatchNorm moving-average decay, None for the backbone's slim value (short runs
    such as the CPU demo need a faster one for the moving statistics to converge);
    conv_impl: 'auto' (the convolution formulation chosen per platform when compiled) or
    'xla' (XLA's convolution everywhere; see ``upm_jax.models.layers``);
    matmul_precision: one of MATMUL_PRECISIONS (above), for float32 products on GPU and TPU.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {sorted(BACKBONES)}")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {list(HEADS)}")
    if isinstance(n_part, bool) or not isinstance(n_part, (int, np.integer)) or n_part < 1:
        raise ValueError(f"n_part must be a positive integer, got {n_part!r}")
    if not float(depth_multiplier) > 0:
        raise ValueError(f"depth_multiplier must be > 0, got {depth_multiplier!r}")
    if not BACKBONES[backbone].has_depth_multiplier and float(depth_multiplier) != 1.0:
        raise ValueError(f"backbone {backbone!r} has no depth multiplier; got "
                         f"depth_multiplier={depth_multiplier!r} (expected 1.0)")
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in COMPUTE_DTYPES]:
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    if bn_decay is not None and not 0.0 <= float(bn_decay) < 1.0:
        raise ValueError(f"bn_decay must lie in [0, 1), got {bn_decay!r}")
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
    if matmul_precision not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul_precision must be one of {MATMUL_PRECISIONS}, got "
                         f"{matmul_precision!r}")
    return ReidModel(backbone, head, int(n_part), float(depth_multiplier), jnp.dtype(dtype),
                     bool(train_relation), None if bn_decay is None else float(bn_decay),
                     conv_impl, matmul_precision)
