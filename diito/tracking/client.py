"""The one way to MLflow: the tracking settings, the client every module uses (with the retries a
job's settings give), the store and experiment checked before compute, and the store a command
outside a job (report, analyze) opens: the one a job with the same environment would log to.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict, Field

from diito import store
from diito.store import mask


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    enabled: bool = True
    uri: str | None = None
    artifact_location: str | None = None
    experiment: str
    run_name: str | None = None
    log_model: bool = True
    # tracking.register=<name>: the logged student becomes a new version of that registered model
    # ("register" is a BaseModel attribute, hence the alias)
    registered_model: str | None = Field(None, alias="register")
    system_metrics: float | None = Field(None, gt=0)  # seconds between samples of CPU, memory (and GPU) use (system/* metrics)
    retries: int = Field(3, ge=0)  # a tracking server that stops answering: tries per request
    timeout: float = Field(10.0, gt=0)  # seconds per try


def client(config: TrackingConfig) -> MlflowClient:
    """A client whose requests to a server give up after ``retries`` tries of ``timeout`` seconds
    (MLflow's own defaults wait minutes per request), unless the environment says otherwise."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(config.retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(config.timeout))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    if mask(config.uri or "") != (config.uri or ""):  # MLflow's "View run at <uri>" lines would print the password
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return MlflowClient(tracking_uri=config.uri)


@contextlib.contextmanager
def process_uri_kept() -> Iterator[None]:
    """The process's MLflow tracking URI (MLflow's global and MLFLOW_TRACKING_URI) as it was before
    the block, whatever the block set: ``mlflow.set_tracking_uri`` also writes the variable, and its
    own restoring helper removes one the user had set."""
    from mlflow.tracking._tracking_service import utils

    variable, previous = os.environ.get("MLFLOW_TRACKING_URI"), utils._tracking_uri
    try:
        yield
    finally:
        utils._tracking_uri = previous
        if variable is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = variable


@contextlib.contextmanager
def fluent_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (``mlflow.transformers.log_model``, ``models:/`` lookups) pointed at
    ``uri`` for the block, and the process left as it was (:func:`process_uri_kept`), so the next
    job of an in-process sweep logs where it would have."""
    import mlflow

    with process_uri_kept():
        mlflow.set_tracking_uri(uri)
        yield


def check_experiment(config: TrackingConfig) -> None:
    """Before compute: the store opens (MLflow's schema is current) and the job's experiment is
    active, or absent (it is then created). Raises :class:`store.StoreError` naming the key and what
    to do. A store not created yet is left alone: MLflow creates it, with the experiment."""
    if store.is_new(config.uri):
        return
    try:
        with store.lock(config.uri):
            found = client(config).get_experiment_by_name(config.experiment)
    except (MlflowException, OSError) as e:
        reason = mask(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        raise store.StoreError(f"tracking.uri: cannot open the store {mask(config.uri or '')} ({reason})") from None
    if found is not None and found.lifecycle_stage == "deleted":
        raise _deleted(config, found.experiment_id)


def _deleted(config: TrackingConfig, experiment: str) -> store.StoreError:
    uri = f"MLFLOW_TRACKING_URI={mask(config.uri)} " if config.uri else ""
    return store.StoreError(
        f"tracking.experiment: {config.experiment!r} is deleted; restore it ({uri}mlflow experiments restore "
        f"--experiment-id {experiment}, or in the UI's trash) or set tracking.experiment=<another name>"
    )


def experiment_id(config: TrackingConfig) -> str:
    """The experiment's id, creating it (with artifacts under ``artifact_location`` for database
    stores, so they never land in a job's working directory) if it does not exist yet."""
    with store.lock(config.uri):
        mlflow_client = client(config)
        found = mlflow_client.get_experiment_by_name(config.experiment)
        if found is not None:
            if found.lifecycle_stage == "deleted":  # since the job was validated
                raise _deleted(config, found.experiment_id)
            return found.experiment_id
        is_database = not str(config.uri).startswith(("http://", "https://", "databricks"))
        location = Path(config.artifact_location).resolve().as_uri() if config.artifact_location and is_database else None
        try:
            return mlflow_client.create_experiment(config.experiment, artifact_location=location)
        except MlflowException:  # created by a concurrent job in the meantime
            return mlflow_client.get_experiment_by_name(config.experiment).experiment_id


def settings(uri: str | None = None) -> TrackingConfig:
    """The tracking settings a job would have in this environment (``DIITO_HOME``,
    ``MLFLOW_TRACKING_URI``, the project's ``conf/``), with ``uri`` instead of the store when given:
    what ``python -m diito.report`` and ``python -m diito.analyze`` open, with the jobs' retries."""
    from hydra import compose, initialize_config_dir

    from diito import config, project_home

    project_home()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
        cfg = compose(config_name="config")
    found = config.tracking_settings(cfg)
    return found.model_copy(update={"uri": uri}) if uri else found
