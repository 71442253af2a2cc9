"""Prepared TFDS sets: every layout's frames stored resized, batches byte-identical to the raw
folder's and to the reference decode + TF1 resize, unreadable frames, the prepare command,
no TensorFlow on the reading path, and a run from a prepared set."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from upm_jax import config as config_lib
from upm_jax.data import (DatasetError, RawFrames, batch_indices, images, load_dataset,
                          ordered_batches, synthetic)
from upm_jax.data import __main__ as data_cli
from upm_jax.data import prepared
from upm_jax.data.pipeline import OrderedBatches, StepBatches

SIZE = 96   # 128x64 frames -> 96x48: a resize whose weights are not powers of two


def _generate(root, layout):
    info = synthetic.generate(layout, str(root), ids=6, seed=1, frames=(3, 5))
    return load_dataset(layout, info["root"], split_file=synthetic.split_file(info["root"],
                                                                              layout))


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """layout -> (dataset read from the raw folder, data_dir of its prepared set)."""
    out = {}
    for layout in synthetic.LAYOUTS:
        base = tmp_path_factory.mktemp(layout)
        ds = _generate(base / "release", layout)
        prepared.prepare(layout, ds.root, SIZE, str(base / "prepared"), threads=2)
        out[layout] = ds, str(base / "prepared")
    return out


def _reference(paths, height, width):
    """Decode + the reference TF1 resize, rounded half to even: the frames the host
    pipeline has always fed the training step."""
    return np.stack([images.to_uint8(images.resize_bilinear_tf1(images.decode(p), height,
                                                                width)) for p in paths])


@pytest.mark.parametrize("layout", synthetic.LAYOUTS)
def test_batches_are_byte_identical_from_raw_prepared_and_the_reference(sets, layout):
    ds, data_dir = sets[layout]
    prepared_set = prepared.PreparedSet(data_dir, layout, SIZE)
    height, width = images.image_shape(SIZE)
    for table in (ds.train, ds.test):
        raw, stored = RawFrames(table.path, SIZE), prepared_set.frames(table)
        kw = dict(seed=7, global_batch=16, local=np.arange(16), num_steps=6)
        for step in range(6):
            a, b = StepBatches(table, raw, **kw)[step], StepBatches(table, stored, **kw)[step]
            rows = batch_indices(7, step, table.num_frames, 16)
            expected = _reference(table.path[rows], height, width)
            assert np.array_equal(a["image"], expected) and np.array_equal(b["image"], expected)
            for k in ("track", "camera"):
                assert np.array_equal(a[k], b[k])
        ordered = [OrderedBatches(f, batch_size=16, local=np.arange(16)) for f in (raw, stored)]
        for k in range(len(ordered[0])):
            x, y = ordered[0][k], ordered[1][k]
            assert all(np.array_equal(x[key], y[key]) for key in ("image", "index", "valid"))


def test_the_set_holds_every_frame_of_the_release_with_its_metadata(sets):
    ds, data_dir = sets["mars"]
    import tensorflow_datasets as tfds
    builder = tfds.builder_from_directory(prepared.dataset_dir(data_dir, "mars", SIZE))
    base, frames = prepared.listing("mars", ds.root)
    assert base == ds.root
    metadata = builder.info.metadata
    assert metadata["paths"] == [f.relpath for f in frames] and metadata["skipped"] == []
    assert metadata["layout"] == "mars" and metadata["image_size"] == SIZE
    # every frame once: train and test of the protocol are among them
    assert len(frames) >= ds.train.num_frames + ds.test.num_frames
    source = builder.as_data_source(split=prepared.SPLIT)
    assert len(source) == len(frames)
    record, frame = source[5], frames[5]
    assert record["path"].decode() == frame.relpath == os.path.relpath(frame.path, base)
    assert (record["part"].decode(), record["camera"], record["person"], record["tracklet"],
            record["frame"]) == (frame.part, frame.camera, frame.person, frame.tracklet,
                                 frame.frame)
    assert record["image"].shape == (96, 48, 3) and record["image"].dtype == np.uint8
    assert np.array_equal(record["image"], _reference([frame.path], 96, 48)[0])
    assert frame.part in ("bbox_train", "bbox_test") and frame.camera >= 1
    for layout, builder_class in prepared.BUILDERS.items():
        assert builder_class.name == f"upm_{layout}"
        assert "manual dir is that folder exactly as\ndistributed" in (
            builder_class.MANUAL_DOWNLOAD_INSTRUCTIONS)


def test_records_follow_the_table_whatever_the_split(sets, tmp_path):
    ds, data_dir = sets["prid2011"]
    prepared_set = prepared.PreparedSet(data_dir, "prid2011", SIZE)
    other = load_dataset("prid2011", ds.root, split=2,
                         split_file=synthetic.split_file(ds.root, "prid2011"))
    listed = {f.path: i for i, f in enumerate(prepared.listing("prid2011", ds.root)[1])}
    for table in (ds.train, other.train, other.test):
        assert prepared_set.records(table.path).tolist() == [listed[p] for p in table.path]
    with pytest.raises(DatasetError, match="not a frame of the prepared set"):
        prepared_set.records(np.array([str(tmp_path / "elsewhere.png")]))
    with pytest.raises(DatasetError, match=r"no prepared prid2011 set of image size 128 .*"
                                           r"python -m upm_jax.data prepare --layout prid2011"):
        prepared.PreparedSet(data_dir, "prid2011", 128)


def test_unreadable_frames_stop_preparing_or_are_skipped_and_listed(tmp_path):
    ds = _generate(tmp_path / "release", "prid2011")
    bad = ds.train.path[3]
    with open(bad, "wb") as f:
        f.write(b"\x89PNG broken")
    with pytest.raises(DatasetError, match=re.escape(f"cannot decode image {bad}") +
                       ".*--skip-corrupt"):
        prepared.prepare("prid2011", ds.root, SIZE, str(tmp_path / "a"))
    assert not os.path.exists(prepared.dataset_dir(str(tmp_path / "a"), "prid2011", SIZE))
    summary = prepared.prepare("prid2011", ds.root, SIZE, str(tmp_path / "b"),
                               skip_corrupt=True)
    relpath = os.path.relpath(bad, ds.root)
    assert [p for p, _ in summary["skipped"]] == [relpath]
    prepared_set = prepared.PreparedSet(str(tmp_path / "b"), "prid2011", SIZE)
    with pytest.raises(DatasetError, match=re.escape(relpath) + ".*skip_corrupt=True"):
        prepared_set.frames(ds.train)
    kept = load_dataset("prid2011", ds.root, split_file=synthetic.split_file(ds.root),
                        skip_corrupt=True, unreadable=prepared_set.unreadable)
    assert [p for p, _ in kept.skipped] == [bad]
    assert kept.train.num_frames == ds.train.num_frames - 1
    frames = prepared_set.frames(kept.train)
    image = np.concatenate([b["image"] for b in ordered_batches(frames, batch_size=8)])
    assert np.array_equal(image[:kept.train.num_frames],
                          _reference(kept.train.path, *images.image_shape(SIZE)))


def test_the_prepare_command_and_the_inspection_form(sets, tmp_path, capsys):
    ds, _ = sets["dukev"]
    out = str(tmp_path / "d")
    assert data_cli.main(["prepare", "--layout", "dukev", "--root", ds.root, "--image-size",
                          "64", "--data-dir", out, "--threads", "1"]) == 0
    text = capsys.readouterr().out
    path = prepared.dataset_dir(out, "dukev", 64)
    assert re.search(rf"prepared \d+ frames of {re.escape(ds.root)} in {re.escape(path)}", text)
    assert "skipped: 0 unreadable frames" in text
    assert data_cli.main(["prepare", "--layout", "dukev", "--root", ds.root, "--image-size",
                          "64", "--data-dir", out]) == 2
    assert f"error: {path} already exists" in capsys.readouterr().err
    assert data_cli.main(["prepare", "--layout", "mars", "--root", ds.root, "--image-size",
                          "64", "--data-dir", out]) == 2
    assert "error: mars: " in capsys.readouterr().err
    assert data_cli.main(["prepare", "--layout", "dukev", "--root", ds.root, "--image-size",
                          "63", "--data-dir", out]) == 2
    assert "expected an even size" in capsys.readouterr().err
    assert data_cli.main([ds.root, "--layout", "dukev"]) == 0
    assert "dukev folder" in capsys.readouterr().out


def test_a_cloud_data_dir_without_gcsfs_fails_before_any_work(sets, capsys):
    import importlib.util
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed: the check would reach Cloud Storage")
    ds, _ = sets["prid2011"]
    assert data_cli.main(["prepare", "--layout", "prid2011", "--root", ds.root, "--image-size",
                          "64", "--data-dir", "gs://bucket/sets"]) == 2
    assert "install gcsfs" in capsys.readouterr().err


def test_reading_a_prepared_set_imports_no_tensorflow(sets):
    ds, data_dir = sets["ilidsvid"]
    code = ("import sys, numpy as np\n"
            "from upm_jax.data import load_dataset, prepared, synthetic\n"
            f"ds = load_dataset('ilidsvid', {ds.root!r}, split_file=synthetic.split_file("
            f"{ds.root!r}, 'ilidsvid'))\n"
            f"frames = prepared.PreparedSet({data_dir!r}, 'ilidsvid', {SIZE}).frames(ds.train)\n"
            f"frames.read(np.arange(4), np.empty((4, {SIZE}, {SIZE // 2}, 3), np.uint8))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_config_fields_of_the_input_are_checked():
    def check(**data):
        config = config_lib.get_base_config()
        config.data.root = "/data"
        config.data.update(data)
        config_lib.check_config(config, num_devices=1)

    check(source="prepared", data_dir="/sets", workers=0, prefetch=1)
    for data, message in [
            (dict(source="tfrecord"), "config.data.source='tfrecord': expected one of"),
            (dict(source="prepared"), "needs config.data.data_dir"),
            (dict(source="prepared", data_dir="gs://b/sets"), "copy it there first"),
            (dict(workers=-2), "config.data.workers=-2"),
            (dict(prefetch=0), "config.data.prefetch=0")]:
        with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
            check(**data)


@pytest.mark.slow
def test_a_run_from_the_prepared_set_gives_the_raw_folders_results(tmp_path):
    from repo_configs import get_config
    from upm_jax import run
    root = str(tmp_path / "release")
    info = synthetic.generate("prid2011", root, ids=8, seed=0)
    prepared.prepare("prid2011", info["root"], 64, str(tmp_path / "sets"))

    def config(**data):
        c = get_config("demo")
        c.data.root, c.data.split_file = root, info["split_file"]
        c.data.synthetic_ids, c.data.image_size, c.data.resident = 0, 64, False
        c.train.batch_size, c.train.steps, c.train.checkpoint_every = 16, 2, 2
        c.eval.batch_size, c.eval.initial = 64, False
        c.data.update(data)
        return c

    results = {}
    for name, data in (("raw", dict(workers=0)),
                       ("prepared", dict(source="prepared", data_dir=str(tmp_path / "sets"),
                                         workers=1, prefetch=1))):
        run.run(config(**data), str(tmp_path / name))
        with open(tmp_path / name / "results.json") as f:
            results[name] = json.load(f)
    assert results["raw"] == results["prepared"]
    # the features themselves, bit for bit (a 3-step model's rankings are mostly ties)
    features = [np.load(tmp_path / name / "split_1" / "lam" / "features.npz")["frame_feat"]
                for name in ("raw", "prepared")]
    assert features[0].shape[0] > 0 and np.array_equal(*features)
