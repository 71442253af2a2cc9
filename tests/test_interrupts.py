"""Stop signals: during training the step in flight is saved and the resumed run ends equal
to an uninterrupted one, with each logged step once; during extraction nothing is left
half-written; a real SIGTERM exits 143 with one line."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from repo_configs import tiny_config

from upm_jax import extract
from upm_jax import interrupts
from upm_jax import run
from upm_jax.training import trainer as trainer_lib

pytestmark = pytest.mark.usefixtures("one_device")   # conftest: runs on one device

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8


def _signal_at_call(monkeypatch, obj, name, call, signum):
    """obj.name raises `signum` in this process right after its `call`-th call returns."""
    real = getattr(obj, name)
    calls = []

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == call:
            signal.raise_signal(signum)
        return out

    monkeypatch.setattr(obj, name, wrapped)


def _config():
    return tiny_config(train__steps=STEPS, train__checkpoint_every=100, train__log_every=1)


def _rows(workdir):
    with open(os.path.join(workdir, "split_1", "lam", "metrics.jsonl"), encoding="utf-8") as f:
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("_per_sec")}
                for line in f]


def _final_arrays(workdir):
    path = os.path.join(workdir, "split_1", "lam", "checkpoints", str(STEPS), "default")
    tree = ocp.PyTreeCheckpointer().restore(path)
    return {str(k): np.asarray(v) for k, v in
            jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, one_device):
    """An uninterrupted 8-step run, and one stopped by SIGTERM after its 3rd step, killed
    rows appended after its checkpoint (as a SIGKILL after logging leaves them), resumed."""
    root = tmp_path_factory.mktemp("interrupts")
    straight, stopped = str(root / "straight"), str(root / "stopped")
    run.run(_config(), straight, mode="train")
    with pytest.MonkeyPatch.context() as m:
        _signal_at_call(m, trainer_lib.Trainer, "step", 3, signal.SIGTERM)
        with interrupts.installed(), pytest.raises(interrupts.Interrupted) as info:
            run.run(_config(), stopped, mode="train")
    saved = sorted(os.listdir(os.path.join(stopped, "split_1", "lam", "checkpoints")))
    rows_after_stop = _rows(stopped)
    with open(os.path.join(stopped, "split_1", "lam", "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 4, "loss": 9.0}) + "\n" + '{"step": 5, "lo')
    run.run(_config(), stopped, mode="train")
    return {"straight": straight, "stopped": stopped, "error": info.value, "saved": saved,
            "rows_after_stop": rows_after_stop}


@pytest.mark.slow
def test_sigterm_saves_the_step_in_flight_and_names_it(interrupted):
    error = interrupted["error"]
    assert error.status == 143 and error.signum == signal.SIGTERM
    assert str(error) == (f"stopped by SIGTERM: split 1 lam: saved the checkpoint of step 3 in "
                          f"{interrupted['stopped']}/split_1/lam/checkpoints; run the same "
                          "command again to resume from it")
    assert interrupted["saved"] == ["3"]   # checkpoint_every=100: only the stop's own save
    assert [r["step"] for r in interrupted["rows_after_stop"]] == [1, 2, 3]


@pytest.mark.slow
def test_the_resumed_run_equals_an_uninterrupted_one_with_each_step_logged_once(interrupted):
    a, b = _final_arrays(interrupted["straight"]), _final_arrays(interrupted["stopped"])
    assert a.keys() == b.keys() and len(a) > 50
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    rows = _rows(interrupted["stopped"])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows == _rows(interrupted["straight"])


@pytest.mark.slow
def test_ctrl_c_during_extraction_leaves_no_half_written_file(interrupted, monkeypatch, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(interrupted["stopped"], workdir)
    model_dir = os.path.join(workdir, "split_1", "lam")
    _signal_at_call(monkeypatch, extract.evaluation.SpreadMeter, "add", 1, signal.SIGINT)
    with interrupts.installed(), pytest.raises(interrupts.Interrupted) as info:
        run.run(None, workdir, mode="extract", overrides=[("eval.batch_size", "8")])
    assert info.value.status == 130
    assert str(info.value) == ("stopped by SIGINT: no file was left half-written; run the same "
                               "command again to continue")
    assert sorted(os.listdir(model_dir)) == ["checkpoints", "metrics.jsonl", "tensorboard"]


@pytest.mark.slow
def test_a_real_sigterm_exits_143_with_one_line_after_saving(tmp_path):
    """What a cluster or a preemptible VM sends, to the real command."""
    workdir = tmp_path / "w"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")   # one device
    proc = subprocess.Popen(
        [sys.executable, "-m", "upm_jax.main", "--config=configs/demo.py",
         f"--workdir={workdir}", "--mode=train", "--config.data.synthetic_ids=8",
         "--config.data.image_size=64", "--config.train.batch_size=16",
         "--config.train.steps=100000", "--config.train.checkpoint_every=100000",
         "--config.train.log_every=5"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "split_1" / "lam" / "metrics.jsonl"
    deadline = time.time() + 300
    # until a step is logged: a signal before the loop saves nothing (nothing was trained)
    while not (metrics.exists() and metrics.stat().st_size) and proc.poll() is None:
        assert time.time() < deadline, "training did not start within 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1, err[-2000:]
    step = int(lines[0].split("checkpoint of step ")[1].split()[0])
    assert lines[0] == (f"stopped by SIGTERM: split 1 lam: saved the checkpoint of step {step} "
                        f"in {workdir}/split_1/lam/checkpoints; run the same command again to "
                        "resume from it")
    assert os.listdir(workdir / "split_1" / "lam" / "checkpoints") == [str(step)]
    assert (workdir / "split_1" / "lam" / "checkpoints" / str(step) / "default" /
            "checksums.json").exists()
