"""Features shaped like a benchmark's test set, for the evaluator's tests, examples and
benchmarks (the real MARS features cannot be shipped)."""
import numpy as np

MARS_TRACKLETS = 12180
MARS_QUERIES = 1980
MARS_IDS = 625
MARS_DISTRACTORS = 3248
MARS_JUNK = 870
MARS_FRAMES = 681089
MARS_CAMERAS = 6


def synthetic_mars(*, parts=1, dim=1024, seed=0, tracklets=MARS_TRACKLETS, queries=MARS_QUERIES,
                   ids=MARS_IDS, distractors=MARS_DISTRACTORS, junk=MARS_JUNK,
                   cameras=MARS_CAMERAS, signal=1.8):
    """Pooled features dict shaped like the MARS test set (paper protocol: gallery = all).

    Each identity is seen in 2..cameras cameras (`queries` (person, camera) pairs in all),
    with one query per pair; feature = identity centre + camera offset + unit noise,
    normalised by the evaluation's pooling rule; `signal` sets the difficulty.
    """
    rng = np.random.default_rng(seed)
    labelled = tracklets - distractors - junk
    if not ids * 2 <= queries <= ids * cameras or labelled < queries:
        raise ValueError("synthetic_mars: inconsistent sizes")
    n_cams = np.full(ids, 2)
    for i in rng.choice(np.repeat(np.arange(ids), cameras - 2), queries - 2 * ids, replace=False):
        n_cams[i] += 1
    pair_pid = np.repeat(np.arange(1, ids + 1), n_cams)  # [queries]
    pair_cam = np.concatenate([rng.choice(cameras, n, replace=False) + 1 for n in n_cams])
    per_pair = 1 + rng.multinomial(labelled - queries, np.full(queries, 1.0 / queries))
    pid = np.concatenate([np.repeat(pair_pid, per_pair), np.zeros(distractors, np.int64),
                          np.full(junk, -1)]).astype(np.int32)
    cam = np.concatenate([np.repeat(pair_cam, per_pair),
                          rng.integers(1, cameras + 1, distractors + junk)]).astype(np.int32)
    query = (np.cumsum(per_pair) - per_pair + rng.integers(0, per_pair)).astype(np.int32)
    f = parts * dim
    # identity signal scaled by f ** -0.25 keeps the difficulty similar for any size
    centre = (signal * f ** -0.25) * rng.standard_normal((ids + 1, f), dtype=np.float32)
    offset = (0.5 * signal * f ** -0.25) * rng.standard_normal((cameras + 1, f), dtype=np.float32)
    feat = rng.standard_normal((tracklets, f), dtype=np.float32)
    labelled_rows = pid > 0
    feat[labelled_rows] += centre[pid[labelled_rows]]
    feat += offset[cam]
    feat = feat.reshape(tracklets, parts, dim)
    feat /= np.linalg.norm(feat, axis=2, keepdims=True) * np.sqrt(parts)
    feat = feat.reshape(tracklets, f)
    feat /= np.linalg.norm(feat, axis=1, keepdims=True)
    return {"track_feat": feat.reshape(tracklets, parts, dim), "pid": pid, "cam": cam,
            "query": query, "gallery": np.arange(tracklets, dtype=np.int32)}
