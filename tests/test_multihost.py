"""Multi-process runs: two processes on localhost (one CPU device each, gloo collectives)
train, extract and evaluate the demo in one shared workdir and give exactly what one
process with two devices gives; joining errors name what is missing; a process's rows
come from the sharding."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from upm_jax import checkpoints as checkpoints_lib
from upm_jax import parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24
# The demo, small: 16 synthetic ids (8 train / 8 test), MobileNet v1 x0.25 at 64x32.
DEMO = [
    "--config=configs/demo.py",
    "--config.data.synthetic_ids=16",
    "--config.data.image_size=64",
    f"--config.train.steps={STEPS}",
    "--config.train.batch_size=16",
    f"--config.train.checkpoint_every={STEPS // 2}",
    f"--config.train.log_every={STEPS // 3}",
    "--config.eval.batch_size=32",
    "--config.eval.initial=False",
]
LAUNCHER_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                      "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")
TIMEOUT_S = 540  # the whole fixture; a hung collective must not hang CI


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices, **extra):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.pop("XLA_FLAGS", None)
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), CUDA_VISIBLE_DEVICES="",
               TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1", **extra)
    return env


def _start(workdir, env, log_path, args=DEMO):
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "upm_jax.main", *args, f"--workdir={workdir}"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    return proc


def _stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# jaxlib 0.10.2's CPU collectives now and then abort a process while gloo connects it
# ("terminate called after throwing ... FATAL: exception not rethrown", SIGABRT), before
# the run has begun: seen in 2 of about 20 launches of two processes on the 2-core
# development machine. Not ours to fix: a fixture whose process ended that way starts its processes
# once more, in a fresh folder; any other failure, or a second abort, fails the tests.
STARTUP_ABORT = "FATAL: exception not rethrown"


def _launched(tmp_path_factory, name, launch):
    """launch(root) in a fresh folder, once more after a startup abort (STARTUP_ABORT)."""
    root = tmp_path_factory.mktemp(name)
    try:
        result = launch(root)
    except AssertionError:
        if not _startup_aborted(root):
            raise
    else:
        if not _startup_aborted(root):
            return result
    return launch(tmp_path_factory.mktemp(name))   # whatever happens now is the result


def _startup_aborted(root):
    return any(STARTUP_ABORT in path.read_text(errors="replace") for path in root.glob("*.log"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with two devices, and two processes with one each, run side by side."""
    return _launched(tmp_path_factory, "multihost", _run_side_by_side)


def _run_side_by_side(root):
    single, multi = str(root / "single"), str(root / "multi")
    address = f"127.0.0.1:{_free_port()}"
    procs = {"single": _start(single, _env(2), root / "single.log")}
    for i in range(2):
        procs[f"process_{i}"] = _start(
            multi, _env(1, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
                        JAX_PROCESS_ID=str(i)), root / f"process_{i}.log")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for name, proc in procs.items():
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        failed = {name: proc.returncode for name, proc in procs.items() if proc.returncode != 0}
        if failed:
            logs = {name: (root / f"{name}.log").read_text()[-3000:] for name in failed}
            raise AssertionError(f"runs failed or timed out ({failed}):\n" +
                                 "\n".join(f"--- {n}\n{text}" for n, text in logs.items()))
    finally:
        for proc in procs.values():
            _stop(proc)
    return {"single": single, "multi": multi, "logs": root}


def _restore(workdir):
    """The final checkpoint's arrays as numpy, by tree path (saved shardings ignored)."""
    path = os.path.join(workdir, "split_1", "lam", "checkpoints", str(STEPS), "default")
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    restored = checkpointer.restore(path, restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(restored)}


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_two_devices(runs):
    single, multi = runs["single"], runs["multi"]
    results = _read_json(os.path.join(multi, "results.json"))
    assert results == _read_json(os.path.join(single, "results.json"))
    paper = results["split_1"]["paper"]
    assert paper["num_queries"] == 8 and 0 < paper["rank1"] <= 100 and 0 < paper["mAP"] <= 100

    a, b = _restore(single), _restore(multi)
    assert sorted(a) == sorted(b) and len(a) > 100
    differ = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not differ, f"checkpoint arrays differ: {differ[:5]}"
    assert int(b["['step']"]) == STEPS

    for stem in ("split_1/lam/features.npz", "split_1/features.npz"):
        with np.load(os.path.join(single, stem)) as x, np.load(os.path.join(multi, stem)) as y:
            assert sorted(x.files) == sorted(y.files)
            for k in x.files:
                assert np.array_equal(x[k], y[k]), (stem, k)

    # metrics from process 0 only: one line per logged or saved step, not one per process;
    # every value but the speeds equal to the single process's
    def metrics(workdir):
        path = os.path.join(workdir, "split_1", "lam", "metrics.jsonl")
        with open(path, encoding="utf-8") as f:
            return [{k: v for k, v in json.loads(line).items() if not k.endswith("_per_sec")}
                    for line in f]

    logged = metrics(multi)
    assert [m["step"] for m in logged] == [8, 12, 16, 24]
    assert logged == metrics(single)
    # the results table is printed by process 0 only
    assert "rank1" in (runs["logs"] / "process_0.log").read_text()
    assert "rank1" not in (runs["logs"] / "process_1.log").read_text()
    # the two checkpoints kept were written by both processes together
    assert sorted(os.listdir(os.path.join(multi, "split_1", "lam", "checkpoints"))) == ["12", "24"]


