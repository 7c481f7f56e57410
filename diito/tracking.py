"""MLflow runs: params, metrics, tags and artifacts, through an explicit run handle.

Everything goes through ``MlflowClient`` with an explicit run id instead of MLflow's global
"active run", so a job can never log into a run that another job (or an earlier job of the same
worker process) left open.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    uri: str | None = None
    artifact_location: str | None = None
    experiment: str
    run_name: str | None = None
    log_model: bool = True


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"loss": {"alpha": 0.7}}`` -> ``{"loss.alpha": 0.7}``; lists stay whole values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def git_tags(folder: Path) -> dict[str, str]:
    """The commit the code ran at, and whether the working tree had uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": str(bool(git("status", "--porcelain")))}
    except (OSError, subprocess.CalledProcessError):
        return {}


class Run:
    """One MLflow run, addressed by id."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, obj, artifact_file)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)


class NullRun:
    """Tracking switched off: the methods of :class:`Run`, doing nothing."""

    run_id = None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def _client(config: TrackingConfig) -> MlflowClient:
    return MlflowClient(tracking_uri=config.uri)


def _store_lock(uri: str | None):
    """An inter-process lock beside a SQLite store: the first access to a new database creates its
    schema, and concurrent jobs must not race to do that (or to create the same experiment)."""
    if uri and uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path) + ".lock")
    return contextlib.nullcontext()


def experiment_id(config: TrackingConfig) -> str:
    """The experiment's id, creating it (with artifacts under ``artifact_location`` for database
    stores, so they never land in a job's working directory) if it does not exist yet."""
    with _store_lock(config.uri):
        return _get_or_create_experiment(config)


def _get_or_create_experiment(config: TrackingConfig) -> str:
    client = _client(config)
    found = client.get_experiment_by_name(config.experiment)
    if found is not None:
        return found.experiment_id
    is_database = not str(config.uri).startswith(("http://", "https://", "databricks"))
    location = Path(config.artifact_location).resolve().as_uri() if config.artifact_location and is_database else None
    try:
        return client.create_experiment(config.experiment, artifact_location=location)
    except MlflowException:  # created by a concurrent job in the meantime
        return client.get_experiment_by_name(config.experiment).experiment_id


@contextlib.contextmanager
def open_run(config: TrackingConfig, run_name: str | None, tags: Mapping[str, str], run_id: str | None = None) -> Iterator[Run | NullRun]:
    """Start a run (or continue ``run_id``) and end it FINISHED, FAILED on an error, KILLED on Ctrl-C."""
    if not config.enabled:
        yield NullRun()
        return
    client = _client(config)
    if run_id is None:
        run_id = client.create_run(experiment_id(config), run_name=run_name, tags={k: str(v) for k, v in tags.items()}).info.run_id
    else:
        client.update_run(run_id, status="RUNNING")
    try:
        yield Run(client, run_id)
    except BaseException as error:
        client.set_tag(run_id, "error", f"{type(error).__name__}: {error}"[:5000])
        client.set_terminated(run_id, status="KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        error.mlflow_run_id = run_id  # lets a sweep tell that this failure is already on record
        raise
    client.set_terminated(run_id, status="FINISHED")
