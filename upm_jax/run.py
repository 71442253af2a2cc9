"""From a config to the papers' table: the modes of one workdir (the library behind main).

`run` only checks, locks and dispatches; each stage is its own module:
workdir.py (the record and the lock), train_loop.py (training one model, built by
trainer.py), inference.py (extraction from a checkpoint), split_evaluation.py.

Workdir layout (one folder per split for PRID2011 / iLIDS-VID, `split_1` otherwise):

    DIR/config.json                 the resolved config, recorded when the run started
    DIR/results.json                per split, mean, and `initial` when asked
    DIR/cmc.png
    DIR/split_K/test_set.npz        the split's test frames (what extraction reads)
    DIR/split_K/<model>/            one trained model: checkpoints/, metrics.jsonl, tensorboard/,
                                    features.npz
    DIR/split_K/features.npz        the features evaluated (for `upm`: LAM and GAM fused)
"""
import os

import jax
from jax.experimental import multihost_utils

from upm_jax import checkpoint as checkpoint_lib
from upm_jax import data as data_lib
from upm_jax import evaluation
from upm_jax import experiment
from upm_jax import inference
from upm_jax import models
from upm_jax import sharding
from upm_jax import split_evaluation
from upm_jax import test_set as test_set_lib
from upm_jax import train_loop
from upm_jax import workdir as workdir_lib
from upm_jax.data import synthetic
from upm_jax.experiment import ConfigError
from upm_jax.progress import say
from upm_jax.train_loop import TrainingDiverged
from upm_jax.workdir import WorkdirError

MODES = ("train", "extract", "evaluate", "all")

# Errors that describe bad input (config, data, weights, workdir): main prints them plainly.
USER_ERRORS = (ConfigError, TrainingDiverged, WorkdirError, data_lib.DatasetError,
               models.WeightsFileError, models.PretrainedMismatchError,
               evaluation.FeaturesError, checkpoint_lib.CheckpointError)


def run(config, workdir, mode="all", *, overwrite=False):
    """Runs `mode` for every split and model; returns the results dict (empty for modes
    that do not evaluate). `config` None: the one recorded in `workdir`. `overwrite`:
    replace a recorded config that differs in a field that changes the trained model."""
    if mode not in MODES:
        raise ConfigError(f"--mode {mode!r}: expected one of {MODES}")
    if config is not None:
        experiment.check_config(config, num_devices=jax.device_count())
        if mode in ("train", "all") and not workdir_lib.has_trained(workdir):
            experiment.check_weights(config)   # a new run starts from them
    _prepare_workdir(workdir)
    lock = workdir_lib.WorkdirLock(workdir)
    if jax.process_index() == 0:
        lock.acquire(say=say)
    try:
        config = _open_record(config, workdir, mode, overwrite)
        return _run_modes(config, workdir, mode)
    finally:
        lock.release()


def _open_record(config, workdir, mode, overwrite):
    if jax.process_index() == 0:
        config = workdir_lib.open_record(config, workdir, mode=mode, overwrite=overwrite, say=say)
    multihost_utils.sync_global_devices("workdir record")
    if jax.process_index() != 0:
        config = workdir_lib.read_record(workdir)
    experiment.check_config(config, num_devices=jax.device_count())
    return config


def _run_modes(config, workdir, mode):
    mesh = sharding.make_mesh()
    results, initial = {}, {}
    _generate_synthetic(config)
    numbers, source = experiment.splits(config, workdir,
                                        recorded_first=mode in ("extract", "evaluate"))
    say(f"splits {numbers} of {source}")
    for split in numbers:
        split_dir = os.path.join(workdir, f"split_{split}")
        runs = experiment.model_runs(config, workdir, split)
        dataset = None
        if mode in ("train", "all"):
            dataset = _load_dataset(config, split, split_dir)
            for model_run in runs:
                if config.eval.initial and mode == "all":
                    inference.initial_features(config, dataset, model_run, mesh)
                train_loop.train_model(config, dataset, model_run, mesh)
        if mode in ("extract", "all"):
            # the tables just read serve extraction too; alone, it reads the recorded test set
            test_set = dataset if dataset is not None else _test_set(config, split, split_dir)
            for model_run in runs:
                inference.extract_model(config, test_set, model_run, mesh)
        if mode in ("evaluate", "all") and jax.process_index() == 0:
            results[f"split_{split}"] = split_evaluation.evaluate_split(config, runs, split_dir)
            if config.eval.initial and (mode == "all" or _has_initial_features(runs)):
                initial[f"split_{split}"] = split_evaluation.evaluate_split(
                    config, runs, split_dir, stem="initial_features")
    if not results:
        return {}
    summary = split_evaluation.summarize(results)
    if initial:
        summary["initial"] = split_evaluation.summarize(initial)
    split_evaluation.write_summary(workdir, summary)
    return summary


def _has_initial_features(runs):
    """Whether every model of the split kept its untrained network's features (a later
    `--mode evaluate` then reports them again, as the run that wrote them did)."""
    return all(os.path.isfile(os.path.join(r.directory, "initial_features.npz")) for r in runs)


def _prepare_workdir(workdir):
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--workdir {workdir!r} is not writable: {e.strerror}") from e


def _generate_synthetic(config):
    """Writes the config's synthetic dataset when asked for and not on disk yet."""
    root = config.data.root
    if config.data.synthetic_ids:
        if jax.process_index() == 0 and not os.path.isdir(root):
            say(f"generating a synthetic {config.data.layout} set ({config.data.synthetic_ids} "
                f"ids, seed {config.data.synthetic_seed}) in {root}")
            synthetic.generate(config.data.layout, root, ids=config.data.synthetic_ids,
                               seed=config.data.synthetic_seed)
        # every process, whatever it saw: one that found the folder half-written must wait too
        multihost_utils.sync_global_devices("synthetic dataset")


def _load_dataset(config, split, split_dir):
    """The split's train and test tables from the raw folder; records the test side in
    split_dir for later extractions."""
    root = config.data.root
    dataset = data_lib.load_dataset(
        config.data.layout, root, split=split, split_file=config.data.split_file or None,
        splits=config.data.splits, skip_corrupt=config.data.skip_corrupt)
    expected = config.data.num_cameras
    if expected and dataset.num_cameras != expected:
        raise ConfigError(
            f"config.data.num_cameras={expected} but {root!r} ({config.data.layout}) has "
            f"{dataset.num_cameras} cameras (numbered as on disk; training tracklets per camera: "
            f"{list(dataset.train.tracklets_per_camera)})")
    for warning in dataset.warnings:
        say(f"warning: {warning}")
    for path, reason in dataset.skipped:
        say(f"skipped {path}: {reason}")
    if jax.process_index() == 0:
        test_set_lib.write(split_dir, dataset, root)
    multihost_utils.sync_global_devices(f"{split_dir} test set recorded")  # others may read it
    return dataset


def _test_set(config, split, split_dir):
    """The split's test frames: as recorded by training, else read from the raw folder."""
    if os.path.isfile(test_set_lib.path_of(split_dir)):
        return test_set_lib.read(split_dir, config.data.root)
    return _load_dataset(config, split, split_dir)
