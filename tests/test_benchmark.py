"""python -m upm_jax.benchmark runs end to end on a tiny setting and writes well-formed rows (speed
itself is measured by running the tool, never asserted here)."""
import json

import pytest

from upm_jax.benchmark import __main__ as benchmark

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_device")]   # conftest


def test_train_and_extract_rows(tmp_path):
    out = tmp_path / "bench.json"
    benchmark.main(["--sections", "train,extract", "--backbones", "mobilenet_v1",
                    "--heads", "upm_local", "--batches", "16", "--dtypes", "float32",
                    "--image-size", "64", "--n-part", "2", "--depth-multiplier", "0.25",
                    "--steps", "1", "--repeats", "1", "--extract-ids", "4",
                    "--extract-batch", "32", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [r["section"] for r in rows] == ["train", "extract", "extract"]
    train = rows[0]
    for key in ("device", "jax", "dtype", "batch"):
        assert key in train
    assert train["batch"] == 16 and train["dtype"] == "float32"
    assert train["steps_per_s"] > 0 and train["frames_per_s"] == train["steps_per_s"] * 16
    assert train["flops_per_step"] > 1e6          # XLA's cost analysis of the whole step
    assert train["mfu"] is None                   # no known peak for a CPU
    assert {r["input"] for r in rows[1:]} == {"on-device", "host pipeline (PNG files)"}
    assert all(r["frames_per_s"] > 0 for r in rows[1:])


def test_export_rows(tmp_path):
    out = tmp_path / "bench.json"
    benchmark.main(["--sections", "export", "--backbones", "mobilenet_v1", "--dtypes", "float32",
                    "--export-methods", "upm_local", "--export-formats", "stablehlo,onnx",
                    "--image-size", "64", "--n-part", "2", "--depth-multiplier", "0.25",
                    "--steps", "1", "--repeats", "1", "--extract-batch", "8", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["runtime"], r["format"]) for r in rows] == [
        ("upm_jax (jit)", ""), ("jax.export reloaded", "stablehlo"), ("onnxruntime", "onnx")]
    assert all(r["section"] == "export" and r["batch"] == 8 and r["frames_per_s"] > 0
               and r["load_s"] > 0 for r in rows)
    assert all(r["error"] < 1e-5 and r["bytes"] > 1e5 for r in rows[1:])
