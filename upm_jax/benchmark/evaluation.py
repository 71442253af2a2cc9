"""MARS-size benchmark of the evaluator: time and peak memory of each stage.

`python -m upm_jax.evaluation.benchmark [--quick] [--json OUT]` runs every case in a fresh
subprocess (so its peak RSS, ru_maxrss, is its own) on synthetic data shaped like the
MARS test set: 12,180 tracklets in 6 cameras, 1,980 queries (one per person and camera),
625 identities, 3,248 distractors (pid 0) and 870 junk tracklets (pid -1).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np

from upm_jax.evaluation.features import atomic_write, load_features, save_features
from upm_jax.evaluation.metrics import evaluate
from upm_jax.evaluation.pooling import pool_tracklets

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
    normalised by the §7 rule; `signal` sets the difficulty.
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


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _prepare_evaluate(parts, dim, workdir):
    """Write the pooled MARS-size features file the evaluate case reads."""
    save_features(os.path.join(workdir, "mars.npz"), **synthetic_mars(parts=parts, dim=dim))


def _case_evaluate(parts, dim, workdir, repeats=5):
    """End to end from a pooled features file (load + both AP modes) and the query-gallery
    product alone, measured alternately `repeats` times; the time besides the product is
    the median of the paired differences (robust to load changing between pairs)."""
    path = os.path.join(workdir, "mars.npz")
    times, cpu, products, peak = [], [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        arrays = load_features(path)
        result = evaluate(arrays, ap="both")
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        peak = peak or _peak_rss_mb()  # before the product below allocates anything
        feat = np.asarray(arrays["track_feat"], dtype=np.float32).reshape(MARS_TRACKLETS, -1)
        q, g = feat[arrays["query"]], feat  # the synthetic gallery is every tracklet, in order
        t1 = time.perf_counter()
        q @ g.T
        products.append(time.perf_counter() - t1)
        del arrays, feat, q, g
    return {"case": f"evaluate {parts}x{dim}", "seconds_end_to_end_first": times[0],
            "seconds_end_to_end_best": min(times), "seconds_distance_product_best": min(products),
            "seconds_besides_product_median": float(np.median(np.subtract(times, products))),
            "seconds_besides_product_best": min(times) - min(products),
            "cpu_seconds_end_to_end_best": min(cpu), "peak_rss_mb": peak,
            "paper": {k: result["paper"][k] for k in ("rank1", "mAP")},
            "standard": {k: result["standard"][k] for k in ("rank1", "mAP", "mINP")}}


def _prepare_pooling(parts, dim, workdir, frames=MARS_FRAMES):
    """Write a per-frame features file of `frames` random frames in MARS-like tracklets."""
    rng = np.random.default_rng(1)
    lengths = 1 + rng.multinomial(frames - MARS_TRACKLETS, np.full(MARS_TRACKLETS, 1.0 / MARS_TRACKLETS))
    track = np.repeat(np.arange(MARS_TRACKLETS, dtype=np.int32), lengths)
    src = os.path.join(workdir, "frames_src.npy")
    mm = np.lib.format.open_memmap(src, mode="w+", dtype=np.float32, shape=(frames, parts, dim))
    for a in range(0, frames, 32768):
        b = min(frames, a + 32768)
        mm[a:b] = rng.standard_normal((b - a, parts, dim), dtype=np.float32)
    mm.flush()
    del mm
    save_features(os.path.join(workdir, "frames.npz"), frame_feat=np.load(src, mmap_mode="r"),
                  frame_track=track, pid=np.ones(MARS_TRACKLETS, np.int32),
                  cam=np.ones(MARS_TRACKLETS, np.int32), query=np.arange(1, dtype=np.int32),
                  gallery=np.arange(MARS_TRACKLETS, dtype=np.int32))
    os.unlink(src)


def _case_pooling(parts, dim, workdir):
    """Streaming max-pooling of the per-frame features, memory-mapped from the file."""
    path = os.path.join(workdir, "frames.npz")
    tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    arrays = load_features(path)
    pooled = pool_tracklets(arrays["frame_feat"], arrays["frame_track"], MARS_TRACKLETS)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    traced = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return {"case": f"pooling {arrays['frame_feat'].shape[0]} frames {parts}x{dim}",
            "seconds": seconds, "cpu_seconds": cpu, "file_gb": os.path.getsize(path) / 2**30,
            "peak_traced_mb": traced, "peak_rss_mb": _peak_rss_mb(),
            "pooled_shape": list(pooled.shape)}


def _prepare_rerank(parts, dim, workdir):
    _prepare_evaluate(parts, dim, workdir)


def _case_rerank(parts, dim, workdir):
    """k-reciprocal re-ranking at MARS size, then both AP modes on the re-ranked distances."""
    t0, c0 = time.perf_counter(), time.process_time()
    result = evaluate(load_features(os.path.join(workdir, "mars.npz")), ap="both", rerank=True)
    return {"case": f"rerank {parts}x{dim}", "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0,
            "peak_rss_mb": _peak_rss_mb(),
            "paper": {k: result["paper"][k] for k in ("rank1", "mAP")},
            "standard": {k: result["standard"][k] for k in ("rank1", "mAP", "mINP")}}


_CASES = {"evaluate": (_prepare_evaluate, _case_evaluate),
          "pooling": (_prepare_pooling, _case_pooling),
          "rerank": (_prepare_rerank, _case_rerank)}


def _subprocess(name, step, parts, dim, workdir):
    """Run step 0 (prepare) or 1 (measure) of a case in a fresh interpreter; its stdout JSON."""
    code = ("import json, sys; from upm_jax.evaluation import benchmark as b\n"
            f"print(json.dumps(b._CASES[{name!r}][{step}]({parts}, {dim}, {workdir!r})))\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark case {name} {parts}x{dim} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_case(name, parts, dim):
    """Prepare a case's input in one subprocess, measure it in a second (own peak RSS)."""
    with tempfile.TemporaryDirectory() as workdir:
        _subprocess(name, 0, parts, dim, workdir)
        return _subprocess(name, 1, parts, dim, workdir)


def mars_size_benchmark(*, evaluate_sizes=((1, 1024), (8, 1280)), pooling_size=(1, 1024),
                        rerank_sizes=((1, 1024), (8, 1280)), verbose=True):
    """Run every case in its own subprocess; returns a list of JSON-able records."""
    records = []
    jobs = ([("evaluate", p, d) for p, d in evaluate_sizes]
            + ([("pooling", *pooling_size)] if pooling_size else [])
            + [("rerank", p, d) for p, d in rerank_sizes])
    for name, p, d in jobs:
        load = os.getloadavg()[0]
        rec = _run_case(name, p, d)
        rec["load_average_1min_before"] = load
        records.append(rec)
        if verbose:
            print(json.dumps(rec), flush=True)
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m upm_jax.evaluation.benchmark",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="DAL-size evaluate and rerank only")
    parser.add_argument("--json", help="write the records to this file")
    args = parser.parse_args(argv)
    if args.quick:
        records = mars_size_benchmark(evaluate_sizes=((1, 1024),), pooling_size=None,
                                      rerank_sizes=((1, 1024),))
    else:
        records = mars_size_benchmark()
    if args.json:
        atomic_write(args.json, lambda f: json.dump(records, f, indent=1), mode="w")


if __name__ == "__main__":
    main()
