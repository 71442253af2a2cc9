"""What a config asks for: its methods' models, its splits, and the checks that refuse a
config no run can use (early, naming the field) before anything is built."""
import dataclasses
import difflib
import math
import os

import jax.numpy as jnp

from upm_jax import data as data_lib
from upm_jax import models
from upm_jax.data import person_splits

# method -> the models it trains, as (sub-folder, head).
METHODS = {
    "dal": (("dal", "dal"),),
    "upm_local": (("lam", "local"),),
    "upm_global": (("gam", "global"),),
    "upm": (("lam", "local"), ("gam", "global")),
}
# sub-folder -> head, for code that starts from a model folder.
HEAD_OF_FOLDER = {name: head for runs in METHODS.values() for name, head in runs}


class ConfigError(ValueError):
    """A config field with a value that cannot work; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ModelRun:
    """One model to train on one split, in its own folder."""
    split: int
    name: str
    head: str
    directory: str


def model_runs(config, workdir, split):
    """The models of `config.method` on `split`, each in DIR/split_K/<name>."""
    return [ModelRun(split, name, head, os.path.join(workdir, f"split_{split}", name))
            for name, head in METHODS[config.method]]


def _flat_fields(config, prefix=""):
    out = set()
    for key, value in config.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            out |= _flat_fields(value, name + ".")
        else:
            out.add(name)
    return out


def load_config_file(spec):
    """The ConfigDict of "FILE[:ARG]" (a configs/ file's get_config(ARG)), as --config reads
    it; for tools that take a config without absl's flags."""
    import importlib.util  # noqa: PLC0415

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file (the configs are in configs/)")
    module_spec = importlib.util.spec_from_file_location("upm_jax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def check_known_fields(config):
    """Refuses fields the project does not define (a typo would otherwise be ignored)."""
    from configs import base  # noqa: PLC0415  (the repository's config package)

    known = _flat_fields(base.get_base_config())
    unknown = sorted(_flat_fields(config) - known)
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1)
            hints.append(f"config.{name}" + (f" (did you mean config.{close[0]}?)" if close
                                             else ""))
        raise ConfigError(f"unknown config field(s): {', '.join(hints)}; every field is listed"
                          " with a comment in configs/base.py")


def _positive(config, *fields):
    for field in fields:
        section, name = field.split(".")
        value = config[section][name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"config.{field}={value!r}: expected a number above 0")


def check_config(config, *, num_devices):
    """Fails early, naming the field, on values no run can use."""
    check_known_fields(config)
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
    _positive(config, "train.steps", "train.batch_size", "train.checkpoint_every",
              "train.log_every", "train.keep_checkpoints", "model.n_part",
              "model.depth_multiplier")
    if config.train.divergence_factor < 0:
        raise ConfigError(f"config.train.divergence_factor={config.train.divergence_factor}: "
                          "expected 0 (off) or a multiple above 1, e.g. 100")
    if 0 < config.train.divergence_factor <= 1:
        raise ConfigError(f"config.train.divergence_factor={config.train.divergence_factor}: "
                          "a multiple of the running median loss must be above 1 (0 = off)")
    if config.data.image_size < 32 or config.data.image_size % 2:
        raise ConfigError(f"config.data.image_size={config.data.image_size}: expected an even "
                          "size of at least 32")
    if config.train.batch_size % num_devices:
        raise ConfigError(f"config.train.batch_size={config.train.batch_size} must be divisible"
                          f" by the {num_devices} devices in use")
    batch = config.eval.batch_size
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ConfigError(f"config.eval.batch_size={batch!r}: expected 0 (chosen per backend) "
                          "or a positive batch size")
    if config.eval.batch_size % num_devices:
        raise ConfigError(f"config.eval.batch_size={config.eval.batch_size} must be divisible"
                          f" by the {num_devices} devices in use")
    if not config.data.root:
        raise ConfigError("config.data.root is empty: set it to the raw dataset folder, e.g. "
                          "--config.data.root=/data/prid_2011")
    data_lib.check_split_spec(config.data.splits, field="config.data.splits")


def check_weights(config):
    """The ImageNet weights file a new training run starts from (not needed to resume,
    extract or evaluate)."""
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


def splits(config, workdir, *, recorded_first=False):
    """The 1-based splits to run and where they come from (a line to print).

    Resolved against the raw folder (`data.resolve_splits`). With `recorded_first`
    (extraction, evaluation), the split folders a run already left in `workdir` come first,
    so these stages work on a machine that holds only the test frames, or no dataset at all.
    """
    field = "config.data.splits"
    recorded = recorded_splits(workdir) if recorded_first else []
    if recorded:
        spec = person_splits.parse_spec(config.data.splits, field)
        wanted = recorded if spec.numbers is None else list(spec.numbers)
        missing = [n for n in wanted if n not in recorded]
        if missing:
            raise ConfigError(f"{field}={config.data.splits!r}: split(s) {missing} have no "
                              f"folder in {workdir!r}; it holds splits {recorded} (train them "
                              "first with --mode train or all)")
        return wanted, f"the split folders recorded in {workdir}"
    plan = data_lib.resolve_splits(config.data.layout, config.data.root, config.data.splits,
                                   config.data.split_file or None, field=field)
    return plan.numbers, plan.protocol


def recorded_splits(workdir):
    """Split numbers K with a DIR/split_K folder, sorted."""
    if not os.path.isdir(workdir):
        return []
    found = [name[len("split_"):] for name in os.listdir(workdir) if name.startswith("split_")]
    return sorted(int(k) for k in found if k.isdigit())


# Extraction batch per backend when config.eval.batch_size is 0 (per device on CPU).
ACCELERATOR_EXTRACTION_BATCH = 256


def extraction_batch(config, mesh):
    """The global extraction batch: config.eval.batch_size, or for 0 one frame per device
    on CPU (fastest there, see configs/base.py) and 256 frames on accelerators."""
    if config.eval.batch_size:
        return config.eval.batch_size
    if mesh.devices.flat[0].platform == "cpu":
        return mesh.size
    return max(ACCELERATOR_EXTRACTION_BATCH // mesh.size, 1) * mesh.size


def num_parts(config, head):
    """Parts P of a head's features: one for DAL, config.model.n_part otherwise."""
    return 1 if head == "dal" else config.model.n_part


def image_shape(config):
    """(H, W) of the model's input frames."""
    return config.data.image_size, config.data.image_size // 2


def build_model(config, head):
    """The model of `head` with the config's backbone settings (one part for DAL)."""
    return models.build_model(
        config.model.backbone, head, n_part=num_parts(config, head),
        depth_multiplier=config.model.depth_multiplier,
        dtype=jnp.dtype(config.model.dtype), train_relation=config.model.train_relation,
        bn_decay=config.model.bn_decay)


def schedule_lengths(config, num_frames):
    """Steps per epoch and the cross-association start step, as the originals."""
    per_epoch = num_frames / config.train.batch_size
    cross_start = math.floor(num_frames / config.train.batch_size) * config.train.warm_up_epochs
    return per_epoch, int(cross_start)
