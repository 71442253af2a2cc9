"""The command line: every mode in-process through `upm_jax.main.cli`, the error paths a
user meets first, exact resume after SIGKILL, and one subprocess test of the exit-code
contract. A tiny model on a tiny synthetic PRID2011-layout set."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from upm_jax import main as main_lib

pytestmark = pytest.mark.usefixtures("one_device")   # conftest: runs on one device

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.py")

# A tiny but complete run: 8 synthetic ids (4 train / 4 test), MobileNet v1 x0.25 at 64x32.
TINY = [
    "--config.data.synthetic_ids=8",
    "--config.data.image_size=64",
    "--config.train.batch_size=16",
    "--config.train.log_every=2",
    "--config.eval.batch_size=64",
]


def cli(*args):
    """`python -m upm_jax.main ARGS` in this process: the exit status."""
    return main_lib.cli(["upm_jax.main", *args])


def cli_run(workdir, *args, config=DEMO):
    rc = cli(f"--config={config}", f"--workdir={workdir}", *args)
    assert rc == 0
    return rc


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
def staged(tmp_path_factory, one_device):
    """train with a config, then extract and evaluate from the workdir alone."""
    workdir = str(tmp_path_factory.mktemp("staged"))
    flags_ = [*TINY, "--config.train.steps=6", "--config.train.checkpoint_every=3",
              "--config.eval.initial=false"]
    cli_run(workdir, "--mode=train", *flags_)
    for mode in ("extract", "evaluate"):
        assert cli(f"--workdir={workdir}", f"--mode={mode}") == 0
    return workdir, flags_


@pytest.mark.slow
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


@pytest.mark.slow
def test_mode_all_equals_staged_modes(staged, tmp_path, capsys):
    workdir, flags_ = staged
    cli_run(str(tmp_path), *flags_)
    assert "rank1" in capsys.readouterr().out
    ours = json.load(open(tmp_path / "results.json"))
    theirs = json.load(open(os.path.join(workdir, "results.json")))
    assert ours == theirs
    assert os.path.isfile(tmp_path / "cmc.png")


@pytest.mark.slow
def test_demo_reports_initial_network_once(tmp_path, capsys):
    args = [*TINY, "--config.train.steps=2", "--config.train.checkpoint_every=2"]
    cli_run(str(tmp_path), *args)
    results = json.load(open(tmp_path / "results.json"))
    assert set(results["initial"]) == {"split_1", "mean"}
    initial = tmp_path / "split_1" / "lam" / "initial_features.npz"
    written = initial.stat().st_mtime_ns
    capsys.readouterr()
    cli_run(str(tmp_path), *args)   # everything done: nothing is trained or re-extracted
    err = capsys.readouterr().err
    assert "already trained" in err and "features already in" in err
    assert initial.stat().st_mtime_ns == written
    assert json.load(open(tmp_path / "results.json")) == results
    assert cli(f"--workdir={tmp_path}", "--mode=evaluate") == 0   # keeps the initial table
    assert json.load(open(tmp_path / "results.json")) == results


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    """The command straight through, and killed after its first checkpoint then run again:
    the same final state, bit for bit. Each run is a command of its own on one CPU device
    (the three compile one training step: they share the test run's compilation cache)."""
    args = [*TINY, "--mode=train", "--config.train.steps=40",
            "--config.train.checkpoint_every=10"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)

    def command(workdir):
        return [sys.executable, "-m", "upm_jax.main", f"--config={DEMO}", f"--workdir={workdir}",
                *args]

    def finish(workdir):
        done = subprocess.run(command(workdir), cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    finish(straight)
    proc = subprocess.Popen(command(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = killed / "split_1" / "lam" / "checkpoints" / "10"
    deadline = time.time() + 300
    while not (first / "commit_success.txt").exists() and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "split_1" / "lam" / "checkpoints" / "40").exists()

    finish(killed)   # also takes over the killed run's lock
    a = restore_raw(str(straight / "split_1" / "lam"), 40)
    b = restore_raw(str(killed / "split_1" / "lam"), 40)
    assert a.keys() == b.keys()
    assert len(a) > 50
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("args, message", [
    (["--config.data.root=/nonexistent/prid_2011", "--config.data.synthetic_ids=0",
      "--config.data.split_file="],
     "/nonexistent/prid_2011"),
    (["--config.model.pretrained=/nonexistent/mobilenet_v1.npz"],
     "config.model.pretrained='/nonexistent/mobilenet_v1.npz': no such file"),
    (["--config.data.num_cameras=6"], "config.data.num_cameras=6 but"),
    (["--config.data.splits=11"], "config.data.splits='11'"),
    (["--config.method=dall"], "config.method='dall'"),
    (["--config.train.checkpoint_every=0"], "config.train.checkpoint_every=0"),
    (["--config.train.lerning_rate=0.1"],
     "config.train.lerning_rate (did you mean config.train.learning_rate?)"),
])
def test_bad_input_is_one_clear_error(tmp_path, capsys, args, message):
    rc = cli(f"--config={DEMO}", f"--workdir={tmp_path / 'w'}", *TINY,
             "--config.train.steps=1", *args)
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert message in err
    assert err.count("error: ") == 1


def test_workdir_alone_without_a_record_asks_for_a_config(tmp_path, capsys):
    assert cli(f"--workdir={tmp_path}", "--mode=extract") == 2
    assert "has no config.json: give --config" in capsys.readouterr().err
    assert cli("--mode=extract") == 2
    assert "give --config (what to run) or --workdir" in capsys.readouterr().err


def test_no_workdir_picks_and_says_the_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli(f"--config={DEMO}:steps=0", "--config.train.log_every=5") == 2
    err = capsys.readouterr().err
    assert f"writing to {os.path.join('runs', 'demo_steps=0_train.log_every=5')}" in err
    assert "config.train.steps=0: expected a number above 0" in err


def test_missing_config_file_and_bad_shortcut(tmp_path, capsys):
    assert cli("--config=configs/nope.py", f"--workdir={tmp_path}") == 2
    assert "--config configs/nope.py: no such file" in capsys.readouterr().err
    assert cli(f"--config={DEMO}:stpes=3", f"--workdir={tmp_path}") == 2
    assert "config argument 'stpes=3'" in capsys.readouterr().err


def test_unwritable_workdir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert cli(f"--config={DEMO}", f"--workdir={blocker / 'run'}", *TINY) == 2
    assert "is not writable" in capsys.readouterr().err


def test_paper_config_without_weights_explains_conversion(tmp_path, capsys):
    rc = cli(f"--config={os.path.join(REPO, 'configs', 'prid.py')}",
             f"--workdir={tmp_path / 'w'}", "--config.data.root=" + str(tmp_path))
    assert rc == 2
    assert "python -m upm_jax.porting" in capsys.readouterr().err


@pytest.mark.slow
def test_exit_status_contract_of_the_real_command(tmp_path):
    """The one subprocess test: a user's mistake exits 2 with one error line, no traceback."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "upm_jax.main", "--config=configs/demo.py",
         f"--workdir={tmp_path}", "--config.train.batch_size=0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: config.train.batch_size=0: expected a number above 0" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("content, args, message", [
    (None, ["--config=configs"], "--config configs: is a folder; give an experiment file in "
                                 "it, e.g. configs/prid.py"),
    (None, ["--config", "configs/prid"], "--config configs/prid: no such file; did you mean "
                                         "configs/prid.py?"),
    (None, ["--config", "configs/nope.py"], "--config configs/nope.py: no such file"),
    ("def get_config(arg=None):\n    raise RuntimeError('boom')\n", [],
     "get_config raised RuntimeError: boom (line 2)"),
    ("x = 1\n", [], "defines no get_config(arg) function"),
    ("def get_config(arg=None):\n    return None\n", [],
     "get_config returned None, expected an ml_collections.ConfigDict"),
    ("def get_config(arg=None)\n    return 1\n", [], "line 1: expected ':'"),
    ("import no_such_module_here\n", [],
     "the file raised ModuleNotFoundError: No module named 'no_such_module_here' (line 1)"),
])
def test_a_config_file_that_gives_no_config_is_one_clear_error(tmp_path, monkeypatch, capsys,
                                                               content, args, message):
    monkeypatch.chdir(REPO)
    if content is not None:
        (tmp_path / "exp.py").write_text(content)
        args = [f"--config={tmp_path / 'exp.py'}"]
    assert cli(*args, f"--workdir={tmp_path / 'w'}") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error: ") == 1 and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_a_backend_this_machine_lacks_is_one_clear_error(tmp_path, monkeypatch, capsys):
    """JAX_PLATFORMS=cuda on a CPU host: JAX fails its backend start with a bare
    AssertionError (jax 0.10.2)."""
    import jax

    def no_backend():
        raise AssertionError()

    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    monkeypatch.setattr(jax, "devices", no_backend)
    assert cli(f"--config={DEMO}", f"--workdir={tmp_path}") == 2
    err = capsys.readouterr().err
    assert ("error: JAX_PLATFORMS=cuda: JAX cannot start that backend on this machine; unset "
            "JAX_PLATFORMS to use the devices present") in err


def test_config_overrides_without_config_apply_to_the_record(monkeypatch):
    """`--workdir DIR --mode extract --config.data.root=...` (the documented command): the
    overrides are taken out of absl's flags and kept for the recorded config."""
    argv, overrides = main_lib._check_config_flags(
        ["upm_jax.main", "--workdir=w", "--mode=extract", "--config.data.root=/mnt/prid",
         "--config.eval.batch_size", "8"])
    assert argv == ["upm_jax.main", "--workdir=w", "--mode=extract"]
    assert overrides == [("data.root", "/mnt/prid"), ("eval.batch_size", "8")]
    with pytest.raises(main_lib.UsageError, match="config.data.rot"):
        main_lib._check_config_flags(["upm_jax.main", "--workdir=w", "--config.data.rot=/x"])
