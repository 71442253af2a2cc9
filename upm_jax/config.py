"""The config schema every experiment starts from, how a config file is loaded, and the
checks that refuse a config no run can use (early, naming the field).

An experiment file (the repository's `configs/`, or a user's own anywhere) is plain
Python: `get_config(arg)` builds on `get_base_config()` and returns an
`ml_collections.ConfigDict`; `arg` is the text after ':' in
`--config configs/prid.py:split=3,backbone=resnet_v1_50`, which `apply_shortcuts` turns
into overrides of the fields named in `SHORTCUTS`.
"""
import difflib
import importlib.util
import os

import ml_collections

# Short names accepted after ':' on the command line -> full config paths.
SHORTCUTS = {
    "split": "data.splits",
    "splits": "data.splits",
    "root": "data.root",
    "backbone": "model.backbone",
    "weights": "model.pretrained",
    "dtype": "model.dtype",
    "method": "method",
    "steps": "train.steps",
    "batch": "train.batch_size",
    "seed": "seed",
}
DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("rmsprop", "sgd")
ANCHOR_INITS = ("zeros", "features")


class ConfigError(ValueError):
    """A config field with a value that cannot work; the message names the field."""


def get_base_config():
    """The papers' common settings: uPMnet on MobileNet v1, batch 64, 256x128 frames."""
    config = ml_collections.ConfigDict()
    # dal | upm_local | upm_global | upm (trains LAM and GAM, evaluates the fused features).
    config.method = "upm"
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.layout = ""            # prid2011 | ilidsvid | mars | dukev
    config.data.root = ""              # the raw dataset folder, exactly as distributed (source "raw")
    config.data.splits = "1"           # '3', '1,2,5', 'all' or 'random:SEED[:COUNT]' (PRID2011 / iLIDS-VID)
    config.data.split_file = ""        # our JSON, torchreid's list JSON or the iLIDS-VID .mat; '' = the shipped lists
    config.data.num_cameras = 0        # expected camera count, checked against the data (0 = any)
    config.data.image_size = 256       # frames are resized to (image_size, image_size // 2)
    config.data.resident = False       # keep the uint8 training frames on the accelerator
    # Where frames are read: "raw" decodes the image files under root; "prepared" reads the
    # set `python -m upm_jax.data prepare` wrote under data_dir (frames stored resized, with
    # its record of the release folder, from which the same readers build the protocol:
    # root is not read). Both give byte-identical batches.
    config.data.source = "raw"
    config.data.data_dir = ""          # the prepare command's --data-dir (a local folder)
    # grain worker processes reading batches (0 = threads of the training process;
    # -1 = chosen per host by upm_jax.data.pipeline.auto_workers)
    config.data.workers = -1
    config.data.prefetch = 2           # batches each reader reads ahead
    config.data.skip_corrupt = False   # skip (and report) unreadable images instead of failing
    config.data.synthetic_ids = 0      # > 0: generate a synthetic set of this many ids if root is absent (raw)
    config.data.synthetic_seed = 0     # seed of that generated set (independent of config.seed)

    config.model = ml_collections.ConfigDict()
    config.model.backbone = "mobilenet_v1"   # mobilenet_v1 | resnet_v1_50
    config.model.depth_multiplier = 1.0      # MobileNet v1 only
    config.model.n_part = 8                  # stripes for upm_local / upm_global
    config.model.dtype = "float32"           # compute dtype: float32 | bfloat16
    # Precision of float32 matrix products and convolutions on GPU/TPU: highest (float32, as
    # the CPU and the originals compute) | high | default (TPU: bfloat16 passes, GPU: TF32;
    # faster, different numbers): docs/training.md, "Precision".
    config.model.matmul_precision = "highest"
    config.model.train_relation = False      # False = the originals' frozen GAM relation layers
    # BatchNorm moving-average decay; None = slim's (MobileNet 0.9997, ResNet 0.997).
    config.model.bn_decay = ml_collections.config_dict.placeholder(float)
    config.model.pretrained = ""             # .npz written by python -m upm_jax.porting; '' = from scratch
    config.model.allow_scratch = False       # a paper config refuses to train without weights

    config.train = ml_collections.ConfigDict()
    config.train.steps = 20000
    config.train.batch_size = 64             # global batch, split over all devices
    config.train.optimizer = "rmsprop"       # rmsprop (TF1 semantics) | sgd (Nesterov, two pieces)
    config.train.learning_rate = 0.045
    config.train.learning_rate_2 = 0.0       # sgd: the rate after the halfway boundary
    config.train.lr_decay_rate = 0.94        # rmsprop: staircase decay ...
    config.train.lr_decay_epochs = 2.0       # ... every this many epochs
    config.train.warm_up_epochs = 2.0        # cross-camera association starts after these
    config.train.margin = 0.5
    config.train.eta = 0.5
    config.train.weight_decay = 4e-5
    config.train.clip = 2.0
    config.train.ema_decay = 0.9999
    config.train.anchor_init = "zeros"       # zeros | features (a first pass over the train frames)
    # Stop when a step's loss exceeds this multiple of the running median loss (0 = off).
    config.train.divergence_factor = 100.0
    config.train.checkpoint_every = 1000
    config.train.keep_checkpoints = 3
    config.train.log_every = 100
    # Splits trained side by side: groups of this many splits (of a benchmark whose splits
    # have the same training tracklet counts: PRID2011, iLIDS-VID) advance together in one
    # jitted step, each with its own frames, schedule and split_K/ folder, as if trained
    # alone (docs/training.md, "Splits side by side"); 1 = one after another. Needs
    # data.resident: the group's frames are resident once for all its splits.
    config.train.parallel_splits = 1

    config.eval = ml_collections.ConfigDict()
    # Extraction batch (global); 0 = chosen per backend (extract.extraction_batch): one
    # frame per device on CPU, where small batches are fastest (2-core CPU, MobileNet v1
    # 256x128: batch 1 / 8 / 32 / 64 / 256 give 320 / 257 / 225 / 226 / 218 frames/s),
    # 256 on GPU and TPU, where a large batch amortises each call.
    config.eval.batch_size = 0
    config.eval.pooling = "max"              # max | mean over a tracklet's frames
    config.eval.distance = "euclidean"       # euclidean | cosine
    config.eval.frame_features = True        # False: pool tracklets while extracting (MARS-size sets)
    config.eval.save_mat = False             # also write .mat files for the original MATLAB scripts
    config.eval.initial = False              # also evaluate the untrained network (the demo does)
    return config


