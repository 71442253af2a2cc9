"""Prepared TFDS sets: every layout's frames stored resized, batches byte-identical to the raw
folder's and to the reference decode + TF1 resize, the set's record of the release folder
(the same tables, splits and protocol without the folder), unreadable frames, the prepare
command, no TensorFlow on the reading path, and a run from a prepared set alone."""
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import scipy.io

from upm_jax import config as config_lib
from upm_jax.data import (DatasetError, RawFrames, batch_indices, images, inspect_disk,
                          load_dataset, ordered_batches, resolve_splits, synthetic,
                          tracklets_on_disk)
from upm_jax.data import __main__ as data_cli
from upm_jax.data import eval_set, prepared, tree
from upm_jax.data.pipeline import OrderedBatches, StepBatches

pytestmark = pytest.mark.usefixtures("one_device")   # conftest: runs on one device

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
        prepared.prepare(layout, str(base / "release"), SIZE, str(base / "prepared"), threads=2)
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


def _portable(obj, root):
    """`obj` (datasets, tables, plans, listings) as plain values with the release folder
    `root` written ROOT: what the folder and its record mounted elsewhere must agree on."""
    if dataclasses.is_dataclass(obj):
        return {f.name: _portable(getattr(obj, f.name), root) for f in dataclasses.fields(obj)}
    if isinstance(obj, np.ndarray):
        return _portable(obj.tolist(), root)
    if isinstance(obj, dict):
        return {k: _portable(v, root) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_portable(v, root) for v in obj]
    return obj.replace(root, "ROOT") if isinstance(obj, str) else obj


def _everything_read(layout, root, release, split_file=None):
    """What the readers build from the release folder `root` read through the tree
    `release`: the disk report, the listing and the protocol of every kind of split spec."""
    out = {"disk": inspect_disk(layout, root, release),
           "listing": tracklets_on_disk(layout, root, release),
           "datasets": [load_dataset(layout, root, tree=release)]}
    if layout in ("prid2011", "ilidsvid"):
        out["plans"] = [resolve_splits(layout, root, spec, tree=release)
                        for spec in ("all", "random:5:2")]
        out["datasets"] += [load_dataset(layout, root, split=3, tree=release),
                            load_dataset(layout, root, split=2, splits="random:5:2",
                                         tree=release)]
        if split_file:   # a config's split file inside the release folder
            out["datasets"].append(load_dataset(layout, root, split=2, tree=release,
                                                split_file=os.path.join(root, split_file)))
    return _portable(out, root)


@pytest.mark.parametrize("layout", synthetic.LAYOUTS)
def test_the_sets_record_gives_the_folders_tables_splits_and_protocol(sets, layout, tmp_path):
    ds, data_dir = sets[layout]
    prepared_set = prepared.PreparedSet(data_dir, layout, SIZE)
    release = prepared_set.release.root
    assert release == os.path.dirname(data_dir) + os.sep + "release"
    split_file = f"{layout}_splits.json" if layout in ("prid2011", "ilidsvid") else None
    from_folder = _everything_read(layout, release, tree.LOCAL, split_file)
    assert from_folder["datasets"][0]["train"] == _portable(ds.train, release)
    # mounted where no folder exists, so that every answer comes from the record
    elsewhere = str(tmp_path / "not_here")
    assert from_folder == _everything_read(layout, elsewhere,
                                           prepared_set.release_tree(elsewhere), split_file)
    # the record holds listings and protocol files, never a frame
    record = prepared_set.release
    assert not any(name.lower().endswith((".png", ".jpg")) for name in record.contents)
    assert sum(len(files) for _, files in record.folders.values()) >= (
        ds.train.num_frames + ds.test.num_frames)


