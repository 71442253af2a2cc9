"""Pictures: CMC curves (matplotlib, Agg canvas) and rank-list montages (Pillow)."""
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from upm_jax.evaluation.distances import pairwise_distances
from upm_jax.evaluation.features import validate_features
from upm_jax.files import atomic_write
from upm_jax.evaluation.pooling import tracklet_features
from upm_jax.evaluation.rerank import k_reciprocal_distances

GOOD_RGB = (0, 170, 0)
BAD_RGB = (210, 0, 0)
QUERY_RGB = (40, 90, 220)


def plot_cmc(curves, out_png, *, max_rank=50, title="CMC"):
    """Write one PNG with a CMC curve (percent per rank) for each name -> cmc in `curves`."""
    if not curves:
        raise ValueError("plot_cmc: no curves given")
    fig = Figure(figsize=(6, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, cmc in curves.items():
        cmc = np.asarray(cmc, dtype=np.float64)[:max_rank]
        ax.plot(np.arange(1, cmc.shape[0] + 1), cmc, marker=".", label=f"{name} (R1 {cmc[0]:.1f})")
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_write(out_png, lambda f: fig.savefig(f, format="png"))


def rank_lists(features, query_positions, *, k=10, distance="euclidean", mode="paper",
               rerank=False, pooling=None, source=""):
    """Top-k ranked gallery tracklets of chosen queries, as the metric sees them.

    `query_positions` index the `query` array. Junk entries (and, in standard mode, the
    gallery entries that are queries) are left out. `source` (the file) prefixes errors.
    Returns a list of
    (query_tracklet, gallery_tracklets [<=k], is_match bool [<=k]).
    """
    if mode not in ("paper", "standard"):
        raise ValueError(f"mode must be 'paper' or 'standard', got {mode!r}")
    validate_features(features, source=source, check_values=False)
    query = np.asarray(features["query"]).astype(np.int64)
    gallery = np.asarray(features["gallery"]).astype(np.int64)
    positions = np.asarray(query_positions, dtype=np.int64).reshape(-1)
    if positions.size == 0 or positions.min() < 0 or positions.max() >= query.shape[0]:
        where = f"{source}: " if source else ""
        raise ValueError(f"{where}query positions must lie in [0, {query.shape[0]}) (the length "
                         f"of 'query'), got {positions.tolist()}")
    pid, cam = np.asarray(features["pid"]), np.asarray(features["cam"])
    feat = tracklet_features(features, pooling=pooling, source=source)
    if rerank:
        dist = k_reciprocal_distances(feat, query, gallery, distance=distance)[positions]
    else:
        dist = pairwise_distances(feat[query[positions]], feat[gallery], distance=distance,
                                  squared=True)
    out = []
    for row, q in zip(dist, query[positions]):
        order = gallery[np.argsort(row, kind="stable")]
        same = pid[order] == pid[q]
        junk = (pid[order] == -1) | (same & (cam[order] == cam[q]))
        if mode == "standard":
            junk |= np.isin(order, query)
        order, same = order[~junk][:k], same[~junk][:k]
        out.append((int(q), order, same))
    return out


def _thumb(path, size, rgb):
    """The image at `path` resized to `size` (w, h) inside a 3-pixel frame of colour `rgb`."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize(size, Image.BILINEAR)
    except OSError as e:
        raise ValueError(f"montage: cannot read image {path!r} ({e})") from None
    framed = Image.new("RGB", (size[0] + 6, size[1] + 6), rgb)
    framed.paste(im, (3, 3))
    return framed


# What the montage's marks mean, drawn above its rows.
MONTAGE_KEY = (("query", QUERY_RGB), ("same person as the query", GOOD_RGB),
               ("another person", BAD_RGB))
MONTAGE_LABELS = ("labels: query T = the query's tracklet T; R: T = rank R, gallery tracklet T "
                  "(tracklet numbers of the features file)")


def _draw_key(draw, y, line_h):
    """The montage's key: a swatch per frame colour on one line, the labels on the next."""
    x = 2
    for text, rgb in MONTAGE_KEY:
        draw.rectangle((x, y + 1, x + line_h - 3, y + line_h - 3), outline=rgb, width=3)
        x += line_h + 2
        draw.text((x, y), text, fill="black")
        x += int(draw.textlength(text)) + 14
    draw.text((2, y + line_h), MONTAGE_LABELS, fill="black")
    return max(x, 4 + int(draw.textlength(MONTAGE_LABELS)))


def plot_montage(paths, ranked, out_png, *, size=(64, 128)):
    """Write a rank-list montage PNG: per row the query (blue frame) then its top-k gallery
    tracklets framed green (same person) or red, each labelled `rank: tracklet`, under a
    key saying so. `paths[t]` is a representative image of tracklet t; `ranked` is the
    output of `rank_lists`."""
    if not ranked:
        raise ValueError("plot_montage: no rank lists given")
    k = max(len(r[1]) for r in ranked)
    cell_w, cell_h, label_h = size[0] + 10, size[1] + 10, 14
    key_h = 2 * label_h + 6
    key_w = _draw_key(ImageDraw.Draw(Image.new("RGB", (1, 1))), 0, label_h)
    canvas = Image.new("RGB", (max(cell_w * (k + 1) + 8, key_w),
                               key_h + (cell_h + label_h) * len(ranked)), "white")
    draw = ImageDraw.Draw(canvas)
    _draw_key(draw, 2, label_h)
    for i, (q, gal, match) in enumerate(ranked):
        for t in [q, *gal.tolist()]:
            if not 0 <= t < len(paths):
                raise ValueError(f"montage: tracklet {t} has no path (paths has {len(paths)} lines)")
        y = key_h + i * (cell_h + label_h)
        draw.text((2, y), f"query {q}", fill="black")
        canvas.paste(_thumb(paths[q], size, QUERY_RGB), (2, y + label_h))
        for j, (t, ok) in enumerate(zip(gal.tolist(), match.tolist())):
            x = cell_w * (j + 1) + 8
            draw.text((x, y), f"{j + 1}: {t}", fill="black")
            canvas.paste(_thumb(paths[t], size, GOOD_RGB if ok else BAD_RGB), (x, y + label_h))
    atomic_write(out_png, lambda f: canvas.save(f, format="PNG"))