def apply_shortcuts(config, arg):
    """Applies 'key=value,key=value' overrides given after ':' on the command line."""
    if not arg:
        return config
    for item in arg.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in SHORTCUTS:
            raise ValueError(f"config argument {item!r}: expected key=value with key one of "
                             f"{sorted(SHORTCUTS)}")
        *parents, leaf = SHORTCUTS[key].split(".")
        node = config
        for name in parents:
            node = node[name]
        current = node[leaf]
        try:
            if isinstance(current, bool):
                node[leaf] = value.strip().lower() in ("1", "true", "yes")
            else:
                node[leaf] = type(current)(value.strip())
        except ValueError as e:
            raise ValueError(f"config argument {key}={value!r}: expected a "
                             f"{type(current).__name__}") from e
    return config


def load_config_file(spec):
    """The ConfigDict of "FILE[:ARG]" (the file's get_config(ARG)), as --config reads it.

    Every way a file can fail to give a config (missing, a folder, a Python error in it,
    no get_config, get_config raising or returning something else) is a ConfigError
    naming the file and the problem; `--config` is checked with it before absl loads it.
    """
    path, _, arg = spec.partition(":")
    if os.path.isdir(path):
        raise ConfigError(f"--config {path}: is a folder; give an experiment file in it, e.g. "
                          f"{os.path.join(path, 'prid.py')}")
    if not os.path.isfile(path):
        hint = (f"; did you mean {path}.py?" if os.path.isfile(path + ".py") else
                " (the repository's experiment files are in its configs/ folder)")
        raise ConfigError(f"--config {path}: no such file{hint}")
    module_spec = importlib.util.spec_from_file_location("upm_jax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"--config {path}: line {e.lineno}: {e.msg}") from None
    except Exception as e:  # noqa: BLE001  (the user's file may raise anything)
        raise ConfigError(f"--config {path}: the file raised {_where(e, path)}") from None
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"--config {path}: defines no get_config(arg) function (an "
                          "experiment file returns its ConfigDict from get_config)")
    try:
        config = get_config(arg or None)
    except ValueError as e:   # apply_shortcuts: a bad 'key=value' after ':'
        raise ConfigError(f"--config {spec}: {e}") from None
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"--config {path}: get_config raised {_where(e, path)}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        got = "None" if config is None else f"a {type(config).__name__}"
        raise ConfigError(f"--config {path}: get_config returned {got}, "
                          "expected an ml_collections.ConfigDict (build it on "
                          "upm_jax.config.get_base_config() and return it)")
    return config