# A run much longer than the test, stopped from outside once it trains.
LONG = [*DEMO[:3], "--config.train.steps=100000", "--config.train.checkpoint_every=100000",
        "--config.train.log_every=2", DEMO[4], *DEMO[7:], "--mode=train"]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """Two 2-process runs side by side: process 1 of one gets SIGTERM, process 1 of the
    other SIGKILL, once each trains; {name: (returncodes, seconds to end, log texts)}."""
    return _launched(tmp_path_factory, "stopped", _stop_pairs)


def _stop_pairs(root):
    pairs = {}
    # process 0 hosts JAX's coordination service: its death ends the others through JAX
    # itself (see docs/reliability.md), so process 1 is the one stopped
    for name in ("sigterm", "sigkill"):
        address = f"127.0.0.1:{_free_port()}"
        pairs[name] = [_start(str(root / name), _env(1, JAX_COORDINATOR_ADDRESS=address,
                                                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
                              root / f"{name}_{i}.log", LONG) for i in range(2)]
    signals = {"sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}
    sent, ended = {}, {}
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while len(ended) < 2 * len(pairs):
            assert time.monotonic() < deadline, f"the runs did not end: {sent}, {ended}"
            for name, procs in pairs.items():
                metrics = root / name / "split_1" / "lam" / "metrics.jsonl"
                training = metrics.exists() and metrics.stat().st_size > 0   # a step logged
                if name not in sent and (training or any(p.poll() is not None for p in procs)):
                    procs[1].send_signal(signals[name])
                    sent[name] = time.monotonic()
                for i, proc in enumerate(procs):
                    if (name, i) not in ended and proc.poll() is not None:
                        ended[name, i] = time.monotonic() - sent.get(name, 0.0)
            time.sleep(0.05)
    finally:
        for procs in pairs.values():
            for proc in procs:
                _stop(proc)
    return {"root": root, **{name: ([p.returncode for p in procs], [ended[name, i] for i in
                                                                    range(2)],
                                    [(root / f"{name}_{i}.log").read_text() for i in range(2)])
                             for name, procs in pairs.items()}}


def _checkpoint_steps(workdir):
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, "split_1", "lam",
                                                          "checkpoints")) if s.isdigit())


@pytest.mark.slow
def test_sigterm_to_one_process_saves_the_same_step_on_both_and_ends_both(stopped):
    codes, _, logs = stopped["sigterm"]
    assert codes == [143, 143], logs
    lines = [[line for line in log.splitlines() if line.startswith("stopped by")] for log in logs]
    assert all(len(found) == 1 for found in lines), logs
    assert lines[0] == lines[1]
    step = int(lines[0][0].split("checkpoint of step ")[1].split()[0])
    assert step >= 2   # signalled after the first logged step
    workdir = str(stopped["root"] / "sigterm")
    assert _checkpoint_steps(workdir) == [step]
    checkpoints = checkpoints_lib.Checkpoints(os.path.join(workdir, "split_1", "lam",
                                                           "checkpoints"), read_only=True)
    checkpoints.verify(step)   # committed whole, with its checksums
    checkpoints.close()
    assert not any("Traceback" in log for log in logs)


@pytest.mark.slow
def test_a_killed_process_ends_the_other_within_seconds_with_one_line(stopped):
    codes, seconds, logs = stopped["sigkill"]
    assert codes == [1, -signal.SIGKILL], logs[0][-3000:]
    assert seconds[0] < 3 * parallel.HEARTBEAT_TIMEOUT_S, seconds
    errors = [line for line in logs[0].replace("\r", "\n").splitlines() if "error: " in line]
    assert len(errors) == 1, logs[0][-3000:]
    assert "stopped without a word (killed or crashed" in errors[0]
    assert "Traceback" not in logs[0] and "Check failure" not in logs[0]


