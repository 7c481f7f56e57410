"""Files written for later use, written so that a kill at any moment leaves the old file or the new
one, never half of one: to a temporary name beside the target, flushed to disk, then renamed. A write
that finds the disk full says so in one line (:class:`NoSpace`) and leaves the old file in place.

Also what can be known about a place before writing there: whether it can be written at all, and
how much room its file system has left.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path


class NoSpace(OSError):
    """A write that found its file system full; the message names the file and what is free."""

    def __init__(self, path: Path):
        super().__init__(
            errno.ENOSPC, f"no space left on device writing {path} ({size(free_space(path))} free); free space there and run the job again"
        )

    def __str__(self) -> str:
        return self.strerror


def disk_full(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it came from, is a full disk or an exhausted quota. Libraries
    that write in another language keep only the words (safetensors: "No space left on device (os
    error 28)")."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _after_failure(tmp: Path, target: Path, error: Exception) -> Exception:
    """Remove what a failed write left at ``tmp`` (a half-written file holds space a full disk
    needs); the error to raise: :class:`NoSpace` for a full disk, else ``error`` itself."""
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)
    return NoSpace(target) if disk_full(error) else error


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` fills a temporary file, which then replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        raise _after_failure(tmp, path, e) from e
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_folder(folder: Path, fill: Callable[[Path], object]) -> Path:
    """``fill(tmp)`` fills a temporary folder, which then takes ``folder``'s place (a folder cannot
    be replaced in one rename, so the old one is moved aside first and removed after)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        fill(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
    except Exception as e:
        raise _after_failure(tmp, folder, e) from e
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


# -- places, before writing ----------------------------------------------------------------------
def nearest_existing(path: Path) -> Path:
    """``path`` if it exists, else its closest ancestor that does."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def read_only(path: Path) -> str | None:
    """Why the existing file or folder ``path`` cannot be written, or None: a read-only file system,
    no permission for this user, or permissions that let no one write it (``chmod a-w``; honoured
    for root too, whom the system would let write anyway, since it says what the owner wants)."""
    if os.statvfs(path).f_flag & os.ST_RDONLY:
        return f"{path} is read-only (a read-only file system)"
    mode = path.stat().st_mode
    if not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is read-only (permissions {stat.filemode(mode)})"
    if not os.access(path, os.W_OK | (os.X_OK if path.is_dir() else 0)):
        return f"{path} is not writable by this user (permissions {stat.filemode(mode)})"
    return None


def unusable_folder(folder: Path) -> str | None:
    """Why files cannot be written in ``folder`` (created first where missing), or None."""
    folder = Path(folder).absolute()
    found = nearest_existing(folder)
    if not found.is_dir():
        return f"{found} is a file, not a folder" if found == folder else f"{found} is a file, so {folder} cannot be a folder under it"
    problem = read_only(found)
    return problem if problem is None or found == folder else f"cannot create {folder}: {problem}"


def free_space(path: Path) -> int:
    """Bytes free on the file system that holds ``path`` (or would hold it, once created)."""
    return shutil.disk_usage(nearest_existing(path)).free


def bytes_in(folder: Path) -> int:
    """The size of the files under ``folder`` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def size(n: float) -> str:
    """A byte count for people: ``512 B``, ``3.4 MB``, ``1.2 GB`` (powers of 1000, as ``df -H``)."""
    units = ["B", "kB", "MB", "GB", "TB", "PB"]
    i = 0
    while abs(n) >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"
