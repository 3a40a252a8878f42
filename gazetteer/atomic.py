"""Atomic outputs: a reader sees the old file/directory or the complete new one, never a half-written one.

Pattern: write into a temporary sibling (same parent directory, hence same filesystem), flush and fsync it,
then ``os.replace``/``os.rename`` it over the final name and fsync the parent directory. On any error the
temporary is removed and the final path is left as it was.

- `atomic_write_bytes(path, data)` / `atomic_write_text(path, text)`: whole file at once.
- `atomic_open(path, mode="w")`: a context manager for streamed writes (e.g. a large CSV).
- `atomic_directory(final_dir, overwrite=False)`: a context manager yielding a temporary directory to fill.

Problems with the destination (parent is a file, no permission, existing output without ``overwrite``) raise
`InputError` with a one-line message naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gazetteer.errors import InputError

logger = logging.getLogger(__name__)


def _fsync_directory(path: Path) -> None:
    """Persist a directory entry (rename/create) on POSIX; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _prepare_parent(path: Path) -> Path:
    """Create the parent directory of `path` if needed; InputError if that is impossible."""
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InputError(f"cannot write {path}: {parent} exists and is not a directory") from None
    except NotADirectoryError:
        raise InputError(f"cannot write {path}: a component of {parent} is a file, not a directory") from None
    except OSError as exc:
        raise InputError(f"cannot write {path}: cannot create directory {parent}: {exc.strerror}") from None
    if not parent.is_dir():
        raise InputError(f"cannot write {path}: {parent} is not a directory")
    return parent


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _default_file_mode() -> int:
    """0o666 minus the process umask: what a plain ``open(path, "w")`` would create (mkstemp uses 0o600)."""
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None):
    """Open a temporary sibling of `path` for writing; on success fsync it and rename it to `path`.

    mode: "w" (text, with `encoding`/`newline`) or "wb". If the block raises, the temporary is deleted and
    `path` is untouched. Yields the open file object.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open supports modes 'w' and 'wb', not {mode!r}")
    final = Path(path)
    if final.is_dir():
        raise InputError(f"cannot write {final}: it is a directory")
    parent = _prepare_parent(final)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=f".{final.name}.", suffix=".tmp")
    except OSError as exc:
        raise InputError(f"cannot write {final}: {exc.strerror} in {parent}") from None
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, _default_file_mode())
        if mode == "wb":
            handle = os.fdopen(fd, "wb")
        else:
            handle = os.fdopen(fd, "w", encoding=encoding, newline=newline)
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_directory(parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file in the same directory, fsync, rename)."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically; newlines are written as given (no platform translation)."""
    atomic_write_bytes(path, text.encode(encoding))


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (so the rename publishes complete data)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            file_path = os.path.join(dirpath, name)
            try:
                fd = os.open(file_path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_directory(Path(dirpath))


def _check_destination(final: Path, overwrite: bool) -> None:
    if final.exists() or final.is_symlink():
        if not final.is_dir():
            raise InputError(f"cannot write directory {final}: a file with that name exists")
        if not overwrite:
            raise InputError(f"output directory {final} already exists (use --overwrite / overwrite=True to replace it)")


@contextlib.contextmanager
def atomic_directory(final_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `final_dir`; on success it becomes `final_dir`.

    On normal exit: every file is fsync'd, then the temporary directory is renamed to `final_dir` (an existing
    `final_dir` is first renamed aside and deleted afterwards, only if ``overwrite=True``; otherwise InputError
    before any work is done). On an exception the temporary directory is removed and `final_dir` is untouched.
    Replacing an existing directory is two renames, so another process may briefly see no `final_dir`, but
    never a partial one.
    """
    final = Path(final_dir)
    _check_destination(final, overwrite)
    parent = _prepare_parent(final)
    try:
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{final.name}.tmp-"))
    except OSError as exc:
        raise InputError(f"cannot write directory {final}: {exc.strerror} in {parent}") from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # what mkdir would create; mkdtemp makes 0o700
        yield tmp
        _fsync_tree(tmp)
        _check_destination(final, overwrite)  # someone may have created it meanwhile
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{final.name}.old-"))
            os.rename(final, old / "replaced")
        try:
            os.rename(tmp, final)
        except OSError:
            if old is not None:  # put the previous version back
                os.rename(old / "replaced", final)
                shutil.rmtree(old, ignore_errors=True)
            raise
        _fsync_directory(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_directory(final_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Fail early (InputError) if `atomic_directory(final_dir, overwrite)` would fail at the end: the path is a
    file, exists without `overwrite`, or its first existing ancestor is not a writable directory. Creates
    nothing, so a long computation can be skipped when its output could not be written anyway."""
    final = Path(final_dir)
    _check_destination(final, overwrite)
    ancestor = final.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"cannot write {final}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {final}: no permission to write in {ancestor}")


def is_same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when both paths exist and name the same file (so writing `b` would clobber input `a`)."""
    try:
        return os.path.samefile(a, b)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return False
        raise
