"""Learning parity: upm_jax and the ORIGINAL TF1 graph trained side by side, then evaluated.

    python tools/learning_parity.py [--config configs/demo.py] [--seeds 0,1,2,3,4]
        [--synthetic-seeds 0] [--kernel-gap] [--json parity.json]

For each generated set (config.data.synthetic_seed) and run seed (config.seed): the
original graph (``tools/tf1_original.py``, docs/faithfulness.md) creates its seeded
initial variables, upm_jax's trainer of the config takes all of them (as
``tools/compare_tf1.py`` loads them), and both train config.train.steps steps on the same
batches: upm_jax's own rows of each step (``data.batch_indices``) of the resident training
frames, and the same cross-camera start. Each final state, and the common initial one, is
then extracted and evaluated by upm_jax's own code (EMA weights, split 1's test set). With
``--kernel-gap`` the original trains a second time with its plain Eigen CPU kernels
(TF_ENABLE_ONEDNN_OPTS=0): how far the outcome moves from rounding alone.

A long trajectory cannot be held to float tolerance (see compare_tf1: rounding grows by
order 1 within 10 steps), so what is compared is the outcome: Rank-1 and mAP per run, their
mean and spread over seeds, and the paired differences of upm_jax against each original and
of the two originals against each other, with paired t-tests. Exit status 0 unless a run fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import compare_tf1  # the sibling tool: original names <-> TrainState

# training settings the original takes from its own flag defaults (the base config's values)
ORIGINAL_FIXED = ("margin", "eta", "weight_decay", "clip", "ema_decay", "lr_decay_rate",
                  "lr_decay_epochs", "warm_up_epochs", "anchor_init")
# the trajectories compared, in table order
SIDES = ("initial", "original", "upm_jax", "original_eigen")
# paired differences reported: upm_jax against each original, and the originals' own
PAIRS = (("upm_jax", "original"), ("upm_jax", "original_eigen"), ("original_eigen", "original"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.py"),
                   help="a config file with a synthetic dataset (data.synthetic_ids > 0)")
    p.add_argument("--seeds", default="0,1,2,3,4", help="run seeds (config.seed), comma-separated")
    p.add_argument("--synthetic-seeds", default="0",
                   help="generated sets (config.data.synthetic_seed), comma-separated")
    p.add_argument("--steps", type=int, default=0, help="training steps (default: the config's)")
    p.add_argument("--synthetic-ids", type=int, default=0, help="default: the config's")
    p.add_argument("--image-size", type=int, default=0, help="default: the config's")
    p.add_argument("--batch", type=int, default=0, help="default: the config's")
    p.add_argument("--kernel-gap", action="store_true",
                   help="also train the original with its Eigen kernels (TF_ENABLE_ONEDNN_OPTS=0)")
    p.add_argument("--original", default=compare_tf1.default_original(),
                   help="the shimmed original code (folder holding dal/ and upmnet/)")
    p.add_argument("--workdir", default="",
                   help="keep the generated sets, batches and features here (default: a temporary folder)")
    p.add_argument("--json", default="", help="write every run's results here")
    args = p.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
        args.synthetic_seeds = [int(s) for s in args.synthetic_seeds.split(",")]
    except ValueError as e:
        p.error(f"--seeds and --synthetic-seeds take comma-separated integers: {e}")
    if min(args.seeds + args.synthetic_seeds) < 0:
        p.error("--seeds and --synthetic-seeds must be >= 0")
    if not os.path.isdir(os.path.join(args.original, "dal")):
        p.error(f"--original {args.original}: no dal/ folder there; expected the original DAL "
                f"and uPMnet code as dal/ and upmnet/, its imports moved to tensorflow.compat.v1 / "
                f"tf_slim (docs/faithfulness.md, 'The original code, for the comparisons'); pass "
                f"--original DIR or set UPM_TF1_ORIGINAL")
    return args


def load_config(args, seed, synthetic_seed, root):
    """The config file's ConfigDict with the run's seeds, sizes and dataset folder."""
    from upm_jax import config as config_lib

    config = config_lib.load_config_file(args.config)
    if config.method not in compare_tf1.METHODS:
        raise SystemExit(f"--config {args.config}: method {config.method!r} trains more than one "
                         f"model; learning parity takes one of {compare_tf1.METHODS}")
    if not (args.synthetic_ids or config.data.synthetic_ids):
        raise SystemExit(f"--config {args.config}: data.synthetic_ids is 0; this tool trains on a "
                         "generated set (give --synthetic-ids)")
    if config.model.backbone != "mobilenet_v1" or config.train.optimizer != "rmsprop":
        raise SystemExit(f"--config {args.config}: the original graph is run with MobileNet v1 and "
                         "RMSProp; the config asks for "
                         f"{config.model.backbone} / {config.train.optimizer}")
    fixed = config_lib.get_base_config().train
    changed = [f"train.{k}={config.train[k]!r} (the original's {fixed[k]!r})" for k in ORIGINAL_FIXED
               if config.train[k] != fixed[k]]
    if changed:
        raise SystemExit(f"--config {args.config}: the original graph runs with its own flag values; "
                         f"the config changes {', '.join(changed)}")
    config.seed = seed
    config.data.synthetic_seed = synthetic_seed
    config.data.root = os.path.join(root, "synthetic")
    config.data.split_file = os.path.join(config.data.root, f"{config.data.layout}_splits.json")
    config.data.splits = "1"
    config.data.resident = True
    config.model.pretrained = ""
    for field, value in (("train.steps", args.steps), ("data.synthetic_ids", args.synthetic_ids),
                         ("data.image_size", args.image_size), ("train.batch_size", args.batch)):
        if value:
            section, name = field.split(".")
            config[section][name] = value
    return config


def prepare_split(config, workdir):
    """(dataset, trainer, model run) of split 1 of the config's generated set."""
    import jax

    from upm_jax import config as config_lib
    from upm_jax import data as data_lib
    from upm_jax import parallel
    from upm_jax.data import synthetic
    from upm_jax.training import trainer as trainer_lib
    from upm_jax.workdir import Workdir

    if not os.path.isdir(config.data.root):
        synthetic.generate(config.data.layout, config.data.root, ids=config.data.synthetic_ids,
                           seed=config.data.synthetic_seed)
    config_lib.check_config(config, num_devices=1)
    dataset = data_lib.load_dataset(config.data.layout, config.data.root, split=1,
                                    split_file=config.data.split_file, splits="1")
    mesh = parallel.make_mesh(jax.devices()[:1])
    (model_dir,) = Workdir(workdir).split(1).models(config.method)
    trainer = trainer_lib.make_trainer(config, model_dir.head, dataset.train, mesh,
                                       load_weights=False)
    trainer.load_resident()
    return dataset, trainer, model_dir