def _where(error, path):
    """'Type: message (line N)' of an exception raised by the config file `path`."""
    line = ""
    tb = error.__traceback__
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
            line = f" (line {tb.tb_lineno})"
        tb = tb.tb_next
    return f"{type(error).__name__}: {error}{line}"


def apply_overrides(config, overrides, *, source="--config"):
    """A copy of `config` with `overrides` [(field, text)] set, each text parsed as the
    field's current type ('data.root', '/mnt/prid' or 'train.steps', '100'), as the
    --config.FIELD=VALUE flags do; a ConfigError names an unknown field or a bad value."""
    config = ml_collections.ConfigDict(config.to_dict())
    for field, text in overrides:
        *parents, leaf = field.split(".")
        node = config
        try:
            for name in parents:
                node = node[name]
            current = node[leaf]
        except (KeyError, AttributeError, TypeError):
            raise ConfigError(f"{source}.{field}: unknown config field; every field is listed "
                              "with a comment in upm_jax/config.py") from None
        node[leaf] = _parse_value(f"{source}.{field}", text, current)
    return config


def _parse_value(flag, text, current):
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{flag}={text}: expected true or false")
    kind = type(current) if current is not None else float
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise ConfigError(f"{flag}={text}: expected a number ({kind.__name__})") from None
    return text


def flat_fields(config, prefix=""):
    """{'section.name', ...}: the leaf fields of a ConfigDict (or nested dict)."""
    out = set()
    for key, value in config.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            out |= flat_fields(value, name + ".")
        else:
            out.add(name)
    return out


def check_known_fields(config):
    """Refuses fields the project does not define (a typo would otherwise be ignored)."""
    known = flat_fields(get_base_config())
    unknown = sorted(flat_fields(config) - known)
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1)
            hints.append(f"config.{name}" + (f" (did you mean config.{close[0]}?)" if close
                                             else ""))
        raise ConfigError(f"unknown config field(s): {', '.join(hints)}; every field is listed"
                          " with a comment in upm_jax/config.py")


def _one_of(config, field, allowed):
    section, _, name = field.rpartition(".")
    value = config[section][name] if section else config[name]
    if value not in allowed:
        raise ConfigError(f"config.{field}={value!r}: expected one of {list(allowed)}")


def _positive(config, *fields):
    for field in fields:
        section, name = field.split(".")
        value = config[section][name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"config.{field}={value!r}: expected a number above 0")


