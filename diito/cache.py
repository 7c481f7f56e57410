"""Build-once folders shared between processes: the first asks builds, the others wait and reuse.

Used for fine-tuned teachers: a sweep of many distillation jobs, sequential or parallel, fine-tunes
each distinct teacher once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

INFO_FILE = "info.json"


def build_once(folder: Path, build: Callable[[Path], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """Return ``(info, built_now)``. ``build(folder)`` fills ``folder`` and returns its info; it runs
    under an inter-process lock, and only when no earlier build completed (an interrupted build
    leaves no info file, so the next caller builds again, resuming whatever ``build`` checkpointed)."""
    info_file = folder / INFO_FILE
    if info_file.exists():
        return json.loads(info_file.read_text()), False
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if info_file.exists():  # built by another process while this one waited
            return json.loads(info_file.read_text()), False
        folder.mkdir(parents=True, exist_ok=True)
        info = build(folder)
        tmp = info_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, info_file)
        return info, True
