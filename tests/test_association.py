"""Association step against hand-derived numbers and an independent loop-based NumPy reference."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from upm_jax.training.association import AnchorMemory, associate, associate_with_metrics

MARGIN, ETA = 0.5, 0.5


def _l2n(x):
    return x / np.sqrt(np.maximum(np.sum(x * x, axis=-1, keepdims=True), 1e-10))


def _rank(dists):
    """Position of the smallest distance; distances equal to 1e-9 count as tied (lowest position wins)."""
    return int(np.argmin(np.round(np.asarray(dists), 9)))


def reference_step(intra, cross, feats, track, camera, sizes, cross_on, margin=MARGIN, eta=ETA):
    """Loop-per-sample transcription of the association semantics (float64), plus the hand-derived gradient.

    Returns loss, new_intra, new_cross, grad wrt raw feats [B, P, D], n_consistent, n_fallback.
    """
    intra = np.asarray(intra, np.float64)
    cross = np.asarray(cross, np.float64)
    feats = np.asarray(feats, np.float64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    num_parts = intra.shape[0]
    batch = feats.shape[0]
    new_intra, new_cross = intra.copy(), cross.copy()
    grad = np.zeros_like(feats)
    total_loss, n_cons, n_fall = 0.0, 0, 0
    for p in range(num_parts):
        f = _l2n(feats[:, p])
        anchors, cross_n = _l2n(intra[p]), _l2n(cross[p])
        rows = [offsets[camera[b]] + track[b] for b in range(batch)]
        own = [list(range(offsets[camera[b]], offsets[camera[b]] + sizes[camera[b]])) for b in range(batch)]
        d_pi = [np.sum((f[b] - anchors[rows[b]]) ** 2) for b in range(batch)]
        d_pc = [np.sum((f[b] - cross_n[rows[b]]) ** 2) for b in range(batch)]
        nearest, d_min = [], []
        for b in range(batch):
            dists = [np.sum((f[b] - anchors[j]) ** 2) for j in own[b]]
            nearest.append(own[b][_rank(dists)])
            d_min.append(min(dists))
        d_neg = []
        for b in range(batch):
            if nearest[b] != rows[b]:
                d_neg.append(d_min[b])
            else:
                n_fall += 1
                mates = [k for k in range(batch) if camera[k] == camera[b]]
                d_neg.append(np.mean([d_min[k] for k in mates]))
        u = [d_pi[b] - d_neg[b] + margin for b in range(batch)]
        v = [d_pc[b] - d_neg[b] + margin for b in range(batch)]
        total_loss += (np.mean([max(x, 0.0) for x in u]) + np.mean([max(x, 0.0) for x in v])) / num_parts

        # d loss / d f, then through the normalisation.
        g = np.zeros_like(f)
        for b in range(batch):
            hu, hv = float(u[b] >= 0), float(v[b] >= 0)
            g[b] += (hu * 2 * (f[b] - anchors[rows[b]]) + hv * 2 * (f[b] - cross_n[rows[b]])) / batch
            w = -(hu + hv) / batch
            if nearest[b] != rows[b]:
                g[b] += w * 2 * (f[b] - anchors[nearest[b]])
            else:
                mates = [k for k in range(batch) if camera[k] == camera[b]]
                for k in mates:
                    g[k] += w / len(mates) * 2 * (f[k] - anchors[nearest[k]])
        g /= num_parts
        norm = np.sqrt(np.maximum(np.sum(feats[:, p] ** 2, -1, keepdims=True), 1e-10))
        grad[:, p] = (g - f * np.sum(f * g, -1, keepdims=True)) / norm

        for b in range(batch):
            new_intra[p, rows[b]] -= eta * (anchors[rows[b]] - f[b])
        updated = _l2n(new_intra[p])
        for b in range(batch):
            a = updated[rows[b]]
            others = [j for j in range(updated.shape[0]) if j not in own[b]]
            consistent = False
            match = None
            if others:
                match = others[_rank([np.sum((a - updated[j]) ** 2) for j in others])]
                back = own[b][_rank([np.sum((updated[match] - updated[j]) ** 2) for j in own[b]])]
                consistent = bool(cross_on) and back == rows[b]
            n_cons += int(consistent)
            new_cross[p, rows[b]] = (a + updated[match]) / 2 if consistent else a
    return total_loss, new_intra, new_cross, grad, n_cons, n_fall


def _memory(intra, cross, sizes):
    mem = AnchorMemory.zeros(sizes, intra.shape[0], intra.shape[2])
    return mem.replace(intra=jnp.asarray(intra, jnp.float32), cross=jnp.asarray(cross, jnp.float32))


def _run(mem, feats, track, camera, cross_on):
    return jax.jit(lambda m, f, t, c, on: associate_with_metrics(m, f, t, c, margin=MARGIN, eta=ETA, cross_on=on))(
        mem, jnp.asarray(feats, jnp.float32), jnp.asarray(track, jnp.int32), jnp.asarray(camera, jnp.int32),
        jnp.asarray(cross_on))


def _grad(mem, feats, track, camera, cross_on):
    fn = lambda f: associate(mem, f, jnp.asarray(track), jnp.asarray(camera), margin=MARGIN, eta=ETA,
                             cross_on=cross_on)[0]
    return np.asarray(jax.jit(jax.grad(fn))(jnp.asarray(feats, jnp.float32)))


# ---------------------------------------------------------------------------- hand-worked example
# Cameras: cam0 has tracklets {0, 1} (rows 0, 1), cam1 has tracklet {0} (row 2). D = 2, P = 1.
# intra rows: [1, 0], [0, 2], [1, 1]; cross all zero.
# Batch: (cam0, t0, [3, 4]), (cam0, t1, [1, 0]), (cam1, t0, [0, 1]), (cam0, t0, [1, 0]).
S = 1 / math.sqrt(2)
HAND_INTRA = np.array([[[1, 0], [0, 2], [1, 1]]], np.float32)
HAND_FEATS = np.array([[[3, 4]], [[1, 0]], [[0, 1]], [[1, 0]]], np.float32)
HAND_TRACK = np.array([0, 1, 0, 0])
HAND_CAMERA = np.array([0, 0, 1, 0])


def _hand_expected(cross_on):
    # normalised f: [.6, .8], [1, 0], [0, 1], [1, 0]; A = [1, 0], [0, 1], [s, s]
    # s0: dpi .8, nearest row1 at .4 (not own) -> dneg .4
    # s1: dpi 2, nearest row0 at 0 (not own) -> dneg 0
    # s2: dpi 2 - sqrt2, only row2 (own) -> fallback: mean over cam1 samples = 2 - sqrt2
    # s3: dpi 0, nearest row0 (own) -> fallback: mean over cam0 samples (.4 + 0 + 0) / 3
    dneg3 = 0.4 / 3
    intra_terms = [0.8 - 0.4 + 0.5, 2 + 0.5, 0.5, 0 - dneg3 + 0.5]
    cross_terms = [1 - 0.4 + 0.5, 1 + 0.5, 1 - (2 - math.sqrt(2)) + 0.5, 1 - dneg3 + 0.5]
    loss = sum(intra_terms) / 4 + sum(cross_terms) / 4
    # intra: row0 += -.5([1,0]-[.6,.8]) + -.5([1,0]-[1,0]) = [.8, .4];
    # row1 += -.5([0,1]-[1,0]) = [.5, 1.5]; row2 += -.5([s,s]-[0,1]) = [1 - s/2, 1.5 - s/2]
    new_intra = np.array([[[0.8, 0.4], [0.5, 1.5], [1 - S / 2, 1.5 - S / 2]]])
    a = _l2n(new_intra[0])
    # row0 -> row2 -> back row1 (inconsistent); row1 -> row2 -> row1 (consistent); row2 -> row1 -> row2.
    if cross_on:
        merged = (a[1] + a[2]) / 2
        new_cross = np.array([[a[0], merged, merged]])
        consistent = 0.5  # samples 1 and 2 of 4
    else:
        new_cross = a[None]
        consistent = 0.0
    return loss, new_intra, new_cross, consistent


@pytest.mark.parametrize("cross_on", [False, True])
def test_hand_worked_example(cross_on):
    mem = _memory(HAND_INTRA, np.zeros_like(HAND_INTRA), (2, 1))
    loss, new, metrics = _run(mem, HAND_FEATS, HAND_TRACK, HAND_CAMERA, cross_on)
    exp_loss, exp_intra, exp_cross, exp_consistent = _hand_expected(cross_on)
    np.testing.assert_allclose(float(loss), exp_loss, rtol=1e-6)
    np.testing.assert_allclose(float(loss), 2.2868868, rtol=1e-6)
    np.testing.assert_allclose(new.intra, exp_intra, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new.cross, exp_cross, rtol=1e-6, atol=1e-6)
    assert float(metrics["negative_fallback"]) == 0.5
    assert float(metrics["cross_consistent"]) == exp_consistent
    assert new.offsets == (0, 2)


def test_hand_worked_gradient():
    mem = _memory(HAND_INTRA, np.zeros_like(HAND_INTRA), (2, 1))
    got = _grad(mem, HAND_FEATS, HAND_TRACK, HAND_CAMERA, True)
    # s2 (cam1, alone): dL/df2 = (1/4)[2(f2 - [s,s]) + 2 f2] - (2/4) * 2(f2 - [s,s]) / 1 (fallback over itself)
    f2 = np.array([0.0, 1.0])
    g2 = (2 * (f2 - [S, S]) + 2 * f2) / 4 - 0.5 * 2 * (f2 - [S, S])
    exp2 = (g2 - f2 * (f2 @ g2)) / 1.0  # |x2| = 1
    np.testing.assert_allclose(got[2, 0], exp2, rtol=1e-5, atol=1e-6)
    ref = reference_step(HAND_INTRA, np.zeros_like(HAND_INTRA), HAND_FEATS, HAND_TRACK, HAND_CAMERA, (2, 1), True)
    np.testing.assert_allclose(got, ref[3], rtol=1e-5, atol=1e-6)


def test_duplicate_tracklet_updates_are_summed():
    # One camera, tracklet 0 anchor [2, 0] (A = [1, 0]); two frames [0, 1] and [0, -1]:
    # deltas -.5([1,0]-[0,1]) = [-.5, .5] and -.5([1,0]-[0,-1]) = [-.5, -.5] -> row0 = [2,0] + [-1, 0] = [1, 0]
    # (a mean would give [1.5, 0]). Cross row0 = l2n([1, 0]) = [1, 0] (no other camera: never consistent).
    intra = np.array([[[2, 0], [0, 3]]], np.float32)
    mem = _memory(intra, np.zeros_like(intra), (2,))
    feats = np.array([[[0, 1]], [[0, -1]]], np.float32)
    _, new, metrics = _run(mem, feats, [0, 0], [0, 0], True)
    np.testing.assert_allclose(new.intra[0], [[1, 0], [0, 3]], atol=1e-6)
    np.testing.assert_allclose(new.cross[0], [[1, 0], [0, 0]], atol=1e-6)
    assert float(metrics["cross_consistent"]) == 0.0


def test_camera_mean_fallback_uses_only_same_camera_samples():
    # cam0 rows: [1, 0], [0, 1]; cam1 rows: [1, 0], [0, 1].
    # s0 cam0 t0 f=[1,0]: nearest own row (d 0) -> fallback to mean over cam0 samples {s0, s1}.
    # s1 cam0 t0 f=[.6,.8]: nearest row1 (d .4) -> not own, dneg .4.  cam0 mean = (0 + .4)/2 = .2
    # s2 cam1 t1 f=[0,1]: nearest own (d 0) -> fallback to cam1 mean = 0 (only s2), not the batch mean.
    intra = np.array([[[1, 0], [0, 1], [1, 0], [0, 1]]], np.float32)
    cross = intra.copy()
    mem = _memory(intra, cross, (2, 2))
    feats = np.array([[[1, 0]], [[0.6, 0.8]], [[0, 1]]], np.float32)
    loss, _, metrics = _run(mem, feats, [0, 0, 1], [0, 0, 1], False)
    # s0: dpi = dpc = 0, dneg .2 -> .3 each. s1: dpi = dpc = .8, dneg .4 -> .9 each. s2: 0 - 0 + .5 each.
    expected = 2 * (0.3 + 0.9 + 0.5) / 3
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["negative_fallback"]), 2 / 3, rtol=1e-6)


def test_camera_absent_from_batch_keeps_its_rows():
    rng = np.random.default_rng(3)
    sizes = (3, 2, 4)
    intra = rng.normal(size=(1, 9, 5)).astype(np.float32)
    cross = rng.normal(size=(1, 9, 5)).astype(np.float32)
    feats = rng.normal(size=(6, 1, 5)).astype(np.float32)
    track = np.array([0, 2, 1, 3, 0, 2])
    camera = np.array([0, 0, 2, 2, 2, 0])  # camera 1 (rows 3, 4) absent
    loss, new, metrics = _run(_memory(intra, cross, sizes), feats, track, camera, True)
    ref = reference_step(intra, cross, feats, track, camera, sizes, True)
    np.testing.assert_allclose(new.intra[0, 3:5], intra[0, 3:5])
    np.testing.assert_allclose(new.cross[0, 3:5], cross[0, 3:5])
    np.testing.assert_allclose(float(loss), ref[0], rtol=1e-5)
    np.testing.assert_allclose(new.intra, ref[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.cross, ref[2], rtol=1e-5, atol=1e-6)


def test_zero_anchors_ties_go_to_lowest_row():
    # All anchors zero: every distance is |f|^2 = 1, so the nearest row is each camera's first row.
    # Samples of tracklet 0 fall back to the camera mean (= 1); all others get dneg = 1.
    # dpi = dpc = 1 -> every hinge term is 1 - 1 + .5 -> loss = 1.0.
    mem = AnchorMemory.zeros((3, 2), 1, 4)
    feats = np.eye(4, dtype=np.float32)[[0, 1, 2, 3]][:, None] * 2.0
    track = np.array([0, 2, 0, 1])
    camera = np.array([0, 0, 1, 1])
    loss, new, metrics = _run(mem, feats, track, camera, True)
    np.testing.assert_allclose(float(loss), 1.0, rtol=1e-6)
    assert float(metrics["negative_fallback"]) == 0.5
    # intra rows become eta * f (unit f); untouched rows stay zero.
    exp = np.zeros((5, 4))
    exp[0], exp[2], exp[3], exp[4] = 0.5 * np.eye(4)
    np.testing.assert_allclose(new.intra[0], exp, atol=1e-7)
    # Cyclic ranking on A' = rows e0, 0, e1, e2, e3:
    # row0 (e0) -> cam1 rows 3, 4 both at distance 2, tie -> row 3; back to cam0 {e0: 2, 0: 1, e1: 2}
    #   -> row 1 != 0: inconsistent. row2 (e1) likewise -> back row 1: inconsistent.
    # row3 (e2) -> cam0 {e0: 2, 0: 1, e1: 2} -> row 1 (zero); back to cam1 {e2: 1, e3: 1}, tie -> row 3:
    #   consistent, cross row3 = (e2 + 0) / 2. row4 (e3) -> row 1 -> back row 3 != 4: inconsistent.
    assert float(metrics["cross_consistent"]) == 0.25
    exp_cross = _l2n(exp)
    exp_cross[3] = [0, 0, 0.5, 0]
    np.testing.assert_allclose(new.cross[0], exp_cross, atol=1e-7)


def test_tied_anchor_rows_choose_lowest_index():
    # cam0 rows 1 and 2 are identical; a sample of tracklet 0 nearest to them must pick row 1, so its
    # negative is not a fallback; its gradient goes to row 1's anchor only (as TF's top_k).
    intra = np.array([[[0, 1, 0], [1, 0, 0], [1, 0, 0], [0, 0, 1]]], np.float32)
    mem = _memory(intra, intra, (3, 1))
    feats = np.array([[[0.9, 0.1, 0.0]]], np.float32)
    loss, _, metrics = _run(mem, feats, [0], [0], False)
    assert float(metrics["negative_fallback"]) == 0.0
    ref = reference_step(intra, intra, feats, [0], [0], (3, 1), False)
    np.testing.assert_allclose(float(loss), ref[0], rtol=1e-6)
    np.testing.assert_allclose(_grad(mem, feats, [0], [0], False), ref[3], rtol=1e-5, atol=1e-6)


def _random_case(seed, sizes, num_parts, batch, dim=6, zero_cross=False):
    rng = np.random.default_rng(seed)
    total = sum(sizes)
    intra = rng.normal(size=(num_parts, total, dim)).astype(np.float32)
    cross = np.zeros_like(intra) if zero_cross else rng.normal(size=intra.shape).astype(np.float32)
    camera = rng.integers(0, len(sizes), size=batch)
    track = np.array([rng.integers(0, sizes[c]) for c in camera])
    track[1], camera[1] = track[0], camera[0]  # at least one duplicate tracklet
    rows = np.concatenate([[0], np.cumsum(sizes)[:-1]])[camera] + track
    feats = rng.normal(size=(batch, num_parts, dim)).astype(np.float32)
    # pull a third of the frames next to their own anchor so fallbacks happen
    near = rng.random(batch) < 0.35
    feats[near] = intra[:, rows[near]].transpose(1, 0, 2) * 3.0 + 0.05 * feats[near]
    return intra, cross, feats, track, camera


@pytest.mark.parametrize("sizes", [(4, 5), (3, 2, 4, 1, 3, 2), (2, 3, 1, 2, 4, 2, 3, 2)], ids=["2cam", "6cam", "8cam"])
@pytest.mark.parametrize("num_parts", [1, 8])
def test_matches_reference_over_steps(sizes, num_parts):
    """Three chained steps from zero anchors: warm-up (cross off), then cross association on."""
    rng = np.random.default_rng(len(sizes) * 10 + num_parts)
    total, dim, batch = sum(sizes), 6, 12
    mem = AnchorMemory.zeros(sizes, num_parts, dim)
    ref_intra = np.zeros((num_parts, total, dim))
    ref_cross = np.zeros((num_parts, total, dim))
    saw_fallback = saw_consistent = False
    for step, cross_on in enumerate([False, True, True]):
        camera = rng.integers(0, len(sizes), size=batch)
        track = np.array([rng.integers(0, sizes[c]) for c in camera])
        feats = rng.normal(size=(batch, num_parts, dim)).astype(np.float32)
        loss, mem, metrics = _run(mem, feats, track, camera, cross_on)
        ref = reference_step(ref_intra, ref_cross, feats, track, camera, sizes, cross_on)
        np.testing.assert_allclose(float(loss), ref[0], rtol=2e-5, err_msg=f"step {step}")
        np.testing.assert_allclose(mem.intra, ref[1], rtol=2e-5, atol=2e-6, err_msg=f"step {step}")
        np.testing.assert_allclose(mem.cross, ref[2], rtol=2e-5, atol=2e-6, err_msg=f"step {step}")
        np.testing.assert_allclose(float(metrics["cross_consistent"]), ref[4] / (batch * num_parts), atol=1e-7)
        np.testing.assert_allclose(float(metrics["negative_fallback"]), ref[5] / (batch * num_parts), atol=1e-7)
        saw_fallback |= ref[5] > 0
        saw_consistent |= ref[4] > 0
        ref_intra, ref_cross = np.asarray(mem.intra, np.float64), np.asarray(mem.cross, np.float64)
    assert saw_fallback and saw_consistent


@pytest.mark.parametrize("sizes,num_parts", [((4, 5), 1), ((3, 2, 4, 1, 3, 2), 8), ((2, 3, 1, 2, 4, 2, 3, 2), 2)])
@pytest.mark.parametrize("cross_on", [False, True])
def test_gradient_matches_hand_derivation(sizes, num_parts, cross_on):
    intra, cross, feats, track, camera = _random_case(sizes[0] + num_parts, sizes, num_parts, 10)
    mem = _memory(intra, cross, sizes)
    ref = reference_step(intra, cross, feats, track, camera, sizes, cross_on)
    assert ref[5] > 0  # the fallback branch is exercised
    np.testing.assert_allclose(_grad(mem, feats, track, camera, cross_on), ref[3], rtol=1e-4, atol=1e-6)


def test_no_gradient_to_anchors_and_traced_cross_on():
    intra, cross, feats, track, camera = _random_case(0, (3, 3), 2, 8)
    mem = _memory(intra, cross, (3, 3))
    g = jax.grad(lambda m: associate(m, jnp.asarray(feats), jnp.asarray(track), jnp.asarray(camera),
                                     margin=MARGIN, eta=ETA, cross_on=True)[0])(mem)
    assert not np.any(np.asarray(g.intra)) and not np.any(np.asarray(g.cross))
    step = jax.jit(lambda m, on: associate(m, jnp.asarray(feats), jnp.asarray(track), jnp.asarray(camera),
                                           margin=MARGIN, eta=ETA, cross_on=on))
    off, on = step(mem, jnp.asarray(False))[1], step(mem, jnp.asarray(True))[1]
    np.testing.assert_array_equal(off.intra, on.intra)
    ref_on = reference_step(intra, cross, feats, track, camera, (3, 3), True)
    np.testing.assert_allclose(on.cross, ref_on[2], rtol=2e-5, atol=2e-6)


def test_bfloat16_features_computed_in_float32():
    intra, cross, feats, track, camera = _random_case(5, (4, 4), 1, 8)
    feats_bf16 = jnp.asarray(feats, jnp.bfloat16)
    loss, _, _ = _run(_memory(intra, cross, (4, 4)), feats_bf16, track, camera, True)
    ref = reference_step(intra, cross, np.asarray(feats_bf16.astype(jnp.float32)), track, camera, (4, 4), True)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), ref[0], rtol=1e-5)


def test_from_features_is_per_tracklet_mean_of_normalised_features():
    feats = np.array([[[3, 4]], [[0, 2]], [[5, 0]], [[0, 0]]], np.float32)
    track = np.array([0, 0, 1, 0])
    camera = np.array([0, 0, 0, 1])
    mem = AnchorMemory.from_features(AnchorMemory.zeros((3, 1), 1, 2), feats, track, camera)
    # row0 = mean([.6,.8], [0,1]) = [.3, .9]; row1 = [1, 0]; row2 no frames -> 0; row3 zero frame -> 0
    exp = np.array([[[0.3, 0.9], [1, 0], [0, 0], [0, 0]]])
    np.testing.assert_allclose(mem.intra, exp, atol=1e-7)
    np.testing.assert_allclose(mem.cross, exp, atol=1e-7)
    assert mem.offsets == (0, 3) and mem.tracklets_per_camera == (3, 1) and mem.num_cameras == 2
    assert mem.intra.unsafe_buffer_pointer() != mem.cross.unsafe_buffer_pointer()


def test_bad_inputs_raise_clear_errors():
    mem = AnchorMemory.zeros((2, 2), 2, 4)
    with pytest.raises(ValueError, match=r"features must be \[B, 2, 4\]"):
        associate(mem, jnp.zeros((3, 1, 4)), jnp.zeros(3, jnp.int32), jnp.zeros(3, jnp.int32),
                  margin=0.5, eta=0.5, cross_on=False)
    with pytest.raises(ValueError, match="track must have shape"):
        associate(mem, jnp.zeros((3, 2, 4)), jnp.zeros(2, jnp.int32), jnp.zeros(3, jnp.int32),
                  margin=0.5, eta=0.5, cross_on=False)
    with pytest.raises(ValueError, match="tracklets_per_camera"):
        AnchorMemory.zeros((0, 0), 1, 4)
    with pytest.raises(ValueError, match="tracklets_per_camera"):
        AnchorMemory.zeros((2, -1), 1, 4)
    with pytest.raises(ValueError, match="track value 2 of camera 1"):
        mem.from_features(np.zeros((2, 2, 4)), [0, 2], [0, 1])
    with pytest.raises(ValueError, match="camera value 2"):
        mem.from_features(np.zeros((2, 2, 4)), [0, 0], [0, 2])
    with pytest.raises(ValueError, match=r"features must be \[N, 2, 4\]"):
        mem.from_features(np.zeros((2, 1, 4)), [0, 0], [0, 1])


def test_camera_without_training_tracklets_changes_nothing():
    # cameras (2, 0, 1): camera 1 has no rows. One step must equal the step on cameras (2, 1)
    # with camera 2 renumbered 1, loss, metrics and both tables, with cross association on.
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(4, 2, 3)).astype(np.float32)
    track = np.array([0, 1, 0, 1])
    camera = np.array([0, 0, 2, 0])
    gap = AnchorMemory.zeros((2, 0, 1), 2, 3)
    assert gap.offsets == (0, 2, 2) and gap.tracklets_per_camera == (2, 0, 1)
    gap = gap.from_features(feats, track, camera)
    dense = AnchorMemory.zeros((2, 1), 2, 3).from_features(feats, track, np.minimum(camera, 1))
    for step in range(2):
        f = feats + 0.1 * step
        got = _run(gap, f, track, camera, True)
        want = _run(dense, f, track, np.minimum(camera, 1), True)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        gap, dense = got[1], want[1]
    assert float(got[2]["cross_consistent"]) > 0