def check_config(config, *, num_devices):
    """Fails early, naming the field, on values no run can use."""
    from upm_jax import data as data_lib  # noqa: PLC0415  (the readers; no JAX)
    from upm_jax import methods  # noqa: PLC0415  (imports the models, hence JAX)
    from upm_jax.data import pipeline  # noqa: PLC0415  (JAX)

    check_known_fields(config)
    _one_of(config, "method", sorted(methods.METHODS))
    _one_of(config, "model.backbone", sorted(methods.BACKBONES))
    _one_of(config, "model.dtype", DTYPES)
    _one_of(config, "model.matmul_precision", methods.MATMUL_PRECISIONS)
    _one_of(config, "train.optimizer", OPTIMIZERS)
    _one_of(config, "train.anchor_init", ANCHOR_INITS)
    _positive(config, "train.steps", "train.batch_size", "train.checkpoint_every",
              "train.log_every", "train.keep_checkpoints", "model.n_part",
              "model.depth_multiplier")
    parallel_splits = config.train.parallel_splits
    if (isinstance(parallel_splits, bool) or not isinstance(parallel_splits, int)
            or parallel_splits < 1):
        raise ConfigError(f"config.train.parallel_splits={parallel_splits!r}: expected the number "
                          "of splits trained side by side (1 = one after another)")
    if parallel_splits > 1 and not config.data.resident:
        raise ConfigError(f"config.train.parallel_splits={parallel_splits}: splits trained side by "
                          "side read their frames from the accelerator; set "
                          "config.data.resident=True (or parallel_splits=1)")
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
    _one_of(config, "data.source", pipeline.SOURCES)
    if config.data.source == "prepared":
        if not config.data.data_dir:
            raise ConfigError("config.data.source='prepared' needs config.data.data_dir: the "
                              "folder given to python -m upm_jax.data prepare --data-dir")
        if "://" in config.data.data_dir:
            raise ConfigError(f"config.data.data_dir={config.data.data_dir!r}: training reads "
                              "a prepared set by random access from local disk; copy it there "
                              "first (e.g. gcloud storage cp -r)")
    workers = config.data.workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < -1:
        raise ConfigError(f"config.data.workers={workers!r}: expected -1 (chosen per host), "
                          "0 (threads of the training process) or a number of processes")
    prefetch = config.data.prefetch
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
        raise ConfigError(f"config.data.prefetch={prefetch!r}: expected a number of batches "
                          ">= 1")
    if not config.data.root and config.data.source == "raw":
        raise ConfigError("config.data.root is empty: set it to the raw dataset folder, e.g. "
                          "--config.data.root=/data/prid_2011, or read a set prepared from it "
                          "(config.data.source='prepared', config.data.data_dir=DIR)")
    data_lib.check_split_spec(config.data.splits, field="config.data.splits")


def check_weights(config, *, initial_features):
    """The ImageNet weights file a new training run starts from (not needed to resume,
    extract or evaluate); with `initial_features` (the run extracts the untrained network's
    features when config.eval.initial) or anchors initialised from features, it must hold
    the BatchNorm moving statistics too."""
    pretrained = config.model.pretrained
    if pretrained and not os.path.isfile(pretrained):
        raise ConfigError(
            f"config.model.pretrained={pretrained!r}: no such file. Convert the TF-slim "
            "checkpoint first: python -m upm_jax.porting --from slim CKPT --out "
            f"{pretrained}, or set --config.model.pretrained='' "
            "--config.model.allow_scratch=True to train from scratch")
    if not pretrained and not config.model.allow_scratch:
        raise ConfigError("config.model.pretrained is empty: the papers start from ImageNet "
                          "weights; set it, or allow training from scratch with "
                          "--config.model.allow_scratch=True")
    inference = [f for f, on in (("config.eval.initial", initial_features and config.eval.initial),
                                 ("config.train.anchor_init='features'",
                                  config.train.anchor_init == "features")) if on]
    from upm_jax.porting import weights_file  # noqa: PLC0415  (NumPy only)
    if pretrained and inference and not weights_file.has_moving_stats(pretrained):
        raise ConfigError(
            f"config.model.pretrained={pretrained!r} holds no BatchNorm moving statistics (it "
            f"was ported by an earlier version), which {' and '.join(inference)} need to run "
            "the ImageNet network in inference mode; port the checkpoint again: python -m "
            f"upm_jax.porting --from slim CKPT --out {pretrained} (or turn those off)")
