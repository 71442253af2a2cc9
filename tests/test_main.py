"""End to end through `python -m upm_jax.main`: every mode, exact resume after SIGKILL, and
the error paths a user meets first. A tiny model on a tiny synthetic PRID2011-layout set."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny but complete run: 8 synthetic ids (4 train / 4 test), MobileNet v1 x0.25 at 64x32.
TINY = [
    "--config.data.synthetic_ids=8",
    "--config.data.image_size=64",
    "--config.train.batch_size=16",
    "--config.train.log_every=2",
    "--config.eval.batch_size=64",
]


def run_main(workdir, *flags, config="configs/demo.py", check=True):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "upm_jax.main", f"--config={config}", f"--workdir={workdir}",
           *flags]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"main failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def restore_raw(directory, step):
    """A checkpoint's arrays as saved (no target needed), as a flat {path: np.ndarray}."""
    tree = ocp.PyTreeCheckpointer().restore(os.path.join(directory, "checkpoints", str(step),
                                                         "default"))
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}/{key}", value)
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(f"{prefix}/{i}", value)
        else:
            flat[prefix] = np.asarray(node)

    walk("", tree)
    return flat


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """train, then extract, then evaluate, as three invocations in one workdir."""
    workdir = str(tmp_path_factory.mktemp("staged"))
    flags = [*TINY, "--config.train.steps=6", "--config.train.checkpoint_every=3"]
    for mode in ("train", "extract", "evaluate"):
        run_main(workdir, f"--mode={mode}", *flags)
    return workdir, flags


def test_staged_modes_write_every_artifact(staged):
    workdir, _ = staged
    model_dir = os.path.join(workdir, "split_1", "lam")
    assert sorted(os.listdir(os.path.join(model_dir, "checkpoints"))) == ["3", "6"]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["steps"] == 6
    lines = [json.loads(l) for l in open(os.path.join(model_dir, "metrics.jsonl"))]
    assert [l["step"] for l in lines] == [2, 3, 4, 6]  # every log_every, and at checkpoints
    assert all(np.isfinite(l["loss"]) and l["frames_per_sec"] > 0 for l in lines)
    assert os.listdir(os.path.join(model_dir, "tensorboard"))
    features = np.load(os.path.join(model_dir, "features.npz"))
    assert features["frame_feat"].shape[1:] == (2, 256)  # P=2 stripes of MobileNet x0.25
    assert features["query"].shape == (4,) and features["gallery"].shape == (4,)
    results = json.load(open(os.path.join(workdir, "results.json")))
    for mode in ("paper", "standard"):
        for key in ("rank1", "rank5", "rank10", "rank20", "mAP"):
            assert 0.0 <= results["mean"][mode][key] <= 100.0
    assert results["mean"]["paper"]["rank1"] == results["split_1"]["paper"]["rank1"]


def test_mode_all_equals_staged_modes(staged, tmp_path):
    workdir, flags = staged
    proc = run_main(str(tmp_path), *flags, "--config.eval.initial=false")
    assert "rank1" in proc.stdout
    ours = json.load(open(tmp_path / "results.json"))
    theirs = json.load(open(os.path.join(workdir, "results.json")))
    assert ours == theirs
    assert os.path.isfile(tmp_path / "cmc.png")


def test_demo_reports_initial_network(tmp_path):
    run_main(str(tmp_path), *TINY, "--config.train.steps=2", "--config.train.checkpoint_every=2")
    results = json.load(open(tmp_path / "results.json"))
    assert set(results["initial"]) == {"split_1", "mean"}
    assert "initial" in open(tmp_path / "results.json").read()


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    flags = [*TINY, "--mode=train", "--config.train.steps=40",
             "--config.train.checkpoint_every=10"]
    straight = tmp_path / "straight"
    run_main(str(straight), *flags)

    killed = tmp_path / "killed"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "upm_jax.main", "--config=configs/demo.py",
         f"--workdir={killed}", *flags], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = killed / "split_1" / "lam" / "checkpoints" / "10"
    deadline = time.time() + 300
    while not (first / "commit_success.txt").exists() and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "split_1" / "lam" / "checkpoints" / "40").exists()

    run_main(str(killed), *flags)
    a = restore_raw(str(straight / "split_1" / "lam"), 40)
    b = restore_raw(str(killed / "split_1" / "lam"), 40)
    assert a.keys() == b.keys()
    assert len(a) > 50
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("flags, message", [
    (["--config.data.root=/nonexistent/prid_2011", "--config.data.synthetic_ids=0",
      "--config.data.split_file="],
     "/nonexistent/prid_2011"),
    (["--config.model.pretrained=/nonexistent/mobilenet_v1.npz"],
     "config.model.pretrained='/nonexistent/mobilenet_v1.npz': no such file"),
    (["--config.data.num_cameras=6"], "config.data.num_cameras=6 but"),
    (["--config.data.splits=11"], "config.data.splits='11'"),
    (["--config.method=dall"], "config.method='dall'"),
])
def test_bad_input_is_one_clear_error(tmp_path, flags, message):
    proc = run_main(str(tmp_path / "w"), *TINY, "--config.train.steps=1", *flags, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = run_main(str(blocker / "run"), *TINY, check=False)
    assert proc.returncode == 2
    assert "is not writable" in proc.stderr and "Traceback" not in proc.stderr


def test_paper_config_without_weights_explains_conversion(tmp_path):
    proc = run_main(str(tmp_path), "--config.data.root=" + str(tmp_path), config="configs/prid.py",
                    check=False)
    assert proc.returncode == 2
    assert "tools/port_weights.py" in proc.stderr and "Traceback" not in proc.stderr
