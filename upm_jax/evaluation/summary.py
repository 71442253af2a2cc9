"""Evaluation of a split from its features files alone: the models' per-frame features
fused per part (LAM and GAM concatenated along D), evaluated, and the run's summary."""
import json
import os

from upm_jax import evaluation
from upm_jax.evaluation.features import atomic_write
from upm_jax.experiment import ConfigError, num_parts
from upm_jax.progress import say


def _check_model_features(config, model_run, stem):
    """The model's features file: present, per frame, with the run's part count."""
    path = os.path.join(model_run.directory, f"{stem}.npz")
    if not os.path.isfile(path):
        raise ConfigError(f"no features file {path}: extract first (--mode extract or all)")
    features = evaluation.load_features(path)
    if "frame_feat" not in features:
        raise evaluation.FeaturesError(f"{path}: expected per-frame features (frame_feat), as "
                                       "--mode extract writes them")
    parts = features["frame_feat"].shape[1]
    expected = num_parts(config, model_run.head)
    if parts != expected:
        raise ConfigError(
            f"{path} holds features of {parts} parts, but the run's config has "
            f"{expected} for its {model_run.name} model (config.model.n_part="
            f"{config.model.n_part}); extract again (--mode extract) or use the workdir's "
            "own config")
    return path


def evaluate_split(config, runs, split_dir, stem="features"):
    """Fuses the split's models' `<stem>.npz` (per part, along D, chunk by chunk), writes
    the evaluated file `split_dir/<stem>.npz` and returns its results."""
    inputs = [_check_model_features(config, r, stem) for r in runs]
    path = os.path.join(split_dir, f"{stem}.npz")
    evaluation.fuse_features(inputs, path, frame_level=config.eval.frame_features,
                             pooling=config.eval.pooling,
                             num_parts=num_parts(config, runs[0].head))
    results = evaluation.evaluate(evaluation.load_features(path),
                                  distance=config.eval.distance, ap="both", source=path)
    say(f"{os.path.basename(split_dir)}: evaluated {path} ({stem}): Rank-1 "
        f"{results['paper']['rank1']:.2f}, mAP {results['paper']['mAP']:.2f} (paper mode)")
    return results


def summarize(per_split):
    """Per-split results plus their mean (ranks and mAP of both AP modes)."""
    return dict(per_split, mean=evaluation.mean_results(list(per_split.values())))


def write_summary(workdir, summary):
    """DIR/results.json and DIR/cmc.png (the mean CMC, paper mode; the untrained
    network's too when present)."""
    path = os.path.join(workdir, "results.json")
    text = json.dumps(summary, indent=2)
    atomic_write(path, lambda f: f.write(text), mode="w")
    curves = {"trained": summary["mean"]["paper"]["cmc"]}
    if "initial" in summary:
        curves["initial"] = summary["initial"]["mean"]["paper"]["cmc"]
    plot = os.path.join(workdir, "cmc.png")
    evaluation.plot_cmc(curves, plot)
    say(f"wrote {path} and {plot}")
