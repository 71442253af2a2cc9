"""Where a split of a run is evaluated and the run summarised: the split's models'
per-frame features fused per part (uPMnet: LAM and GAM concatenated along D) and
evaluated, the per-split results averaged, written (results.json, cmc.png) and printed.

NumPy only, like the rest of `upm_jax.evaluation`: it needs the features files, nothing
that trained them.
"""
import json
import os

from upm_jax.evaluation.features import FeaturesError, load_features
from upm_jax.evaluation.fusion import fuse_features
from upm_jax.evaluation.metrics import evaluate, mean_results
from upm_jax.evaluation.plots import plot_cmc
from upm_jax.files import atomic_write

_COLUMNS = ("rank1", "rank5", "rank10", "rank20", "mAP")


def _check_model_features(path, num_parts):
    """A model's features file: present, per frame, with the run's part count."""
    if not os.path.isfile(path):
        raise FeaturesError(f"no features file {path}: extract first (--mode extract or all)")
    features = load_features(path)
    if "frame_feat" not in features:
        raise FeaturesError(f"{path}: expected per-frame features (frame_feat), as "
                            "--mode extract writes them")
    parts = features["frame_feat"].shape[1]
    if parts != num_parts:
        raise FeaturesError(
            f"{path} holds features of {parts} parts, but the run's config has {num_parts} "
            "for this model (config.model.n_part; DAL has 1); extract again (--mode extract) "
            "or use the workdir's own config")


def evaluate_split(model_features, out_path, *, num_parts, frame_level, pooling, distance):
    """Fuses the models' per-frame features files `model_features` (per part, along D,
    chunk by chunk) into `out_path` and returns its results in both AP modes.

    `frame_level`: keep per-frame features in `out_path` (else tracklet-pooled, for
    MARS-size sets); `pooling`: max | mean over a tracklet's frames; `distance`:
    euclidean | cosine.
    """
    for path in model_features:
        _check_model_features(path, num_parts)
    fuse_features(list(model_features), out_path, frame_level=frame_level, pooling=pooling,
                  num_parts=num_parts)
    return evaluate(load_features(out_path), distance=distance, ap="both", source=out_path)


def summarize(per_split):
    """Per-split results plus their mean (ranks and mAP of both AP modes)."""
    return dict(per_split, mean=mean_results(list(per_split.values())))


def write_summary(summary, results_path, plot_path):
    """results.json at `results_path` and the mean CMC curve (paper mode; the untrained
    network's too when present) at `plot_path`."""
    text = json.dumps(summary, indent=2)
    atomic_write(results_path, lambda f: f.write(text), mode="w")
    curves = {"trained": summary["mean"]["paper"]["cmc"]}
    if "initial" in summary:
        curves["initial"] = summary["initial"]["mean"]["paper"]["cmc"]
    plot_cmc(curves, plot_path)


def _rows(summary, prefix=""):
    for name, result in summary.items():
        if name == "initial":
            continue
        for mode in ("paper", "standard"):
            values = [result[mode][c] for c in _COLUMNS]
            yield f"{prefix}{name}", mode, values


def format_results(summary):
    """The run's printed table: Rank-k and mAP (both AP modes) in percent, per split and
    mean, before and after training when the untrained network was evaluated too."""
    header = f"{'':<22}{'AP mode':<10}" + "".join(f"{c:>9}" for c in _COLUMNS)
    lines = [header, "-" * len(header)]
    sections = [("", summary)]
    if "initial" in summary:
        sections = [("initial ", summary["initial"]), ("trained ", summary)]
    for prefix, part in sections:
        for name, mode, values in _rows(part, prefix):
            lines.append(f"{name:<22}{mode:<10}" + "".join(f"{v:>9.2f}" for v in values))
    if "initial" in summary:
        before, after = summary["initial"]["mean"]["paper"], summary["mean"]["paper"]
        lines.append("")
        lines.append(f"training changed Rank-1 by {after['rank1'] - before['rank1']:+.2f} points "
                     f"and mAP by {after['mAP'] - before['mAP']:+.2f} points (paper mode)")
    return "\n".join(lines)
