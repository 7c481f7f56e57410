"""A run's life: opened (or continued after an interruption), ended FINISHED, FAILED or KILLED; the
finished run of a job found again; a FAILED run for a job that failed before its run existed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from diito import tags as tag
from diito.resume import ResumeState
from diito.store import mask
from diito.tracking.client import TrackingConfig, client, experiment_id
from diito.tracking.runs import NullRun, Run

log = logging.getLogger(__name__)


class RunFailed(Exception):
    """A job failed inside its run, which is already marked FAILED with the error (``error``, also
    the exception's cause). Pickles whole, so a spawned rank can hand it to the job's process."""

    def __init__(self, run_id: str, error: BaseException):
        super().__init__(f"{type(error).__name__}: {error}")
        self.run_id, self.error = run_id, error

    def __reduce__(self):
        return type(self), (self.run_id, self.error)


@functools.cache
def git_tags() -> dict[str, str]:
    """The commit of the code that runs (not of the working directory), and whether its tree had
    uncommitted changes."""
    folder = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, check=True).stdout.strip()

    source = {"mlflow.source.type": "LOCAL", "mlflow.source.name": sys.argv[0] or "python"}  # the runs table's Source column
    try:
        commit = git("rev-parse", "HEAD")
        return source | {"git_commit": commit, "mlflow.source.git.commit": commit, "git_dirty": str(bool(git("status", "--porcelain")))}
    except (OSError, subprocess.CalledProcessError):
        return source


@contextlib.contextmanager
def open_run(config: TrackingConfig, run_name: str | None, tags: Mapping[str, Any], run_id: str | None = None) -> Iterator[Run | NullRun]:
    """Start a run (or continue ``run_id``) and end it FINISHED; an error marks it FAILED and comes
    out as :class:`RunFailed`, Ctrl-C marks it KILLED."""
    if not config.enabled:
        yield NullRun()
        return
    mlflow_client = client(config)
    if run_id is not None:
        try:
            mlflow_client.update_run(run_id, status="RUNNING")
            if tag.ERROR in mlflow_client.get_run(run_id).data.tags:
                mlflow_client.delete_tag(run_id, tag.ERROR)  # the interruption's error no longer describes the run
            run = Run.continued(mlflow_client, run_id)
            run.set_tags(tags)  # say, the sweep that runs it now
        except MlflowException as e:
            log.warning("cannot continue MLflow run %s (%s); this job starts a new run", run_id, str(e).splitlines()[0])
            run_id = None
    if run_id is None:
        tags = {k: mask(str(v)) for k, v in tags.items()}
        experiment = experiment_id(config)
        run_id = mlflow_client.create_run(experiment, run_name=mask(run_name) if run_name else None, tags=tags).info.run_id
        run = Run(mlflow_client, run_id, experiment_id=experiment)
    try:
        yield run
    except Exception as error:
        _end(run, "FAILED", f"{type(error).__name__}: {error}")
        raise RunFailed(run_id, error) from error
    except BaseException:
        _end(run, "KILLED")
        raise
    _end(run, "FINISHED")


def _end(run: Run, status: str, error: str | None = None) -> None:
    """Record the run's end; say what never reached the store (the job's own outputs are kept)."""
    if error:
        run.set_tags({tag.ERROR: error[:5000]})
    unsent = run.unsent()
    if not run._send("the run's end", lambda: run.client.set_terminated(run.run_id, status=status)):
        unsent.append(f"the run's end ({status}: the run still shows RUNNING)")
    if unsent:
        log.warning("tracking: never reached %s for run %s: %s", mask(run.client.tracking_uri), run.run_id, "; ".join(unsent))


@contextlib.contextmanager
def system_metrics(run: Run | NullRun, config: TrackingConfig) -> Iterator[None]:
    """With ``tracking.system_metrics=<seconds>``, MLflow's monitor samples CPU, memory, disk, network
    (and GPU) use that often into the run's ``system/*`` metrics while the block runs."""
    if not (config.enabled and config.system_metrics and run.run_id):
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run.run_id, sampling_interval=config.system_metrics, resume_logging=True, tracking_uri=config.uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


@contextlib.contextmanager
def no_run() -> Iterator[NullRun]:
    """Where a run would be, for a process that does not log (a rank other than 0)."""
    yield NullRun()


@contextlib.contextmanager
def resumable_run(state: ResumeState, config: TrackingConfig, run_name: str | None, tags: Mapping[str, Any]) -> Iterator[Run | NullRun]:
    """A run whose id is kept in the resume ``state`` of what it runs (a job, a teacher's fine-tune),
    so re-running an interrupted job continues the same run, and a record of anything else starts a
    new one. The caller holds the state's lock, so no other process shares it."""
    where = {"uri": mask(config.uri or ""), "experiment": config.experiment}
    run_id = state.saved_run(where)
    with open_run(config, run_name, tags, run_id=run_id) as run:
        if run.run_id and run.run_id != run_id:
            state.save_run(run.run_id, where)
        yield run


def finished_run(config: TrackingConfig, config_hash: str) -> tuple[Run, dict[str, float]] | None:
    """A FINISHED student run of exactly this job, with its metrics, if there is one."""
    mlflow_client = client(config)
    found = mlflow_client.search_runs(
        [experiment_id(config)],
        max_results=1,
        filter_string=(
            f"tags.{tag.CONFIG_HASH} = '{config_hash}' and tags.`{tag.ROLE}` = '{tag.STUDENT_ROLE}' and attributes.status = 'FINISHED'"
        ),
    )
    return (Run(mlflow_client, found[0].info.run_id), found[0].data.metrics) if found else None


def record_failure(config: TrackingConfig, run_name: str, tags: Mapping[str, Any], params: Mapping[str, Any], error: BaseException) -> None:
    """A FAILED run for a job that failed before its own run existed (say, an invalid combination of
    values in a sweep), so the sweep shows it with its error and its config."""
    mlflow_client = client(config)
    tags = {k: mask(str(v)) for k, v in tags.items()} | {tag.ERROR: mask(f"{type(error).__name__}: {error}")[:5000]}
    run_id = mlflow_client.create_run(experiment_id(config), run_name=mask(run_name), tags=tags).info.run_id
    Run(mlflow_client, run_id).log_params(params)
    mlflow_client.set_terminated(run_id, status="FAILED")