def test_a_split_file_beside_the_release_comes_with_the_set_and_the_folder_can_go(tmp_path):
    # the iLIDS-VID release: the split .mat sits next to the folder given as the root
    top = tmp_path / "download"
    info = synthetic.generate("ilidsvid", str(top / "i-LIDS-VID"), ids=4, seed=2,
                              frames=(1, 2), size=(16, 8))
    os.remove(info["split_file"])
    ls_set = np.stack([np.random.default_rng(k).permutation(4) + 1 for k in range(3)])
    os.makedirs(top / "train-test people splits")
    scipy.io.savemat(str(top / "train-test people splits" / "train_test_splits_ilidsvid.mat"),
                     {"ls_set": ls_set.astype(np.float64)})
    root = info["root"]
    prepared.prepare("ilidsvid", root, 32, str(tmp_path / "sets"))
    expected = _everything_read("ilidsvid", root, tree.LOCAL)
    assert "this folder's own split file" in expected["datasets"][0]["protocol"]
    assert "train_test_splits_ilidsvid.mat" in expected["datasets"][0]["protocol"]
    shutil.rmtree(top)
    prepared_set = prepared.PreparedSet(str(tmp_path / "sets"), "ilidsvid", 32)
    assert _everything_read("ilidsvid", root, prepared_set.release_tree()) == expected


def test_a_recorded_test_set_is_read_against_the_sets_record(sets, tmp_path):
    ds, data_dir = sets["prid2011"]
    prepared_set = prepared.PreparedSet(data_dir, "prid2011", SIZE)
    release = prepared_set.release.root
    path = str(tmp_path / "test_set.npz")
    eval_set.write(path, ds, release)   # as a run from the raw folder records it
    elsewhere = str(tmp_path / "not_here")
    read = eval_set.read(path, elsewhere, prepared_set.release_tree(elsewhere))
    assert [os.path.relpath(p, elsewhere) for p in read.test.path] == [
        os.path.relpath(p, release) for p in ds.test.path]
    assert np.array_equal(prepared_set.records(read.test.path),
                          prepared_set.records(ds.test.path))
    # recorded relative to another folder: its frames are not in the release recorded here
    eval_set.write(path, ds, ds.root)
    with pytest.raises(DatasetError, match=r"test frames recorded in .* are missing from the "
                                           r"release folder that the prepared set .* records"):
        eval_set.read(path, elsewhere, prepared_set.release_tree(elsewhere))


def test_a_set_without_the_record_of_its_release_is_refused(sets, tmp_path):
    _, data_dir = sets["dukev"]
    current = prepared.dataset_dir(data_dir, "dukev", SIZE)
    old = os.path.join(os.path.dirname(prepared.dataset_dir(str(tmp_path / "old"), "dukev",
                                                            SIZE)), "1.0.0")
    shutil.copytree(current, old)
    os.remove(os.path.join(old, prepared.RELEASE_RECORD))
    with pytest.raises(DatasetError, match=r"holds a prepared dukev set of version 1\.0\.0, made "
                                           r"by an older upm_jax: it does not record the release "
                                           r"folder.*prepare it again with python -m "
                                           r"upm_jax.data prepare --layout dukev"):
        prepared.PreparedSet(str(tmp_path / "old"), "dukev", SIZE)
    partial = prepared.dataset_dir(str(tmp_path / "partial"), "dukev", SIZE)
    shutil.copytree(current, partial)
    os.remove(os.path.join(partial, prepared.RELEASE_RECORD))
    with pytest.raises(DatasetError, match=r"the set has no release_record.json.gz"):
        prepared.PreparedSet(str(tmp_path / "partial"), "dukev", SIZE)


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
    check(source="prepared", data_dir="/sets", root="")   # the set records its release
    for data, message in [
            (dict(root=""), "config.data.root is empty: set it to the raw dataset folder, e.g. "
                            "--config.data.root=/data/prid_2011, or read a set prepared from "
                            "it (config.data.source='prepared', config.data.data_dir=DIR)"),
            (dict(source="tfrecord"), "config.data.source='tfrecord': expected one of"),
            (dict(source="prepared"), "needs config.data.data_dir"),
            (dict(source="prepared", data_dir="gs://b/sets"), "copy it there first"),
            (dict(workers=-2), "config.data.workers=-2"),
            (dict(prefetch=0), "config.data.prefetch=0")]:
        with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
            check(**data)


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache for the runs of this module, so that a run compiles
    nothing an earlier one did (the same executables: it is only faster)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cache
    fields = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("compilation_cache")),
              "jax_persistent_cache_min_compile_time_secs": 0,
              "jax_persistent_cache_min_entry_size_bytes": 0}
    before = {name: getattr(jax.config, name) for name in fields}
    for name, value in fields.items():
        jax.config.update(name, value)
    cache.reset_cache()
    yield
    for name, value in before.items():
        jax.config.update(name, value)
    cache.reset_cache()


