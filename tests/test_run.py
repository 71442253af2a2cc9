"""The run library in-process, on one CPU device (`one_device`; whole runs on 8 devices:
test_parallel_splits): uPMnet's two models and their fused features, several splits with
their mean, MATLAB exports, pooled feature files, and the workdir as the record
(refusals, lock, stages from the workdir alone, faults)."""
import errno
import json
import os
import re
import shutil
import socket
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import scipy.io

from repo_configs import tiny_config
from upm_jax import checkpoints as checkpoints_lib
from upm_jax import config as config_lib
from upm_jax import data as data_lib
from upm_jax import evaluation
from upm_jax import extract
from upm_jax import parallel
from upm_jax import run
from upm_jax import workdir as workdir_lib
from upm_jax.data import eval_set as eval_set_lib
from upm_jax.data import synthetic
from upm_jax.training import trainer as trainer_lib
from upm_jax.workdir import Workdir


pytestmark = pytest.mark.usefixtures("one_device")


@pytest.fixture(scope="module")
def upm_two_splits(tmp_path_factory, one_device):
    workdir = str(tmp_path_factory.mktemp("upm"))
    config = tiny_config(data__splits="1,2", eval__save_mat=True)
    config.method = "upm"
    return workdir, run.run(config, workdir)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_device):
    """A finished 2-step LAM run (train, extract, evaluate); tests copy it before changing."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    return workdir, run.run(tiny_config(), workdir)


@pytest.fixture
def copy_of_trained(trained, tmp_path):
    """A copy of the trained workdir elsewhere: its record (paths relative to the workdir)
    serves it as is."""
    workdir = str(tmp_path / "w")
    shutil.copytree(trained[0], workdir)
    return workdir


@pytest.mark.slow
def test_upm_trains_lam_and_gam_and_fuses_per_part(upm_two_splits):
    workdir, _ = upm_two_splits
    lam = np.load(os.path.join(workdir, "split_1", "lam", "features.npz"))["frame_feat"]
    gam = np.load(os.path.join(workdir, "split_1", "gam", "features.npz"))["frame_feat"]
    fused = np.load(os.path.join(workdir, "split_1", "features.npz"))["frame_feat"]
    assert lam.shape[1:] == (2, 256) and gam.shape[1:] == (2, 256)
    np.testing.assert_array_equal(fused, np.concatenate([lam, gam], axis=-1))


@pytest.mark.slow
def test_splits_are_reported_with_their_mean(upm_two_splits):
    workdir, results = upm_two_splits
    assert set(results) == {"split_1", "split_2", "mean"}
    on_disk = json.load(open(os.path.join(workdir, "results.json")))
    assert on_disk == json.loads(json.dumps(results))
    for mode in ("paper", "standard"):
        expected = np.mean([results["split_1"][mode]["rank1"], results["split_2"][mode]["rank1"]])
        assert results["mean"][mode]["rank1"] == pytest.approx(expected)
    # The split results are exactly what the stand-alone evaluator computes from the files.
    again = evaluation.evaluate(evaluation.load_features(
        os.path.join(workdir, "split_2", "features.npz")))
    assert again["paper"]["mAP"] == pytest.approx(results["split_2"]["paper"]["mAP"])


@pytest.mark.slow
def test_mat_export_matches_the_features_file(upm_two_splits):
    workdir, _ = upm_two_splits
    model_dir = os.path.join(workdir, "split_1", "lam")
    frame_feat = np.load(os.path.join(model_dir, "features.npz"))["frame_feat"]
    mat = scipy.io.loadmat(os.path.join(model_dir, "mat", "test.mat"))["test"]
    assert mat.shape == (frame_feat.shape[1] * frame_feat.shape[2], frame_feat.shape[0])
    np.testing.assert_array_equal(mat, frame_feat.reshape(len(frame_feat), -1).T)
    ids = scipy.io.loadmat(os.path.join(model_dir, "mat", "testID.mat"))["testID"]
    cams = scipy.io.loadmat(os.path.join(model_dir, "mat", "testCAM.mat"))["testCAM"]
    assert ids.shape == cams.shape == (frame_feat.shape[0], 1)
    assert set(np.unique(cams)) == {1.0, 2.0}


@pytest.mark.slow
def test_pooled_feature_files_evaluate_like_frame_files(copy_of_trained):
    workdir = copy_of_trained
    config = Workdir(workdir).read_record()
    config.eval.frame_features = False   # an eval field: the record allows it
    results = run.run(config, workdir, mode="evaluate")
    pooled = evaluation.load_features(os.path.join(workdir, "split_1", "features.npz"))
    assert "track_feat" in pooled and "frame_feat" not in pooled
    frame_level = evaluation.evaluate(evaluation.load_features(
        os.path.join(workdir, "split_1", "lam", "features.npz")))
    for mode in ("paper", "standard"):
        assert results["mean"][mode]["rank1"] == pytest.approx(frame_level[mode]["rank1"])
        assert results["mean"][mode]["mAP"] == pytest.approx(frame_level[mode]["mAP"], abs=1e-4)


def test_the_record_holds_paths_relative_to_the_workdir(trained, tmp_path):
    workdir, _ = trained
    record = json.load(open(os.path.join(workdir, "config.json")))
    assert record["data"]["root"] == "{workdir}/synthetic_prid2011"
    assert record["checksum"].startswith("sha256:")
    assert Workdir(workdir).read_record().data.root == os.path.join(
        os.path.abspath(workdir), "synthetic_prid2011")
    moved = str(tmp_path / "moved")
    shutil.copy(os.path.join(workdir, "config.json"), tmp_path)
    os.makedirs(moved)
    shutil.move(str(tmp_path / "config.json"), moved)
    read = Workdir(moved).read_record()
    assert read.data.root == os.path.join(moved, "synthetic_prid2011")
    assert read.data.split_file == os.path.join(moved, "synthetic_prid2011",
                                                "prid2011_splits.json")
    # a path outside the workdir is recorded as it is
    config = read.copy_and_resolve_references()
    config.data.root = str(tmp_path / "elsewhere")
    Workdir(moved).write_record(config)
    assert Workdir(moved).read_record().data.root == str(tmp_path / "elsewhere")
    # a prepared set's folder is a path like the others; a URL is kept as written
    config.data.data_dir = os.path.join(moved, "prepared")
    Workdir(moved).write_record(config)
    recorded = json.load(open(os.path.join(moved, "config.json")))["data"]["data_dir"]
    assert recorded == "{workdir}/prepared"
    config.data.data_dir = "gs://bucket/prepared"
    Workdir(moved).write_record(config)
    assert Workdir(moved).read_record().data.data_dir == "gs://bucket/prepared"


@pytest.mark.slow
@pytest.mark.parametrize("field, value", [("train__batch_size", 8), ("data__image_size", 96),
                                          ("seed", 3), ("model__n_part", 1)])
def test_a_changed_model_field_is_refused_and_the_record_kept(copy_of_trained, field, value):
    workdir = copy_of_trained
    before = open(os.path.join(workdir, "config.json"), "rb").read()
    config = tiny_config()
    if field == "seed":
        config.seed = value
    else:
        config = tiny_config(**{field: value})
    name = field.replace("__", ".")
    for mode in ("train", "extract"):
        with pytest.raises(workdir_lib.WorkdirError, match=re.escape(name)):
            run.run(config, workdir, mode=mode)
    assert open(os.path.join(workdir, "config.json"), "rb").read() == before


@pytest.mark.slow
def test_overwritten_record_with_another_model_is_a_clear_checkpoint_error(copy_of_trained):
    workdir = copy_of_trained
    config = tiny_config(model__depth_multiplier=0.5, train__steps=4)
    with pytest.raises(checkpoints_lib.CheckpointError,
                       match=r"written by a different model(.|\n)*in the checkpoint"):
        run.run(config, workdir, mode="train", overwrite=True)
    with pytest.raises(checkpoints_lib.CheckpointError, match="different model"):
        extract.restore_inference(config, Workdir(workdir).split(1).models(config.method)[0],
                                  parallel.make_mesh())


@pytest.mark.slow
def test_resume_with_more_steps_continues_from_the_checkpoint(copy_of_trained, capsys):
    workdir = copy_of_trained
    run.run(tiny_config(train__steps=3), workdir, mode="train", overwrite=True)
    steps = sorted(os.listdir(os.path.join(workdir, "split_1", "lam", "checkpoints")))
    assert steps == ["2", "3"]
    err = capsys.readouterr().err
    assert "resuming from the checkpoint of step 2" in err
    assert re.search(r"split 1 lam: compiled the training step in \d+\.\d s\n", err)
    assert json.load(open(os.path.join(workdir, "config.json")))["train"]["steps"] == 3


def test_a_finished_model_is_skipped_before_anything_is_built(copy_of_trained, monkeypatch,
                                                              capsys):
    def no_trainer(*args, **kwargs):
        raise AssertionError("a trainer was built for a finished model")

    monkeypatch.setattr(trainer_lib, "make_trainer", no_trainer)
    run.run(None, copy_of_trained, mode="train")
    assert "already trained (2 steps" in capsys.readouterr().err


@pytest.mark.slow
def test_extract_and_evaluate_need_only_the_workdir_and_test_frames(trained, copy_of_trained):
    workdir = copy_of_trained
    split_dir = os.path.join(workdir, "split_1")
    recorded = eval_set_lib.read(Workdir(workdir).split(1).eval_set,
                                 os.path.join(workdir, "synthetic_prid2011"))
    keep = {os.path.realpath(p) for p in recorded.test.path}
    removed = 0
    for folder, _, files in os.walk(os.path.join(workdir, "synthetic_prid2011")):
        for name in files:
            path = os.path.realpath(os.path.join(folder, name))
            if path not in keep:
                os.remove(path)
                removed += 1
    assert removed > 50   # the training frames and the split file are gone
    os.remove(os.path.join(split_dir, "lam", "features.npz"))
    run.run(None, workdir, mode="extract")
    np.testing.assert_array_equal(
        np.load(os.path.join(split_dir, "lam", "features.npz"))["frame_feat"],
        np.load(os.path.join(trained[0], "split_1", "lam", "features.npz"))["frame_feat"])
    shutil.rmtree(os.path.join(workdir, "synthetic_prid2011"))
    results = run.run(None, workdir, mode="evaluate")
    assert results == trained[1]


@pytest.mark.slow
def test_evaluate_refuses_a_features_file_of_another_part_count(copy_of_trained):
    workdir = copy_of_trained
    path = os.path.join(workdir, "split_1", "lam", "features.npz")
    arrays = dict(np.load(path))
    arrays["frame_feat"] = np.concatenate([arrays["frame_feat"]] * 3, axis=1)[:, :3]  # P=3
    evaluation.save_features(path, **arrays)
    before = open(os.path.join(workdir, "results.json"), "rb").read()
    with pytest.raises(evaluation.FeaturesError, match=r"features\.npz holds features of 3 "
                                                       r"parts, but the run's config has 2"):
        run.run(None, workdir, mode="evaluate")
    assert open(os.path.join(workdir, "results.json"), "rb").read() == before


@pytest.mark.slow
def test_a_second_run_in_a_locked_workdir_is_refused(copy_of_trained):
    workdir = copy_of_trained
    with Workdir(workdir).lock():
        with pytest.raises(workdir_lib.WorkdirError,
                           match=rf"in use by another run \(pid {os.getpid()} on host "
                                 rf"{re.escape(socket.gethostname())}"):
            run.run(None, workdir, mode="evaluate")


@pytest.mark.slow
def test_a_stale_lock_is_taken_over(copy_of_trained, capsys):
    workdir = copy_of_trained
    with open(Workdir(workdir).lock_file, "w") as f:
        json.dump({"pid": 999999999, "host": "gone", "since": "yesterday"}, f)
    run.run(None, workdir, mode="evaluate")
    assert "taking over the lock" in capsys.readouterr().err
    assert "pid 999999999 on host gone" not in open(Workdir(workdir).lock_file).read()


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_one_error_keeping_the_old_one(copy_of_trained,
                                                                      monkeypatch):
    workdir = copy_of_trained
    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    with pytest.raises(checkpoints_lib.CheckpointError,
                       match=r"checkpoint of step 4 .*No space left on device; the checkpoint "
                             r"of step 2 is intact"):
        run.run(tiny_config(train__steps=4), workdir, mode="train", overwrite=True)
    steps = sorted(os.listdir(os.path.join(workdir, "split_1", "lam", "checkpoints")))
    assert steps == ["2"]


@pytest.mark.slow
def test_diverging_loss_stops_with_the_step_and_keeps_good_checkpoints(tmp_path):
    """A learning rate of 1e30 blows the weights up after the first update: the run must
    stop naming the first diverged step, having saved nothing at or after it."""
    config = tiny_config(train__steps=6, train__checkpoint_every=1, train__learning_rate=1e30)
    with pytest.raises(trainer_lib.TrainingDiverged, match=r"at step (\d+)") as info:
        run.run(config, str(tmp_path), mode="train")
    bad_step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    assert bad_step >= 2
    assert f"the last checkpoint (step {bad_step - 1}) is intact" in str(info.value)
    saved = sorted(int(s) for s in os.listdir(tmp_path / "split_1" / "lam" / "checkpoints")
                   if s.isdigit())
    assert saved == list(range(1, bad_step))


@pytest.mark.slow
def test_a_finite_explosion_of_the_loss_stops_the_run(tmp_path):
    """lr 1e12 makes the loss huge but finite: the running-median guard stops it before
    the first checkpoint, and says that no checkpoint exists."""
    config = tiny_config(train__steps=6, train__checkpoint_every=6, train__learning_rate=1e12)
    with pytest.raises(trainer_lib.TrainingDiverged,
                       match=r"times its running median(.|\n)*no checkpoint was written"):
        run.run(config, str(tmp_path), mode="train")
    assert not os.listdir(tmp_path / "split_1" / "lam" / "checkpoints")


def test_non_finite_weights_stop_before_the_checkpoint(tmp_path):
    checkpoints = checkpoints_lib.Checkpoints(str(tmp_path / "checkpoints"))
    guard = trainer_lib.DivergenceGuard(100.0, checkpoints)
    guard.check_params(types.SimpleNamespace(params={"w": jnp.ones(3)}), 1)
    bad = types.SimpleNamespace(params={"w": jnp.array([1.0, np.inf]), "b": jnp.zeros(2)})
    with pytest.raises(trainer_lib.TrainingDiverged,
                       match="weights are not finite after step 7; stopping, no checkpoint"):
        guard.check_params(bad, 7)
    checkpoints.close()


@pytest.mark.parametrize("field, value, message", [
    ("train__checkpoint_every", 0, "config.train.checkpoint_every=0: expected a number above 0"),
    ("train__batch_size", 0, "config.train.batch_size=0: expected a number above 0"),
    ("train__batch_size", -8, "config.train.batch_size=-8"),
    ("train__steps", 0, "config.train.steps=0"),
    ("train__divergence_factor", 0.5, "above 1"),
    ("eval__batch_size", -8, "config.eval.batch_size=-8: expected 0 (chosen per backend)"),
    ("model__matmul_precision", "fast", "config.model.matmul_precision='fast': expected one of "
                                        "['default', 'high', 'highest']"),
])
def test_impossible_values_fail_before_any_work(tmp_path, field, value, message):
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        run.run(tiny_config(**{field: value}), str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


def test_extraction_batch_is_the_config_value_or_one_frame_per_cpu_device():
    mesh = parallel.make_mesh(jax.devices())
    assert extract.extraction_batch(tiny_config(eval__batch_size=0), mesh) == mesh.size == 8
    assert extract.extraction_batch(tiny_config(eval__batch_size=64), mesh) == 64


def test_an_unknown_config_field_is_named_with_a_suggestion(tmp_path):
    config = tiny_config()
    config.train.learning_rat = 0.1
    with pytest.raises(config_lib.ConfigError,
                       match=r"config\.train\.learning_rat \(did you mean "
                             r"config\.train\.learning_rate\?\)"):
        run.run(config, str(tmp_path))


def test_default_workdir_names_the_config_and_its_overrides():
    assert workdir_lib.default_workdir("configs/prid.py") == os.path.join("runs", "prid")
    assert workdir_lib.default_workdir("configs/prid.py:split=3,backbone=resnet_v1_50",
                                       ["train.steps=100"]) == os.path.join(
        "runs", "prid_split=3_backbone=resnet_v1_50_train.steps=100")
    assert workdir_lib.default_workdir("configs/demo.py", ["data.root=/a b"]) == os.path.join(
        "runs", "demo_data.root=-a-b")


def test_frames_too_small_for_the_parts_are_refused_before_the_record(tmp_path):
    with pytest.raises(config_lib.ConfigError,
                       match=r"config.data.image_size=32 \(32x16 frames\) does not fit the local "
                             r"model .*n_part=2\): cannot cut a feature map of height 1 into "
                             r"n_part=2 stripes"):
        run.run(tiny_config(data__image_size=32), str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w" / "config.json")


@pytest.mark.parametrize("damage, message", [
    (lambda text: "[1, 2]", r"holds a JSON list, not the recorded config"),
    (lambda text: text.replace('"steps": 2', '"steps": 3'),
     r"its content does not match its checksum \(the file was damaged or edited by hand\)"),
    (lambda text: text[:len(text) // 2], r"cannot read the workdir's recorded config"),
])
def test_a_damaged_record_is_refused_naming_it(tmp_path, damage, message):
    workdir = Workdir(str(tmp_path))
    workdir.write_record(workdir.resolve(tiny_config()))
    text = open(workdir.record).read()
    open(workdir.record, "w").write(damage(text))
    with pytest.raises(workdir_lib.WorkdirError, match=re.escape(workdir.record) + ": " + message):
        run.run(None, str(tmp_path), mode="evaluate")
    # --config with --overwrite records a new one over the damage
    config = workdir.open_record(tiny_config(), mode="train", overwrite=True, say=lambda m: None)
    assert Workdir(str(tmp_path)).read_record().to_dict() == config.to_dict()


def test_a_record_with_values_of_the_wrong_type_names_the_field(tmp_path):
    """A record written by hand (or an older tool) without a checksum is still checked."""
    workdir = Workdir(str(tmp_path))
    record = tiny_config().to_dict()
    record["train"]["steps"] = "many"
    with open(workdir.record, "w") as f:
        json.dump(record, f)
    with pytest.raises(workdir_lib.WorkdirError,
                       match=re.escape(workdir.record) + r": 'train.steps' is 'many' \(str\), "
                                                         "expected int"):
        run.run(None, str(tmp_path), mode="evaluate")


@pytest.mark.slow
def test_a_moved_workdir_with_the_documented_extract_command_stays_inside_itself(
        trained, tmp_path, capsys):
    """`mv` a workdir, then `--workdir NEW --mode extract --config.data.root=...` (the
    command the docs and the missing-frames error give): it reads and writes only inside
    NEW, and temporary files a killed run left there are removed."""
    from upm_jax import main as main_lib

    old = str(tmp_path / "old")
    shutil.copytree(trained[0], old)
    new = str(tmp_path / "new")
    os.rename(old, new)
    data = str(tmp_path / "data")
    shutil.move(os.path.join(new, "synthetic_prid2011"), data)
    left = os.path.join(new, "split_1", "lam", ".tmp-killed.npz")
    open(left, "wb").write(b"half")
    os.remove(os.path.join(new, "split_1", "lam", "features.npz"))
    assert main_lib.cli(["upm_jax.main", f"--workdir={new}", "--mode=extract",
                         f"--config.data.root={data}"]) == 0
    assert "removed 1 temporary file(s) an interrupted run left" in capsys.readouterr().err
    assert not os.path.exists(old) and not os.path.exists(left)
    assert sorted(os.listdir(tmp_path)) == ["data", "new"]
    np.testing.assert_array_equal(
        np.load(os.path.join(new, "split_1", "lam", "features.npz"))["frame_feat"],
        np.load(os.path.join(trained[0], "split_1", "lam", "features.npz"))["frame_feat"])


@pytest.mark.slow
def test_a_damaged_test_set_or_checkpoint_is_named_and_never_used(copy_of_trained):
    workdir = copy_of_trained
    split = Workdir(workdir).split(1)
    features = os.path.join(split.path, "lam", "features.npz")
    before = open(features, "rb").read()
    test_set = open(split.eval_set, "rb").read()
    open(split.eval_set, "wb").write(test_set[:-40])   # truncated
    with pytest.raises(run.data_lib.DatasetError,
                       match=re.escape(split.eval_set) + ": not a complete .npz archive"):
        run.run(None, workdir, mode="extract")
    open(split.eval_set, "wb").write(test_set)
    item = os.path.join(split.path, "lam", "checkpoints", "2", "default")
    data = max((os.path.join(r, n) for r, _, ns in os.walk(os.path.join(item, "ocdbt.process_0"))
                for n in ns), key=os.path.getsize)
    raw = bytearray(open(data, "rb").read())
    raw[len(raw) // 2] ^= 0x01   # one bit
    open(data, "wb").write(bytes(raw))
    with pytest.raises(checkpoints_lib.CheckpointError,
                       match=r"checkpoints/2 is damaged: default/" +
                             re.escape(os.path.relpath(data, item)) + " is damaged"):
        run.run(None, workdir, mode="extract")
    assert open(features, "rb").read() == before   # nothing written from it


@pytest.mark.slow
def test_split_all_compiles_the_training_step_once(tmp_path, caplog):
    """Every split of a benchmark runs the one compiled training step: the schedule is a
    traced input and the resident frames are padded to the largest split, so two splits of
    different sizes compile the step once, and the extraction function once."""
    import logging

    import jax

    root = str(tmp_path / "prid")
    synthetic.generate("prid2011", root, ids=8, seed=3, num_splits=2)
    plan = data_lib.resolve_splits("prid2011", root, "all", synthetic.split_file(root))
    assert plan.numbers == [1, 2] and len(set(plan.train_frames.values())) == 2
    config = tiny_config(data__root=root, data__split_file=synthetic.split_file(root),
                         data__synthetic_ids=0, data__splits="all")
    jax.clear_caches()   # what earlier tests compiled must not hide a compilation here
    jax.config.update("jax_enable_compilation_cache", False)   # nor the persistent cache
    try:
        with jax.log_compiles(), caplog.at_level(logging.WARNING):
            results = run.run(config, str(tmp_path / "run"))
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
    assert {"split_1", "split_2", "mean"} <= set(results)
    compiled = [r.getMessage().split()[1] for r in caplog.records
                if r.getMessage().startswith("Compiling ")]
    assert compiled.count("jit(resident_train_step)") == 1, compiled
    assert compiled.count("jit(extract_features)") == 1, compiled
