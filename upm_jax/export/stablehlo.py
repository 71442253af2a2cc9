"""The StableHLO artifact: the feature extractor serialised with `jax.export`.

One file for CPU, CUDA and TPU at once, with a symbolic batch size N. The models' weights
are constants inside it. Each convolution keeps the formulation chosen per platform
(`models.layers`: shifted multiply-adds and matrix products on XLA:CPU, XLA's convolution
elsewhere): exported for several platforms, `lax.platform_dependent` becomes a branch on
the platform the module is compiled for, so a GPU or TPU compiles XLA's convolutions
(tests/test_export.py compiles the artifact for a TPU v5e and an H100 and counts them).
Every product runs at HIGHEST precision whatever the run's `model.matmul_precision` (no
TF32 on CUDA, no single bfloat16 pass on TPU), so the artifact computes the float32 model
wherever it runs. A consumer needs only `jax`:

    exported = jax.export.deserialize(bytearray(open(path, "rb").read()))
    features = exported.call(frames)            # uint8 [N, H, W, 3] -> float32 [N, P, D]

JAX guarantees that an artifact keeps loading for about six months of newer jaxlib
releases (its calling convention version is recorded in the JSON file beside it).
"""
import jax
import jax.numpy as jnp
import numpy as np

PLATFORMS = ("cpu", "cuda", "tpu")


def write(extractor, path):
    """Writes the Extractor's features as a serialised jax.export artifact at `path`;
    returns the format's details."""
    height, width = extractor.image_shape
    batch, = jax.export.symbolic_shape("N")
    spec = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.uint8)
    exported = jax.export.export(jax.jit(extractor.feature_function(matmul_precision="highest")),
                                 platforms=PLATFORMS)(spec)
    with open(path, "wb") as f:
        f.write(exported.serialize())
    return {"platforms": list(exported.platforms),
            "calling_convention_version": exported.calling_convention_version,
            "jax": jax.__version__, "precision": "HIGHEST",
            "compute_dtype": extractor.dtype.name,
            "convolutions": "per platform (taps and matrix products on CPU, XLA's "
                            "convolution on CUDA and TPU)"}


def open_artifact(path):
    """A `uint8 [N, H, W, 3] -> float32 [N, P, D]` NumPy function of the artifact, compiled
    for this process's default device."""
    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    call = jax.jit(exported.call)
    return lambda frames: np.asarray(call(frames))
