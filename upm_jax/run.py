"""From a config to the papers' table: train, extract and evaluate (the library behind main).

Workdir layout (one folder per split for PRID2011 / iLIDS-VID, `split_1` otherwise):

    DIR/config.json                 the resolved config
    DIR/results.json                per split, mean, and `initial` when asked
    DIR/cmc.png
    DIR/split_K/<model>/            one trained model: checkpoints/, metrics.jsonl, tensorboard/,
                                    features.npz
    DIR/split_K/features.npz        the features evaluated (for `upm`: LAM and GAM fused)
"""
import dataclasses
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from upm_jax import checkpoint as checkpoint_lib
from upm_jax import data as data_lib
from upm_jax import evaluation
from upm_jax import extract as extract_lib
from upm_jax import metrics_writer
from upm_jax import models
from upm_jax import optim
from upm_jax import sharding
from upm_jax import train as train_lib
from upm_jax.association import AnchorMemory
from upm_jax.data import synthetic

# method -> the models it trains, as (sub-folder, head).
METHODS = {
    "dal": (("dal", "dal"),),
    "upm_local": (("lam", "local"),),
    "upm_global": (("gam", "global"),),
    "upm": (("lam", "local"), ("gam", "global")),
}
MODES = ("train", "extract", "evaluate", "all")
SPLIT_LAYOUTS = ("prid2011", "ilidsvid")
NUM_SPLITS = 10


class ConfigError(ValueError):
    """A config field with a value that cannot work; the message names the field."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last checkpoint written before it is intact."""


# Errors that describe bad input (config, data, weights, workdir): main prints them plainly.
USER_ERRORS = (ConfigError, TrainingDiverged, data_lib.DatasetError, models.WeightsFileError,
               models.PretrainedMismatchError, evaluation.FeaturesError,
               checkpoint_lib.CheckpointError)


@dataclasses.dataclass(frozen=True)
class ModelRun:
    """One model to train on one split, in its own folder."""
    split: int
    name: str
    head: str
    directory: str


def run(config, workdir, mode="all"):
    """Runs `mode` for every split and model of the config; returns the results dict
    (empty for modes that do not evaluate)."""
    if mode not in MODES:
        raise ConfigError(f"--mode {mode!r}: expected one of {MODES}")
    check_config(config)
    _prepare_workdir(workdir)
    _write_config(config, workdir)
    mesh = sharding.make_mesh()
    results = {}
    initial = {}
    for split in _splits(config):
        dataset = _load_dataset(config, split, workdir)
        runs = [ModelRun(split, name, head, os.path.join(workdir, f"split_{split}", name))
                for name, head in METHODS[config.method]]
        for model_run in runs:
            if mode in ("train", "all"):
                if config.eval.initial and mode == "all":
                    initial_features(config, dataset, model_run, mesh)
                train_model(config, dataset, model_run, mesh)
            if mode in ("extract", "all"):
                extract_model(config, dataset, model_run, mesh)
        if mode in ("evaluate", "all"):
            split_dir = os.path.join(workdir, f"split_{split}")
            results[f"split_{split}"] = evaluate_split(config, dataset, runs, split_dir)
            if config.eval.initial and mode == "all":
                initial[f"split_{split}"] = evaluate_split(
                    config, dataset, runs, split_dir, stem="initial_features")
    if results:
        summary = summarize(results)
        if initial:
            summary["initial"] = summarize(initial)
        _write_results(workdir, summary)
        _plot(workdir, summary)
        return summary
    return {}


