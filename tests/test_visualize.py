"""Grad-CAM: the rule against a NumPy reference, localisation on a model whose features
depend only on known regions, endpoint names, and the CLI on a tiny saved workdir."""
import glob
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from repo_configs import get_config
from upm_jax import checkpoints as checkpoints_lib
from upm_jax import data as data_lib
from upm_jax import methods
from upm_jax import models
from upm_jax import parallel
from upm_jax import visualize
from upm_jax.training import state as state_lib
from upm_jax.training import trainer as trainer_lib
from upm_jax.workdir import Workdir
from upm_jax.data import synthetic


def reference_cam(activation, gradient):
    """The rule for one frame, written out: [h, w, C] map and gradient -> [h, w]."""
    norm = gradient / (np.sqrt(np.mean(np.square(gradient))) + 1e-5)
    weights = norm.mean(axis=(0, 1))
    cam = np.ones(activation.shape[:2], np.float64)
    for c, w in enumerate(weights):
        cam += w * activation[:, :, c]
    cam = np.maximum(cam, 0)
    return cam / cam.max()


def random_frames(count, height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), np.uint8)


def calibrated(model, frames):
    """Variables whose BN moving statistics are those of `frames` (bn_decay=0 models), so the
    inference activations are not the saturated ones of the initial 0/1 statistics."""
    @jax.jit
    def init(images):
        variables = model.init(jax.random.PRNGKey(1), images[:1])
        _, updated = model.apply(variables, images, train=True, mutable=["batch_stats"])
        return {"params": variables["params"], "batch_stats": updated["batch_stats"]}

    return init(frames.astype(np.float32) / 127.5 - 1.0)


def test_cam_from_gradient_is_the_rule():
    rng = np.random.default_rng(0)
    activation = rng.uniform(0, 1, (2, 3, 4, 5, 7)).astype(np.float32)
    gradient = rng.normal(0, 1e-3, (2, 3, 4, 5, 7)).astype(np.float32)
    cams = np.asarray(visualize.cam_from_gradient(activation, gradient))
    assert cams.shape == (2, 3, 4, 5)
    for i in np.ndindex(2, 3):
        np.testing.assert_allclose(cams[i], reference_cam(activation[i], gradient[i]),
                                   rtol=1e-5, atol=1e-6)
    # A map ReLU leaves all zero stays zero (no division by zero).
    dark = np.asarray(visualize.cam_from_gradient(np.full((1, 2, 2, 1), 5.0, np.float32),
                                                  np.full((1, 2, 2, 1), -1.0, np.float32)))
    np.testing.assert_array_equal(dark, np.zeros((1, 2, 2)))


@pytest.mark.slow
def test_lam_cams_at_the_final_map_match_the_analytic_gradient():
    # LAM part p = mean over stripe p of the final map, so d(mean_d part_p)/d(map) is
    # 1 / (C * rows * w) on stripe p and 0 elsewhere (the third row is dropped: 3 // 2 = 1).
    model = models.build_model("mobilenet_v1", "local", n_part=2, depth_multiplier=0.25,
                               bn_decay=0.0)
    frames = random_frames(3, 96, 48)
    variables = calibrated(model, frames)
    endpoint = visualize.resolve_endpoint(model)
    assert endpoint.name == "Conv2d_13_pointwise"
    cams = np.asarray(visualize.make_grad_cam(model, endpoint)(variables, frames))
    assert cams.shape == (3, 3, 96, 48)
    _, maps = jax.jit(lambda v, x: model.apply(v, x, return_endpoints=True))(
        variables, frames.astype(np.float32) / 127.5 - 1.0)
    activation = np.asarray(maps["Conv2d_13_pointwise"])  # [3, 3, 2, 256]
    _, h, w, c = activation.shape
    for b in range(3):
        expected = []
        for rows in ([0, 1], [0], [1]):  # overall, part 1, part 2
            gradient = np.zeros((h, w, c), np.float32)
            gradient[rows] = 1.0 / (c * 1 * w)
            expected.append(reference_cam(activation[b], gradient))
        expected = jax.image.resize(np.stack(expected), (3, 96, 48), "bilinear")
        np.testing.assert_allclose(cams[b], expected, rtol=1e-4, atol=1e-5)
    assert cams.min() >= 0.0 and cams.max() <= 1.0
    # Batched: each frame's maps are those it gets alone.
    alone = visualize.make_grad_cam(model, endpoint)(variables, frames[1:2])
    np.testing.assert_allclose(cams[1:2], alone, rtol=1e-4, atol=1e-5)


