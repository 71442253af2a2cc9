"""Run the ORIGINAL DAL or uPMnet TF1 training graph step by step and record its whole state.

The original code (a checkout of yanbeic/Deep-Association-Learning or deropty/uPMnet with
only its imports moved to ``tensorflow.compat.v1`` / ``tf_slim``, as docs/faithfulness.md
says how) is third-party: this script runs it and never
copies it. Its own ``train()`` builds the graph; run-time patches only replace what a
side-by-side run cannot use:

* ``utils.prepare_data`` (TFRecord queues) returns placeholders fed here: images float32
  [B, H, H/2, 3] in [-1, 1], labels and cams int64 [B], 1-based, as the queues produced;
* ``tf.train.start_queue_runners`` raises, stopping ``train()`` after it has initialised
  its session; the session and ops are then read from ``train()``'s frame;
* ``datasets.tracket_num.get_tracket_num`` returns the tracklets per camera given here;
* the MobileNet builder gets ``--depth-multiplier`` and its arg scope ``--bn-decay``;
* ``tf.Graph`` is seeded, so the random initial variables are reproducible;
* (uPMnet) the ``nPart`` flag it assigns at import is defined first, and
  ``tf.train.Saver.restore`` (its unconditional ImageNet restore) is a no-op.

Each step is then the original loop's body, ``sess.run([train_op, anchors_op, loss])``,
with the regularisation terms fetched alongside so the association loss can be told apart.

Used by ``tools/compare_tf1.py`` and ``tools/learning_parity.py`` in a subprocess (the two
originals share module and flag names, so one process can hold only one of them). Input
``--batches``: an .npz with a frame table and the rows of each step's batch: frames uint8
[N, H, W, 3], track / camera int64 [N] (0-based), index int64 [S, B] and cross_on bool [S];
the image fed is frames / 127.5 - 1 in float32, as upm_jax's step computes it.
Output in ``--out``: ``init.npz`` (every global variable before step 1, by name),
``step_N.npz`` after each recorded step N, ``losses.npz`` (per-step association loss,
weight decay of the layers upm_jax has, weight decay of the unused classifier).
With ``--restart-from DIR`` only the recorded steps N run, each from DIR's state after N - 1
steps (``init.npz`` for N = 1), and ``losses.npz`` holds one entry per recorded step: how
compare_tf1 takes one step anywhere along a trajectory.
"""
import argparse
import functools
import importlib
import os
import sys

import numpy as np

METHODS = {"dal": ("dal", "train_dal"), "upm_local": ("upmnet", "train"),
           "upm_global": ("upmnet", "train")}
CLASSIFIER = "Conv2d_1c_1x1"  # the ImageNet-style classifier the originals build but never train


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--original", required=True, help="folder holding dal/ and upmnet/")
    p.add_argument("--method", choices=sorted(METHODS), required=True)
    p.add_argument("--batches", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--record", default="1", help="comma-separated steps after which to save")
    p.add_argument("--tracklets", required=True, help="tracklets per camera, e.g. 6,5")
    p.add_argument("--frames", type=int, required=True, help="num_samples (lr decay interval)")
    p.add_argument("--n-part", type=int, default=2)
    p.add_argument("--depth-multiplier", type=float, default=0.25)
    p.add_argument("--bn-decay", type=float, default=0.9997)
    p.add_argument("--lr", type=float, default=0.045)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default="", help="init.npz to load instead of the seeded init")
    p.add_argument("--restart-from", default="",
                   help="a folder of states (init.npz, step_N.npz): run only the --record steps, "
                        "each from that folder's state after the step before it")
    p.add_argument("--anchors", choices=["zeros", "random"], default="zeros",
                   help="random: anchors start N(0, 1) (seeded), as if after a first pass, so the "
                        "first step's association gradient is not identically zero")
    return p.parse_args(argv)