def say(message):
    """A progress message for the user, from process 0 only."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def check_config(config):
    """Fails early, naming the field, on values no run can use."""
    if config.method not in METHODS:
        raise ConfigError(f"config.method={config.method!r}: expected one of {sorted(METHODS)}")
    if config.model.backbone not in models.BACKBONES:
        raise ConfigError(f"config.model.backbone={config.model.backbone!r}: expected one of "
                          f"{sorted(models.BACKBONES)}")
    if config.model.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"config.model.dtype={config.model.dtype!r}: expected float32 or "
                          "bfloat16")
    if config.train.optimizer not in ("rmsprop", "sgd"):
        raise ConfigError(f"config.train.optimizer={config.train.optimizer!r}: expected "
                          "rmsprop or sgd")
    if config.train.anchor_init not in ("zeros", "features"):
        raise ConfigError(f"config.train.anchor_init={config.train.anchor_init!r}: expected "
                          "zeros or features")
    if config.data.image_size < 32 or config.data.image_size % 2:
        raise ConfigError(f"config.data.image_size={config.data.image_size}: expected an even "
                          "size of at least 32")
    if config.train.batch_size % jax.device_count():
        raise ConfigError(f"config.train.batch_size={config.train.batch_size} must be divisible"
                          f" by the {jax.device_count()} devices in use")
    if not config.data.root:
        raise ConfigError("config.data.root is empty: set it to the raw dataset folder, e.g. "
                          "--config.data.root=/data/prid_2011")
    pretrained = config.model.pretrained
    if pretrained and not os.path.isfile(pretrained):
        raise ConfigError(
            f"config.model.pretrained={pretrained!r}: no such file. Convert the TF-slim "
            "checkpoint first: python tools/port_weights.py --from slim CKPT --out "
            f"{pretrained} (see README, 'ImageNet weights'), or set "
            "--config.model.pretrained='' --config.model.allow_scratch=True to train from "
            "scratch")
    if not pretrained and not config.model.allow_scratch:
        raise ConfigError("config.model.pretrained is empty: the papers start from ImageNet "
                          "weights; set it, or allow training from scratch with "
                          "--config.model.allow_scratch=True")
    _splits(config)


def _splits(config):
    text = str(config.data.splits).strip().lower()
    if config.data.layout not in SPLIT_LAYOUTS:
        return [1]
    if text == "all":
        return list(range(1, NUM_SPLITS + 1))
    try:
        splits = [int(s) for s in text.split(",")]
    except ValueError:
        splits = []
    if not splits or any(not 1 <= s <= NUM_SPLITS for s in splits):
        raise ConfigError(f"config.data.splits={config.data.splits!r}: expected 'all' or split "
                          f"numbers 1..{NUM_SPLITS} separated by commas")
    return splits


def _prepare_workdir(workdir):
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--workdir {workdir!r} is not writable: {e.strerror}") from e


def _write_config(config, workdir):
    if jax.process_index() == 0:
        _atomic_write_text(os.path.join(workdir, "config.json"), config.to_json(indent=2))


def _write_results(workdir, summary):
    if jax.process_index() == 0:
        _atomic_write_text(os.path.join(workdir, "results.json"), json.dumps(summary, indent=2))


def _plot(workdir, summary):
    """DIR/cmc.png: the mean CMC (paper mode), and the untrained network's when present."""
    if jax.process_index() != 0:
        return
    curves = {"trained": summary["mean"]["paper"]["cmc"]}
    if "initial" in summary:
        curves["initial"] = summary["initial"]["mean"]["paper"]["cmc"]
    evaluation.plot_cmc(curves, os.path.join(workdir, "cmc.png"))


def _atomic_write_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def resolve_path(path, workdir):
    """Config paths may say `{workdir}` (e.g. the demo's generated dataset)."""
    return path.replace("{workdir}", os.path.abspath(workdir)) if path else path


def _load_dataset(config, split, workdir):
    root = resolve_path(config.data.root, workdir)
    split_file = resolve_path(config.data.split_file, workdir) or None
    if config.data.synthetic_ids:
        if jax.process_index() == 0 and not os.path.isdir(root):
            say(f"generating a synthetic {config.data.layout} set ({config.data.synthetic_ids} "
                f"ids) in {root}")
            synthetic.generate(config.data.layout, root, ids=config.data.synthetic_ids,
                               seed=config.seed)
        # every process, whatever it saw: one that found the folder half-written must wait too
        multihost_utils.sync_global_devices("synthetic dataset")
    dataset = data_lib.load_dataset(
        config.data.layout, root, split=split, split_file=split_file,
        skip_corrupt=config.data.skip_corrupt)
    expected = config.data.num_cameras
    if expected and dataset.num_cameras != expected:
        raise ConfigError(
            f"config.data.num_cameras={expected} but {root!r} ({config.data.layout}) has "
            f"{dataset.num_cameras} cameras with training tracklets")
    for path, reason in dataset.skipped:
        say(f"skipped {path}: {reason}")
    return dataset


def build_model(config, head):
    """The model of `head` with the config's backbone settings (one part for DAL)."""
    return models.build_model(
        config.model.backbone, head, n_part=1 if head == "dal" else config.model.n_part,
        depth_multiplier=config.model.depth_multiplier,
        dtype=jnp.dtype(config.model.dtype), train_relation=config.model.train_relation,
        bn_decay=config.model.bn_decay)


def schedule_lengths(config, num_frames):
    """Steps per epoch, the cross-association start and the decay step as the originals."""
    per_epoch = num_frames / config.train.batch_size
    cross_start = math.floor(num_frames / config.train.batch_size) * config.train.warm_up_epochs
    return per_epoch, int(cross_start)


def _make_optimizer(config, steps_per_epoch):
    return optim.make_optimizer(
        config.train.optimizer, learning_rate=config.train.learning_rate,
        learning_rate_2=config.train.learning_rate_2, steps_per_epoch=steps_per_epoch,
        total_steps=config.train.steps, decay_rate=config.train.lr_decay_rate,
        decay_epochs=config.train.lr_decay_epochs)


