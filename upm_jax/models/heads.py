"""Feature heads on the backbone's final map [B, h, w, C] -> per-part features [B, P, D].

DAL pools the whole map (P = 1); LAM cuts the map into P horizontal stripes (uPMnet
local-aware module); GAM fuses every stripe with the whole-body feature (uPMnet
global-aware module). All pooling is done in float32; outputs are float32.

Static slices are taken with `lax` slicing, not NumPy-style indexing: with a symbolic batch
size (the exports) indexing lowers to a gather, which TFLite's converter rejects.
"""
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from upm_jax.models.layers import ConvBN

GAM_DIM = 256
SLIM_AVGPOOL_MAX_KERNEL = 7


def stripe_pool(x: jnp.ndarray, n_part: int) -> jnp.ndarray:
    """[B, h, w, C] -> [B, P, C]: P stripes of h // P rows, each averaged over its whole extent.

    Rows beyond P * (h // P) are dropped (the originals' stripe arithmetic).
    """
    b, h, w, c = x.shape
    rows = h // n_part
    if rows == 0:
        raise ValueError(
            f"cannot cut a feature map of height {h} into n_part={n_part} stripes: the map must "
            f"have at least n_part rows (use a larger image or a smaller n_part)")
    x = lax.slice_in_dim(x, 0, rows * n_part, axis=1)
    x = x.astype(jnp.float32).reshape(b, n_part, rows, w, c)
    return jnp.mean(x, axis=(2, 3))


def slim_avgpool(x: jnp.ndarray) -> jnp.ndarray:
    """slim MobileNet ``AvgPool_1a``: kernel (min(h,7), min(w,7)), stride 2, VALID -> [B, 1, C].

    At 224x112 inputs (7x4 map) this is a global mean; at 256x128 (8x4 map) it averages the
    first 7 rows. Inputs whose map is larger than 8x8 would give more than one window, which
    the originals never used; that is an error rather than a silent re-definition.
    """
    b, h, w, c = x.shape
    kh, kw = min(h, SLIM_AVGPOOL_MAX_KERNEL), min(w, SLIM_AVGPOOL_MAX_KERNEL)
    oh, ow = (h - kh) // 2 + 1, (w - kw) // 2 + 1
    if (oh, ow) != (1, 1):
        raise ValueError(
            f"the DAL MobileNet head (slim AvgPool_1a, kernel {kh}x{kw}, stride 2, VALID) gives a "
            f"{oh}x{ow} map on a {h}x{w} feature map; it needs a map of at most 8x8, i.e. images "
            f"of at most 256x256")
    window = lax.slice_in_dim(lax.slice_in_dim(x, 0, kh, axis=1), 0, kw, axis=2)
    return jnp.mean(window.astype(jnp.float32), axis=(1, 2))[:, None, :]


class DALHead(nn.Module):
    """DAL pooling: ``pooling='slim_avgpool'`` (MobileNet) or ``'mean'`` (ResNet) -> [B, 1, C]."""

    pooling: str = "mean"

    @nn.compact
    def __call__(self, x, train: bool):
        if self.pooling == "slim_avgpool":
            return slim_avgpool(x)
        if self.pooling == "mean":
            return jnp.mean(x.astype(jnp.float32), axis=(1, 2))[:, None, :]
        raise ValueError(f"DALHead pooling must be 'slim_avgpool' or 'mean', got {self.pooling!r}")


class LocalHead(nn.Module):
    """LAM: P stripe features of C dims -> [B, P, C]."""

    n_part: int = 8

    @nn.compact
    def __call__(self, x, train: bool):
        return stripe_pool(x, self.n_part)


class GlobalHead(nn.Module):
    """GAM: output_i = relu6(BN(conv_i([p'_i, g']))) + g', 256-d per part -> [B, P, 256].

    p'_i = conv(stripe_i mean), g' = conv(whole-map mean) are 1x1 convs with bias (no BN, no
    activation); conv_i is a 1x1 conv without bias followed by BN. Everything lives under the
    ``Logits`` scope. With ``train_relation=False`` (the original code's behaviour) the caller
    keeps ``Logits`` frozen (see ``ReidModel.frozen_scopes``) and the relation BN never writes
    its moving statistics: batch statistics in training, moving 0/1 at inference.
    """

    n_part: int = 8
    kernel_init: Callable = nn.initializers.lecun_normal()
    bn_decay: float = 0.997
    bn_epsilon: float = 1e-5
    train_relation: bool = False
    dtype: Any = jnp.float32
    conv_impl: str = "auto"   # layers.CONV_IMPLS

    @nn.compact
    def __call__(self, x, train: bool):
        parts = stripe_pool(x, self.n_part)  # [B, P, C]
        whole = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [B, C]
        return _Relation(self.n_part, self.kernel_init, self.bn_decay, self.bn_epsilon,
                         self.train_relation, self.dtype, self.conv_impl,
                         name="Logits")(parts, whole, train)


class _Relation(nn.Module):
    """The GAM layers (slim scope ``Logits`` in the original)."""

    n_part: int
    kernel_init: Callable
    bn_decay: float
    bn_epsilon: float
    train_relation: bool
    dtype: Any
    conv_impl: str

    @nn.compact
    def __call__(self, parts, whole, train: bool):
        def reduce(v, name):  # [B, C] -> [B, 1, 1, 256]
            conv = nn.Conv(GAM_DIM, (1, 1), use_bias=True, kernel_init=self.kernel_init,
                           bias_init=nn.initializers.zeros, dtype=self.dtype,
                           param_dtype=jnp.float32, name=name)
            return conv(v[:, None, None, :])

        g = reduce(whole, "global")  # [B, 1, 1, 256]
        outputs = []
        for i in range(self.n_part):
            p = reduce(lax.index_in_dim(parts, i, axis=1, keepdims=False),
                       f"part_{i}")  # [B, 1, 1, 256]
            r = ConvBN(GAM_DIM, 1, activation=nn.relu6, kernel_init=self.kernel_init,
                       bn_decay=self.bn_decay, bn_epsilon=self.bn_epsilon,
                       bn_track_stats=self.train_relation, dtype=self.dtype,
                       conv_impl=self.conv_impl,
                       name=f"relation_{i}")(jnp.concatenate([p, g], axis=-1), train)
            outputs.append(lax.squeeze((r + g).astype(jnp.float32), (1, 2)))  # [B, 256]
        return jnp.stack(outputs, axis=1)  # [B, P, 256]
