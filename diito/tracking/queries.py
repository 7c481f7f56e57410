"""What the report and the alignment map read from the store, and the files they log back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from diito import tags as tag
from diito.store import mask
from diito.tracking.client import TrackingConfig, client
from diito.tracking.sweeps import reused_runs


def find_student_runs(config: TrackingConfig, target: str) -> tuple[list[Any], str | None]:
    """The finished student runs of a sweep (by sweep id or parent run id) or of an experiment (by
    name), and the sweep's parent run id (None for an experiment)."""
    mlflow_client = client(config)
    experiments = [e.experiment_id for e in mlflow_client.search_experiments()]
    parents = mlflow_client.search_runs(
        experiments, filter_string=f"tags.`{tag.ROLE}` = '{tag.SWEEP_ROLE}' and tags.`{tag.SWEEP_ID}` = '{target}'"
    )
    if not parents:
        parents = [
            r
            for r in mlflow_client.search_runs(experiments, filter_string=f"tags.`{tag.ROLE}` = '{tag.SWEEP_ROLE}'")
            if r.info.run_id == target
        ]
    students = f"tags.`{tag.ROLE}` = '{tag.STUDENT_ROLE}' and attributes.status = 'FINISHED'"
    if parents:
        parent = parents[0]
        query = f"tags.`{tag.SWEEP_ID}` = '{parent.data.tags[tag.SWEEP_ID]}' and " + students
        reused = [r for r in reused_runs(mlflow_client, parent) if r.info.status == "FINISHED"]
        return mlflow_client.search_runs([parent.info.experiment_id], filter_string=query) + reused, parent.info.run_id
    experiment = mlflow_client.get_experiment_by_name(target)
    if experiment is None:
        raise LookupError(f"no experiment, sweep id or sweep run named {target!r}")
    return mlflow_client.search_runs([experiment.experiment_id], filter_string=students), None


def run_record(config: TrackingConfig, run_id: str) -> Any:
    """A run's record (info, params, metrics, tags); LookupError naming the run and the store if absent."""
    try:
        return client(config).get_run(run_id)
    except MlflowException:
        raise LookupError(f"no run {run_id} in {mask(config.uri or '')}") from None


def download(config: TrackingConfig, run_id: str, artifact_path: str, folder: Path) -> Path:
    """One of a run's artifacts (a file or a folder), or else the run's logged model of that name
    (MLflow 3 keeps a logged model's files with the model, not with the run), copied into ``folder``."""
    import mlflow.artifacts

    mlflow_client = client(config)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return Path(mlflow_client.download_artifacts(run_id, artifact_path, str(folder)))
    except (MlflowException, OSError):
        run = mlflow_client.get_run(run_id)
        models = [
            m
            for m in mlflow_client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
            if m.name == artifact_path
        ]
        if not models:
            raise
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=models[0].artifact_location, dst_path=str(folder / artifact_path)))


def log_files(config: TrackingConfig, run_id: str, files: list[Path], artifact_path: str) -> None:
    mlflow_client = client(config)
    for f in files:
        mlflow_client.log_artifact(run_id, str(f), artifact_path)
