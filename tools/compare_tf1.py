"""One-step equivalence of upm_jax's training step with the ORIGINAL TF1 training graph.

    python tools/compare_tf1.py --steps 1,10,100 [--method dal|upm_local|upm_global] [--seeds 0,1,2]

For each method the original graph (run by ``tools/tf1_original.py`` in a subprocess, from
the original code prepared as docs/faithfulness.md says: ``--original`` or
$UPM_TF1_ORIGINAL) creates every initial variable: conv weights, BN
gamma/beta and moving statistics, RMSProp slots, EMA shadows, anchors. All of them are
loaded into upm_jax's TrainState (backbone names through ``upm_jax.porting.slim``'s rule
table), both sides take the same batches (uint8 frames, tracklet ids, cameras), and after
each listed step the whole state is compared: loss, trained params, frozen params (GAM
relation layers), both RMSProp slots, BN moving statistics, EMA, intra and cross anchors.

Difference of one array: max|ours - original| / max|original| (absolute where the original
is all zero); a group's difference is the largest over its arrays (the loss: over every
step so far). The original runs twice from the same initial variables, with its oneDNN CPU
kernels (TF_ENABLE_ONEDNN_OPTS=1, TF's default, the reference) and with its plain Eigen
kernels (=0); their difference is the original's own "kernel gap". A group passes when its
difference to the nearer of the two originals is within ``--tol`` or within
``--gap-factor`` times that gap (with several ``--seeds``: the medians over them); exit
status 0 only when every group of every method passes.

Why the gap and not a fixed tolerance for every group: TF's CPU fused batch norm computes
the training variance to only ~1e-5 (Eigen) / ~4e-5 (oneDNN) relative (ours: ~2e-7 against
float64), and a randomly initialised BN network amplifies such rounding layer by layer in
the forward pass and far more in the backward pass, so the two originals' gradients
already differ by tens of percent after one step. The loss, EMA, cross anchors and step
agree to 1e-5 after one step regardless (tests/test_compare_tf1.py holds them to it).
Anchors start at seeded N(0, 1) values by default (``--anchors zeros`` gives the
originals' zeros, with which the first step's association gradient is identically zero).

``--restart``: after a few steps each side's trajectory is chaotic (order-1 differences by
step 10, the original's against itself included), so a step-10 or step-100 comparison says
little about step 10 or 100 itself. With --restart every listed step N is a one-step
comparison anywhere along the trajectory: upm_jax and the Eigen original each take step N
from the oneDNN original's state after N - 1 steps (its learning-rate decay, EMA decay,
cross-camera phase and filled anchors), and what is compared is each array's increment
over that step, state_N - state_(N-1), by the same rule, disregarding elementwise
differences of one float32 ulp of the element: an increment is not known more finely than
the stored value, and the compiled EMA update rounds its last operation differently from
TF's in a few elements per thousand.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METHODS = ("dal", "upm_local", "upm_global")
HEADS = {"dal": "dal", "upm_local": "local", "upm_global": "global"}
GROUPS = ("loss", "params", "frozen params", "rms slot", "momentum slot", "bn moving stats",
          "ema", "intra anchors", "cross anchors", "step")
_SLOTS = {"RMSProp": "opt_state/nu", "RMSProp_1": "opt_state/trace",
          "ExponentialMovingAverage": "ema_params"}
# TF's momentum slot holds +lr * g / sqrt(ms + eps) and subtracts it; optax's trace follows
# scale_by_learning_rate, so it holds the negated value and is added.
_SIGN = {"opt_state/trace": -1.0}
_GROUP_OF_FIELD = {"params": "params", "frozen_params": "frozen params", "opt_state/nu": "rms slot",
                   "opt_state/trace": "momentum slot", "batch_stats": "bn moving stats",
                   "ema_params": "ema", "memory/intra": "intra anchors",
                   "memory/cross": "cross anchors", "step": "step", "opt_state/count": "step"}
ONEDNN = "TF_ENABLE_ONEDNN_OPTS"


def default_original() -> str:
    """$UPM_TF1_ORIGINAL, else ../shared/bench_tf1/orig/shimmed beside the clone (or beside
    a worktree's parent)."""
    if os.environ.get("UPM_TF1_ORIGINAL"):
        return os.environ["UPM_TF1_ORIGINAL"]
    for up in ("..", os.path.join("..", "..")):
        path = os.path.normpath(os.path.join(ROOT, up, "shared", "bench_tf1", "orig", "shimmed"))
        if os.path.isdir(path):
            return path
    return os.path.normpath(os.path.join(ROOT, "..", "shared", "bench_tf1", "orig", "shimmed"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", default="1,10,100", help="comma-separated steps after which to compare")
    p.add_argument("--method", choices=METHODS, action="append",
                   help="repeatable; default: all three")
    p.add_argument("--original", default=default_original(),
                   help="the shimmed original code (folder holding dal/ and upmnet/)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=128, help="height; width is half")
    p.add_argument("--tracklets", default="8,7", help="tracklets per camera")
    p.add_argument("--n-part", type=int, default=2)
    p.add_argument("--depth-multiplier", type=float, default=0.25)
    p.add_argument("--bn-decay", type=float, default=0.95)
    p.add_argument("--lr", type=float, default=0.15)
    p.add_argument("--frames", type=int, default=0,
                   help="frames per epoch for the lr decay (default: 4 steps' worth)")
    p.add_argument("--cross-start", type=int, default=2,
                   help="first step (0-based) with cross-camera association on")
    p.add_argument("--seeds", default="0",
                   help="comma-separated seeds (initial variables, batches, anchors); with several, "
                        "a group is judged on its median over them")
    p.add_argument("--anchors", choices=["random", "zeros"], default="random",
                   help="initial anchors: seeded N(0, 1) (default; from zeros, the first step's "
                        "association gradient is identically zero) or the originals' zeros")
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--gap-factor", type=float, default=2.0)
    p.add_argument("--no-kernel-gap", action="store_true",
                   help="skip the original's second run (steps > 1 are then held to --tol)")
    p.add_argument("--restart", action="store_true",
                   help="compare each listed step alone, from the original's state before it "
                        "(increments over the step; see the module docstring)")
    p.add_argument("--json", default="", help="write every measured difference here")
    args = p.parse_args(argv)
    try:
        args.steps = sorted({int(s) for s in args.steps.split(",")})
        args.seeds = [int(s) for s in args.seeds.split(",")]
        args.tracklets = tuple(int(n) for n in args.tracklets.split(","))
    except ValueError as e:
        p.error(f"--steps, --seeds and --tracklets take comma-separated integers: {e}")
    if args.steps[0] < 1 or min(args.tracklets) < 1 or len(args.tracklets) < 2:
        p.error("--steps must be >= 1; --tracklets needs >= 2 cameras with >= 1 tracklet each")
    if not os.path.isdir(os.path.join(args.original, "dal")):
        p.error(f"--original {args.original}: no dal/ folder there; expected the original DAL "
                f"and uPMnet code as dal/ and upmnet/, its imports moved to tensorflow.compat.v1 / "
                f"tf_slim (docs/faithfulness.md, 'The original code, for the comparisons'); pass "
                f"--original DIR or set UPM_TF1_ORIGINAL")
    args.method = args.method or list(METHODS)
    args.frames = args.frames or 4 * args.batch
    return args


def make_batches(args):
    """Step s's batch: uint8 frames [B, H, W, 3], tracklet ids and cameras (0-based), cross_on.

    Every tracklet has its own coarse colour layout (8x4 blocks) and each frame adds noise, so
    the features and batch statistics are those of distinct, non-centred images (pure noise
    would make every BN batch mean a near-cancellation and every tracklet alike).
    """
    rng = np.random.default_rng(args.seed)
    steps, b, h = args.steps[-1], args.batch, args.image_size
    w = h // 2
    camera = rng.integers(0, len(args.tracklets), (steps, b))
    track = (rng.random((steps, b)) * np.asarray(args.tracklets)[camera]).astype(np.int64)
    layouts = rng.integers(0, 256, (len(args.tracklets), max(args.tracklets), 8, 4, 3))
    coarse = layouts[camera, track]  # [S, B, 8, 4, 3]
    base = np.repeat(np.repeat(coarse, -(-h // 8), axis=2), -(-w // 4), axis=3)[:, :, :h, :w]
    noise = rng.integers(-40, 41, (steps, b, h, w, 3))
    return {"image": np.clip(base + noise, 0, 255).astype(np.uint8),
            "track": track, "camera": camera,
            "cross_on": np.arange(steps) >= args.cross_start}


# --- original names <-> TrainState paths --------------------------------------------------

def _gam_target(name: str, n_part: int):
    """Flax path under head/Logits of an original GAM relation variable, or None."""
    m = re.fullmatch(r"MobilenetV1/Logits/Relation_conv2d_(\d+)/(weights|biases)", name)
    if m:
        i = int(m[1])
        layer = "global" if i == n_part else f"part_{i}"
        return f"head/Logits/{layer}/{'kernel' if m[2] == 'weights' else 'bias'}"
    m = re.fullmatch(r"MobilenetV1/Logits/Relation_conv2d_relu_bn_(\d+)/(weights|BatchNorm/\w+)", name)
    if m:
        leaf = {"weights": "kernel", "BatchNorm/gamma": "BatchNorm/scale",
                "BatchNorm/beta": "BatchNorm/bias", "BatchNorm/moving_mean": "BatchNorm/mean",
                "BatchNorm/moving_variance": "BatchNorm/var"}[m[2]]
        return f"head/Logits/relation_{m[1]}/{leaf}"
    return None


def map_original(names, *, method: str, n_part: int, tracklets, state_keys):
    """(targets, skipped): original name -> (state key, part, rows or None); name -> why skipped.

    Backbone weights and BN gamma/beta go through ``upm_jax.porting.slim.plan`` (the project's
    port rules); moving statistics take their layer's gamma path with ``mean``/``var``; the
    slots ``/RMSProp``, ``/RMSProp_1`` and ``/ExponentialMovingAverage`` map to the optimizer
    state and EMA of their variable. A name that maps nowhere and is not a known unused
    variable is an error, and so is a TrainState leaf (other than rng) no name maps to.
    """
    from upm_jax.porting import slim

    offsets = np.concatenate([[0], np.cumsum(tracklets)[:-1]])
    base_names = {re.sub(r"/(RMSProp|RMSProp_1|ExponentialMovingAverage)$", "", n) for n in names}
    backbone = [n for n in base_names if n.startswith("MobilenetV1/") and "/Logits/" not in n]
    restore = slim.plan([n for n in backbone if not re.search(r"moving_(mean|variance)$", n)],
                        "mobilenet_v1").restore

    def param_path(base):
        m = re.fullmatch(r"(.+/BatchNorm)/moving_(mean|variance)", base)
        if m and "/Logits/" not in base:
            return restore[m[1] + "/gamma"].replace("/scale", "/mean" if m[2] == "mean" else "/var")
        return restore.get(base) or _gam_target(base, n_part)

    def field_of(path):  # params / frozen_params / batch_stats
        for field in ("params", "frozen_params", "batch_stats"):
            if f"{field}/{path}" in state_keys:
                return field
        return None

    targets, skipped = {}, {}
    for name in sorted(names):
        m = re.fullmatch(r"(intra|cross)_anchors(\d+)", name)
        if m:
            digits = m[2]
            part, cam = (0, int(digits)) if method == "dal" else (int(digits[:-1]), int(digits[-1]))
            rows = (int(offsets[cam]), int(offsets[cam] + tracklets[cam]))
            targets[name] = (f"memory/{m[1]}", part, rows)
            continue
        if name == "global_step":
            targets[name] = ("step", None, None)
            continue
        if "Conv2d_1c_1x1" in name:
            skipped[name] = "classifier the originals build but never train (absent in upm_jax)"
            continue
        if name.endswith("/avg"):
            skipped[name] = "moving average of the loss for TensorBoard"
            continue
        slot = re.fullmatch(r"(.+)/(RMSProp|RMSProp_1|ExponentialMovingAverage)", name)
        base = slot[1] if slot else name
        path = param_path(base)
        if path is None:
            raise ValueError(f"compare_tf1: original variable {name!r} maps to no upm_jax state")
        field = field_of(path)
        if field is None:
            raise ValueError(f"compare_tf1: original variable {name!r} -> {path!r}, which is in none "
                             f"of params / frozen_params / batch_stats of the TrainState")
        if slot:
            if field == "frozen_params":
                skipped[name] = "EMA of a frozen relation layer (constant; upm_jax uses the layer)"
                continue
            targets[name] = (f"{_SLOTS[slot[2]]}/{path}", None, None)
        else:
            targets[name] = (f"{field}/{path}", None, None)
    covered = {key for key, _, _ in targets.values()} | {"opt_state/count"}
    uncovered = sorted(k for k in state_keys if k not in covered and k != "rng")
    if uncovered:
        raise ValueError(f"compare_tf1: {len(uncovered)} TrainState leaves get no original value, "
                         f"e.g. {uncovered[:5]}")
    return targets, skipped


def _key(path) -> str:
    parts = []
    for k in path:
        if hasattr(k, "name"):
            parts.append(str(k.name))
        elif hasattr(k, "key"):
            parts.append(str(k.key))
    return "/".join(parts)


def state_leaves(state):
    """{key: leaf} of a TrainState, keys like 'params/backbone/Conv2d_0/kernel', 'opt_state/nu/...'."""
    import jax
    return {_key(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def _sign(key: str) -> float:
    return next((v for k, v in _SIGN.items() if key.startswith(k)), 1.0)


def load_original(state, values, targets):
    """A new TrainState: every mapped leaf the original's value, the others copies of the
    template's (same dtypes and shardings; the template stays usable after a donating step)."""
    import jax

    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    new = {}
    for name, (key, part, rows) in targets.items():
        if part is None:
            new[key] = _sign(key) * np.asarray(values[name])
        else:
            table = new.setdefault(key, np.zeros(np.shape(state_leaves(state)[key]), np.float32))
            table[part, rows[0]:rows[1]] = values[name]
    step = int(np.asarray(values["global_step"]))
    new["opt_state/count"] = np.asarray(step)
    out = []
    for path, leaf in leaves:
        key = _key(path)
        value = np.asarray(new[key] if key in new else leaf).astype(leaf.dtype)
        if value.shape != leaf.shape:
            raise ValueError(f"compare_tf1: {key} has shape {leaf.shape}, the original {value.shape}")
        out.append(jax.device_put(value, leaf.sharding))
    return jax.tree_util.tree_unflatten(treedef, out)


def as_original(state, targets):
    """original name -> our value, for every mapped name."""
    leaves = {k: np.asarray(v) for k, v in state_leaves(state).items()}
    out = {}
    for name, (key, part, rows) in targets.items():
        out[name] = _sign(key) * leaves[key] if part is None else leaves[key][part, rows[0]:rows[1]]
    return out


def rel_diff(ours, ref, resolution=0.0) -> float:
    """max|ours - ref| / max|ref|; elementwise differences within `resolution` count as 0."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    scale = np.max(np.abs(ref)) if ref.size else 0.0
    diff = np.max(np.maximum(np.abs(ours - ref) - resolution, 0.0)) if ref.size else 0.0
    return float(diff / scale) if scale > 0 else float(diff)


def group_diffs(ours, ref, targets, loss_ours, loss_ref, resolution=None):
    """{group: (largest relative difference, name of that array)}; `resolution`: {name: array}
    of elementwise differences to disregard (see rel_diff)."""
    out = {"loss": (max(rel_diff(a, b) for a, b in zip(loss_ours, loss_ref)), "loss")}
    for name, (key, _, _) in targets.items():
        field = next(f for f in sorted(_GROUP_OF_FIELD, key=len, reverse=True) if key.startswith(f))
        group = _GROUP_OF_FIELD[field]
        d = rel_diff(ours[name], ref[name], 0.0 if resolution is None else resolution[name])
        if group not in out or d > out[group][0]:
            out[group] = (d, name)
    return out


# --- the two sides ------------------------------------------------------------------------

def run_original(args, method, batches_path, out, *, onednn: str, init: str = "",
                 record=None, restart_from: str = ""):
    """Run tools/tf1_original.py; returns (init values, {step: values}, total loss per step
    run). `record`: the steps to save (default args.steps); `restart_from`: a folder of its
    states, from which only the recorded steps run (tf1_original --restart-from)."""
    record = sorted(record or args.steps)
    cmd = [sys.executable, os.path.join(ROOT, "tools", "tf1_original.py"),
           "--original", args.original, "--method", method, "--batches", batches_path,
           "--out", out, "--record", ",".join(map(str, record)),
           "--tracklets", ",".join(map(str, args.tracklets)), "--frames", str(args.frames),
           "--n-part", str(args.n_part), "--depth-multiplier", repr(args.depth_multiplier),
           "--bn-decay", repr(args.bn_decay), "--lr", repr(args.lr), "--seed", str(args.seed),
           "--anchors", args.anchors]
    if init:
        cmd += ["--init", init]
    if restart_from:
        cmd += ["--restart-from", restart_from]
    env = dict(os.environ, **{ONEDNN: onednn, "CUDA_VISIBLE_DEVICES": ""})
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the original ({method}, {ONEDNN}={onednn}) failed:\n{done.stderr[-3000:]}")
    init_values = dict(np.load(os.path.join(out, "init.npz")))
    states = {s: dict(np.load(os.path.join(out, f"step_{s}.npz"))) for s in record}
    losses = np.load(os.path.join(out, "losses.npz"))
    return init_values, states, losses["association"] + losses["shared_decay"]


def run_ours(args, method, init_values, batches, starts=None):
    """upm_jax from the original's initial variables: (targets, skipped, {step: values}, losses).

    With `starts` ({step N: the original's values after N - 1 steps}) only those steps run,
    each from its start, and the losses are theirs in step order."""
    import jax

    from upm_jax import parallel
    from upm_jax.training import optim
    from upm_jax.training import state as state_lib
    from upm_jax.training import step as step_lib
    from upm_jax.training.association import AnchorMemory
    from upm_jax.models import build_model

    model = build_model("mobilenet_v1", HEADS[method], n_part=args.n_part,
                        depth_multiplier=args.depth_multiplier, bn_decay=args.bn_decay)
    mesh = parallel.make_mesh(jax.devices()[:1])
    memory = AnchorMemory.zeros(args.tracklets, model.num_parts, model.feature_dim)
    tx = optim.make_optimizer("rmsprop")
    schedule = optim.make_schedule("rmsprop", learning_rate=args.lr,
                                   steps_per_epoch=args.frames / args.batch,
                                   total_steps=args.steps[-1], cross_start=args.cross_start)
    h = args.image_size
    state = state_lib.create_train_state(model, jax.random.PRNGKey(args.seed), image_shape=(h, h // 2),
                                         tx=tx, memory=memory, mesh=mesh)
    targets, skipped = map_original(init_values, method=method, n_part=args.n_part,
                                    tracklets=args.tracklets, state_keys=state_leaves(state))
    template = state
    state = load_original(template, init_values, targets)
    step_fn = step_lib.make_train_step(model, "rmsprop", mesh=mesh,
                                        frozen_scopes=model.frozen_scopes)
    states, losses = {}, []
    for s in (sorted(starts) if starts else range(1, args.steps[-1] + 1)):
        if starts:
            state = load_original(template, starts[s], targets)
        batch = {"image": batches["image"][s - 1], "track": batches["track"][s - 1].astype(np.int32),
                 "camera": batches["camera"][s - 1].astype(np.int32)}
        state, metrics = step_fn(state, schedule, parallel.global_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
        if s in args.steps:
            states[s] = as_original(state, targets)
    return targets, skipped, states, np.asarray(losses)


def compare_method(args, method, tmp):
    """Group differences per step: upm_jax vs the original with oneDNN kernels ('ours'), vs the
    original with its plain Eigen kernels ('ours_vs_eigen'), and the two originals ('kernels')."""
    os.makedirs(tmp, exist_ok=True)
    batches = make_batches(args)
    path = os.path.join(tmp, f"{method}_batches.npz")
    steps, batch = batches["track"].shape  # the original's input: a frame table and the rows
    np.savez(path, frames=batches["image"].reshape(steps * batch, *batches["image"].shape[2:]),
             track=batches["track"].reshape(-1), camera=batches["camera"].reshape(-1),
             index=np.arange(steps * batch).reshape(steps, batch), cross_on=batches["cross_on"])
    ref_dir = os.path.join(tmp, f"{method}_onednn1")
    record = set(args.steps) | ({s - 1 for s in args.steps} - {0} if args.restart else set())
    init_values, ref, ref_loss = run_original(args, method, path, ref_dir, onednn="1",
                                              record=record)
    # --restart: step N starts from the oneDNN original's state after N - 1 steps
    starts = {s: ref[s - 1] if s > 1 else init_values for s in args.steps} if args.restart else None
    targets, skipped, ours, our_loss = run_ours(args, method, init_values, batches, starts)
    sides = {"ours": (ours, our_loss)}
    if not args.no_kernel_gap:
        _, other, other_loss = run_original(args, method, path, os.path.join(tmp, f"{method}_onednn0"),
                                            onednn="0", init=os.path.join(ref_dir, "init.npz"),
                                            restart_from=ref_dir if args.restart else "")
        sides["eigen"] = (other, other_loss)
    if args.restart:  # every side's losses one per listed step, like ours and the Eigen run's
        ref_loss = np.asarray([ref_loss[s - 1] for s in args.steps])
    sides["ref"] = (ref, ref_loss)

    def compared(side, i, s):
        """(values, losses) of a side at the i-th listed step s: the state and every loss so
        far, or with --restart the increments over step s and its loss."""
        states, losses = sides[side]
        if not args.restart:
            return states[s], losses[:s]
        return ({name: np.asarray(states[s][name], np.float64)
                 - np.asarray(starts[s][name], np.float64) for name in targets}, losses[i:i + 1])

    def resolution(s):  # --restart: one float32 ulp of each element, before or after the step
        return {name: np.spacing(np.maximum(np.abs(np.asarray(ref[s][name], np.float32)),
                                            np.abs(np.asarray(starts[s][name], np.float32))))
                for name in targets} if args.restart else None

    pairs = {"ours": ("ours", "ref"), "kernels": ("eigen", "ref"), "ours_vs_eigen": ("ours", "eigen")}
    result = {key: {} for key in pairs}
    result["skipped"] = skipped
    for i, s in enumerate(args.steps):
        ulps = resolution(s)
        for key, (a, b) in pairs.items():
            if a in sides and b in sides:
                (va, la), (vb, lb) = compared(a, i, s), compared(b, i, s)
                result[key][s] = group_diffs(va, vb, targets, la, lb, ulps)
    return result


def verdict(args, results):
    """Rows {step, group, ours, eigen, gap, passed} of one method over its seeds' results.

    ours / eigen / gap: upm_jax vs the original (oneDNN), vs the original (Eigen), and the
    original's own kernel gap, each a list over the seeds (eigen and gap None without the
    second run). A group passes when the median over seeds of upm_jax's difference to the
    nearer of the two originals (both are the original; neither kernel set is the truth) is
    within --tol, or within --gap-factor times the median kernel gap: the differences vary
    from seed to seed, so one seed's value says little on its own.
    """
    rows = []
    for s in args.steps:
        for group in GROUPS:
            if group not in results[0]["ours"][s]:
                continue
            ours = [r["ours"][s][group][0] for r in results]
            eigen, gap = ([r[key][s][group][0] for r in results] if results[0][key] else None
                          for key in ("ours_vs_eigen", "kernels"))
            limit = args.tol if gap is None else max(args.tol, args.gap_factor * float(np.median(gap)))
            nearer = ours if eigen is None else np.minimum(ours, eigen)
            rows.append({"step": s, "group": group, "ours": ours, "eigen": eigen, "gap": gap,
                         "worst": results[int(np.argmax(ours))]["ours"][s][group][1],
                         "passed": float(np.median(nearer)) <= limit})
    return rows


def _cell(values):
    """A difference over seeds: the value, or median [min, max]."""
    if values is None:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2e}"
    return f"{np.median(values):.2e} [{min(values):.1e}, {max(values):.1e}]"


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    report, ok = {}, True
    with tempfile.TemporaryDirectory(prefix="compare_tf1_") as tmp:
        for method in args.method:
            t0 = time.perf_counter()
            results = [compare_method(argparse.Namespace(**dict(vars(args), seed=seed)), method,
                                      os.path.join(tmp, f"seed{seed}"))
                       for seed in args.seeds]
            rows = verdict(args, results)
            over = (f"median [min, max] over seeds {args.seeds}" if len(args.seeds) > 1
                    else f"seed {args.seeds[0]}")
            what = "of each step's increments (--restart)" if args.restart else "per group"
            print(f"\n{method}: largest relative difference {what}, {over} "
                  f"[{time.perf_counter() - t0:.0f} s]"
                  f"\n  vs oneDNN / vs Eigen: upm_jax against the original with {ONEDNN}=1 / =0;"
                  f"\n  kernel gap: the original {ONEDNN}=0 against =1 (same initial variables)")
            width = 10 if len(args.seeds) == 1 else 28
            print(f"  {'step':>5} {'group':<16} {'vs oneDNN':>{width}} {'vs Eigen':>{width}} "
                  f"{'kernel gap':>{width}}  ok  worst array (vs oneDNN)")
            for row in rows:
                cells = [_cell(row[k]) for k in ("ours", "eigen", "gap")]
                print(f"  {row['step']:>5} {row['group']:<16} "
                      + " ".join(f"{c:>{width}}" for c in cells)
                      + f"  {'yes' if row['passed'] else 'NO ':<3} {row['worst']}")
                ok &= row["passed"]
            report[method] = {"seeds": args.seeds, "rows": rows,
                              "skipped": results[0]["skipped"]}
    if args.json:
        from upm_jax.files import atomic_write
        atomic_write(args.json, lambda f: f.write(json.dumps(report, indent=1)), mode="w")
    print("\nall groups within tolerance" if ok else "\nSOME GROUPS ARE OUT OF TOLERANCE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
