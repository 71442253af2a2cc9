"""TF-free checkpoint reader (V2 bundle, V1 TensorSlice), slim rule table, port CLI errors.

Checkpoints are written by TensorFlow's own save ops; they are read back without TF.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import slim_synthetic as syn
from upm_jax.models import build_model
from upm_jax.porting.checkpoint import CheckpointFormatError, CheckpointReader
from upm_jax.porting.slim import PortError, detect_backbone, plan
from upm_jax.porting.wire import read_varint

VALUES = {
    "conv/weights": np.random.default_rng(0).normal(size=(3, 4, 5, 2)).astype(np.float32),
    "step": np.array(-7, np.int64),
    "ints": np.arange(-3, 5, dtype=np.int32),
    "doubles": np.random.default_rng(1).normal(size=1000),
    "flags": np.array([True, False, True]),
    "halves": np.random.default_rng(2).normal(size=7).astype(np.float16),
    "empty": np.zeros((0, 3), np.float32),
    "bytes": np.arange(10, dtype=np.uint8),
}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    # 400 extra entries with long shared prefixes: several index/data blocks and real
    # prefix compression in the tables.
    values = dict(VALUES)
    for i in range(400):
        values[f"scope/very/long/prefix/layer_{i:03d}/w"] = np.full((2,), i, np.float32)
    syn.write_v2(str(d / "v2.ckpt"), values)
    syn.write_v1(str(d / "v1.ckpt"), values)
    return d, values


@pytest.mark.parametrize("fmt", ["v2", "v1"])
def test_reads_every_dtype_exactly(written, fmt):
    d, values = written
    reader = CheckpointReader(str(d / f"{fmt}.ckpt"))
    assert reader.format == fmt
    assert sorted(reader.tensors) == sorted(values)
    for name, want in values.items():
        got = reader.read(name)
        assert reader.tensors[name] == (want.shape, want.dtype), name
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_v1_assembles_partitioned_slices(tmp_path):
    import tensorflow as tf

    full = np.random.default_rng(3).normal(size=(6, 4)).astype(np.float32)
    path = str(tmp_path / "sliced.ckpt")
    # Two row slices saved under one name (what a partitioned variable looks like in V1).
    tf.raw_ops.SaveSlices(filename=path, tensor_names=["w", "w"],
                          shapes_and_slices=["6 4 0,2:-", "6 4 2,4:-"],
                          data=[tf.constant(full[0:2]), tf.constant(full[2:6])])
    np.testing.assert_array_equal(CheckpointReader(path).read("w"), full)
    partial = str(tmp_path / "partial.ckpt")
    tf.raw_ops.SaveSlices(filename=partial, tensor_names=["w"], shapes_and_slices=["6 4 0,2:-"],
                          data=[tf.constant(full[0:2])])
    with pytest.raises(CheckpointFormatError, match="not fully covered"):
        CheckpointReader(partial).read("w")


def test_corrupt_and_missing_files_are_named(written, tmp_path):
    d, _ = written
    with pytest.raises(CheckpointFormatError, match="no TF checkpoint at .*nothing"):
        CheckpointReader(str(tmp_path / "nothing"))
    index = (d / "v2.ckpt.index").read_bytes()
    meta_end = read_varint(index, read_varint(index, len(index) - 48)[1])[1]
    index_offset, pos = read_varint(index, meta_end)
    index_size, _ = read_varint(index, pos)
    beyond = bytearray(index)  # index handle pointing past the end of the file
    beyond[meta_end:meta_end + 3] = bytes([0xFF, 0xFF, 0x7F])
    snappy = bytearray(index)  # index block marked as snappy-compressed
    snappy[index_offset + index_size] = 1
    for name, data, match in [
        ("truncated", index[: len(index) // 2], "not a TF sorted string table"),
        ("short", index[:20], "too short"),
        ("beyond", bytes(beyond), "outside the file"),
        ("snappy", bytes(snappy), "snappy-compressed"),
    ]:
        (tmp_path / f"{name}.index").write_bytes(data)
        with pytest.raises(CheckpointFormatError,
                           match=f"corrupt checkpoint index: {tmp_path / name}.index: .*{match}"):
            CheckpointReader(str(tmp_path / name))
    (tmp_path / "noshard.index").write_bytes(index)
    with pytest.raises(CheckpointFormatError, match="data shard missing: .*noshard.data-00000"):
        CheckpointReader(str(tmp_path / "noshard"))
    (tmp_path / "garbage.ckpt").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointFormatError, match="garbage.ckpt: not a TF sorted string table"):
        CheckpointReader(str(tmp_path / "garbage.ckpt"))
    (tmp_path / "cut.ckpt.index").write_bytes(index)
    (tmp_path / "cut.ckpt.data-00000-of-00001").write_bytes(
        (d / "v2.ckpt.data-00000-of-00001").read_bytes()[:100])
    reader = CheckpointReader(str(tmp_path / "cut.ckpt"))
    with pytest.raises(CheckpointFormatError, match="cut.ckpt.data-00000-of-00001: truncated"):
        reader.read("doubles")


def _flax_backbone_shapes(backbone):
    """{path: shape} of the model's backbone params and (under batch_stats/) BN statistics."""
    model = build_model(backbone, "dal")
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 112, 3))))
    out = {}
    for collection, prefix in (("params", ""), ("batch_stats", "batch_stats/")):
        out.update({f"{prefix}backbone/" + k: v.shape for k, v in
                    traverse_util.flatten_dict(shapes[collection]["backbone"], sep="/").items()})
    return out


