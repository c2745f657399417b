"""The one way sdxs-edge writes a file or a folder: all of it or none of it.

Every writer (images, bundles, model folders, checkpoints, reports, tokenizer files) goes through
`atomic_file` / `write_atomic` or `atomic_dir`:

- the new content goes to a temporary sibling whose name is unique per process and call
  (`.NAME.tmp-PID-N` for files, `.NAME.partial-PID-N` for folders), so two writers never share one;
- it is fsynced, then renamed over the old one with `os.replace`, and the parent folder is fsynced;
- the old file is never deleted first: until the rename a reader sees the old version, after it the new
  one; a failed or interrupted write leaves the old one as it was and removes its temporary;
- a folder is replaced by renaming the old one aside only once the new one is complete, and put back if
  the final rename fails;
- `atomic_dir` holds an exclusive lock on the destination for the whole write: a second writer into the
  same place fails at once with a clear error instead of interleaving, and the lock holder removes the
  temporaries (`.partial-`, `.work-`, `.old-`) that killed processes left beside the destination.

Standard library only; runtimes use it without PyTorch.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sdxs_edge.errors import SDXSError

_CALLS = itertools.count()  # with the pid, makes every temporary name unique per process and call
_TEMP_KINDS = ("partial", "work", "old", "tmp")


class WriteError(SDXSError):
    """A file or folder could not be written (disk full, no permission, another writer holds it)."""


def _temp_name(final: Path, kind: str) -> Path:
    return final.with_name(f".{final.name}.{kind}-{os.getpid()}-{next(_CALLS)}")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync_path(Path(dirpath) / f)
        _fsync_path(Path(dirpath))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_WRITE_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EFBIG: "the file size limit was reached",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EROFS: "the file system is read-only",
}


def write_failed(final: str | os.PathLike, e: BaseException) -> WriteError | None:
    """The one-line `WriteError` for an exception that means "no space / not allowed", else None.

    Writers that wrap the OS error in their own type (safetensors, onnx) pass it here too: their
    message carries the OS text ("No space left on device", "File too large").
    """
    why = _WRITE_ERRNOS.get(getattr(e, "errno", None))
    if why is None:
        text = str(e)
        why = next((w for code, w in _WRITE_ERRNOS.items() if os.strerror(code) in text), None)
    return (
        None
        if why is None
        else WriteError(f"could not write {final}: {why}; the previous version, if any, is unchanged")
    )


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds, fsync it and rename it over `path`.

    Args:
        path: the destination file; its parent folder is created if missing.

    Raises:
        WriteError: the write failed for lack of space, permission, or another OS reason (the old
            `path`, if any, is untouched and the temporary is gone).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(final, "tmp")
    try:
        yield tmp
        if not tmp.is_file():
            raise WriteError(f"could not write {final}: the writer produced no file")
        _fsync_path(tmp)
        os.replace(tmp, final)
        _fsync_path(final.parent)
    except Exception as e:
        err = write_failed(final, e)
        if err is None:
            raise
        raise err from None
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8, or bytes) to `path` through `atomic_file`; returns the path."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale(final: str | os.PathLike) -> list[Path]:
    """Remove the temporaries beside `final` that processes no longer running left behind.

    Only names of the form `.NAME.{partial,work,old,tmp}-PID[-N]` whose PID is dead are removed; a live
    process's temporaries are left alone. Returns what was removed.
    """
    final = Path(final)
    removed = []
    for kind in _TEMP_KINDS:
        for p in final.parent.glob(f".{final.name}.{kind}-*"):
            pid = p.name[len(f".{final.name}.{kind}-") :].split("-")[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                _remove(p)
                removed.append(p)
    return removed


@contextmanager
def _locked(final: Path) -> Iterator[None]:
    """An exclusive, non-blocking lock on `final`, held in `.NAME.lock` beside it (removed on release)."""
    lock = final.with_name(f".{final.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WriteError(
                f"{final} is being written by another process; wait for it to finish or choose another output"
            ) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino  # the holder before us may have removed it
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


@contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling folder; when the block succeeds, it becomes `final`.

    Args:
        final: the destination folder (a bundle, a model folder, a checkpoint).
        overwrite: replace an existing `final`; without it an existing one is refused.

    Raises:
        SDXSError: `final` exists and `overwrite` is not set.
        WriteError: another process is writing `final`, or the write failed (disk full, ...); the old
            `final`, if any, is intact and no temporary is left.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise SDXSError(f"{final} exists; pass --overwrite to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final):
        if final.exists() and not overwrite:  # written by another process since the check above
            raise SDXSError(f"{final} exists; pass --overwrite to replace it")
        remove_stale(final)
        tmp = _temp_name(final, "partial")
        try:
            tmp.mkdir()
            yield tmp
            _fsync_tree(tmp)
            _swap_in(tmp, final)
        except Exception as e:
            err = write_failed(final, e)
            if err is None:
                raise
            raise err from None
        finally:
            _remove(tmp)


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename the complete `tmp` to `final`; an old `final` is renamed aside first and restored on failure."""
    if not final.exists():
        os.replace(tmp, final)
    else:
        old = _temp_name(final, "old")
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:
            os.replace(old, final)
            raise
        _remove(old)
    _fsync_path(final.parent)


@contextmanager
def scratch_dir(final: str | os.PathLike) -> Iterator[Path]:
    """A temporary working folder beside `final` (`.NAME.work-PID-N`), removed afterwards; a killed
    process's one is removed by the next `atomic_dir` into `final`."""
    work = _temp_name(Path(final), "work")
    work.mkdir(parents=True)
    try:
        yield work
    finally:
        _remove(work)
