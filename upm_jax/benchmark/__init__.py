"""Benchmarks of every stage (`python -m upm_jax.benchmark --sections ...`): training and
extraction steps, the input pipeline, the evaluator and memory at MARS size."""
