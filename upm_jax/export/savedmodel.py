"""The TensorFlow SavedModel artifact (TF Serving, TFLite conversion), through `jax2tf`.

TensorFlow is needed only here, to write the folder (the `export` extra), and by whoever
serves it; upm_jax itself never imports it. The SavedModel's `serving_default` signature
takes `frames`, uint8 [None, H, W, 3], and returns `{"features": float32 [None, P, D]}`.
Inside is one `XlaCallModule` op holding the StableHLO of the models for CPU, CUDA and TPU,
written with XLA's plain convolution everywhere (`conv_impl="xla"`), which TFLite's
converter maps to its builtin CONV_2D and DEPTHWISE_CONV_2D:

    converter = tf.lite.TFLiteConverter.from_saved_model(path)
    open("features.tflite", "wb").write(converter.convert())

A TF runtime must be able to compile XLA to run it (TF Serving on CPU: with
`--xla_cpu_compilation_enabled=true`).
"""
SIGNATURE = "serving_default"
INPUT, OUTPUT = "frames", "features"


def write(extractor, path):
    """Writes the Extractor's features as a SavedModel folder at `path`; the format's details."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    from upm_jax.export.stablehlo import PLATFORMS

    height, width = extractor.image_shape
    convert = jax2tf.convert(extractor.feature_function(conv_impl="xla",
                                                        matmul_precision="highest"),
                             polymorphic_shapes=["(N, ...)"],
                             native_serialization_platforms=PLATFORMS, with_gradient=False)

    class Features(tf.Module):
        @tf.function(autograph=False, input_signature=[
            tf.TensorSpec([None, height, width, 3], tf.uint8, name=INPUT)])
        def __call__(self, frames):
            return {OUTPUT: convert(frames)}

    module = Features()
    tf.saved_model.save(module, path, signatures={SIGNATURE: module.__call__})
    return {"signature": SIGNATURE, "input": INPUT, "output": OUTPUT,
            "tensorflow": tf.__version__, "platforms": list(PLATFORMS), "precision": "HIGHEST",
            "compute_dtype": extractor.dtype.name,
            "convolutions": "XLA's convolution on every platform (TFLite-convertible)"}


def open_artifact(path):
    """A `uint8 [N, H, W, 3] -> float32 [N, P, D]` NumPy function of the SavedModel, run
    by TensorFlow."""
    import tensorflow as tf

    serve = tf.saved_model.load(path).signatures[SIGNATURE]
    return lambda frames: serve(**{INPUT: tf.constant(frames, tf.uint8)})[OUTPUT].numpy()