@pytest.mark.parametrize("backbone,counts", [("mobilenet_v1", (441, 81, 54, 306)),
                                             ("resnet_v1_50", (269, 159, 106, 4))])
def test_rule_table_covers_golden_listing(backbone, counts):
    """Every real checkpoint entry is consumed, and every Flax backbone leaf (params and BN
    moving statistics) is produced."""
    listing = syn.read_listing(backbone)
    p = plan(listing)
    assert p.backbone == backbone == detect_backbone(listing)
    stats = {n for n, target in p.restore.items() if target.startswith("batch_stats/")}
    assert (len(listing), len(p.restore) - len(stats), len(stats), len(p.skip)) == counts
    assert set(p.restore) | set(p.skip) == set(listing)
    produced = {target: listing[name][0] for name, target in p.restore.items()}
    assert produced == _flax_backbone_shapes(backbone)
    # Params: conv weights and BN gamma/beta only; the moving statistics go to their own
    # group; never classifiers, optimiser slots or EMA shadows.
    for name in set(p.restore) - stats:
        assert name.endswith(("weights", "/gamma", "/beta")), name
    for name in stats:
        assert name.endswith(("/moving_mean", "/moving_variance")), name
    for name in listing:
        if any(s in name for s in ("ogits", "RMSProp", "ExponentialMovingAverage",
                                   "global_step", "mean_rgb")):
            assert name in p.skip, name


def test_uncovered_names_are_all_listed():
    names = list(syn.read_listing("mobilenet_v1")) + ["MobilenetV1/Conv2d_14/biases",
                                                      "MobilenetV1/Extra/weights"]
    with pytest.raises(PortError, match=r"2 checkpoint name\(s\).*\n.*Conv2d_14/biases\n"
                                        r".*Extra/weights"):
        plan(names)
    with pytest.raises(PortError, match="cannot tell the backbone"):
        plan(["vgg_16/conv1/weights"])
    with pytest.raises(PortError, match="cannot tell the backbone"):
        detect_backbone(["MobilenetV1/Conv2d_0/weights", "resnet_v1_50/conv1/weights"])
    with pytest.raises(PortError, match="not covered by the resnet_v1_50 rule table "
                                        r"\(the names look like a mobilenet_v1 checkpoint\)"):
        plan(["MobilenetV1/Conv2d_0/weights"], backbone="resnet_v1_50")


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    missing = str(tmp_path / "missing.ckpt")
    assert syn.port_weights_cli(["--from", "slim", missing, "--out", str(tmp_path / "o.npz")]) == 2
    assert f"error: no TF checkpoint at '{missing}'" in capsys.readouterr().err
    assert not (tmp_path / "o.npz").exists()


def test_reader_imports_neither_tensorflow_nor_jax():
    code = ("import sys; import upm_jax.porting.slim, upm_jax.porting.checkpoint; "
            "bad = [m for m in ('tensorflow', 'jax', 'flax') if m in sys.modules]; "
            "sys.exit(1 if bad else 0)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0
