"""From a config to the papers' table: the modes of one workdir (the library behind main).

`run` only checks, locks and dispatches, split by split and model by model; each stage is
its own module: workdir.py (every path of the record, and its lock), training/trainer.py
(building and training one model), extract.py (a checkpoint restored, features written),
evaluation/summary.py (a split evaluated, the run summarised).
"""
import os

import jax
from jax.experimental import multihost_utils

from upm_jax import checkpoints
from upm_jax import config as config_lib
from upm_jax import data as data_lib
from upm_jax import evaluation
from upm_jax import extract
from upm_jax import methods
from upm_jax import models
from upm_jax import parallel
from upm_jax.config import ConfigError
from upm_jax.data import eval_set as eval_set_lib
from upm_jax.data import person_splits, synthetic
from upm_jax.data import tree as tree_lib
from upm_jax.evaluation import summary as summary_lib
from upm_jax.progress import say
from upm_jax.training import side_by_side
from upm_jax.training import trainer as trainer_lib
from upm_jax.training.trainer import TrainingDiverged
from upm_jax.workdir import FEATURES, INITIAL_FEATURES, Workdir, WorkdirError

MODES = ("train", "extract", "evaluate", "all")

# Errors that describe bad input (config, data, weights, workdir): main prints them plainly.
USER_ERRORS = (ConfigError, TrainingDiverged, WorkdirError, data_lib.DatasetError,
               models.WeightsFileError, models.PretrainedMismatchError,
               evaluation.FeaturesError, checkpoints.CheckpointError)


def run(config, workdir, mode="all", *, overwrite=False, overrides=()):
    """Runs `mode` for every split and model; returns the results dict (empty for modes
    that do not evaluate). `workdir`: the run's folder. `config` None: the one recorded in
    `workdir`, with `overrides` [(field, text)] applied (--config.FIELD=VALUE flags given
    without --config). `overwrite`: replace a recorded config that differs in a field
    that changes the trained model."""
    if mode not in MODES:
        raise ConfigError(f"--mode {mode!r}: expected one of {MODES}")
    workdir = Workdir(workdir)
    if config is not None:
        config_lib.check_config(config, num_devices=jax.device_count())
        methods.check_frames_fit(config)
        if mode in ("train", "all") and not workdir.has_trained():
            config_lib.check_weights(config, initial_features=mode == "all")   # a new run
    _prepare_workdir(workdir)
    lock = workdir.lock()
    if jax.process_index() == 0:
        lock.acquire(say=say)
        left = workdir.remove_temporaries()
        if left:
            say(f"removed {len(left)} temporary file(s) an interrupted run left: "
                f"{', '.join(left[:3])}{' ...' if len(left) > 3 else ''}")
    try:
        config = _open_record(config, workdir, mode, overwrite, overrides)
        return _run_modes(config, workdir, mode)
    finally:
        lock.release()


def _open_record(config, workdir, mode, overwrite, overrides):
    """The config every process runs with: process 0 checks it against the record (and
    writes the record); the others, once it has, compute the same config."""
    if jax.process_index() == 0:
        config = workdir.open_record(config, mode=mode, overwrite=overwrite,
                                     overrides=overrides, say=say)
    multihost_utils.sync_global_devices("workdir record")
    if jax.process_index() != 0:
        config = (workdir.resolve(config) if config is not None
                  else workdir.read_record(overrides=overrides))
    config_lib.check_config(config, num_devices=jax.device_count())
    return config


def _run_modes(config, workdir, mode):
    mesh = parallel.make_mesh()
    results, initial = {}, {}
    _generate_synthetic(config)
    numbers, source, train_frames = _splits(config, workdir,
                                            recorded_first=mode in ("extract", "evaluate"))
    say(f"splits {numbers} of {source}")
    # every split's resident frames padded to the largest: one compiled training step
    resident_rows = max(train_frames.values(), default=None) if config.data.resident else None
    size = config.train.parallel_splits
    for group in [numbers[i:i + size] for i in range(0, len(numbers), size)]:
        datasets = {}
        if mode in ("train", "all"):
            datasets = {n: _load_dataset(config, workdir.split(n)) for n in group}
            _train_splits(config, workdir, group, datasets, mesh, resident_rows,
                          initial=config.eval.initial and mode == "all")
        for number in group:
            _extract_evaluate_split(config, workdir, number, datasets.get(number), mode, mesh,
                                    results, initial)
    if not results:
        return {}
    summary = summary_lib.summarize(results)
    if initial:
        summary["initial"] = summary_lib.summarize(initial)
    summary_lib.write_summary(summary, workdir.results, workdir.cmc_plot)
    say(f"wrote {workdir.results} and {workdir.cmc_plot}")
    return summary


def _train_splits(config, workdir, numbers, datasets, mesh, resident_rows, *, initial):
    """Trains every model of splits `numbers`: one split after another, or side by side
    (config.train.parallel_splits > 1), model by model. `initial`: first write the untrained
    network's features of each model."""
    for index in range(len(methods.METHODS[config.method])):
        model_dirs = [workdir.split(n).models(config.method)[index] for n in numbers]
        if initial:
            for number, model_dir in zip(numbers, model_dirs):
                extract.initial_features(config, datasets[number], model_dir, mesh)
        if len(numbers) > 1:
            side_by_side.train_side_by_side(config, [datasets[n] for n in numbers], model_dirs,
                                            mesh, resident_rows=resident_rows)
        else:
            trainer_lib.train_model(config, datasets[numbers[0]], model_dirs[0], mesh,
                                    resident_rows=resident_rows)


