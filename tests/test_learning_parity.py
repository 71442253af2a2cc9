"""tools/learning_parity.py: both implementations trained from the same state and batches.

A tiny run (8 generated ids, 64x32 frames, batch 8, 4 steps, one seed) in-process, the
original in its subprocess. The first step's loss of the two trajectories must agree to
float tolerance (same initial variables, same frame rows through the frame-table input of
tools/tf1_original.py), and every side must be evaluated by upm_jax's own code.
"""
import importlib.util
import json
import os
import pathlib

import numpy as np
import pytest

from upm_jax import data

pytestmark = pytest.mark.slow

pytest.importorskip("tf_slim")
pytest.importorskip("tf_keras")

TOOLS = pathlib.Path(__file__).parent.parent / "tools"


def _tool():
    spec = importlib.util.spec_from_file_location("learning_parity_tool", TOOLS / "learning_parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_sides_start_alike_and_are_evaluated(tmp_path, capsys):
    tool = _tool()
    original = tool.compare_tf1.default_original()
    if not os.path.isdir(original):
        # third-party code we run but may not ship: only its absence skips this comparison
        pytest.skip(f"the original TF1 code is not at {original}; set UPM_TF1_ORIGINAL to "
                    "it (docs/faithfulness.md says how to obtain it)")
    out = tmp_path / "parity.json"
    status = tool.main(["--steps", "4", "--synthetic-ids", "8", "--image-size", "64",
                        "--batch", "8", "--seeds", "3", "--workdir", str(tmp_path / "work"),
                        "--json", str(out)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    assert (run["seed"], run["steps"], run["synthetic_seed"]) == (3, 4, 0)
    first = run["original"]["first_loss"], run["upm_jax"]["first_loss"]
    assert abs(first[0] - first[1]) <= 1e-5 * abs(first[0]), first
    for side in ("initial", "original", "upm_jax"):
        assert 0.0 <= run[side]["rank1"] <= 100.0 and 0.0 < run[side]["mAP"] <= 100.0, run[side]
    assert "original_eigen" not in run
    split_dir = tmp_path / "work" / "set0_seed3" / "split_1"
    for stem in ("initial_features", "original_features", "features"):
        assert (split_dir / f"{stem}.npz").is_file(), stem
    batches = np.load(tmp_path / "work" / "set0_seed3" / "batches.npz")
    assert batches["index"].shape == (4, 8)
    for step in range(4):   # upm_jax's own rows of each step, as its trainer draws them
        np.testing.assert_array_equal(
            batches["index"][step], data.batch_indices(3, step, run["frames"], 8))
    assert batches["frames"].dtype == np.uint8 and batches["frames"].shape[1:] == (64, 32, 3)
    summary = report["summary"]["rank1"]
    assert summary["upm_jax - original"]["mean"] == pytest.approx(
        run["upm_jax"]["rank1"] - run["original"]["rank1"])
