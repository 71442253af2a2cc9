"""Building blocks shared by the backbones: TF-semantics batch norm and conv + BN + activation.

Parameters are always float32; ``dtype`` is the compute dtype of the activations.

How a convolution is computed depends on the platform it is compiled for, and only on
that: with ``conv_impl="auto"`` the depthwise and 1x1 convolutions are staged out with
``lax.platform_dependent``, so XLA:CPU gets shifted multiply-adds and matrix products
(several times faster there) and every other platform XLA's convolution, decided when the
computation is lowered for its devices (also ahead of time, for a TPU or GPU target on a
CPU host). ``conv_impl="xla"`` uses XLA's convolution everywhere (the tests run that
formulation on CPU; exports whose consumers need standard convolution ops use it).
"""
import functools
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
# "auto": the formulation chosen per platform at lowering; "xla": XLA's convolution everywhere.
CONV_IMPLS = ("auto", "xla")


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


def _tap_pads(shape_hw, k, stride, padding):
    """((lo, hi), (lo, hi)) spatial pads of a k x k convolution, from a mode or explicit."""
    if isinstance(padding, str):
        return tuple(tuple(p) for p in lax.padtype_to_pads(shape_hw, (k, k), (stride, stride),
                                                             padding))
    return tuple(tuple(p) for p in padding)


def _taps(xp, w, stride, out_hw):
    """sum over (i, j) of the strided window of padded xp at offset (i, j) times w[i, j].

    xp [B, Hp, Wp, C], w [k, k, C] -> [B, out_h, out_w, C]; one fused loop on XLA:CPU.
    """
    k = w.shape[0]
    out_h, out_w = out_hw
    y = None
    for i in range(k):
        for j in range(k):
            tap = xp[:, i:i + (out_h - 1) * stride + 1:stride, j:j + (out_w - 1) * stride + 1:stride]
            y = tap * w[i, j] if y is None else y + tap * w[i, j]
    return y


def _depthwise_by_taps(x, w, stride, padding):
    """Depthwise convolution as k*k shifted multiply-adds: x [B, H, W, C], w [k, k, 1, C].

    The same result as the grouped convolution (up to float summation order), and several
    times faster on XLA:CPU, whose grouped convolution is slow.
    """
    pads = _tap_pads(x.shape[1:3], w.shape[0], stride, padding)
    return _padded_taps(x, w[:, :, 0], stride, pads)


def _sum_leading(p):
    """p [N, ...] summed over N by pairwise adds of halves: [...].

    Written as adds of slices, so that XLA:CPU fuses the whole sum, and the shifted window
    feeding it, into one loop over p; a reduce op instead would first copy each shifted
    window into a buffer of its own for the library reduction.
    """
    while p.shape[0] > 1:
        half = p.shape[0] // 2
        summed = p[:half] + p[half:2 * half]
        if p.shape[0] % 2:
            summed = jnp.concatenate([summed[:1] + p[2 * half:], summed[1:]])
        p = summed
    return p[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _padded_taps(x, w, stride, pads):
    """x [B, H, W, C] zero-padded by pads ((top, bottom), (left, right)), then the taps of w [k, k, C].

    The hand-written backward keeps only the padded input, which the forward materialises
    anyway (autodiff of the taps kept all k*k shifted copies alive and summed k*k padded
    gradients): the input gradient is the same taps loop on the dilated, padded output
    gradient with the kernel flipped, the kernel gradient k*k multiply-reductions.
    """
    return _padded_taps_fwd(x, w, stride, pads)[0]


def _padded_taps_fwd(x, w, stride, pads):
    k = w.shape[0]
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    out_hw = tuple((xp.shape[a] - k) // stride + 1 for a in (1, 2))
    return _taps(xp, w, stride, out_hw), (xp, w)


def _padded_taps_bwd(stride, pads, residuals, g):
    xp, w = residuals
    k = w.shape[0]
    (top, bottom), (left, right) = pads
    out_h, out_w = g.shape[1:3]
    # Rows/columns of the padded input that no output window reaches (strided VALID tail).
    rest_h = xp.shape[1] - k - (out_h - 1) * stride
    rest_w = xp.shape[2] - k - (out_w - 1) * stride
    gp = lax.pad(g, jnp.zeros((), g.dtype),
                 ((0, 0, 0), (k - 1 - top, k - 1 - bottom + rest_h, stride - 1),
                  (k - 1 - left, k - 1 - right + rest_w, stride - 1), (0, 0, 0)))
    in_hw = (xp.shape[1] - top - bottom, xp.shape[2] - left - right)
    dx = _taps(gp, w[::-1, ::-1], 1, in_hw)  # [B, H, W, C]
    dw = jnp.stack([
        jnp.stack([jnp.sum(_sum_leading(xp[:, i:i + (out_h - 1) * stride + 1:stride,
                                           j:j + (out_w - 1) * stride + 1:stride] * g),
                           axis=(0, 1))
                   for j in range(k)])
        for i in range(k)])  # [k, k, C]
    return dx, dw.astype(w.dtype)


_padded_taps.defvjp(_padded_taps_fwd, _padded_taps_bwd)


def _pointwise_by_dot(x, w):
    """1x1 convolution as a matrix product over the channels: x [B, H, W, Cin], w [1, 1, Cin, Cout].

    On XLA:CPU the kernel gradient of a 1x1 convolution transposes the whole activation
    to [C, H, W, B] first; as a dot it is one product contracting B*H*W.
    """
    return lax.dot_general(x, w[0, 0], (((x.ndim - 1,), (0,)), ((), ())))


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
    conv_impl: str = "auto"

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

        def xla_conv(x, w):
            return lax.conv_general_dilated(
                x, w, window_strides=(self.stride, self.stride), padding=padding,
                dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)

        cpu_conv = None
        if self.depthwise:
            cpu_conv = functools.partial(_depthwise_by_taps, stride=self.stride, padding=padding)
        elif k == 1 and self.stride == 1:
            cpu_conv = _pointwise_by_dot
        x, w = x.astype(self.dtype), w.astype(self.dtype)
        if cpu_conv is None or self.conv_impl == "xla":
            y = xla_conv(x, w)
        else:
            y = lax.platform_dependent(x, w, cpu=cpu_conv, default=xla_conv)
        y = BatchNorm(self.bn_decay, self.bn_epsilon, dtype=self.dtype,
                      track_stats=self.bn_track_stats, name="BatchNorm")(y, train)
        if self.activation is not None:
            y = self.activation(y)
        return y
