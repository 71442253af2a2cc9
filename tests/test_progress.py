"""The progress a user sees: the first call of a jitted step says it is compiling, and how
long that took."""
import io
import re
import time

import jax
import jax.numpy as jnp
import pytest
import tqdm

from upm_jax import progress


def test_compiling_labels_the_bar_meanwhile_and_reports_the_time(capsys):
    stream = io.StringIO()
    bar = tqdm.tqdm(total=3, desc="split 1 lam", file=stream)
    seen = []

    @jax.jit
    def step(x):
        return jnp.tanh(x) * 2

    with progress.compiling(bar, "the training step"):
        seen.append(bar.desc)
        time.sleep(0.2)
        step(jnp.ones(3)).block_until_ready()
    bar.update(1)
    bar.close()
    assert seen == ["split 1 lam (compiling the training step)"]
    assert bar.desc == "split 1 lam"
    assert "split 1 lam (compiling the training step):" in stream.getvalue()
    err = capsys.readouterr().err
    seconds = float(re.fullmatch(r"split 1 lam: compiled the training step in (\d+\.\d) s\n",
                                 err).group(1))
    assert seconds >= 0.2


def test_compiling_restores_the_label_when_the_call_fails(capsys):
    bar = tqdm.tqdm(total=1, desc="split 2 gam", file=io.StringIO())
    with pytest.raises(ValueError):
        with progress.compiling(bar, "the training step"):
            raise ValueError("bad input")
    assert bar.desc == "split 2 gam"
    assert "compiled" not in capsys.readouterr().err


def test_a_disabled_bar_says_nothing(capsys):
    bar = tqdm.tqdm(total=1, desc="x", disable=True)
    with progress.compiling(bar, "the training step"):
        pass
    assert capsys.readouterr().err == ""
