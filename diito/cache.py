"""Build-once folders shared between processes: the first asks builds, the others wait and reuse.

Used for fine-tuned teachers: a sweep of many distillation jobs, sequential or parallel, fine-tunes
each distinct teacher once. An entry is complete when its info file exists (written last, in one
rename); an entry found damaged is reported and built again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

from diito.files import atomic_write_text

log = logging.getLogger(__name__)
INFO_FILE = "info.json"


def _problem(folder: Path, check: Callable[[Path], str | None] | None) -> str | None:
    """What is wrong with a completed entry, or None when it is sound."""
    try:
        json.loads((folder / INFO_FILE).read_text())
    except (OSError, ValueError) as e:
        return f"its {INFO_FILE} is unreadable ({type(e).__name__})"
    return check(folder) if check else None


def build_once(
    folder: Path, build: Callable[[Path], dict[str, Any]], check: Callable[[Path], str | None] | None = None
) -> tuple[dict[str, Any], bool]:
    """Return ``(info, built_now)``. ``build(folder)`` fills ``folder`` and returns its info; it runs
    under an inter-process lock, and only when no earlier build completed (an interrupted build
    leaves no info file, so the next caller builds again, resuming whatever ``build`` checkpointed).
    ``check(folder)`` names what is wrong with a completed entry (say, its weights are missing): such
    an entry is reported and built again."""
    info_file = folder / INFO_FILE
    if info_file.exists() and _problem(folder, check) is None:
        return json.loads(info_file.read_text()), False
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if info_file.exists():  # built by another process while this one waited, or damaged
            problem = _problem(folder, check)
            if problem is None:
                return json.loads(info_file.read_text()), False
            log.warning("cache entry %s is damaged: %s; building it again", folder, problem)
            info_file.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        info = build(folder)
        atomic_write_text(info_file, json.dumps(info, indent=2))
        return info, True
