"""Files written for later use, written so that a kill at any moment leaves the old file or the new
one, never half of one: to a temporary name beside the target, flushed to disk, then renamed.

Also what can be known about a place before writing there: whether it can be written at all.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` fills a temporary file, which then replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
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
    fill(tmp)
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
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
