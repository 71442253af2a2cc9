"""TF-free reading of TF-slim checkpoints and their conversion to Flax backbone params.

NumPy and the standard library only (no TensorFlow, no JAX), so TPU hosts can port weights.
"""
