"""The Python API and the exports, held to the real thing: on a finished workdir, the
API's features are the features files of `--mode extract` bit for bit, and every exported
artifact's features, run by its own runtime on the recorded test frames, lie within 1e-5
of them (max over frames and parts of |a - b| / |b|, norms of the part vectors) and give
the run's results.json when evaluated. The ONNX graph is also held to the flax model for
each backbone and head; bfloat16 exports are exact to the model's own rounding or refused."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import upm_jax
from repo_configs import get_config
from upm_jax import evaluation
from upm_jax import extractor as extractor_lib
from upm_jax import run
from upm_jax.data import eval_set as eval_set_lib
from upm_jax.evaluation import summary as summary_lib
from upm_jax.export import __main__ as export_cli
from upm_jax.export import artifact, onnx_graph
from upm_jax.extractor import Extractor, ExtractorError, TrainedModel
from upm_jax.models import build_model
from upm_jax.workdir import Workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


STEPS = 20


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, one_device):
    """A finished `upm` run of the demo-size model (MobileNet v1 0.25, 2 parts) trained
    for STEPS steps on synthetic frames of 128x64 (model input 64x32): its features files
    and results.json. (An untrained network with BatchNorm statistics set from a few
    frames is no stand-in: it amplifies rounding, so that upm_jax's own two convolution
    formulations differ by 2e-5; this model's differ by 5e-7.)"""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = get_config("demo")
    config.method = "upm"
    config.data.synthetic_ids = 8
    config.data.image_size = 64
    config.train.batch_size = 16
    config.train.steps = STEPS
    config.train.checkpoint_every = STEPS
    config.eval.initial = False
    run.run(config, workdir)
    config = Workdir(workdir).read_record()
    split = Workdir(workdir).split(1)
    test = eval_set_lib.read(split.eval_set, config.data.root).test
    with open(Workdir(workdir).results) as f:
        results = json.load(f)
    return {"workdir": workdir, "config": config, "split": split, "paths": list(test.path),
            "features": evaluation.load_features(split.features()), "results": results}


# --- the Python API --------------------------------------------------------------------------

@pytest.mark.slow
def test_load_gives_the_runs_features_and_pooling_exactly(finished_run):
    extractor = upm_jax.load(finished_run["workdir"])
    assert [(m.name, m.step) for m in extractor.models] == [("lam", STEPS), ("gam", STEPS)]
    assert (extractor.split, extractor.image_shape) == (1, (64, 32))
    saved = finished_run["features"]
    feats = extractor(finished_run["paths"])  # image files, resized 128x64 -> 64x32
    np.testing.assert_array_equal(feats, saved["frame_feat"])
    # decoded frames of their own size give the same
    from upm_jax.data import images
    decoded = np.stack([images.decode(p) for p in finished_run["paths"][:5]])
    np.testing.assert_array_equal(extractor(decoded), feats[:5])
    # the evaluation's tracklet pooling
    pooled = extractor.pool(feats, saved["frame_track"])
    np.testing.assert_array_equal(pooled, evaluation.tracklet_features(saved))
    assert extractor.distances(pooled[:2], pooled).shape == (2, len(pooled))
    # one model alone: its own features file
    gam = upm_jax.load(finished_run["workdir"], models=["gam"])
    gam_saved = evaluation.load_features(finished_run["split"].models("upm")[1].features())
    np.testing.assert_array_equal(gam(finished_run["paths"]), gam_saved["frame_feat"])
    # another batch size: the same up to float32 rounding (the products are summed in
    # another order)
    other = upm_jax.load(finished_run["workdir"], batch_size=16)(finished_run["paths"])
    assert artifact.feature_error(other, feats) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("kwargs,message", [
    (dict(split=2), "split 2: models 'lam', 'gam' have finished training only for splits [1]"),
    (dict(models=["dal"]), "model 'dal': the workdir's method 'upm' trains ['lam', 'gam']"),
    (dict(batch_size=12), "batch_size=12: expected a positive multiple of the 8 devices"),
])
def test_load_errors_name_what_is_wrong(finished_run, kwargs, message):
    with pytest.raises(ExtractorError) as e:
        upm_jax.load(finished_run["workdir"], **kwargs)
    assert message in str(e.value)


@pytest.mark.slow
def test_an_unfinished_workdir_is_refused_unless_asked(finished_run, tmp_path):
    """The same checkpoints recorded for a run of twice the steps: training not finished."""
    config = Workdir(finished_run["workdir"]).read_record()
    config.train.steps = 2 * STEPS
    Workdir(str(tmp_path)).write_record(config)
    os.symlink(finished_run["split"].path, tmp_path / "split_1")
    with pytest.raises(ExtractorError) as e:
        upm_jax.load(str(tmp_path))
    assert str(e.value) == (
        f"workdir {str(tmp_path)!r} is not finished: no split where models 'lam', 'gam' have "
        f"trained config.train.steps={2 * STEPS} steps (split 1: lam at step {STEPS}, gam at "
        f"step {STEPS}); finish it with python -m upm_jax.main --mode train --workdir {tmp_path}")
    loaded = upm_jax.load(str(tmp_path), unfinished=True, models=["gam"])
    assert [(m.name, m.step) for m in loaded.models] == [("gam", STEPS)]


def test_load_of_a_folder_that_is_no_workdir(tmp_path):
    with pytest.raises(ExtractorError, match="has no config.json: expected a folder written"):
        upm_jax.load(str(tmp_path))


def test_import_upm_jax_stays_light_and_load_is_there():
    code = ("import sys, upm_jax\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT), check=True)
    assert out.stdout.strip() == "[]"
    assert upm_jax.load is extractor_lib.load


def _random_extractor(backbone, heads, image_size, *, seed=0):
    """An Extractor of models with random weights (variance preserving) and random
    BatchNorm statistics, scales and offsets, so that no folded BatchNorm is near the
    identity. Drawn with NumPy on the shapes of the variables: no initialisation to compile."""
    rng = np.random.default_rng(seed)
    draws = {"mean": lambda s: rng.normal(0, 0.5, s), "var": lambda s: rng.uniform(0.5, 2, s),
             "scale": lambda s: rng.uniform(0.5, 1.5, s), "bias": lambda s: rng.normal(0, 0.3, s),
             "kernel": lambda s: rng.normal(0, np.prod(s[:-1]) ** -0.5, s),
             "depthwise_kernel": lambda s: rng.normal(0, np.prod(s[:2]) ** -0.5, s)}
    models = []
    for head in heads:
        model = build_model(backbone, head, n_part=2,
                            depth_multiplier=0.25 if backbone == "mobilenet_v1" else 1.0)
        shapes = jax.eval_shape(lambda m=model: m.init(
            jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size // 2, 3)), train=False))
        variables = jax.tree_util.tree_map_with_path(
            lambda path, x: draws[path[-1].key](x.shape).astype(np.float32), shapes)
        models.append(TrainedModel(head, head, None, model, variables))
    return Extractor(models, image_size=image_size, batch_size=8)


# --- the ONNX graph against the flax model, per backbone and head --------------------------

@pytest.mark.parametrize("backbone,heads,image_size", [
    # a 3x2 final map: AvgPool_1a over all of it; 2 stripes of one row, the third row dropped
    ("mobilenet_v1", ("dal",), 96),
    ("mobilenet_v1", ("local", "global"), 96),
    pytest.param("mobilenet_v1", ("dal",), 256, marks=pytest.mark.slow),  # 7 of 8 rows pooled
    pytest.param("resnet_v1_50", ("dal",), 96, marks=pytest.mark.slow),
    pytest.param("resnet_v1_50", ("local", "global"), 96, marks=pytest.mark.slow),
])
def test_onnx_graph_computes_the_model(backbone, heads, image_size):
    extractor = _random_extractor(backbone, heads, image_size)
    proto = onnx_graph.build([(m.model, m.variables) for m in extractor.models],
                             extractor.image_shape)
    import onnxruntime
    session = onnxruntime.InferenceSession(proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    frames = artifact.check_frames(extractor)
    got = session.run(None, {"frames": frames})[0]
    assert got.shape == (8, extractor.num_parts, extractor.feature_dim)
    assert artifact.feature_error(got, extractor(frames)) < 1e-5


@pytest.mark.slow
def test_stablehlo_compiles_the_accelerator_convolutions_at_highest(tmp_path):
    """One artifact for every platform: compiled ahead of time for a TPU v5e and an H100
    (compile-only devices, the `aot` extra), its LAM and GAM models' 13 depthwise layers each
    are XLA's grouped convolutions and every product is at HIGHEST precision although the
    models were built with model.matmul_precision='default'; on the CPU the taps."""
    from upm_jax import parallel
    from upm_jax.benchmark import compile as compile_lib
    from upm_jax.benchmark import hlo
    from upm_jax.export import stablehlo

    extractor = _random_extractor("mobilenet_v1", ("local", "global"), 64)
    extractor = Extractor([m._replace(model=m.model.clone(matmul_precision="default"))
                           for m in extractor.models], image_size=64, batch_size=8)
    path = str(tmp_path / "features.stablehlo")
    details = stablehlo.write(extractor, path)
    assert details["platforms"] == ["cpu", "cuda", "tpu"]
    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    meshes = {name: compile_lib.target_mesh(name) for name in ("v5e:1x1", "h100")}
    meshes["cpu"] = parallel.make_mesh(jax.devices()[:1])
    for name, mesh in meshes.items():
        frames = jax.ShapeDtypeStruct((8, 64, 32, 3), jnp.uint8,
                                      sharding=parallel.batch_sharding(mesh))
        compiled = jax.jit(exported.call).lower(frames).compile()
        stats = hlo.summary(compiled.as_text())
        grouped = stats["convolutions"].get("grouped convolution", 0)
        assert grouped == (0 if name == "cpu" else 2 * 13), name
        if name != "cpu":
            assert set(stats["operand_precision"]) == {"highest"}, name


def test_feature_error_is_relative_to_each_part_vector():
    ref = np.zeros((2, 3, 4), np.float32)
    ref[..., 0] = [[1.0, 2.0, 1e-3], [4.0, 1.0, 0.0]]
    got = ref.copy()
    got[0, 2, 1] = 1e-5  # 1% of that small part vector
    assert artifact.feature_error(got, ref) == pytest.approx(1e-2)
    got = ref.copy()
    got[1, 2, 3] = 4e-6  # a zero vector: measured against 1e-6 of the largest norm (4)
    assert artifact.feature_error(got, ref) == pytest.approx(1.0)
    assert artifact.feature_error(ref, ref) == 0.0


# --- the exports of the finished run ---------------------------------------------------------

def _evaluated_like_the_run(finished_run, frame_feat, tmp_path):
    """results.json's content for these per-frame features of split 1, evaluated by the
    run's own evaluator."""
    saved, config = finished_run["features"], finished_run["config"]
    protocol = {k: saved[k] for k in ("frame_track", "pid", "cam", "query", "gallery",
                                      "pooling", "directions")}
    path = str(tmp_path / "exported_features.npz")
    evaluation.save_frame_features(path, [frame_feat], shape=frame_feat.shape, **protocol)
    results = summary_lib.evaluate_split(
        [path], str(tmp_path / "evaluated.npz"), num_parts=frame_feat.shape[1],
        frame_level=config.eval.frame_features, pooling=config.eval.pooling,
        distance=config.eval.distance)
    return json.loads(json.dumps(summary_lib.summarize({"split_1": results})))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["stablehlo", "onnx", "savedmodel"])
def test_export_computes_what_the_run_extracted_and_scored(finished_run, fmt, tmp_path, capsys):
    out = str(tmp_path / f"features.{fmt}")
    assert export_cli.main(["--workdir", finished_run["workdir"], "--format", fmt,
                            "--out", out]) == 0
    assert f"wrote {out} ({fmt}" in capsys.readouterr().err
    run_artifact, record = artifact.open_artifact(out)
    assert record["input"]["shape"] == ["N", 64, 32, 3]
    assert record["output"]["shape"] == ["N", 2, 512]
    assert record["output"]["parts"] == [{"model": "lam", "head": "local", "dims": [0, 256]},
                                         {"model": "gam", "head": "global", "dims": [256, 512]}]
    assert record["source"] == {"workdir": finished_run["workdir"], "split": 1,
                                "models": [{"name": "lam", "head": "local", "step": STEPS},
                                           {"name": "gam", "head": "global", "step": STEPS}]}
    assert record["exported"]["upm_jax"] == upm_jax.__version__
    assert record["parity"]["error"] < 1e-5
    # the recorded test frames, resized as the pipeline does, through the artifact's runtime
    frames = upm_jax.load(finished_run["workdir"], models=["lam"]).prepare(finished_run["paths"])
    feats = np.concatenate([run_artifact(frames[:7]), run_artifact(frames[7:])])
    error = artifact.feature_error(feats, finished_run["features"]["frame_feat"])
    assert error < 1e-5
    assert _evaluated_like_the_run(finished_run, feats, tmp_path) == finished_run["results"]
    if fmt == "savedmodel":  # converts to TFLite's builtin operators, and computes the same
        assert artifact.feature_error(_tflite_features(out, frames[:9]), feats[:9]) < 1e-5


def _tflite_features(savedmodel, frames):
    import tensorflow as tf
    converter = tf.lite.TFLiteConverter.from_saved_model(savedmodel)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    interpreter = tf.lite.Interpreter(model_content=converter.convert())
    frames_in, features_out = (interpreter.get_input_details()[0]["index"],
                               interpreter.get_output_details()[0]["index"])
    interpreter.resize_tensor_input(frames_in, list(frames.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(frames_in, frames)
    interpreter.invoke()
    return interpreter.get_tensor(features_out)


@pytest.mark.slow
def test_a_wrong_artifact_is_refused_and_nothing_is_written(finished_run, tmp_path, monkeypatch):
    extractor = upm_jax.load(finished_run["workdir"])
    first = extractor.models[0]
    stem = first.variables["params"]["backbone"]["Conv2d_0"]["BatchNorm"]
    nudged = jax.tree.map(lambda x: x, first.variables)
    nudged["params"]["backbone"]["Conv2d_0"]["BatchNorm"] = dict(stem, bias=stem["bias"] + 1e-3)
    wrong = Extractor([first._replace(variables=nudged)] + list(extractor.models[1:]),
                      image_size=64, batch_size=8)
    write = onnx_graph.write
    monkeypatch.setattr(onnx_graph, "write", lambda _, path: write(wrong, path))
    out = tmp_path / "features.onnx"
    with pytest.raises(artifact.ExportError, match=r"differ from upm_jax's by .* above the "
                                                   r"tolerance 1e-05; nothing written"):
        artifact.export(extractor, "onnx", str(out))
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_bfloat16_export_is_exact_to_the_models_own_rounding(finished_run, tmp_path):
    loaded = upm_jax.load(finished_run["workdir"])
    extractor = Extractor([m._replace(model=m.model.clone(dtype=jnp.bfloat16))
                           for m in loaded.models], image_size=64, batch_size=8)
    record = artifact.export(extractor, "onnx", str(tmp_path / "bf16.onnx"))
    check = record["parity"]
    assert record["model"]["dtype"] == "bfloat16"
    assert 1e-4 < check["bfloat16_rounding"] < 0.05  # bfloat16 rounds, and only so much
    assert check["tolerance"] == 2 * check["bfloat16_rounding"]
    # ONNX computes the float32 model: its distance from bfloat16 is the rounding itself
    assert check["error"] == pytest.approx(check["bfloat16_rounding"], rel=0.01)


@pytest.mark.parametrize("fmt,out,message", [
    ("tflite", "x.tflite", "format 'tflite': expected one of ['onnx', 'savedmodel', "
                           "'stablehlo']"),
    ("onnx", "missing/x.onnx", "x.onnx: its folder {tmp}/missing does not exist"),
    ("savedmodel", "existing_file", "existing_file exists: a savedmodel is a folder"),
])
def test_cli_checks_format_and_out_before_loading(tmp_path, capsys, fmt, out, message):
    (tmp_path / "existing_file").write_bytes(b"")
    # the workdir does not exist: the format and the output are refused first
    assert export_cli.main(["--workdir", str(tmp_path / "no_run"), "--format", fmt,
                            "--out", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message.format(tmp=tmp_path) in err


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def write_half(extractor, path):
        with open(path, "wb") as f:
            f.write(b"half an artifact")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx_graph, "write", write_half)
    (tmp_path / "x.onnx").write_bytes(b"the previous artifact")
    with pytest.raises(artifact.ExportError, match=r"x.onnx: cannot write the artifact "
                                                   r"\(\[Errno 28\] No space left on device\); "
                                                   r"nothing written"):
        artifact.export(None, "onnx", str(tmp_path / "x.onnx"))
    assert os.listdir(tmp_path) == ["x.onnx"]
    assert (tmp_path / "x.onnx").read_bytes() == b"the previous artifact"


def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "existing"
    folder.mkdir()
    assert export_cli.main(["--workdir", str(tmp_path), "--format", "onnx", "--out",
                            str(tmp_path / "x.onnx")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    with pytest.raises(artifact.ExportError, match="is an existing folder"):
        artifact.export(None, "stablehlo", str(folder))
    real = artifact.importlib.util.find_spec
    monkeypatch.setattr(artifact.importlib.util, "find_spec",
                        lambda name: None if name == "onnxruntime" else real(name))
    with pytest.raises(artifact.ExportError, match=r"format 'onnx' needs onnxruntime: pip "
                                                   r"install 'upm_jax\[export\]'"):
        artifact.format_module("onnx")
