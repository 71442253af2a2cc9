"""File helpers every stage shares: atomic writes, the temporary files an interrupted write
leaves, and the integrity check of .npz archives (NumPy and the standard library only, so
the evaluator stays importable without JAX)."""
import os
import shutil
import tempfile
import zipfile

# Prefix of the temporary files `atomic_write` renames into place.
TEMP_PREFIX = ".tmp-"
# Bytes read at a time by the integrity check.
_CHECK_BLOCK = 4 << 20
# (path, inode, size, mtime) of archives already verified by this process.
_VERIFIED = set()


class DamagedFileError(ValueError):
    """A file whose bytes are not what was written (truncated, or failing its checksum)."""


def atomic_write(path, write, *, mode="wb"):
    """Call write(file) on a temp file in `path`'s directory, then rename it onto `path`.

    Readers never see a half-written file; the result gets the usual umask permissions.
    When the write fails or is interrupted (any exception, KeyboardInterrupt included) the
    temp file is removed; one left by a killed process is removed by `remove_temporaries`.
    A failure is an OSError naming `path` (not the temp file).
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise OSError(f"cannot write {path}: the folder {directory} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX,
                                   suffix=os.path.splitext(os.fspath(path))[1], dir=directory)
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        if e.filename is None and e.errno is None:
            raise   # already names what failed
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_temporaries(directory, *, skip=()):
    """Removes the temp files and folders named TEMP_PREFIX... under `directory` (a process
    killed while writing leaves them: `atomic_write`'s files, a generated dataset's
    folder); folders named in `skip` are not entered. Returns their paths. Call it only
    while no other process writes there (e.g. holding the workdir's lock)."""
    removed = []
    for root, dirs, files in os.walk(directory):
        for name in [d for d in dirs if d.startswith(TEMP_PREFIX)]:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(os.path.join(root, name))
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(TEMP_PREFIX)]
        for name in files:
            if name.startswith(TEMP_PREFIX):
                _unlink(os.path.join(root, name))
                removed.append(os.path.join(root, name))
    return removed


def verify_npz(path, *, advice=""):
    """Checks that `path` is a complete .npz (zip) archive whose every member matches the
    CRC-32 its writer recorded, reading each member once from end to end (what `unzip -t`
    does); raises DamagedFileError naming the file and the member. `advice`: what to do,
    appended to the message. An archive verified earlier by this process and unchanged
    since (same inode, size and modification time) is not read again."""
    path = os.fspath(path)
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return
    tail = f"; {advice}" if advice else ""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise DamagedFileError(f"{path}: not a complete .npz archive ({e}): the file is "
                               f"truncated or damaged{tail}") from None
    with archive:
        for info in archive.infolist():
            try:
                with archive.open(info) as member:
                    while member.read(_CHECK_BLOCK):
                        pass
            except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as e:
                reason = str(e) if "CRC" not in str(e) else "its CRC-32 check fails"
                raise DamagedFileError(f"{path}: member '{info.filename}' is damaged ({reason})"
                                       f"{tail}") from None
    _VERIFIED.add(key)
