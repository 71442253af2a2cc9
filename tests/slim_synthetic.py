"""Test helper: synthetic TF-slim checkpoints with the real checkpoints' names, shapes and formats.

The golden listings in tests/data/ are the variable listings of the released ImageNet files
(MobileNet v1 2018_02_22: V2 bundle; ResNet-50 2016_08_28: V1 TensorSlice file). Values are
random but non-trivial: He-scaled conv weights, gamma in [0.5, 1.5], beta ~ N(0, 0.1), moving
means ~ N(0, 0.1) and moving variances in [0.5, 2], so every BatchNorm really transforms.
"""
import pathlib
import re
from typing import Dict, Tuple

import numpy as np

DATA = pathlib.Path(__file__).parent / "data"
LISTINGS = {"mobilenet_v1": DATA / "mobilenet_v1_1.0_224.ckpt.listing.txt",
            "resnet_v1_50": DATA / "resnet_v1_50.ckpt.listing.txt"}


def read_listing(backbone: str) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """name -> (shape, dtype name) from a golden listing line ``name [d0, d1] dtype``."""
    out = {}
    for line in LISTINGS[backbone].read_text().splitlines():
        m = re.fullmatch(r"(\S+) \[([\d, ]*)\] (\w+)", line.strip())
        assert m, f"bad listing line {line!r}"
        out[m[1]] = (tuple(int(s) for s in m[2].split(",") if s.strip()), m[3])
    return out


def synthetic_values(backbone: str, seed: int = 0) -> Dict[str, np.ndarray]:
    """Random values for every listed entry, scaled as described in the module docstring."""
    rng = np.random.default_rng(seed)
    values = {}
    for name, (shape, dtype) in read_listing(backbone).items():
        base = re.sub(r"/(ExponentialMovingAverage|RMSProp|RMSProp_1)$", "", name)
        if dtype == "int64":
            values[name] = np.asarray(12345, np.int64).reshape(shape)
        elif base.endswith("/gamma"):
            values[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif base.endswith("/moving_variance"):
            values[name] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        elif base.endswith(("/beta", "/moving_mean", "/biases", "mean_rgb")):
            values[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:  # conv weights [k, k, in, out] or depthwise [k, k, C, 1]: fan-in k*k*in or k*k
            fan_in = shape[0] * shape[1] * (1 if base.endswith("depthwise_weights") else shape[2])
            values[name] = (np.sqrt(2.0 / fan_in) * rng.standard_normal(shape)).astype(np.float32)
    return values


def write_v2(prefix: str, values: Dict[str, np.ndarray]) -> None:
    """A V2 tensor bundle (prefix.index + prefix.data-00000-of-00001), as TF's SaveV2 writes it."""
    import tensorflow as tf

    names = sorted(values)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(values[n]) for n in names])


def write_v1(path: str, values: Dict[str, np.ndarray]) -> None:
    """A V1 TensorSlice checkpoint (one file), as TF's legacy Save op writes it."""
    import tensorflow as tf

    names = sorted(values)
    tf.raw_ops.Save(filename=path, tensor_names=names, data=[tf.constant(values[n]) for n in names])


def moving_stats(values: Dict[str, np.ndarray], scope: str) -> Dict[str, np.ndarray]:
    """Flax batch_stats paths ('backbone/.../BatchNorm/mean|var') -> the checkpoint's moving stats.

    Written independently of the porter's rule table (plain string edits): the equivalence
    tests check the ported file's statistics against it.
    """
    out = {}
    for name, value in values.items():
        m = re.fullmatch(re.escape(scope) + r"/(.+)/BatchNorm/moving_(mean|variance)", name)
        if m:
            layer = m[1].replace("/bottleneck_v1", "")
            out[f"backbone/{layer}/BatchNorm/{'mean' if m[2] == 'mean' else 'var'}"] = value
    return out


def rel_err(a, b) -> float:
    """max|a - b| / max|b|: the error relative to the reference's largest magnitude."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def port_weights_cli(argv) -> int:
    """Run ``python -m upm_jax.porting`` in-process with ``argv``; returns its exit status."""
    from upm_jax.porting.__main__ import main  # noqa: PLC0415
    return main(argv)


def run_ported(backbone, weights_path, images, conv_impl="auto"):
    """Our DAL model with the ported file's weights and moving statistics, in inference mode
    (as the untrained network's features are extracted): (features, endpoints).
    `conv_impl`: the model's convolution formulation ('auto': on this CPU the taps and
    matrix products; 'xla': XLA's convolution, what GPUs and TPUs run)."""
    import jax

    from upm_jax.models import build_model, load_pretrained

    model = build_model(backbone, "dal", conv_impl=conv_impl)
    variables = model.init(jax.random.key(0), images[:1], train=False)
    variables = load_pretrained(variables, weights_path, backbone, moving_stats=True)
    fn = jax.jit(lambda v, x: model.apply(v, x, train=False, return_endpoints=True))
    return fn(variables, images)