def test_launcher_detection():
    assert parallel.detect_launcher({}) is None
    assert parallel.detect_launcher({"JAX_NUM_PROCESSES": "2"}) == "jax"
    assert parallel.detect_launcher({"SLURM_STEP_NUM_TASKS": "1"}) is None
    assert parallel.detect_launcher({"SLURM_STEP_NUM_TASKS": "4"}) == "slurm"
    assert parallel.detect_launcher({"OMPI_COMM_WORLD_SIZE": "2"}) == "openmpi"
    assert parallel.detect_launcher({"TPU_WORKER_HOSTNAMES": "t0"}) is None
    assert parallel.detect_launcher({"TPU_WORKER_HOSTNAMES": "t0,t1"}) == "tpu"


def test_jax_variables_are_passed_explicitly_and_checked():
    env = {"JAX_COORDINATOR_ADDRESS": "node001:1234", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "3"}
    assert parallel.jax_arguments(env) == {
        "coordinator_address": "node001:1234", "num_processes": 4, "process_id": 3}
    with pytest.raises(parallel.DistributedError,
                       match="JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID not set"):
        parallel.jax_arguments({"JAX_NUM_PROCESSES": "2"})
    with pytest.raises(parallel.DistributedError, match="JAX_PROCESS_ID='one'"):
        parallel.jax_arguments(dict(env, JAX_PROCESS_ID="one"))
    with pytest.raises(parallel.DistributedError, match="JAX_PROCESS_ID=4 with JAX_NUM_"):
        parallel.jax_arguments(dict(env, JAX_PROCESS_ID="4"))
    with pytest.raises(parallel.DistributedError, match="expected host:port"):
        parallel.jax_arguments(dict(env, JAX_COORDINATOR_ADDRESS="node001"))
    with pytest.raises(parallel.DistributedError, match="--distributed=yes but no multi"):
        parallel.initialize("yes", environ={})
    assert parallel.initialize("auto", environ={}) is False
    assert parallel.initialize("no", environ=env) is False


def test_initialize_passes_the_jax_variables(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    address = f"127.0.0.1:{_free_port()}"
    env = {"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0",
           "SLURM_STEP_NUM_TASKS": "2"}
    assert parallel.initialize("auto", environ=env, timeout_s=7) is True
    heartbeat = parallel.HEARTBEAT_TIMEOUT_S
    assert calls == [{"coordinator_address": address, "num_processes": 2, "process_id": 0,
                      "cluster_detection_method": "deactivate", "initialization_timeout": 7,
                      "heartbeat_timeout_seconds": heartbeat}]
    assert jax.config.jax_cpu_collectives_implementation == "gloo"
    assert jax.config.jax_enable_recoverability   # a lost process is ours to report
    calls.clear()
    assert parallel.initialize("auto", environ={"OMPI_COMM_WORLD_SIZE": "2"}) is True
    # JAX detects Open MPI itself
    assert calls == [{"initialization_timeout": 300, "heartbeat_timeout_seconds": heartbeat}]


def test_unreachable_or_busy_coordinator_is_a_clear_error():
    port = _free_port()
    with pytest.raises(parallel.DistributedError,
                       match=f"no coordinator at JAX_COORDINATOR_ADDRESS=127.0.0.1:{port} after"):
        parallel.check_coordinator({"coordinator_address": f"127.0.0.1:{port}",
                                       "process_id": 1}, timeout_s=0.5)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        parallel.check_coordinator({"coordinator_address": f"127.0.0.1:{taken}",
                                       "process_id": 1}, timeout_s=0.5)  # reachable: fine
        with pytest.raises(parallel.DistributedError, match=f"cannot listen on port {taken}"):
            parallel.check_coordinator({"coordinator_address": f"127.0.0.1:{taken}",
                                           "process_id": 0}, timeout_s=0.5)


def test_cli_names_the_missing_variable():
    env = _env(1, JAX_NUM_PROCESSES="2")
    proc = subprocess.run([sys.executable, "-m", "upm_jax.main", *DEMO, "--workdir=unused"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID not set" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_process_rows_come_from_the_sharding():
    # a process whose devices hold rows 0-1 and 4-5 of 8 (not neighbours on the mesh)
    assert parallel.rows_held([slice(0, 2), slice(4, 6)], 8).tolist() == [0, 1, 4, 5]
    assert parallel.rows_held([slice(None)], 3).tolist() == [0, 1, 2]  # replicated
    devices = np.array(jax.devices()[:4])[[3, 1, 0, 2]]
    mesh = jax.sharding.Mesh(devices, ("data",))
    batch = parallel.batch_sharding(mesh)
    assert parallel.process_rows(batch, 8).tolist() == list(range(8))  # one process: all
    x = parallel.from_process_rows(batch, np.arange(8) * 10, 8)
    held = {d: np.asarray(s.data).tolist() for d, s in
            ((s.device, s) for s in x.addressable_shards)}
    assert held[devices[0]] == [0, 10] and held[devices[3]] == [60, 70]
    with pytest.raises(ValueError, match="holds 8 of the 8 rows"):
        parallel.from_process_rows(batch, np.arange(4), 8)
