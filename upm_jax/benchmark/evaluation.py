"""Evaluator at MARS size: time and peak memory of each stage (the `evaluate` section of
`python -m upm_jax.benchmark`).

Every case runs in a fresh subprocess (so its peak RSS, ru_maxrss, is its own) on
synthetic data shaped like the MARS test set (`upm_jax.evaluation.synthetic`): 12,180
tracklets in 6 cameras, 1,980 queries (one per person and camera), 625 identities, 3,248
distractors (pid 0) and 870 junk tracklets (pid -1).
"""
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np

from upm_jax.evaluation.features import load_features, save_features
from upm_jax.files import verify_npz
from upm_jax.evaluation.metrics import evaluate
from upm_jax.evaluation.pooling import pool_tracklets
from upm_jax.evaluation.synthetic import MARS_FRAMES, MARS_TRACKLETS, synthetic_mars


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _prepare_evaluate(parts, dim, workdir):
    """Write the pooled MARS-size features file the evaluate case reads."""
    save_features(os.path.join(workdir, "mars.npz"), **synthetic_mars(parts=parts, dim=dim))


def _crc_check(path):
    """Seconds of the CRC-32 check `load_features` runs once per file (a streaming read)."""
    t0 = time.perf_counter()
    verify_npz(path)
    return time.perf_counter() - t0


def _case_evaluate(parts, dim, workdir, repeats=5):
    """End to end from a pooled features file (load + both AP modes) and the query-gallery
    product alone, measured alternately `repeats` times; the time besides the product is
    the median of the paired differences (robust to load changing between pairs). The
    file's CRC-32 check, which runs once per file and process, is timed apart first."""
    path = os.path.join(workdir, "mars.npz")
    crc = _crc_check(path)
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
            "seconds_crc_check": crc, "file_gb": os.path.getsize(path) / 2**30,
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
    """Streaming max-pooling of the per-frame features, memory-mapped from the file (its
    CRC-32 check timed apart, first: the file is in the page cache, just written)."""
    path = os.path.join(workdir, "frames.npz")
    crc = _crc_check(path)
    tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    arrays = load_features(path)
    pooled = pool_tracklets(arrays["frame_feat"], arrays["frame_track"], MARS_TRACKLETS)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    traced = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return {"case": f"pooling {arrays['frame_feat'].shape[0]} frames {parts}x{dim}",
            "seconds": seconds, "cpu_seconds": cpu, "file_gb": os.path.getsize(path) / 2**30,
            "seconds_crc_check": crc,
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
    code = ("import json, sys; from upm_jax.benchmark import evaluation as b\n"
            f"print(json.dumps(b._CASES[{name!r}][{step}]({parts}, {dim}, {workdir!r})))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
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
