"""Which tracklets rank which, and how the rankings of one split are combined.

A features file's optional `directions` says it: "one" (default) ranks the gallery for
every query, as PRID2011 (cam_a -> cam_b), MARS and DukeMTMC-VideoReID do; "both" also
ranks the query set for every gallery tracklet and averages the two results, as uPMnet's
`CMC_iLIDS_VID.m` scores iLIDS-VID (cam1 -> cam2 and cam2 -> cam1).
"""
import numpy as np


def _name(cam, probes, candidates):
    """'cam1->cam2' when each side is one camera, else 'query->gallery' / 'gallery->query'."""
    p, c = np.unique(cam[probes]), np.unique(cam[candidates])
    if p.size == 1 and c.size == 1:
        return f"cam{p[0]}->cam{c[0]}"
    return None


def rankings(features):
    """[(name, probes, candidates)]: the ranking(s) one split is scored by."""
    query = np.asarray(features["query"]).astype(np.int64)
    gallery = np.asarray(features["gallery"]).astype(np.int64)
    if str(features.get("directions", "one")) == "one":
        return [(None, query, gallery)]
    cam = np.asarray(features["cam"]).astype(np.int64)
    return [(_name(cam, query, gallery) or "query->gallery", query, gallery),
            (_name(cam, gallery, query) or "gallery->query", gallery, query)]


def mean_metrics(per, exclude=()):
    """The mean of every number of the metrics dicts `per` (keys in `exclude` left out) and
    their CMC curves averaged over the common length."""
    mean = {k: float(np.mean([p[k] for p in per])) for k in per[0]
            if k not in ("cmc", *exclude)}
    length = min(len(p["cmc"]) for p in per)
    mean["cmc"] = [float(v) for v in np.mean([p["cmc"][:length] for p in per], axis=0)]
    return mean


def combine(runs):
    """One split's result from its rankings [(name, {mode: metrics})].

    One ranking: its result. Two: per mode, the mean of every number of the two (CMC
    curves over their common length), `num_queries` their sum, `gallery_size` the common
    curve length, and `directions` {name: metrics} holding each.
    """
    if len(runs) == 1:
        return runs[0][1]
    out = {}
    for mode in runs[0][1]:
        per = [r[mode] for _, r in runs]
        mean = mean_metrics(per, exclude=("num_queries", "gallery_size"))
        mean["num_queries"] = int(sum(p["num_queries"] for p in per))
        mean["gallery_size"] = len(mean["cmc"])
        mean["directions"] = {name: r[mode] for name, r in runs}
        out[mode] = mean
    return out
