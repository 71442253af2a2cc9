"""MobileNet v1 as TF-slim builds it (``nets/mobilenet_v1.py``), up to ``Conv2d_13_pointwise``.

Every convolution uses TF SAME padding (slim's default ``use_explicit_padding=False``), so
strided convolutions on even sizes pad one row/column after, on odd sizes one on each side.
ReLU6 after every BatchNorm; no conv biases; truncated-normal(0.09) initialisation.
"""
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax.numpy as jnp

from upm_jax.models.layers import ConvBN

BN_DECAY = 0.9997
BN_EPSILON = 1e-3
INIT_STDDEV = 0.09
MIN_DEPTH = 8

# (stride, base depth) of the 13 depthwise-separable layers after the 3x3/2 stem (32 filters).
STEM_DEPTH = 32
SEPARABLE_LAYERS: Tuple[Tuple[int, int], ...] = (
    (1, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512),
    (1, 512), (1, 512), (1, 512), (1, 512), (1, 512), (2, 1024), (1, 1024),
)


def scaled_depth(depth: int, depth_multiplier: float) -> int:
    """slim's ``depth(d) = max(int(d * depth_multiplier), min_depth)``."""
    return max(int(depth * depth_multiplier), MIN_DEPTH)


def kernel_init():
    """slim mobilenet_v1_arg_scope: truncated normal, stddev 0.09 (before truncation at 2 sd)."""
    return nn.initializers.truncated_normal(stddev=INIT_STDDEV)


class MobileNetV1(nn.Module):
    """Backbone returning the final map [B, ceil(H/32), ceil(W/32), depth(1024)] and endpoints."""

    depth_multiplier: float = 1.0
    dtype: Any = jnp.float32
    bn_decay: float = BN_DECAY
    conv_impl: str = "auto"   # layers.CONV_IMPLS

    @nn.compact
    def __call__(self, x, train: bool) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
        common = dict(kernel_init=kernel_init(), bn_decay=self.bn_decay, bn_epsilon=BN_EPSILON,
                      dtype=self.dtype, activation=nn.relu6, padding="SAME",
                      conv_impl=self.conv_impl)
        endpoints = {}
        x = ConvBN(scaled_depth(STEM_DEPTH, self.depth_multiplier), 3, stride=2,
                   name="Conv2d_0", **common)(x, train)
        endpoints["Conv2d_0"] = x
        for i, (stride, depth) in enumerate(SEPARABLE_LAYERS, start=1):
            name = f"Conv2d_{i}_depthwise"
            x = ConvBN(x.shape[-1], 3, stride=stride, depthwise=True, name=name, **common)(x, train)
            endpoints[name] = x
            name = f"Conv2d_{i}_pointwise"
            x = ConvBN(scaled_depth(depth, self.depth_multiplier), 1, name=name, **common)(x, train)
            endpoints[name] = x
        return x, endpoints
