"""ResNet-50 v1 as TF-slim builds it (``nets/resnet_v1.py``, ``resnet_v1_50``), without logits.

Layout details that differ from torchvision/Keras and matter for ported weights:
- each block's stride sits in the 3x3 conv (conv2) of its LAST unit (blocks 1-3), and that
  unit's shortcut is a 1x1 subsample (x[::2, ::2]); only unit 1 of a block has a projection;
- strided convs use slim ``conv2d_same``: explicit symmetric padding, then VALID;
- stem: 7x7/2 conv2d_same + BN + ReLU ('conv1'), then 3x3/2 max pool with SAME padding ('pool1');
- BN decay 0.997, eps 1e-5; variance-scaling (He, fan-in, truncated normal) initialisation.
"""
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from upm_jax.models.layers import ConvBN

BN_DECAY = 0.997
BN_EPSILON = 1e-5

# (name, bottleneck depth, number of units, stride of the last unit)
BLOCKS: Tuple[Tuple[str, int, int, int], ...] = (
    ("block1", 64, 3, 2),
    ("block2", 128, 4, 2),
    ("block3", 256, 6, 2),
    ("block4", 512, 3, 1),
)


def kernel_init():
    """slim variance_scaling_initializer(): He, fan-in, truncated normal."""
    return nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


class Bottleneck(nn.Module):
    """slim ``bottleneck`` (v1): 1x1 -> 3x3 (strided, conv2d_same) -> 1x1, post-activation."""

    depth: int
    depth_bottleneck: int
    stride: int
    dtype: Any = jnp.float32
    bn_decay: float = BN_DECAY
    conv_impl: str = "auto"   # layers.CONV_IMPLS

    @nn.compact
    def __call__(self, x, train: bool):
        common = dict(kernel_init=kernel_init(), bn_decay=self.bn_decay, bn_epsilon=BN_EPSILON,
                      dtype=self.dtype, conv_impl=self.conv_impl)
        if x.shape[-1] == self.depth:
            # slim subsample (1x1 max pool): x[:, ::stride, ::stride], as a lax slice (no
            # gather under a symbolic batch size: see models.heads)
            shortcut = lax.slice_in_dim(lax.slice_in_dim(x, 0, None, self.stride, axis=1),
                                        0, None, self.stride, axis=2)
        else:
            shortcut = ConvBN(self.depth, 1, stride=self.stride, name="shortcut",
                              **common)(x, train)
        r = ConvBN(self.depth_bottleneck, 1, activation=nn.relu, name="conv1", **common)(x, train)
        r = ConvBN(self.depth_bottleneck, 3, stride=self.stride, padding="SYMMETRIC",
                   activation=nn.relu, name="conv2", **common)(r, train)
        r = ConvBN(self.depth, 1, name="conv3", **common)(r, train)
        return nn.relu(shortcut.astype(self.dtype) + r)


class Block(nn.Module):
    """One slim resnet block: ``units`` bottlenecks named unit_1.., the stride in the last one."""

    base_depth: int
    units: int
    stride: int
    dtype: Any = jnp.float32
    bn_decay: float = BN_DECAY
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool):
        outputs = []
        for u in range(1, self.units + 1):
            unit_stride = self.stride if u == self.units else 1
            x = Bottleneck(4 * self.base_depth, self.base_depth, unit_stride, dtype=self.dtype,
                           bn_decay=self.bn_decay, conv_impl=self.conv_impl,
                           name=f"unit_{u}")(x, train)
            outputs.append(x)
        return x, outputs


class ResNetV1_50(nn.Module):
    """Backbone returning block4 [B, h, w, 2048] (output stride 32) and endpoints.

    Endpoints: 'conv1', 'pool1', 'blockN/unit_M' (every unit) and 'blockN' (= its last unit).
    """

    dtype: Any = jnp.float32
    bn_decay: float = BN_DECAY
    conv_impl: str = "auto"   # layers.CONV_IMPLS

    @nn.compact
    def __call__(self, x, train: bool) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
        endpoints = {}
        x = ConvBN(64, 7, stride=2, padding="SYMMETRIC", activation=nn.relu,
                   kernel_init=kernel_init(), bn_decay=self.bn_decay, bn_epsilon=BN_EPSILON,
                   dtype=self.dtype, conv_impl=self.conv_impl, name="conv1")(x, train)
        endpoints["conv1"] = x
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        endpoints["pool1"] = x
        for block, base, units, stride in BLOCKS:
            x, outputs = Block(base, units, stride, dtype=self.dtype, bn_decay=self.bn_decay,
                               conv_impl=self.conv_impl, name=block)(x, train)
            for u, out in enumerate(outputs, start=1):
                endpoints[f"{block}/unit_{u}"] = out
            endpoints[block] = x
        return x, endpoints
