"""How a job or a sweep that goes wrong ends, in one place (as lightning-hydra-template's
``task_wrapper``): what is recorded where, the line printed, the exit code.

=============================================  =======================================================  ====
what went wrong                                what is recorded, what is printed                        exit
=============================================  =======================================================  ====
bad input (``ConfigError``, ``DataError``)     nothing was started; ``error: <the key or file>: ...``   2
an identical job is running (``JobRunning``)   nothing was started; ``error: ...``                      75
a job failed inside its run                    its run FAILED with the ``error`` tag (by                1
                                               :func:`diito.tracking.open_run`); one line for a
                                               failure that says it all (a non-finite loss, a full
                                               disk, the store), else the traceback, masked
a job of a sweep failed                        the same, or a FAILED run made for it when it failed     --
                                               before its run existed; a note in the sweep's folder;
                                               the sweep goes on
a sweep with failed jobs                       its parent run FAILED, its summary names them            1
Ctrl-C or SIGTERM                              the run KILLED; how to continue                          130,
                                                                                                        143
=============================================  =======================================================  ====

75 is sysexits.h's EX_TEMPFAIL, "try again later": the same command succeeds once the other job ended.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from diito import interrupts, store, tags, tracking
from diito.files import NoSpace, atomic_write_text

log = logging.getLogger(__name__)

BAD_INPUT, FAILED, RUNNING = 2, 1, 75
FAILURES = "failed"  # a file per failed job in the sweep's folder, so a sweep knows its failures even without tracking
_sweep_failed = False  # set when a sweep of this process ended with failed jobs


class Refused(BaseException):
    """Bad input found by a Hydra callback, before any job. A BaseException, so Hydra (which prints
    an Exception with its traceback) lets it through to the entry point, which ends as for any bad
    input (:func:`exit_code`)."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def _bad_input() -> tuple[type[Exception], ...]:
    from diito.config import ConfigError
    from diito.sources import DataError

    return ConfigError, DataError


def _said_in_one_line() -> tuple[type[Exception], ...]:
    from diito.trainer import NonFiniteLoss

    return NonFiniteLoss, NoSpace, store.StoreError


def guarded(
    job: Callable[[], float], cfg: DictConfig, job_name: str, job_dir: Path, sweep_dir: Path | None, sweep: dict[str, str] | None
) -> float:
    """``job()``, ended by the policy: in a sweep (``sweep_dir``), a failed job is recorded and the
    sweep goes on (NaN is its result); alone, its failure ends the process with its line and code."""
    try:
        return job()
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: the run is marked KILLED; say how to continue
        print(interrupts.how_to_continue(stop), file=sys.stderr)
        raise
    except Exception as error:
        if sweep_dir is None:
            raise SystemExit(end(error)) from error
        log.error("job %s failed: %s", store.mask(job_name), store.mask(str(error)))
        _note(sweep_dir, job_dir, job_name, error)
        if sweep and not isinstance(error, tracking.RunFailed):  # it failed before its run existed
            from diito import config

            tracking.record_failure(
                config.tracking_settings(cfg),
                job_name,
                tracking.sweep_tags(sweep) | {tags.ROLE: tags.STUDENT_ROLE},
                config.raw_params(cfg),
                error,
            )
        return float("nan")


def end(error: BaseException) -> int:
    """Say what ended the command (one line, or the masked traceback) and return its exit code; an
    error without a line of its own and without a credential to mask is raised again, for its
    traceback."""
    from diito.resume import JobRunning

    error = error.error if isinstance(error, Refused) else error
    if isinstance(error, _bad_input()):  # bad input: nothing was started
        print(f"error: {store.mask(str(error))}", file=sys.stderr)
        return BAD_INPUT
    if isinstance(error, JobRunning):  # nothing was started either
        print(f"error: {error}", file=sys.stderr)
        return RUNNING
    cause = error.error if isinstance(error, tracking.RunFailed) else error
    if isinstance(cause, _said_in_one_line()):  # said in one line (and in its FAILED run): a traceback adds nothing
        print(f"error: {store.mask(str(cause))}", file=sys.stderr)
        return FAILED
    if store.mask(str(error)) != str(error):  # the traceback Hydra prints would show a credential: print it masked
        print(store.mask("".join(traceback.format_exception(error))), file=sys.stderr)
        return FAILED
    raise error


def _note(sweep_dir: Path, job_dir: Path, job_name: str, error: BaseException) -> None:
    """Note in the sweep's folder that a job failed (read back when the sweep ends)."""
    text = json.dumps({"run": store.mask(job_name), "error": store.mask(f"{type(error).__name__}: {error}")})
    atomic_write_text(Path(sweep_dir) / FAILURES / f"{Path(job_dir).name}.json", text)


def job_failures(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The failed jobs noted in a sweep's folder."""
    return [json.loads(f.read_text()) for f in sorted((Path(sweep_dir) / FAILURES).glob("*.json"))]


def sweep_ended(failed: bool) -> None:
    """A sweep of this process ended, ``failed`` when any of its jobs failed (see :func:`exit_status`)."""
    global _sweep_failed
    _sweep_failed = _sweep_failed or failed


def exit_status() -> int:
    """The exit code of a command that returned normally: 1 when a sweep it ran had failed jobs."""
    return FAILED if _sweep_failed else 0