@pytest.mark.slow
# MARS's layout, whose record also holds its info/ files (the other readers list their
# folders through the same tree calls; every layout's record and batches are checked by the
# quick tests of this file)
@pytest.mark.parametrize("layout", ["mars"])
def test_a_run_from_the_prepared_set_alone_gives_the_raw_folders_results(tmp_path, layout,
                                                                           compilation_cache,
                                                                           capsys):
    from repo_configs import get_config
    from upm_jax import run
    info = synthetic.generate(layout, str(tmp_path / "release"), ids=8, seed=0)
    prepared.prepare(layout, info["root"], 64, str(tmp_path / "sets"))

    def config(**data):
        c = get_config("demo")
        c.data.layout, c.data.root = layout, info["root"]
        c.data.split_file, c.data.num_cameras = info["split_file"] or "", 0
        c.data.synthetic_ids, c.data.image_size, c.data.resident = 0, 64, False
        c.train.batch_size, c.train.steps, c.train.checkpoint_every = 16, 2, 1
        c.eval.batch_size, c.eval.initial = 64, False
        c.data.update(data)
        return c

    run.run(config(workers=0), str(tmp_path / "raw"))
    shutil.rmtree(info["root"])
    # the set alone: the release folder is gone and config.data.root is empty (a split file
    # the config names in the folder is the one the set recorded); training resumes from
    # step 1 (its last checkpoint lost); extraction reads the recorded test set; frames are
    # read through a grain worker process.
    data = dict(source="prepared", data_dir=str(tmp_path / "sets"), root="", workers=1,
                prefetch=1)
    workdir = str(tmp_path / "prepared")
    run.run(config(**data), workdir, "train")
    shutil.rmtree(tmp_path / "prepared" / "split_1" / "lam" / "checkpoints" / "2")
    capsys.readouterr()
    run.run(config(**data), workdir, "train")
    assert "resuming from the checkpoint of step 1" in capsys.readouterr().err
    for mode in ("extract", "evaluate"):
        run.run(config(**data), workdir, mode)
    results = []
    for name in ("raw", "prepared"):
        with open(tmp_path / name / "results.json") as f:
            results.append(json.load(f))
    assert results[0] == results[1]
    # the features themselves, bit for bit (a 2-step model's rankings are mostly ties), and
    # the test set each recorded, relative to the release folder
    for stem in ("lam/features.npz", "test_set.npz"):
        arrays = [np.load(tmp_path / name / "split_1" / stem) for name in ("raw", "prepared")]
        assert sorted(arrays[0].files) == sorted(arrays[1].files)
        for key in arrays[0].files:
            assert np.array_equal(arrays[0][key], arrays[1][key]), (stem, key)


def test_a_run_from_a_set_that_lacks_a_frame_names_it_and_the_prepare_command(sets, tmp_path):
    ds, data_dir = sets["dukev"]
    prepared_set = prepared.PreparedSet(data_dir, "dukev", SIZE)
    new = os.path.join(os.path.dirname(ds.train.path[0]), "new.jpg")   # added after preparing
    with pytest.raises(DatasetError, match=(
            r"1 frames of the table are not in the prepared set .*, e\.g\. train/\S+/new\.jpg: "
            r"the release folder changed after preparing; prepare the set again with "
            r"python -m upm_jax\.data prepare --layout dukev --root RELEASE_FOLDER "
            r"--image-size 96 --data-dir ")):
        prepared_set.records(np.append(ds.train.path, new))