class Trainer:
    """Everything one model's training needs, built once: model, optimizer, state, step."""

    def __init__(self, config, dataset, head, mesh):
        self.config = config
        self.mesh = mesh
        self.model = build_model(config, head)
        table = dataset.train
        self.table = table
        self.num_frames = len(table.path)
        steps_per_epoch, self.cross_start = schedule_lengths(config, self.num_frames)
        self.tx, self.schedule = _make_optimizer(config, steps_per_epoch)
        size = config.data.image_size
        self.image_shape = (size, size // 2)
        feature_shape = jax.eval_shape(
            lambda: self.model.init_with_output(
                jax.random.PRNGKey(0), jnp.zeros((1, *self.image_shape, 3)), train=False)[0])
        _, num_parts, dim = feature_shape.shape
        memory = AnchorMemory.zeros(table.tracklets_per_camera, num_parts, dim)
        self.state = train_lib.create_train_state(
            self.model, jax.random.PRNGKey(config.seed), image_shape=self.image_shape,
            tx=self.tx, memory=memory, mesh=mesh, pretrained=config.model.pretrained or None)
        self.step_fn = train_lib.make_train_step(
            self.model, self.tx, self.schedule, mesh=mesh, margin=config.train.margin,
            eta=config.train.eta, weight_decay=config.train.weight_decay,
            clip=config.train.clip, ema_decay=config.train.ema_decay,
            cross_start_step=self.cross_start, frozen_scopes=self.model.frozen_scopes)
        self.resident = None
        if config.data.resident:
            self.resident = data_lib.load_resident(table, size, mesh)

    def batches(self, start_step):
        """Yields the batch of each step from `start_step` on (a function of seed and step)."""
        config = self.config
        if self.resident is None:
            yield from data_lib.TrainInput(
                self.table, global_batch=config.train.batch_size,
                image_size=config.data.image_size, seed=config.seed,
                mesh=self.mesh).iterate(start_step)
            return
        yield from data_lib.resident_batches(
            self.num_frames, global_batch=config.train.batch_size, seed=config.seed,
            mesh=self.mesh, start_step=start_step)

    def step(self, batch):
        if self.resident is None:
            self.state, metrics = self.step_fn(self.state, batch)
        else:
            self.state, metrics = self.step_fn(self.state, batch, self.resident)
        return metrics


def train_model(config, dataset, model_run, mesh):
    """Trains (or resumes) one model until `config.train.steps`, checkpointing as it goes."""
    os.makedirs(model_run.directory, exist_ok=True)
    trainer = Trainer(config, dataset, model_run.head, mesh)
    checkpoints = checkpoint_lib.Checkpoints(model_run.directory,
                                             keep=config.train.keep_checkpoints)
    start = checkpoints.latest_step()
    if start is not None:
        trainer.state = checkpoints.restore(checkpoint_lib.abstract_like(trainer.state))
        say(f"resuming {model_run.directory} from its checkpoint at step {start}")
    else:
        start = 0
        if config.train.anchor_init == "features":
            trainer.state = _init_anchors_from_features(config, dataset, trainer, mesh)
    if start >= config.train.steps:
        checkpoints.close()
        return
    writer = metrics_writer.MetricsWriter(model_run.directory)
    try:
        _train_loop(config, trainer, checkpoints, writer, start, model_run)
    finally:
        checkpoints.wait()
        checkpoints.close()
        writer.close()


def _train_loop(config, trainer, checkpoints, writer, start, model_run):
    total = config.train.steps
    pending = []   # (step, device metrics) not yet checked on the host
    bar = tqdm.tqdm(total=total, initial=start, desc=f"split {model_run.split} {model_run.name}",
                    unit="step", disable=jax.process_index() != 0, dynamic_ncols=True)
    last_time, last_step = time.perf_counter(), start
    for step, batch in zip(range(start, total), trainer.batches(start)):
        pending.append((step, trainer.step(batch)))
        done = step + 1
        save = done % config.train.checkpoint_every == 0 or done == total
        if done % config.train.log_every == 0 or save:
            host = _check_finite(jax.device_get(pending))
            pending = []
            now = time.perf_counter()
            rate = (done - last_step) / max(now - last_time, 1e-9)
            last_time, last_step = now, done
            scalars = dict(host[-1][1], steps_per_sec=rate,
                           frames_per_sec=rate * config.train.batch_size)
            writer.write(done, scalars)
            bar.set_postfix(loss=f"{scalars['loss']:.4f}", steps_s=f"{rate:.2f}",
                            frames_s=f"{rate * config.train.batch_size:.0f}")
            bar.update(done - bar.n)
        if save:
            checkpoints.save(done, trainer.state)
    bar.close()


def _check_finite(host_metrics):
    """Raises on the first step whose loss is NaN or inf (before anything is saved)."""
    for step, metrics in host_metrics:
        if not np.isfinite(metrics["loss"]):
            raise TrainingDiverged(
                f"loss is {metrics['loss']} at step {step + 1}; stopping. The last checkpoint "
                "written before this step is intact; lower the learning rate or check the data")
    return host_metrics


def _init_anchors_from_features(config, dataset, trainer, mesh):
    """Anchors initialised from a first pass of the initial network over the train frames."""
    variables = {"params": train_lib.merge_params(trainer.state.params,
                                                  trainer.state.frozen_params),
                 "batch_stats": trainer.state.batch_stats}
    feats = extract_lib.extract_frame_features(
        trainer.model, variables, dataset.train, mesh=mesh, batch_size=config.eval.batch_size,
        image_size=config.data.image_size)
    memory = AnchorMemory.from_features(
        trainer.state.memory, feats, dataset.train.track, dataset.train.camera)
    return trainer.state.replace(memory=jax.device_put(memory, sharding.replicated(mesh)))


def _inference_model(config, model_run, mesh):
    """The model and its EMA inference variables restored from the latest checkpoint."""
    model = build_model(config, model_run.head)
    size = config.data.image_size
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size // 2, 3)),
                           train=False))
    replicated = sharding.replicated(mesh)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
    trained, frozen = train_lib.split_frozen(abstract["params"], model.frozen_scopes)
    target = {"ema_params": trained, "frozen_params": frozen,
              "batch_stats": abstract.get("batch_stats", {})}
    checkpoints = checkpoint_lib.Checkpoints(model_run.directory, read_only=True)
    try:
        restored = checkpoints.restore_inference(target)
    finally:
        checkpoints.close()
    return model, extract_lib.inference_variables(restored)


