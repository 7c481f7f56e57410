"""The student as an MLflow 3 logged model: the transformers flavor's ``log_model`` (a
text-classification pipeline with its tokenizer, a signature and an input example), linked to its
run (the runs table's Models column, the run's "Logged models", the experiment's Models tab), with
its final scores on the datasets they were measured on, found by ``mlflow.search_logged_models``,
loadable as ``runs:/<run id>/student`` and ``models:/<model id>``, registered on request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

from mlflow.entities import LoggedModelOutput, Metric
from mlflow.exceptions import MlflowException

from diito.tracking import DatasetRecord, Run
from diito.tracking.client import fluent_uri

log = logging.getLogger(__name__)

NAME = "student"  # runs:/<run id>/student


def log_student(
    run: Run,
    model,
    tokenizer,
    examples: list,
    folder: Path,
    scores: Mapping[str, float],
    step: int,
    datasets: list[DatasetRecord],
    register: str | None = None,
) -> str | None:
    """Log the in-memory classifier ``model`` (no second save and reload of the job folder's copy)
    as the run's logged model ``student``; ``scores`` (``<split>/<metric>``) are recorded on it at
    ``step`` with the dataset of their split. Returns the model's id. Should the flavor fail, the
    Hugging Face ``folder`` is logged as the run's artifact instead, with a warning: the student
    is never lost."""
    if run.run_id is None:  # tracking switched off, or a rank that does not log
        return None
    try:
        model_id = _log(run, model, tokenizer, examples)
    except Exception as e:  # noqa: BLE001 - any failure of the flavor falls back to the plain folder
        log.warning(
            "tracking: the student could not be logged as an MLflow model (%s: %s); its Hugging Face folder is logged instead",
            type(e).__name__,
            str(e).splitlines()[0] if str(e) else "",
        )
        run.log_artifacts(folder, NAME)
        return None
    run._send("the student's scores", lambda: run.client.log_batch(run.run_id, metrics=_scores(run, model_id, scores, step, datasets)))
    run._send("the run's model output", lambda: run.client.log_outputs(run.run_id, [LoggedModelOutput(model_id, step)]))
    if register:
        run._send(f"model version of {register}", lambda: _register(run, register, model_id))
    return model_id


def _scores(run: Run, model_id: str, scores: Mapping[str, float], step: int, datasets: list[DatasetRecord]) -> list[Metric]:
    """The run's final scores, as the model's, each with the dataset of its split. A metric logged
    with a model id is written to the run too: it takes the timestamp of the run's own value, so
    the run's history holds it once."""
    by_split = {d.name.rsplit("/", 1)[-1]: d for d in datasets}
    metrics = []
    for key, value in scores.items():
        logged = [m.timestamp for m in run.client.get_metric_history(run.run_id, key) if m.step == step and m.value == value]
        dataset = by_split.get(key.split("/", 1)[0])
        metrics.append(
            Metric(
                key,
                float(value),
                max(logged, default=int(time.time() * 1000)),
                step,
                model_id=model_id,
                dataset_name=dataset.name if dataset else None,
                dataset_digest=dataset.digest if dataset else None,
            )
        )
    return metrics


def _log(run: Run, model, tokenizer, examples: list) -> str:
    """Create the logged model in the run's experiment and save the pipeline into it. The model is
    created here rather than by ``log_model``, which would put it in the active (default)
    experiment; its metrics are linked by :func:`log_student`, with their datasets."""
    import mlflow.transformers
    import torch
    import transformers

    client = run.client
    record = client.get_run(run.run_id)
    logged = client.create_logged_model(
        record.info.experiment_id, name=NAME, source_run_id=run.run_id, params=record.data.params, model_type="text-classification"
    )
    classifier = transformers.pipeline("text-classification", model=model, tokenizer=tokenizer)
    # Pinned here: the flavor's own guess adds torchvision, which a text classifier does not need.
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}"]
    # The signature is inferred from the input example and the pipeline's answer to it. The flavor
    # looks the model up on the hub for a model card and a license; offline, that only warns.
    flavor_log = logging.getLogger("mlflow.transformers")
    level = flavor_log.level
    flavor_log.setLevel(logging.ERROR)
    try:
        with fluent_uri(client.tracking_uri):  # the fluent API reads the process's tracking URI
            mlflow.transformers.log_model(
                classifier, name=NAME, model_id=logged.model_id, input_example=examples, pip_requirements=requirements
            )
    finally:
        flavor_log.setLevel(level)
    return logged.model_id


def _register(run: Run, name: str, model_id: str) -> None:
    with fluent_uri(run.client.tracking_uri):  # a models:/ source is looked up through the process's tracking URI
        _new_version(run, name, model_id)


def _new_version(run: Run, name: str, model_id: str) -> None:
    try:
        run.client.create_registered_model(name)
    except MlflowException:  # it exists: this is one more version
        pass
    version = run.client.create_model_version(name, f"models:/{model_id}", run_id=run.run_id, model_id=model_id)
    log.info("tracking: registered the student as %s version %s", name, version.version)
