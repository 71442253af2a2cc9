"""File helpers every stage shares: atomic writes (NumPy and the standard library only,
so the evaluator stays importable without JAX)."""
import os
import tempfile


def atomic_write(path, write, *, mode="wb"):
    """Call write(file) on a temp file in `path`'s directory, then rename it onto `path`.

    Readers never see a half-written file; the result gets the usual umask permissions.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(os.fspath(path))[1],
                               dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
