"""Defaults shared by every experiment; dataset configs import this and override.

A config file's `get_config(arg)` receives the text after ':' in
`--config configs/prid.py:split=3,backbone=resnet_v1_50`; `apply_shortcuts` turns
those `key=value` pairs into overrides of the fields named in `SHORTCUTS`.
"""
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


def get_base_config():
    """The papers' common settings (design.md §5): uPMnet on MobileNet v1, batch 64, 256x128."""
    config = ml_collections.ConfigDict()
    # dal | upm_local | upm_global | upm (trains LAM and GAM, evaluates the fused features).
    config.method = "upm"
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.layout = ""            # prid2011 | ilidsvid | mars | dukev
    config.data.root = ""              # the raw dataset folder, exactly as distributed
    config.data.splits = "1"           # '3', '1,2,5', 'all' or 'random:SEED[:COUNT]' (PRID2011 / iLIDS-VID)
    config.data.split_file = ""        # our JSON, torchreid's list JSON or the iLIDS-VID .mat; '' = README order
    config.data.num_cameras = 0        # expected camera count, checked against the data (0 = any)
    config.data.image_size = 256       # frames are resized to (image_size, image_size // 2)
    config.data.resident = False       # keep the uint8 training frames on the accelerator
    config.data.skip_corrupt = False   # skip (and report) unreadable images instead of failing
    config.data.synthetic_ids = 0      # > 0: generate a synthetic set of this many ids if root is empty
    config.data.synthetic_seed = 0     # seed of that generated set (independent of config.seed)

    config.model = ml_collections.ConfigDict()
    config.model.backbone = "mobilenet_v1"   # mobilenet_v1 | resnet_v1_50
    config.model.depth_multiplier = 1.0      # MobileNet v1 only
    config.model.n_part = 8                  # stripes for upm_local / upm_global
    config.model.dtype = "float32"           # compute dtype: float32 | bfloat16
    config.model.train_relation = False      # False = the originals' frozen GAM relation layers
    # BatchNorm moving-average decay; None = slim's (MobileNet 0.9997, ResNet 0.997).
    config.model.bn_decay = ml_collections.config_dict.placeholder(float)
    config.model.pretrained = ""             # .npz written by tools/port_weights.py; '' = from scratch
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

    config.eval = ml_collections.ConfigDict()
    # Extraction batch (global); 0 = chosen per backend (experiment.extraction_batch): one
    # frame per device on CPU, where small batches are fastest (tools/bench_vs_tf1.py, 2-core
    # CPU, MobileNet v1 256x128: batch 1 / 8 / 32 / 64 / 256 give 320 / 257 / 225 / 226 /
    # 218 frames/s), 256 on GPU and TPU, where a large batch amortises each call (no
    # accelerator figure yet: see README, Performance).
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