def write_batches(config, trainer, path):
    """The original's input: the resident frames, their ids and every step's rows."""
    from upm_jax import data as data_lib

    resident = {k: np.asarray(v) for k, v in trainer.resident.items()}
    steps, batch = config.train.steps, config.train.batch_size
    index = np.stack([data_lib.batch_indices(config.seed, s, trainer.num_frames, batch)
                      for s in range(steps)])
    np.savez(path, frames=resident["image"], track=resident["track"].astype(np.int64),
             camera=resident["camera"].astype(np.int64), index=index,
             cross_on=np.arange(steps) >= trainer.cross_start)


def run_original(args, config, trainer, batches, out, *, onednn, init=""):
    """The original trained on `batches`: (initial variables, final variables, losses)."""
    settings = argparse.Namespace(
        original=args.original, steps=[config.train.steps],
        tracklets=tuple(trainer.table.tracklets_per_camera), frames=trainer.num_frames,
        n_part=config.model.n_part, depth_multiplier=config.model.depth_multiplier,
        bn_decay=config.model.bn_decay, lr=config.train.learning_rate, seed=config.seed,
        anchors="zeros")
    init_values, states, losses = compare_tf1.run_original(
        settings, config.method, batches, out, onednn=onednn, init=init)
    return init_values, states[config.train.steps], losses


def train_ours(config, trainer):
    """upm_jax's trainer over its own batches from the loaded state: per-step losses."""
    import jax

    metrics = [trainer.step(batch)
               for _, batch in zip(range(config.train.steps), trainer.batches(0))]
    return np.asarray([float(m["loss"]) for m in jax.device_get(metrics)])


def evaluate_state(config, trainer, state, dataset, model_dir, stem):
    """Rank-1 and mAP (paper mode) of a TrainState's EMA weights on split 1's test set."""
    from upm_jax import extract as extract_lib
    from upm_jax import methods
    from upm_jax.evaluation import summary
    from upm_jax.workdir import SplitDir

    variables = extract_lib.inference_variables(
        {"ema_params": state.ema_params, "frozen_params": state.frozen_params,
         "batch_stats": state.batch_stats})
    os.makedirs(model_dir.path, exist_ok=True)
    extract_lib.write_model_features(config, dataset, trainer.model, variables, model_dir, stem,
                                     trainer.mesh)
    results = summary.evaluate_split(
        [model_dir.features(stem)],
        SplitDir(os.path.dirname(model_dir.path), model_dir.split).features(stem),
        num_parts=methods.num_parts(config, model_dir.head),
        frame_level=config.eval.frame_features, pooling=config.eval.pooling,
        distance=config.eval.distance)["paper"]
    return {"rank1": float(results["rank1"]), "mAP": float(results["mAP"])}