class _Windows(nn.Module):
    """[B, H, W, 3] -> [B, H/2, W/2, 4]: channels 0-1 see only the top window, 2-3 only the
    bottom one (zero elsewhere); positive inside."""

    top: tuple
    bottom: tuple

    @nn.compact
    def __call__(self, images):
        b, h, w, _ = images.shape
        x = nn.avg_pool(images + 1.0, (2, 2), strides=(2, 2))  # [B, h/2, w/2, 3], > 0 inside
        x = nn.Dense(4, kernel_init=nn.initializers.uniform(1.0), name="mix")(x)
        x = jnp.abs(x) + 0.1
        rows = jnp.arange(h // 2)[:, None]
        cols = jnp.arange(w // 2)[None, :]

        def window(r0, r1, c0, c1):
            return ((rows >= r0) & (rows < r1) & (cols >= c0) & (cols < c1)).astype(x.dtype)

        masks = jnp.stack([window(*self.top)] * 2 + [window(*self.bottom)] * 2, axis=-1)
        return x * masks


class _TwoPartModel(nn.Module):
    """Part 1's feature depends only on the top window, part 2's only on the bottom one."""

    top: tuple
    bottom: tuple

    @nn.compact
    def __call__(self, images, train=False, return_endpoints=False):
        maps = _Windows(self.top, self.bottom, name="windows")(images)
        feats = jnp.stack([maps[..., :2].mean(axis=(1, 2)), maps[..., 2:].mean(axis=(1, 2))],
                          axis=1)  # [B, 2, 2]
        return (feats, {"windows": maps}) if return_endpoints else feats


def test_each_map_is_highest_on_the_region_its_feature_depends_on():
    top, bottom = (1, 4, 1, 5), (10, 14, 3, 7)  # (row0, row1, col0, col1) on the 16x8 map
    model = _TwoPartModel(top, bottom)
    frames = random_frames(2, 32, 16, seed=3)
    variables = model.init(jax.random.PRNGKey(0), frames.astype(np.float32))
    endpoint = visualize.Endpoint("windows", "windows", ("windows",))
    cams = np.asarray(visualize.make_grad_cam(model, endpoint)(variables, frames))
    assert cams.shape == (2, 3, 32, 16)

    def image_window(r0, r1, c0, c1):  # the map window in frame pixels, away from its edges
        inside = np.zeros((32, 16), bool)
        inside[2 * r0 + 1:2 * r1 - 1, 2 * c0 + 1:2 * c1 - 1] = True
        return inside

    def far_from(*windows):  # pixels at least 2 away from every window
        near = np.zeros((32, 16), bool)
        for r0, r1, c0, c1 in windows:
            near[max(2 * r0 - 2, 0):2 * r1 + 2, max(2 * c0 - 2, 0):2 * c1 + 2] = True
        return ~near

    for b in range(2):
        overall, part1, part2 = cams[b]
        for cam, inside, outside in (
                (part1, image_window(*top), far_from(top)),
                (part2, image_window(*bottom), far_from(bottom)),
                (overall, image_window(*top) | image_window(*bottom), far_from(top, bottom))):
            assert np.unravel_index(np.argmax(cam), cam.shape) in set(zip(*np.nonzero(inside)))
            assert cam[inside].min() > cam[outside].max()
        # Outside its window a part's map is the flat map of ones, divided by the maximum.
        assert np.ptp(part1[far_from(top)]) < 1e-6


def test_endpoints_by_slim_name_and_a_clear_error_for_others():
    mobilenet = models.build_model("mobilenet_v1", "dal", depth_multiplier=0.25)
    names = list(visualize.model_endpoints(mobilenet))
    assert names[0] == "Conv2d_0" and names[-1] == "Conv2d_13_pointwise" and len(names) == 27
    assert "Conv2d_7_depthwise" in names
    resnet = models.build_model("resnet_v1_50", "global", n_part=2)
    names = list(visualize.model_endpoints(resnet))
    assert names[0] == "resnet_v1_50/conv1"
    assert "resnet_v1_50/block2/unit_4/bottleneck_v1" in names
    assert visualize.resolve_endpoint(resnet).name == "resnet_v1_50/block4"
    assert visualize.resolve_endpoint(resnet, "resnet_v1_50/block3").path == (
        "backbone", "block3", "unit_6")
    with pytest.raises(visualize.VisualizeError, match=r"'Conv2d_14'.*resnet_v1_50/conv1, "
                       r".*resnet_v1_50/block4$"):
        visualize.resolve_endpoint(resnet, "Conv2d_14")
    with pytest.raises(visualize.VisualizeError, match="Conv2d_0, Conv2d_1_depthwise"):
        visualize.resolve_endpoint(mobilenet, "resnet_v1_50/block4")


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["mobilenet_v1", "resnet_v1_50"])
def test_every_endpoint_is_the_map_its_module_returns(backbone):
    # Traced only (no compilation): the perturbed module must return exactly the endpoint
    # map, once (perturbed_forward raises otherwise).
    model = models.build_model(backbone, "local", n_part=2,
                               depth_multiplier=0.25 if backbone == "mobilenet_v1" else 1.0)
    images = jax.ShapeDtypeStruct((2, 64, 32, 3), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                  jnp.zeros((1, 64, 32, 3))))
    endpoints = visualize.model_endpoints(model).values()
    _, maps = jax.eval_shape(lambda v, x: model.apply(v, x, return_endpoints=True), variables,
                             images)
    for endpoint in endpoints:
        _, perturbed = jax.eval_shape(visualize.perturbed_forward(model, endpoint), variables,
                                      images, jax.ShapeDtypeStruct((), jnp.float32))
        assert perturbed.shape == maps[endpoint.key].shape, endpoint.name
    # A path that is not the endpoint's module is caught.
    wrong = visualize.Endpoint("x", list(endpoints)[-1].key, ("backbone",))
    with pytest.raises(RuntimeError, match="module backbone returned"):
        jax.eval_shape(visualize.perturbed_forward(model, wrong), variables, images,
                       jax.ShapeDtypeStruct((), jnp.float32))


