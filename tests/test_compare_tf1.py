"""tools/compare_tf1.py: upm_jax's whole training step against the original TF1 graph.

Runs the harness in-process (the original in its subprocesses) at a tiny size: MobileNet
v1 x0.25, 64x32 frames, batch 8, 4 + 3 tracklets, one step of each method. Asserts the
harness passes and the groups that must agree to float tolerance after one step do: the
loss, the EMA (read before the update, as the original), the cross anchors, the step
counter and (GAM) the frozen relation layers. Then GAM's third step alone (--restart).
"""
import importlib.util
import json
import os
import pathlib

import pytest

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
        pytest.skip(f"the original TF1 code is not at {tool.default_original()}; put "
                    "../shared beside the clone or set UPM_TF1_ORIGINAL")
    return tool


def test_one_step_matches_the_original(tmp_path, capsys):
    tool = _tool_with_original()
    out = tmp_path / "diffs.json"
    status = tool.main(["--steps", "1", "--batch", "8", "--image-size", "64", "--tracklets", "4,3",
                        "--json", str(out)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    report = json.loads(out.read_text())
    assert sorted(report) == ["dal", "upm_global", "upm_local"]
    for method, result in report.items():
        assert result["seeds"] == [0]
        rows = {r["group"]: r for r in result["rows"]}
        assert rows["loss"]["ours"][0] <= 1e-5, (method, rows["loss"])
        assert rows["loss"]["eigen"][0] <= 1e-5, (method, rows["loss"])
        assert rows["cross anchors"]["ours"][0] <= 1e-5, (method, rows["cross anchors"])
        assert rows["ema"]["ours"] == [0.0], (method, rows["ema"])
        assert rows["step"]["ours"] == [0.0], (method, rows["step"])
        for group in ("params", "rms slot", "momentum slot", "bn moving stats", "intra anchors"):
            assert group in rows and rows[group]["gap"][0] > 0, (method, group)
        assert ("frozen params" in rows) == (method == "upm_global")
    frozen = {r["group"]: r for r in report["upm_global"]["rows"]}["frozen params"]
    assert frozen["ours"] == [0.0], frozen
    assert any("Conv2d_1c_1x1" in name for name in report["dal"]["skipped"])


def test_a_later_step_alone_matches_the_original(tmp_path, capsys):
    """--restart: GAM's step 3 from the original's state after 2 steps (cross-camera phase on,
    anchors and slots no longer at their start), compared by its increments."""
    tool = _tool_with_original()
    out = tmp_path / "diffs.json"
    status = tool.main(["--restart", "--steps", "3", "--method", "upm_global", "--batch", "8",
                        "--image-size", "64", "--tracklets", "4,3", "--cross-start", "1",
                        "--json", str(out)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "increments (--restart)" in printed
    rows = {r["group"]: r for r in json.loads(out.read_text())["upm_global"]["rows"]}
    assert {r["step"] for r in rows.values()} == {3}
    for group in ("loss", "ema"):  # the rest within the kernel gap (status 0)
        assert rows[group]["ours"][0] <= 1e-5, rows[group]
    assert rows["frozen params"]["ours"] == [0.0] and rows["step"]["ours"] == [0.0]
