"""Faults of the machine a job runs on, not of its config: a folder that cannot be written (a real
read-only file system). Each is refused before compute in one line naming the key (exit code 2,
nothing cached, no run).

A real read-only file system needs mounts: those tests run the job in a mount namespace of its own
(``unshare``), with a read-only bind mount, and are skipped where the machine does not allow that."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

TINY = ["teacher=tiny", "trainer=debug"]


# -- folders -------------------------------------------------------------------------------------------
def test_on_the_command_line_a_root_under_a_file_is_one_line(home):
    """Hydra creates the job's folder (under paths.root) before the job starts: checked before that."""
    (home / "somefile").write_text("not a folder")
    result = run_cli([*TINY, f"paths.root={home}/somefile/x"], home, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (f"error: paths.root: {home}/somefile is a file, so {home}/somefile/x cannot be "
                                                      "a folder under it; set paths.root=<a writable folder>")
    assert "Traceback" not in result.stderr


# -- a real read-only file system (in a mount namespace of the test's own) ---------------------------------
def _namespaces() -> bool:
    try:
        tried = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True, check=False)
    except OSError:  # no unshare
        return False
    return tried.returncode == 0


namespaces = pytest.mark.skipif(not _namespaces(), reason="this machine does not allow mount namespaces (unshare -rm)")


def job_line(args: list[str]) -> str:
    """The shell line of ``python run.py ARGS``."""
    return shlex.join([sys.executable, str(ROOT / "run.py"), *args])


def in_namespace(script: str, home: Path) -> subprocess.CompletedProcess:
    """The shell ``script`` in a mount namespace of its own (what it mounts vanishes with it), with
    ``home`` as the project folder."""
    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"DIITO_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=home, env=environment, capture_output=True, text=True, timeout=600,
                          check=False)


def read_only_mount(folder: Path) -> str:
    return f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} || exit 99\n"

@namespaces
def test_a_cache_on_a_read_only_file_system_is_refused(home):
    (home / "cache").mkdir()
    result = in_namespace(read_only_mount(home / "cache") + job_line([*TINY, f"paths.cache={home}/cache"]), home)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (f"error: paths.cache: {home}/cache is read-only (a read-only file system); "
                                                      "set paths.cache=<a writable folder>")
    assert "Traceback" not in result.stderr and not any((home / "cache").iterdir())
