"""The student people can use: an MLflow model that pyfunc and `mlflow models predict` load offline,
registered on request; the plain folder when the flavor fails; system metrics on request."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from transformers import pipeline

from diito import job, logged_model
from tests.conftest import compose_config

TINY = ["teacher=tiny", "trainer=debug"]


def _student(home):
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()], filter_string="tags.`diito.role` = 'student'")
    return client, run


def test_the_logged_student_predicts_through_pyfunc_and_the_cli_and_is_registered(home, tmp_path, capfd):
    job.run(compose_config([*TINY, "tracking.register=rt-student"]), output_dir=tmp_path / "out")
    console = capfd.readouterr().err
    assert "model card could not be retrieved" not in console and "license information" not in console  # offline noise, silenced
    client, run = _student(home)
    sentences = ["a gripping, moving film", "dull and far too long", "the plot is thin but the acting carries it"]
    mlflow.set_tracking_uri(client.tracking_uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/student")
    assert model.metadata.signature is not None and model.metadata.saved_input_example_info is not None
    answers = model.predict(sentences)
    expected = pipeline("text-classification", model=str(tmp_path / "out" / "student"))(sentences)  # the job folder's plain copy
    assert answers["label"].tolist() == [e["label"] for e in expected] and set(answers["label"]) <= {"negative", "positive"}
    assert answers["score"].tolist() == pytest.approx([e["score"] for e in expected], abs=1e-5)

    (version,) = client.search_model_versions("name='rt-student'")
    assert version.run_id == run.info.run_id and int(version.version) == 1
    assert mlflow.pyfunc.load_model("models:/rt-student/1").predict(sentences)["label"].tolist() == answers["label"].tolist()

    # an MLflow 3 logged model: linked to its run (the Models column), with its scores on their datasets
    (logged,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert logged.name == "student" and logged.source_run_id == run.info.run_id and logged.status == LoggedModelStatus.READY
    assert [o.model_id for o in client.get_run(run.info.run_id).outputs.model_outputs] == [logged.model_id]
    scores = {m.key: (m.value, m.dataset_name) for m in logged.metrics}
    assert scores["validation/accuracy"] == (run.data.metrics["validation/accuracy"], "rotten_tomatoes/validation")
    assert scores["test/accuracy"] == (run.data.metrics["test/accuracy"], "rotten_tomatoes/test")
    assert logged.params["loss.alpha"] == run.data.params["loss.alpha"]
    assert version.source == f"models:/{logged.model_id}"  # the version is the logged model
    assert "Loading weights" not in console and "Writing model shards" not in console  # written once, never reloaded to be logged

    csv = tmp_path / "sentences.csv"
    pd.DataFrame({"text": sentences}).to_csv(csv, index=False)
    env = {**os.environ, "MLFLOW_TRACKING_URI": client.tracking_uri, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "predict",
            "-m",
            f"runs:/{run.info.run_id}/student",
            "-i",
            str(csv),
            "-t",
            "csv",
            "--env-manager",
            "local",
            "-o",
            str(tmp_path / "predicted.json"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = json.loads((tmp_path / "predicted.json").read_text())["predictions"]
    assert [p["label"] for p in predicted] == answers["label"].tolist()


def test_when_the_flavor_fails_the_plain_folder_is_logged_with_a_warning(home, tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no flavor today")

    monkeypatch.setattr(logged_model, "_log", broken)
    with caplog.at_level(logging.WARNING, logger="diito.logged_model"):
        job.run(compose_config(TINY), output_dir=tmp_path / "out")
    client, run = _student(home)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "student")} >= {"student/config.json", "student/model.safetensors"}
    assert "could not be logged as an MLflow model (RuntimeError: no flavor today)" in caplog.text


def test_system_metrics_are_sampled_while_training_on_request(home, tmp_path):
    job.run(
        compose_config([*TINY, "trainer.max_steps=40", "tracking.system_metrics=0.2", "tracking.log_model=false"]),
        output_dir=tmp_path / "out",
    )
    client, run = _student(home)
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    assert len(client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")) >= 1
