"""upm_jax.host_malloc: when the entry points re-execute themselves with huge pages."""
import os
import subprocess
import sys

import pytest

from upm_jax import host_malloc

SUPPORTED = host_malloc.tunables_for({}) is not None  # glibc >= 2.35 and THP on, here


@pytest.mark.skipif(not SUPPORTED, reason="needs glibc >= 2.35 and transparent huge pages")
def test_tunable_added_once_and_user_tunables_kept():
    assert host_malloc.tunables_for({}) == "glibc.malloc.hugetlb=1"
    assert (host_malloc.tunables_for({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
            == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
    # already there (the user's choice, or the re-executed process): nothing to do, no loop
    assert host_malloc.tunables_for({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
    assert host_malloc.tunables_for({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) is None


def test_opt_out():
    assert host_malloc.tunables_for({host_malloc.ENV: "default"}) is None


def test_no_huge_pages_no_change(monkeypatch):
    monkeypatch.setattr(host_malloc, "THP_SETTING", "/nonexistent/thp")
    assert host_malloc.tunables_for({}) is None


@pytest.mark.skipif(not SUPPORTED, reason="needs glibc >= 2.35 and transparent huge pages")
def test_reexecuted_process_keeps_pid_and_arguments():
    code = ("import os, sys; from upm_jax import host_malloc; print(os.getpid(), flush=True); "
            "host_malloc.reexec_with_huge_pages(); "
            "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_malloc.ENV)}
    out = subprocess.run([sys.executable, "-c", code, "an-argument"], env=env, check=True,
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__)))).stdout.split("\n")
    first, second, final = out[0], out[1], out[2]
    assert first == second   # printed once before and once after the re-execution
    pid, tunables, args = final.split(" ", 2)
    assert pid == first and tunables == "glibc.malloc.hugetlb=1" and args == "['an-argument']"
