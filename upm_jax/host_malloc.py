"""Transparent huge pages for the blocks glibc's malloc maps, asked for before the program starts.

XLA:CPU allocates an executable's temporaries afresh on every run. glibc serves a block
that large with mmap and unmaps it when it is freed, so every training step faults its
whole working set in again, 4 KiB at a time. glibc's tunable glibc.malloc.hugetlb=1
(glibc >= 2.35) has malloc ask for transparent huge pages on those blocks: one fault per
2 MiB. On the 2-core CPU the demo went from 149 to 110 CPU-seconds with the same
results and peak RSS (README, Performance). (mallopt cannot do it: one arena without
mmap keeps the pages, but at full size fragmentation grew the heap by a temporary buffer
every few steps.)

A tunable is read only when a program starts, so the command-line entry points call
`reexec_with_huge_pages()` first: it replaces the process by the same command line (same
pid) with the tunable added to GLIBC_TUNABLES. UPM_JAX_MALLOC=default opts out; nothing is
done without glibc >= 2.35 or where the kernel's transparent huge pages are off.
"""
import ctypes
import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
ENV = "UPM_JAX_MALLOC"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version():
    """(major, minor) of the running glibc, or None for another C library."""
    try:
        get = ctypes.CDLL(None).gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    get.restype = ctypes.c_char_p
    major, minor = get().decode().split(".")[:2]
    return int(major), int(minor)


def _huge_pages_available() -> bool:
    try:
        with open(THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def tunables_for(environ):
    """The GLIBC_TUNABLES value to run with, or None when nothing is to change (opted out,
    already set by the user or by an earlier re-execution, no glibc >= 2.35, no THP)."""
    if environ.get(ENV, "") == "default" or not sys.platform.startswith("linux"):
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE + "=" in current:
        return None
    version = _glibc_version()
    if version is None or version < (2, 35) or not _huge_pages_available():
        return None
    return f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"


def reexec_with_huge_pages():
    """Re-executes this command line with the tunable set; returns only when that is not
    needed (or the re-execution could not start, which is then harmless)."""
    tunables = tunables_for(os.environ)
    if tunables is None:
        return
    try:
        os.execve(sys.executable, sys.orig_argv, dict(os.environ, GLIBC_TUNABLES=tunables))
    except OSError:
        return
