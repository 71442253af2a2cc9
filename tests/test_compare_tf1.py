"""tools/compare_tf1.py: upm_jax's whole training step against the original TF1 graph.

Runs the harness in-process (the original in its subprocesses) at a tiny size: MobileNet
v1 x0.25, 64x32 frames, batch 8, 4 + 3 tracklets: one step of DAL and LAM, and GAM's
first and third step each alone (--restart). Asserts the harness passes and the groups
that must agree to float tolerance after one step from the start do: the loss, the EMA
(read before the update, as the original), the cross anchors, the step counter and (GAM)
the frozen relation layers.
"""
import importlib.util
import json
import os
import pathlib

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("tf_slim")
pytest.importorskip("tf_keras")

TOOL = pathlib.Path(__file__).parent.parent / "tools" / "compare_tf1.py"


def _tool():
    spec = importlib.util.spec_from_file_location("compare_tf1_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tool_with_original():
    tool = _tool()
    if not os.path.isdir(tool.default_original()):
        # third-party code we run but may not ship: only its absence skips this comparison
        pytest.skip(f"the original TF1 code is not at {tool.default_original()}; set "
                    "UPM_TF1_ORIGINAL to it (docs/faithfulness.md says how to obtain it)")
    return tool


def _rows(report, method, step):
    return {r["group"]: r for r in report[method]["rows"] if r["step"] == step}


def _assert_one_step_from_start(method, rows):
    """The groups that agree to float tolerance after one step from the common start."""
    for group in ("loss", "cross anchors"):
        assert rows[group]["ours"][0] <= 1e-5, (method, rows[group])
        assert rows[group]["eigen"][0] <= 1e-5, (method, rows[group])
    assert rows["ema"]["ours"] == [0.0] and rows["step"]["ours"] == [0.0], (method, rows)
    for group in ("params", "rms slot", "momentum slot", "bn moving stats", "intra anchors"):
        assert group in rows and rows[group]["gap"][0] > 0, (method, group)


def test_one_step_matches_the_original(tmp_path, capsys):
    """DAL and LAM: the state after one step from the original's initial variables."""
    tool = _tool_with_original()
    out = tmp_path / "diffs.json"
    status = tool.main(["--steps", "1", "--method", "dal", "--method", "upm_local", "--batch", "8",
                        "--image-size", "64", "--tracklets", "4,3", "--json", str(out)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    report = json.loads(out.read_text())
    assert sorted(report) == ["dal", "upm_local"]
    for method in report:
        assert report[method]["seeds"] == [0]
        rows = _rows(report, method, 1)
        _assert_one_step_from_start(method, rows)
        assert "frozen params" not in rows
    assert any("Conv2d_1c_1x1" in name for name in report["dal"]["skipped"])


def test_each_step_alone_matches_the_original(tmp_path, capsys):
    """GAM with --restart: step 1 from the initial variables and step 3 from the original's
    state after 2 steps (cross-camera phase on, anchors and slots moved), by increments."""
    tool = _tool_with_original()
    out = tmp_path / "diffs.json"
    status = tool.main(["--restart", "--steps", "1,3", "--method", "upm_global", "--batch", "8",
                        "--image-size", "64", "--tracklets", "4,3", "--cross-start", "1",
                        "--json", str(out)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "increments (--restart)" in printed
    report = json.loads(out.read_text())
    _assert_one_step_from_start("upm_global", _rows(report, "upm_global", 1))
    for step in (1, 3):
        rows = _rows(report, "upm_global", step)
        for group in ("loss", "ema"):  # the rest within the kernel gap (status 0)
            assert rows[group]["ours"][0] <= 1e-5, (step, rows[group])
        assert rows["frozen params"]["ours"] == [0.0] and rows["step"]["ours"] == [0.0]