def test_row_labels_are_the_paths_below_the_frames_common_folder():
    assert visualize.frame_labels(["/d/cam_a/p1/1.png", "/d/cam_b/p1/1.png"]) == [
        "cam_a/p1/1.png", "cam_b/p1/1.png"]
    assert visualize.frame_labels(["/d/p1/1.png", "/d/p1/2.png"]) == ["p1/1.png", "p1/2.png"]


def test_the_picture_says_what_its_marks_are(tmp_path):
    """Columns are named, the colour bar is labelled, and with stripes drawn the title says
    what the dashed lines are; without stripes (DAL) it does not mention them."""
    frames = random_frames(2, 16, 8)
    cams = np.random.default_rng(1).uniform(0, 1, (2, 3, 16, 8)).astype(np.float32)
    fig = visualize.draw(frames, cams, str(tmp_path / "a.png"), labels=["x", "y"],
                         title="Grad-CAM", stripes=[(0, 8), (8, 16)])
    assert fig.get_suptitle().splitlines() == [
        "Grad-CAM", "dashed lines: the stripe of the frame that the part's feature pools"]
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["frame", "overall", "part 1", "part 2"]
    assert fig.axes[-1].get_ylabel() == "Grad-CAM (normalised)"
    plain = visualize.draw(frames, cams[:, :1], str(tmp_path / "b.png"), labels=["x", "y"],
                           title="Grad-CAM")
    assert plain.get_suptitle() == "Grad-CAM"
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


# --- the CLI on a tiny workdir -------------------------------------------------------------

@pytest.fixture(scope="module")
def upm_workdir(tmp_path_factory, one_device):
    """A method-`upm` workdir (config.json, split_1/{lam,gam}/checkpoints) whose EMA weights
    differ from the trained ones, saved with upm_jax.checkpoints (no training steps)."""
    workdir = str(tmp_path_factory.mktemp("upm"))
    config = get_config("demo")
    config.method = "upm"
    config.data.synthetic_ids = 4
    config.data.image_size = 64
    config.train.batch_size = 8
    config.data.resident = False
    config.model.bn_decay = 0.0
    config.data.root = os.path.join(workdir, "synthetic")
    config.data.split_file = os.path.join(workdir, "synthetic", "prid2011_splits.json")
    synthetic.generate("prid2011", config.data.root, ids=4, frames=(2, 2), size=(64, 32))
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json())
    dataset = data_lib.load_dataset("prid2011", config.data.root,
                                    split_file=config.data.split_file)
    mesh = parallel.make_mesh()
    frames = sorted(glob.glob(os.path.join(config.data.root, "**", "*.png"), recursive=True))
    images = visualize.load_frames(frames[:8], 64).astype(np.float32) / 127.5 - 1.0
    states = {}
    for model_dir in Workdir(workdir).split(1).models("upm"):
        name, head = model_dir.name, model_dir.head
        state = trainer_lib.make_trainer(config, head, dataset.train, mesh,
                                         load_weights=False).state
        model = methods.build_model(config, head)
        # Moving statistics of real frames (bn_decay 0: one pass sets them), so that the
        # maps are not the flat ones of saturated activations.
        stats = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[1])(
            {"params": state_lib.merge_params(state.params, state.frozen_params),
             "batch_stats": state.batch_stats}, images)
        state = state.replace(batch_stats=stats["batch_stats"],
                              ema_params=jax.tree.map(lambda p: p * 0.7, state.params))
        checkpoints = checkpoints_lib.Checkpoints(model_dir.checkpoints)
        checkpoints.save(5, state)
        checkpoints.close()
        states[name] = state
    return workdir, states, frames[:2], config


