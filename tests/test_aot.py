"""The accelerator build, checked without an accelerator: the training step of a small
config (MobileNet v1 x0.25, 128x64 frames; LAM on one target, DAL on the other) and its
extraction function compiled ahead of time for a 4-chip TPU v5e and for an H100
(`upm_jax.benchmark.compile`, the `aot` extra).

What must hold in the optimized modules: XLA's convolutions, not the CPU formulation (13
depthwise layers: 13 grouped convolutions forward, 26 more backward); peak memory within
the chip's HBM; on 4 chips only the collectives of the data-parallel step (the features
all-gathered for the association on the global batch; all-reduces of the gradients, the
BatchNorm statistics and the sampled rows' ids; nothing moves a parameter), on one chip none;
no host callback or transfer; every product at the config's precision.
"""
import math

import pytest

from repo_configs import get_config
from upm_jax import methods
from upm_jax.benchmark import compile as compile_lib
from upm_jax.benchmark import hlo
from upm_jax.training.trainer import TrainSetShape

pytestmark = pytest.mark.slow

BATCH = 16
TRAIN_SET = TrainSetShape(64, (4, 4))   # few resident frames: the shapes are what matter
DEPTHWISE_LAYERS = 13


def _feature_dim(config):
    return methods.build_model(config, methods.METHODS[config.method][0][1]).feature_dim


def _config(method):
    config = get_config("demo")
    config.method = method
    config.train.batch_size = BATCH
    return config


# each target with one head, each head on one target: LAM's parts on the 4-chip gather
@pytest.fixture(scope="module", params=[("v5e:2x2", "upm_local"), ("h100", "dal")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def train_step(request):
    name, method = request.param
    config = _config(method)
    mesh = compile_lib.target_mesh(name)
    (_, head), = methods.METHODS[method]
    row, compiled, _ = compile_lib.compile_train(config, head, mesh, TRAIN_SET,
                                                 compile_lib.TARGETS[name])
    return name, config, mesh, row, compiled


def test_training_step_compiles_with_the_accelerator_convolutions(train_step):
    name, config, mesh, row, compiled = train_step
    assert mesh.devices.flat[0].platform == {"tpu": "tpu", "cuda": "gpu"}[
        compile_lib.TARGETS[name].platform]
    assert row["convolutions"]["grouped convolution"] == 3 * DEPTHWISE_LAYERS
    assert row["fits"] and 0 < row["peak_mb"] < 0.01 * row["hbm_mb"]
    assert row["host_transfers"] == {}
    assert set(row["operand_precision"]) == {config.model.matmul_precision}
    assert row["gflops"] > 0 and row["gb_accessed"] > 0 and row["roofline_ms"] > 0


def test_only_the_data_parallel_collectives(train_step):
    name, config, mesh, row, compiled = train_step
    stats = hlo.summary(compiled.as_text())["collectives"]
    if mesh.size == 1:
        assert stats == {}
        return
    assert set(stats) == {"all-gather", "all-reduce"}
    parts = 1 if config.method == "dal" else config.model.n_part
    # the only all-gather: the float32 features [B, P, D] of the global batch (in whatever
    # shape XLA moves them), for the association
    gathered = [(t, math.prod(dims)) for shapes in stats["all-gather"]["shapes"]
                for t, dims in shapes]
    assert gathered == [("f32", BATCH * parts * _feature_dim(config))]
    # all-reduces: one gradient sum (every trained parameter), per-channel BatchNorm
    # statistics, the sampled rows' track and camera ids; never a parameter gathered
    gradient = [shapes for shapes in stats["all-reduce"]["shapes"] if len(shapes) > 2]
    assert len(gradient) == 1
    vectors = [s for shapes in stats["all-reduce"]["shapes"] if len(shapes) <= 2 for s in shapes]
    assert all(len(dims) == 1 for _, dims in vectors)


def test_extraction_compiles_without_collectives():
    config = _config("upm_local")
    mesh = compile_lib.target_mesh("h100")
    row, _, _ = compile_lib.compile_extract(config, "local", mesh, compile_lib.TARGETS["h100"])
    assert row["batch"] == 256   # extract.extraction_batch on accelerators
    assert row["convolutions"]["grouped convolution"] == DEPTHWISE_LAYERS
    assert row["collectives"] == {} and row["host_transfers"] == {}
    assert row["fits"]
