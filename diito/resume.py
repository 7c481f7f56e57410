"""Resume state: the folder where an interrupted fit keeps what the next run of it continues from.

A job's folder is ``<paths.cache>/runs/<its identity>``; a teacher's is its cache entry. Each holds
the fit's checkpoints (``checkpoint/``, stamped with the identity, see :class:`diito.trainer.Trainer`)
and the id of the MLflow run it logs to (``run.json``). A job's folder is locked for the whole job
(:func:`held`), so a second identical job is refused before any compute; a finished job clears it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from diito.files import atomic_write_text

log = logging.getLogger(__name__)


class JobRunning(RuntimeError):
    """An identical job (the same settings on the same data) is running: this one does not start."""


@dataclass(frozen=True)
class ResumeState:
    """The resume folder of the fit whose identity is ``identity`` (a job's hash, a teacher's cache key)."""

    folder: Path
    identity: str

    @property
    def checkpoints(self) -> Path:
        return self.folder / "checkpoint"

    @property
    def _run_file(self) -> Path:
        return self.folder / "run.json"

    def saved_run(self, where: dict[str, str]) -> str | None:
        """The run an interrupted fit was logging to, if it ran this identity and logged ``where``
        (a store and experiment); a record without an identity is an older version's: not this
        fit's for sure. An unreadable record starts a new run (said aloud)."""
        if not self._run_file.exists():
            return None
        try:
            saved = json.loads(self._run_file.read_text())
            run_id = saved["run_id"]
        except (OSError, ValueError, KeyError) as e:
            log.warning("run state %s is unreadable (%s); this job starts a new MLflow run", self._run_file, type(e).__name__)
            return None
        return run_id if all(saved.get(k) == v for k, v in ({"identity": self.identity} | where).items()) else None

    def save_run(self, run_id: str, where: dict[str, str]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self._run_file, json.dumps({"run_id": run_id, "identity": self.identity} | where))

    def clear_checkpoints(self) -> None:
        shutil.rmtree(self.checkpoints, ignore_errors=True)

    def clear(self) -> None:
        """The fit ended: nothing to resume, and a later identical job is a new run."""
        self.clear_checkpoints()
        self._run_file.unlink(missing_ok=True)


def of_job(cache: str | Path, job_hash: str) -> ResumeState:
    """A job's resume state: named by its identity, under the cache folder."""
    return ResumeState(Path(cache) / "runs" / job_hash, job_hash)


@contextlib.contextmanager
def held(state: ResumeState, holder: bool = True) -> Iterator[None]:
    """The job's resume folder, locked for the whole job (teacher, training, logging), so a second
    identical job is refused (:class:`JobRunning`) before any compute instead of after the teacher.
    One process holds it (``holder``): the job's, whose spawned ranks run inside its hold, or rank 0
    of a launcher's ranks."""
    if not holder:
        yield
        return
    state.folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(state.folder / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise JobRunning(
            f"an identical job is already running (its state: {state.folder}); wait for it to end, or change a setting to run another job"
        ) from None
    try:
        yield
    finally:
        lock.release()