def _tf1():
    """tensorflow.compat.v1 in graph mode, with tf_keras' legacy layers where TF looks for them."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:  # TF >= 2.16 lazily imports tf.compat.v1.layers from a path tf_keras moved under src/
        legacy = importlib.import_module("tf_keras.src.legacy_tf_layers")
        sys.modules.setdefault("tf_keras.legacy_tf_layers", legacy)
        sys.modules.setdefault("tf_keras.legacy_tf_layers.normalization",
                               importlib.import_module("tf_keras.src.legacy_tf_layers.normalization"))
    except ImportError:
        pass
    import tensorflow.compat.v1 as tf
    tf.disable_v2_behavior()
    tf.logging.set_verbosity(tf.logging.ERROR)
    return tf


class _Built(Exception):
    """Raised in place of start_queue_runners: the graph and session are ready."""


def build(args, batch, height):
    """(tf, sess, fetches, placeholders) of the original graph, built by its own train()."""
    folder, module_name = METHODS[args.method]
    sys.path.insert(0, os.path.join(os.path.abspath(args.original), folder))
    tf = _tf1()
    import tf_slim as slim

    tracklets = [int(n) for n in args.tracklets.split(",")]
    flags = ["--batch_size=%d" % batch, "--image_size=%d" % height, "--dataset_name=PRID2011",
             "--num_cams=%d" % len(tracklets), "--num_classes=%d" % sum(tracklets),
             "--num_samples=%d" % args.frames, "--optimizer=rmsprop", "--model_name=mobilenet_v1",
             "--num_gpus=1", "--initial_learning_rate=%r" % args.lr,
             "--train_dir=" + os.path.join(args.out, "train_dir"),
             "--pretrained_model_checkpoint_path="]
    if args.method == "dal":
        flags += ["--feature_dim=%d" % max(int(1024 * args.depth_multiplier), 8)]
    else:
        relation = "local" if args.method == "upm_local" else "global"
        dim = max(int(1024 * args.depth_multiplier), 8) if relation == "local" else 256
        flags += ["--n_part=%d" % args.n_part, "--relation=" + relation,
                  "--feature_name=AvgPool_", "--feature_dim=%d" % dim, "--tb=false"]
        tf.app.flags.DEFINE_integer("nPart", 0, "defined here: uPMnet's train.py assigns it")
    sys.argv = [sys.argv[0]] + flags
    train_module = importlib.import_module(module_name)
    tf.app.flags.FLAGS(sys.argv)
    utils = importlib.import_module("utils")
    tracket_num = importlib.import_module("datasets.tracket_num")
    nets_factory = importlib.import_module("nets.nets_factory")

    name = "mobilenet_v1" if args.method == "dal" else "mobilenet_v1_uPMnet"
    nets_factory.networks_map[name] = functools.partial(
        nets_factory.networks_map[name], depth_multiplier=args.depth_multiplier)
    base_scope = nets_factory.arg_scopes_map[name]

    def arg_scope(**kwargs):
        with slim.arg_scope(base_scope(**kwargs)):
            with slim.arg_scope([slim.batch_norm], decay=args.bn_decay) as scope:
                return scope

    nets_factory.arg_scopes_map[name] = arg_scope
    tracket_num.get_tracket_num = lambda dataset_name: list(tracklets)

    width = height // 2
    ph = {}

    def prepare_data(split):
        ph["images"] = tf.placeholder(tf.float32, [batch, height, width, 3], name="images")
        ph["labels"] = tf.placeholder(tf.int64, [batch], name="labels")
        ph["cams"] = tf.placeholder(tf.int64, [batch], name="cams")
        return ph["images"], ph["labels"], ph["cams"]

    def stop(*unused, **unused_kw):
        raise _Built()

    seed = args.seed

    class SeededGraph(tf.Graph):
        def __init__(self):
            super().__init__()
            self.seed = seed

    utils.prepare_data = prepare_data
    train_module.utils.prepare_data = prepare_data
    tf.train.start_queue_runners = stop
    tf.Graph = SeededGraph
    if folder == "upmnet":
        tf.train.Saver.restore = lambda self, sess, path: None
    try:
        train_module.train()
        raise SystemExit("the original train() returned without reaching start_queue_runners")
    except _Built:
        tb = sys.exc_info()[2]
        while tb.tb_frame.f_code.co_name != "train":
            tb = tb.tb_next
        scope = tb.tb_frame.f_locals
    sess = scope["sess"]
    ph["start_sign"] = scope["start_sign_placeholder"]
    with sess.graph.as_default():
        regs = tf.get_collection(tf.GraphKeys.REGULARIZATION_LOSSES)
        variables = tf.global_variables()
    fetches = {"train_op": scope["train_op"], "anchors_op": scope["anchors_op"],
               "loss": scope["loss"],
               "shared_decay": [r for r in regs if CLASSIFIER not in r.name],
               "classifier_decay": [r for r in regs if CLASSIFIER in r.name]}
    return tf, sess, fetches, ph, variables


def _values(sess, variables):
    return {v.op.name: value for v, value in zip(variables, sess.run(variables))}


def _load(sess, variables, path):
    values = np.load(path)
    missing = [v.op.name for v in variables if v.op.name not in values]
    if missing:
        raise SystemExit("%s: no value for %d variables of the graph, e.g. %s" % (path, len(missing), missing[0]))
    for v in variables:
        v.load(values[v.op.name], sess)


def _save(path, arrays):
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


class Batches:
    """Step s's (images float32 [B, H, W, 3], track, camera) from the --batches table."""

    def __init__(self, path):
        data = np.load(path)
        self.frames, self.index, self.cross_on = data["frames"], data["index"], data["cross_on"]
        self.track, self.camera = data["track"], data["camera"]
        self.shape = self.index.shape + self.frames.shape[1:2]

    def __getitem__(self, s):
        rows = self.index[s]
        image = self.frames[rows].astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        return image, self.track[rows], self.camera[rows]