def _extract_evaluate_split(config, workdir, number, dataset, mode, mesh, results, initial):
    """Extraction and evaluation of split `number` as `mode` asks, into `results` (and
    `initial`: the untrained network's). `dataset`: its tables when training read them."""
    split = workdir.split(number)
    model_dirs = split.models(config.method)
    if mode in ("extract", "all"):
        # the tables just read serve extraction too; alone, it reads the recorded test set
        eval_set = dataset if dataset is not None else _eval_set(config, split)
        for model_dir in model_dirs:
            extract.extract_model(config, eval_set, model_dir, mesh)
    if mode in ("evaluate", "all") and jax.process_index() == 0:
        results[f"split_{number}"] = _evaluate_split(config, split, model_dirs)
        if config.eval.initial and (mode == "all" or all(
                os.path.isfile(m.features(INITIAL_FEATURES)) for m in model_dirs)):
            # a later --mode evaluate reports the untrained network again when every
            # model kept its features, as the run that wrote them did
            initial[f"split_{number}"] = _evaluate_split(config, split, model_dirs,
                                                         INITIAL_FEATURES)


def _evaluate_split(config, split, model_dirs, stem=FEATURES):
    """The split's models' `<stem>` features fused into the split's own file, evaluated."""
    path = split.features(stem)
    results = summary_lib.evaluate_split(
        [m.features(stem) for m in model_dirs], path,
        num_parts=methods.num_parts(config, model_dirs[0].head),
        frame_level=config.eval.frame_features, pooling=config.eval.pooling,
        distance=config.eval.distance)
    say(f"split_{split.number}: evaluated {path} ({stem}): Rank-1 "
        f"{results['paper']['rank1']:.2f}, mAP {results['paper']['mAP']:.2f} (paper mode)")
    return results


def _splits(config, workdir, *, recorded_first=False):
    """The 1-based splits to run, where they come from (a line to print) and their training
    frame counts on disk ({split: frames}; empty where the plan does not count them).

    Resolved against the release folder (`data.resolve_splits`). With `recorded_first`
    (extraction, evaluation), the split folders a run already left in the workdir come
    first, so these stages work on a machine that holds only the test frames, or no
    dataset at all.
    """
    field = "config.data.splits"
    recorded = workdir.recorded_splits() if recorded_first else []
    if recorded:
        spec = person_splits.parse_spec(config.data.splits, field)
        wanted = recorded if spec.numbers is None else list(spec.numbers)
        missing = [n for n in wanted if n not in recorded]
        if missing:
            raise ConfigError(f"{field}={config.data.splits!r}: split(s) {missing} have no "
                              f"folder in {workdir.path!r}; it holds splits {recorded} (train "
                              "them first with --mode train or all)")
        return wanted, f"the split folders recorded in {workdir.path}", {}
    root, tree = _release(config)
    plan = data_lib.resolve_splits(config.data.layout, root, config.data.splits,
                                   config.data.split_file or None, field=field, tree=tree)
    return plan.numbers, plan.protocol, plan.train_frames


def _release(config):
    """(root, tree): the release folder the readers read and the file tree that answers for
    it. From a prepared set, the set's record of the folder it was prepared from (that
    folder need not exist here, and config.data.root is not read); otherwise the folder
    config.data.root names, on disk."""
    if config.data.source == "prepared":
        from upm_jax.data import prepared  # noqa: PLC0415  (imports TFDS)
        release = prepared.open_set(config.data.data_dir, config.data.layout,
                                    config.data.image_size).release_tree()
        return release.mount, release
    return config.data.root, tree_lib.LOCAL


def _prepare_workdir(workdir):
    try:
        os.makedirs(workdir.path, exist_ok=True)
        probe = os.path.join(workdir.path, f".write_test.{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--workdir {workdir.path!r} is not writable: {e.strerror}") from e


def _generate_synthetic(config):
    """Writes the config's synthetic dataset when asked for and not on disk yet (a run
    from a prepared set reads no folder)."""
    root = config.data.root
    if config.data.synthetic_ids and config.data.source == "raw":
        if jax.process_index() == 0 and not os.path.isdir(root):
            say(f"generating a synthetic {config.data.layout} set ({config.data.synthetic_ids} "
                f"ids, seed {config.data.synthetic_seed}) in {root}")
            synthetic.generate(config.data.layout, root, ids=config.data.synthetic_ids,
                               seed=config.data.synthetic_seed)
        # every process, whatever it saw: one that found the folder half-written must wait too
        multihost_utils.sync_global_devices("synthetic dataset")


def _load_dataset(config, split):
    """The split's train and test tables from the release folder (`_release`); records the
    test side in the split's folder for later extractions. Reading a prepared set, the
    frames it skipped as unreadable are the ones `data.skip_corrupt` leaves out (none is
    decoded)."""
    root, tree = _release(config)
    unreadable = None
    if config.data.source == "prepared":
        from upm_jax.data import prepared  # noqa: PLC0415  (imports TFDS)
        unreadable = prepared.open_set(config.data.data_dir, config.data.layout,
                                       config.data.image_size).unreadable
    dataset = data_lib.load_dataset(
        config.data.layout, root, split=split.number, split_file=config.data.split_file or None,
        splits=config.data.splits, skip_corrupt=config.data.skip_corrupt, unreadable=unreadable,
        tree=tree)
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
        eval_set_lib.write(split.eval_set, dataset, root)
    multihost_utils.sync_global_devices(f"{split.path} test set recorded")  # others may read it
    return dataset


def _eval_set(config, split):
    """The split's test frames: as recorded by training, else read from the release
    folder (either way through `_release`)."""
    if os.path.isfile(split.eval_set):
        return eval_set_lib.read(split.eval_set, *_release(config))
    return _load_dataset(config, split)
