"""Building blocks shared by the backbones: TF-semantics batch norm and conv + BN + activation.

Parameters are always float32; ``dtype`` is the compute dtype of the activations.
"""
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Initializer = Callable[..., Any]

# Padding modes of a convolution:
#   "SAME":      TensorFlow SAME (extra padding, if odd, goes after), what slim conv2d uses.
#   "SYMMETRIC": slim resnet_utils.conv2d_same for strided convs: pad (k-1)//2 before and
#                k-1-(k-1)//2 after explicitly, then VALID.
PADDINGS = ("SAME", "SYMMETRIC")


class BatchNorm(nn.Module):
    """Batch norm with the semantics of TF's fused batch norm as slim used it.

    Training normalises with the biased batch variance and moves the moving variance towards
    the unbiased one (n / (n - 1)), like ``tf.nn.fused_batch_norm``:
    moving = decay * moving + (1 - decay) * batch.
    ``track_stats=False`` normalises with batch statistics in training but never writes the
    moving statistics (the frozen GAM relation layers of the original code).
    """

    decay: float
    epsilon: float
    dtype: Any = jnp.float32
    track_stats: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        moving_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        moving_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        x32 = x.astype(jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x32, axis=axes)  # [C]
            var = jnp.mean(jnp.square(x32 - mean), axis=axes)  # [C], biased
            if self.track_stats and not self.is_initializing():
                n = x.size // c
                unbiased = var * (n / max(n - 1, 1))
                moving_mean.value = self.decay * moving_mean.value + (1.0 - self.decay) * mean
                moving_var.value = self.decay * moving_var.value + (1.0 - self.decay) * unbiased
        else:
            mean, var = moving_mean.value, moving_var.value
        y = (x32 - mean) * (scale * lax.rsqrt(var + self.epsilon)) + bias
        return y.astype(self.dtype)


def _explicit_padding(padding: str, kernel: int, stride: int):
    if padding == "SAME":
        return "SAME"
    if padding == "SYMMETRIC":
        if stride == 1:
            return "SAME"
        before = (kernel - 1) // 2
        after = kernel - 1 - before
        return ((before, after), (before, after))
    raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")


def _depthwise_by_taps(x, w, stride, padding):
    """Depthwise convolution as k*k shifted multiply-adds: x [B, H, W, C], w [k, k, 1, C].

    The same result as the grouped convolution (up to float summation order), and several
    times faster, forward and backward, on XLA:CPU, whose grouped convolution is slow.
    """
    k = w.shape[0]
    pads = (lax.padtype_to_pads(x.shape[1:3], (k, k), (stride, stride), padding)
            if isinstance(padding, str) else padding)
    x = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    out_h = (x.shape[1] - k) // stride + 1
    out_w = (x.shape[2] - k) // stride + 1
    y = None
    for i in range(k):
        for j in range(k):
            tap = x[:, i:i + (out_h - 1) * stride + 1:stride, j:j + (out_w - 1) * stride + 1:stride]
            y = tap * w[i, j, 0] if y is None else y + tap * w[i, j, 0]
    return y


class ConvBN(nn.Module):
    """Convolution without bias, then BatchNorm, then an optional activation (slim conv2d).

    ``depthwise=True`` is slim's separable_conv2d with num_outputs=None (depth multiplier 1):
    its kernel is stored as ``depthwise_kernel`` [k, k, C, 1] like slim's ``depthwise_weights``.
    Otherwise the kernel is ``kernel`` [k, k, C_in, C_out] like slim's ``weights``.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: str = "SAME"
    depthwise: bool = False
    activation: Optional[Callable] = None
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bn_decay: float = 0.997
    bn_epsilon: float = 1e-5
    bn_track_stats: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        k, cin = self.kernel_size, x.shape[-1]
        if self.depthwise:
            w = self.param("depthwise_kernel", self.kernel_init, (k, k, cin, 1), jnp.float32)
            w = w.reshape(k, k, 1, cin)  # HWIO with one input channel per group
            groups = cin
        else:
            w = self.param("kernel", self.kernel_init, (k, k, cin, self.features), jnp.float32)
            groups = 1
        padding = _explicit_padding(self.padding, k, self.stride)
        if self.depthwise and jax.default_backend() == "cpu":
            y = _depthwise_by_taps(x.astype(self.dtype), w.astype(self.dtype), self.stride,
                                   padding)
        else:
            y = lax.conv_general_dilated(
                x.astype(self.dtype),
                w.astype(self.dtype),
                window_strides=(self.stride, self.stride),
                padding=padding,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=groups,
            )
        y = BatchNorm(self.bn_decay, self.bn_epsilon, dtype=self.dtype,
                      track_stats=self.bn_track_stats, name="BatchNorm")(y, train)
        if self.activation is not None:
            y = self.activation(y)
        return y