def main(argv=None):
    args = parse_args(argv)
    data = Batches(args.batches)
    steps, batch, height = data.shape
    record = sorted({int(s) for s in args.record.split(",")})
    if record[-1] > steps:
        raise SystemExit(f"--record {record[-1]} > the {steps} batches in {args.batches}")
    os.makedirs(args.out, exist_ok=True)
    tf, sess, fetches, ph, variables = build(args, int(batch), int(height))
    if args.init:
        _load(sess, variables, args.init)
    elif args.anchors == "random":
        rng = np.random.default_rng(args.seed)
        for v in variables:
            if "_anchors" in v.op.name:
                v.load(rng.standard_normal(v.shape.as_list()).astype(np.float32), sess)
    _save(os.path.join(args.out, "init.npz"), _values(sess, variables))
    losses = {"association": [], "shared_decay": [], "classifier_decay": []}
    for s in ([r - 1 for r in record] if args.restart_from else range(steps)):
        if args.restart_from:
            _load(sess, variables, os.path.join(
                args.restart_from, "step_%d.npz" % s if s else "init.npz"))
        image, track, camera = data[s]
        feed = {ph["images"]: image, ph["labels"]: track + 1, ph["cams"]: camera + 1,
                ph["start_sign"]: bool(data.cross_on[s])}
        out = sess.run(fetches, feed_dict=feed)
        shared, classifier = float(sum(out["shared_decay"])), float(sum(out["classifier_decay"]))
        losses["association"].append(float(out["loss"]) - shared - classifier)
        losses["shared_decay"].append(shared)
        losses["classifier_decay"].append(classifier)
        if s + 1 in record:
            _save(os.path.join(args.out, "step_%d.npz" % (s + 1)), _values(sess, variables))
    _save(os.path.join(args.out, "losses.npz"), {k: np.asarray(v, np.float64) for k, v in losses.items()})
    print("tf1_original: %s, %d steps, tf %s, TF_ENABLE_ONEDNN_OPTS=%s" % (
        args.method, steps, tf.__version__, os.environ.get("TF_ENABLE_ONEDNN_OPTS", "(default)")))


if __name__ == "__main__":
    main()