def extract_model(config, dataset, model_run, mesh):
    """Writes `<model dir>/features.npz` (and `.mat` files on request) from the checkpoint."""
    model, variables = _inference_model(config, model_run, mesh)
    _write_model_features(config, dataset, model, variables, model_run.directory, "features",
                          mesh)


def initial_features(config, dataset, model_run, mesh):
    """Features of the untrained network (its initial weights), for the before/after table."""
    trainer_model = build_model(config, model_run.head)
    size = config.data.image_size
    variables = jax.jit(lambda rng: trainer_model.init(
        rng, jnp.zeros((1, size, size // 2, 3)), train=False))(jax.random.PRNGKey(config.seed))
    if config.model.pretrained:
        variables = models.load_pretrained(variables, config.model.pretrained)
    os.makedirs(model_run.directory, exist_ok=True)
    _write_model_features(config, dataset, trainer_model, variables, model_run.directory,
                          "initial_features", mesh)


def _write_model_features(config, dataset, model, variables, directory, stem, mesh):
    feats = extract_lib.extract_frame_features(
        model, variables, dataset.test, mesh=mesh,
        batch_size=config.eval.batch_size, image_size=config.data.image_size)
    arrays = extract_lib.features_arrays(feats, dataset, pooling=config.eval.pooling,
                                         frame_level=True)
    path = os.path.join(directory, f"{stem}.npz")
    extract_lib.write_features(path, arrays)
    if config.eval.save_mat and stem == "features":
        extract_lib.write_mat(os.path.join(directory, "mat"), feats, dataset,
                              config.data.layout)
    multihost_utils.sync_global_devices(f"{stem} written")  # evaluate_split reads it


def evaluate_split(config, dataset, runs, split_dir, stem="features"):
    """Fuses the split's models' features (per part, along D) and evaluates them."""
    loaded = [evaluation.load_features(os.path.join(r.directory, f"{stem}.npz")) for r in runs]
    frame_feat = np.concatenate([np.asarray(f["frame_feat"]) for f in loaded], axis=-1)
    arrays = extract_lib.features_arrays(frame_feat, dataset, pooling=config.eval.pooling,
                                         frame_level=config.eval.frame_features)
    path = os.path.join(split_dir, f"{stem}.npz")
    extract_lib.write_features(path, arrays)
    multihost_utils.sync_global_devices(f"fused {stem} written")  # process 0 wrote it, all read it
    return evaluation.evaluate(evaluation.load_features(path), distance=config.eval.distance,
                               ap="both")


def summarize(per_split):
    """Per-split results plus their mean (ranks and mAP of both AP modes)."""
    return dict(per_split, mean=evaluation.mean_results(list(per_split.values())))


def load_config_json(path):
    """A config written by `run` (DIR/config.json), for tools that re-open a workdir."""
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(json.load(f))