@pytest.mark.slow
def test_cli_draws_the_gam_model_with_its_ema_weights(upm_workdir, tmp_path, capsys):
    workdir, states, frames, config = upm_workdir
    out = str(tmp_path / "cam.png")
    assert visualize.main(["--workdir", workdir, "--model", "gam", "--layer",
                           "Conv2d_11_pointwise", *frames, "--out", out]) == 0
    message = capsys.readouterr().err
    assert "model gam (split 1, step 5) at Conv2d_11_pointwise [4, 2, 128]" in message
    assert os.listdir(tmp_path) == ["cam.png"]  # no temporary file left behind
    one_row = str(tmp_path / "one.png")
    assert visualize.main(["--workdir", workdir, "--model", "gam", frames[0], "--out",
                           one_row]) == 0
    with Image.open(out) as two, Image.open(one_row) as one:
        assert two.size[0] == one.size[0] and two.size[1] > 1.6 * one.size[1]  # a row a frame

    drawn = visualize.visualize(workdir, frames, str(tmp_path / "again.png"), model_name="gam",
                                layer="Conv2d_11_pointwise")
    model = methods.build_model(config, "global")
    state = states["gam"]
    endpoint = visualize.resolve_endpoint(model, "Conv2d_11_pointwise")
    images = visualize.load_frames(frames, 64)
    cam_fn = visualize.make_grad_cam(model, endpoint)

    def cams_of(params):
        return np.asarray(cam_fn({"params": state_lib.merge_params(params, state.frozen_params),
                                  "batch_stats": state.batch_stats}, images))

    np.testing.assert_allclose(drawn["cams"], cams_of(state.ema_params), rtol=1e-5, atol=1e-6)
    assert np.abs(drawn["cams"] - cams_of(state.params)).max() > 1e-3


@pytest.mark.slow
def test_cli_defaults_to_the_first_model_and_the_last_map(upm_workdir, tmp_path, capsys):
    workdir, _, frames, _ = upm_workdir
    assert visualize.main(["--workdir", workdir, frames[0], "--out",
                           str(tmp_path / "lam.png")]) == 0
    assert "model lam (split 1, step 5) at Conv2d_13_pointwise [2, 1, 256]" in (
        capsys.readouterr().err)


@pytest.mark.slow
@pytest.mark.parametrize("args,expected", [
    (["--layer", "Conv2d_99"], "'Conv2d_99' is not an endpoint of mobilenet_v1; expected one "
                               "of: Conv2d_0, Conv2d_1_depthwise"),
    (["--model", "dal"], "model 'dal': the workdir's method 'upm' trains ['lam', 'gam']"),
    (["--split", "3"], "split 3: models 'lam', 'gam' have checkpoints only for splits [1]"),
    (["--model", "gam", "--split", "3"],
     "split 3: model 'gam' has checkpoints only for splits [1]"),
    (["--workdir", "/nonexistent/run"], "workdir '/nonexistent/run' has no config.json"),
    (["missing.png"], "cannot decode image missing.png"),
])
def test_cli_user_errors_exit_2_with_a_message(upm_workdir, tmp_path, capsys, args, expected):
    workdir, _, frames, _ = upm_workdir
    argv = ["--workdir", workdir, frames[0], "--out", str(tmp_path / "x.png")]
    argv = argv[:-2] + args + argv[-2:] if args[0].startswith("--") else argv + args
    assert visualize.main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "x.png")



def test_out_into_a_missing_folder_is_one_line(tmp_path, capsys):
    from upm_jax.visualize import main

    out = tmp_path / "nope" / "cam.png"
    assert main(["frame.png", f"--workdir={tmp_path}", f"--out={out}"]) == 2
    assert capsys.readouterr().err == (f"error: --out {out}: the folder {tmp_path / 'nope'} "
                                       "does not exist\n")