def one_run(args, seed, synthetic_seed, root):
    """Every side's Rank-1 / mAP and final loss for one (set, seed)."""
    workdir = os.path.join(root, f"set{synthetic_seed}_seed{seed}")
    config = load_config(args, seed, synthetic_seed, os.path.join(root, f"set{synthetic_seed}"))
    dataset, trainer, model_dir = prepare_split(config, workdir)
    batches = os.path.join(workdir, "batches.npz")
    os.makedirs(workdir, exist_ok=True)
    write_batches(config, trainer, batches)
    t0 = time.perf_counter()
    init_values, final, original_loss = run_original(
        args, config, trainer, batches, os.path.join(workdir, "original"), onednn="1")
    seconds = {"original": time.perf_counter() - t0}
    targets, _ = compare_tf1.map_original(
        init_values, method=config.method, n_part=config.model.n_part,
        tracklets=trainer.table.tracklets_per_camera,
        state_keys=compare_tf1.state_leaves(trainer.state))
    template = trainer.state

    def score(state, stem, losses=None):
        out = evaluate_state(config, trainer, state, dataset, model_dir, stem)
        if losses is not None:
            out.update(first_loss=float(losses[0]), final_loss=float(np.mean(losses[-50:])))
        return out

    trainer.state = compare_tf1.load_original(template, init_values, targets)
    row = {"synthetic_seed": synthetic_seed, "seed": seed, "frames": trainer.num_frames,
           "steps": config.train.steps, "cross_start": trainer.cross_start,
           "initial": score(trainer.state, "initial_features"),
           "original": score(compare_tf1.load_original(template, final, targets),
                             "original_features", original_loss)}
    t0 = time.perf_counter()
    our_loss = train_ours(config, trainer)
    seconds["upm_jax"] = time.perf_counter() - t0
    row["upm_jax"] = score(trainer.state, "features", our_loss)
    if args.kernel_gap:
        _, eigen, eigen_loss = run_original(
            args, config, trainer, batches, os.path.join(workdir, "original_eigen"), onednn="0",
            init=os.path.join(workdir, "original", "init.npz"))
        row["original_eigen"] = score(compare_tf1.load_original(template, eigen, targets),
                                      "original_eigen_features", eigen_loss)
    row["seconds"] = seconds
    return row


def summarize(rows):
    """Mean and sd of each side's Rank-1 / mAP, and the paired differences of PAIRS."""
    from scipy import stats

    sides = [s for s in SIDES if all(s in r for r in rows)]
    out = {}
    for metric in ("rank1", "mAP"):
        values = {s: np.asarray([r[s][metric] for r in rows]) for s in sides}
        entry = {s: {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
                 for s, v in values.items()}
        for s, ref in PAIRS:
            if s in values and ref in values:
                diff = values[s] - values[ref]
                test = stats.ttest_rel(values[s], values[ref]) if len(diff) > 1 else None
                entry[f"{s} - {ref}"] = {
                    "mean": float(diff.mean()),
                    "sd": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0,
                    "p_paired_t": (None if test is None or not np.isfinite(test.pvalue)
                                   else float(test.pvalue))}
        out[metric] = entry
    return out


def print_rows(rows, summary):
    sides = [s for s in SIDES if all(s in r for r in rows)]
    print("\nRank-1 / mAP (paper mode) per run, split 1 of each generated set")
    print(f"  {'set':>3} {'seed':>4} " + " ".join(f"{s:>17}" for s in sides))
    for r in rows:
        cells = [f"{r[s]['rank1']:6.2f} / {r[s]['mAP']:6.2f}" for s in sides]
        print(f"  {r['synthetic_seed']:>3} {r['seed']:>4} " + " ".join(f"{c:>17}" for c in cells))
    for metric, entry in summary.items():
        print(f"\n{metric}: " + ", ".join(
            f"{s} {v['mean']:.2f} +- {v['sd']:.2f}" for s, v in entry.items() if " - " not in s))
        for s, v in entry.items():
            if " - " in s:
                p = "n/a" if v["p_paired_t"] is None else f"{v['p_paired_t']:.2f}"
                print(f"  paired {s}: {v['mean']:+.2f} +- {v['sd']:.2f} (paired t-test p = {p})")


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    rows = []
    with tempfile.TemporaryDirectory(prefix="learning_parity_") as tmp:
        root = args.workdir or tmp
        for synthetic_seed in args.synthetic_seeds:
            for seed in args.seeds:
                row = one_run(args, seed, synthetic_seed, root)
                print(f"set {synthetic_seed} seed {seed}: " + ", ".join(
                    f"{s} Rank-1 {row[s]['rank1']:.2f}" for s in SIDES if s in row)
                    + f" [original {row['seconds']['original']:.0f} s, upm_jax "
                      f"{row['seconds']['upm_jax']:.0f} s]", flush=True)
                rows.append(row)
    summary = summarize(rows)
    print_rows(rows, summary)
    if args.json:
        from upm_jax.files import atomic_write
        report = json.dumps({"config": args.config, "runs": rows, "summary": summary}, indent=1)
        atomic_write(args.json, lambda f: f.write(report), mode="w")
    return 0


if __name__ == "__main__":
    sys.exit(main())
