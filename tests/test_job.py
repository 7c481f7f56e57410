"""End to end: run.py into a temporary MLflow store; resume; teacher-cache reuse."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from filelock import FileLock
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from diito import evaluation, job
from diito.tracking import RunFailed
from diito.trainer import Trainer
from tests.conftest import ROOT, TIMINGS, compose_config, run_cli

SMOKE = ["teacher=tiny", "trainer=debug"]


def runs_by_role(home, role: str):
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`diito.role` = '{role}'", order_by=["attributes.start_time ASC"])
    return client, runs


def test_end_to_end_run_logs_params_metrics_tags_and_artifacts(home):
    result = run_cli([*SMOKE, "loss.alpha=0.7", "loss.T=4"], home)
    assert result.returncode == 0, result.stderr
    client, (student,) = runs_by_role(home, "student")
    _, (teacher,) = runs_by_role(home, "teacher")
    assert student.info.status == teacher.info.status == "FINISHED"
    assert client.get_experiment(student.info.experiment_id).name == "rotten_tomatoes-debug"  # a smoke configuration's own

    params = student.data.params
    assert params["loss.alpha"] == "0.7" and params["loss.T"] == "4.0" and params["student.layers"] == "3"
    assert params["task.name"] == "rotten_tomatoes" and params["trainer.max_steps"] == "4"

    tags = student.data.tags
    assert tags["task"] == "rotten_tomatoes" and tags["teacher"] == "tiny" and tags["student_layers"] == "3"
    assert tags["diito.teacher_run_id"] == teacher.info.run_id
    assert len(tags["git_commit"]) == 40
    assert tags["mlflow.source.git.commit"] == tags["git_commit"] and tags["mlflow.source.name"].endswith("run.py")  # the Source column

    # what users ask first: sizes (the tiny teacher has 4 blocks, its student 3), latencies and speed-ups
    m = student.data.metrics
    assert m["model/student_params"] < m["model/teacher_params"]
    assert m["model/teacher_mb"] == pytest.approx(m["model/teacher_params"] * 4 / 2**20, rel=0.01)  # fp32 weights (and a few buffers)
    # the training time, beside the run's start and end (which also count loading, the final evaluation and the model's logging)
    assert 0 < m["time/train_seconds"] < (student.info.end_time - student.info.start_time) / 1000
    assert m["steps"] == 4 and m["epochs"] == 0.5  # what the run did: 4 steps of the 8 batches of 64 examples
    assert client.get_run(teacher.info.run_id).data.metrics["time/train_seconds"] > 0
    for batch in ("batch1", "batch32"):
        per_example = "ms_batch1" if batch == "batch1" else "ms_per_example_batch32"
        assert m[f"speedup/{batch}"] == pytest.approx(m[f"latency/teacher_{per_example}"] / m[f"latency/student_{per_example}"])
    # the data it read, as MLflow run inputs (the Dataset column): 4 training steps of 64 examples, 32 to evaluate
    inputs = {d.dataset.name: (d.dataset.profile, [t.value for t in d.tags], d.dataset.digest) for d in student.inputs.dataset_inputs}
    assert {name: (profile, context) for name, (profile, context, _) in inputs.items()} == {
        "rotten_tomatoes/train": ('{"num_rows": 64}', ["training"]),
        "rotten_tomatoes/validation": ('{"num_rows": 32}', ["validation"]),
        "rotten_tomatoes/test": ('{"num_rows": 32}', ["test"]),
    }
    assert len({digest for _, _, digest in inputs.values()}) == 3

    history = client.get_metric_history(student.info.run_id, "train/kd")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert {"train/ce", "train/loss", "train/lr", "validation/accuracy", "validation/f1", "test/accuracy"} <= set(student.data.metrics)
    # DIITO (the default objective) logs its term and the intervention diagnostics
    assert {"train/diito", "train/iia", "train/efficacy", "validation/iia", "validation/efficacy"} <= set(student.data.metrics)
    assert 0.0 <= student.data.metrics["validation/iia"] <= 1.0
    assert tags["loss"] == "diito" and params["intervention.interchange_prop"] == "0.3" and params["mapping.name"] == "full"
    assert "trainer.progress" not in params and "paths.root" not in params  # settings that cannot change a result
    assert "intervention mapping" in result.stdout
    assert client.get_metric_history(teacher.info.run_id, "train/ce")

    artifacts = {a.path for a in client.list_artifacts(student.info.run_id)}
    assert {"config.yaml", ".hydra", "predictions"} <= artifacts and "student" not in artifacts  # the student is a logged model
    # the teacher's run is a tracked stage like the student's: its config, its data, its time and size
    teacher = client.get_run(teacher.info.run_id)
    assert "config.yaml" in {a.path for a in client.list_artifacts(teacher.info.run_id)}
    teacher_config = open(
        download_artifacts(run_id=teacher.info.run_id, artifact_path="config.yaml", tracking_uri=client.tracking_uri)
    ).read()
    assert "recipe:" in teacher_config and "rotten_tomatoes" in teacher_config and "student" not in teacher_config
    assert {d.dataset.name: [t.value for t in d.tags] for d in teacher.inputs.dataset_inputs} == {
        "rotten_tomatoes/train": ["training"],
        "rotten_tomatoes/validation": ["validation"],
        "rotten_tomatoes/test": ["test"],
    }
    assert {"time/train_seconds", "model/teacher_params", "model/teacher_mb", "best_step", "steps", "epochs", "test/accuracy"} <= set(
        teacher.data.metrics
    )
    assert teacher.data.tags["task"] == "rotten_tomatoes" and teacher.data.tags["teacher"] == "tiny"
    assert ".hydra/overrides.yaml" in {a.path for a in client.list_artifacts(student.info.run_id, ".hydra")}
    predictions = download_artifacts(run_id=student.info.run_id, artifact_path="predictions/test.tsv", tracking_uri=client.tracking_uri)
    lines = open(predictions).read().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 1 + 32
    # the student is an MLflow model (transformers flavor), runs:/<id>/student, holding a plain Hugging Face folder and its tokenizer
    mlflow.set_tracking_uri(client.tracking_uri)  # MLflow finds a run's logged model through the process's tracking URI
    folder = Path(download_artifacts(run_id=student.info.run_id, artifact_path="student"))
    model = AutoModelForSequenceClassification.from_pretrained(folder / "model")
    assert model.config.num_hidden_layers == 3 and model.config.id2label == {0: "negative", 1: "positive"}
    tokenizer = AutoTokenizer.from_pretrained(folder / "components" / "tokenizer")
    assert model(**tokenizer(["a fine film"], return_tensors="pt")).logits.shape == (1, 2)
    # artifacts live in the project folder, never in the job's working directory
    assert (home / "mlartifacts").is_dir()


def test_a_job_leaves_the_process_tracking_uri_as_it_found_it(home, tmp_path, monkeypatch):
    """Logging the student points MLflow's fluent API at the job's store; the next job of an
    in-process sweep must still log where MLFLOW_TRACKING_URI (or its absence) says."""
    elsewhere = f"sqlite:///{tmp_path}/elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    job.run(compose_config(SMOKE), output_dir=tmp_path / "a")
    assert os.environ["MLFLOW_TRACKING_URI"] == elsewhere and mlflow.get_tracking_uri() == elsewhere
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    job.run(compose_config([*SMOKE, "seed=2"]), output_dir=tmp_path / "b")
    assert "MLFLOW_TRACKING_URI" not in os.environ
    _, students = runs_by_role(home, "student")
    assert [s.data.params["seed"] for s in students] == ["2"]


def test_second_job_reuses_the_cached_teacher(home):
    for loss in ("loss=diito", "loss=kd"):
        assert run_cli([*SMOKE, loss], home).returncode == 0
    _, teachers = runs_by_role(home, "teacher")
    _, students = runs_by_role(home, "student")
    assert len(teachers) == 1 and len(students) == 2
    assert {s.data.tags["diito.teacher_run_id"] for s in students} == {teachers[0].info.run_id}
    kd = students[1]
    assert kd.data.tags["loss"] == "kd" and kd.data.params["loss.gamma"] == "0.0"
    assert not any(k.startswith(("intervention.", "mapping.")) for k in kd.data.params) and "train/diito" not in kd.data.metrics


def test_concurrent_jobs_fine_tune_one_teacher(home):
    env = {k: v for k, v in __import__("os").environ.items() if k != "MLFLOW_TRACKING_URI"} | {"DIITO_HOME": str(home)}
    command = [sys.executable, str(ROOT / "run.py"), *SMOKE, "stage=teacher", "teacher.recipe.max_steps=30"]
    procs = [subprocess.Popen(command, cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    _, teachers = runs_by_role(home, "teacher")
    assert len(teachers) == 1
    logs = " ".join(out + err for out, err in outputs)
    assert "teacher: fine-tuned now" in logs and "teacher: from the cache" in logs


def test_tracking_none_writes_no_store(home):
    result = run_cli([*SMOKE, "tracking=none"], home)
    assert result.returncode == 0, result.stderr
    assert not (home / "mlflow.db").exists()


class Killed(Exception):
    """Stands for the process being killed right after a checkpoint was written."""


def kill_after_checkpoint(monkeypatch, step: int):
    """Make the student's checkpoint at ``step`` the last thing the job does; returns the undo."""
    save = Trainer.save_checkpoint

    def save_then_die(self):
        save(self)
        if self.name == "student" and self.state.step == step:
            raise Killed

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)
    return lambda: monkeypatch.setattr(Trainer, "save_checkpoint", save)


def test_resume_after_kill_ends_like_an_uninterrupted_run(home, tmp_path, monkeypatch):
    overrides = [*SMOKE, "trainer.max_steps=6", "trainer.save_every=2", "trainer.eval_every=2", "trainer.keep_best=false"]
    cfg = compose_config(overrides)
    uninterrupted = job.run(cfg, output_dir=tmp_path / "a")

    undo = kill_after_checkpoint(monkeypatch, 4)
    with pytest.raises(RunFailed) as failure:
        job.run(cfg, output_dir=tmp_path / "b")
    assert isinstance(failure.value.__cause__, Killed)
    client, students = runs_by_role(home, "student")
    assert students[-1].info.status == "FAILED"
    undo()
    resumed = job.run(cfg, output_dir=tmp_path / "b")

    _, students = runs_by_role(home, "student")
    assert len(students) == 2 and all(s.info.status == "FINISHED" for s in students)
    assert [m.step for m in client.get_metric_history(students[1].info.run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]
    assert resumed == uninterrupted
    a = load_file(tmp_path / "a" / "student" / "model.safetensors")
    b = load_file(tmp_path / "b" / "student" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    results = [{k: v for k, v in s.data.metrics.items() if not k.startswith(TIMINGS)} for s in students]
    assert results[0] == results[1]  # last value of every loss term and metric


def test_regression_task_from_files_with_a_given_teacher_checkpoint(home, tmp_path):
    rng = __import__("random").Random(0)
    words = ["good", "bad", "fine", "great", "awful", "okay", "nice", "poor"]
    for split, n in (("train", 48), ("dev", 16)):
        rows = ["text,score"] + [f"{' '.join(rng.choices(words, k=5))},{rng.uniform(0, 5):.2f}" for _ in range(n)]
        (tmp_path / f"{split}.csv").write_text("\n".join(rows) + "\n")
    task = [
        "task=files",
        "task.name=scores",
        f"task.files.train={tmp_path / 'train.csv'}",
        f"task.files.validation={tmp_path / 'dev.csv'}",
        "task.label_field=score",
        "task.regression=true",
        "task.metrics=[pearson,spearman]",
        "task.main_metric=pearson",
    ]
    job.run(compose_config([*SMOKE, *task, "stage=teacher"]), output_dir=tmp_path / "t")
    _, (teacher,) = runs_by_role(home, "teacher")
    folder = next((home / ".cache" / "teachers").glob("scores-*/model"))
    assert AutoModelForSequenceClassification.from_pretrained(folder).config.num_labels == 1

    pearson = job.run(
        compose_config([*SMOKE, *task, f"teacher.checkpoint={folder}", "student.layers=2", "student.init_from=pretrained"]),
        output_dir=tmp_path / "s",
    )
    client, (student,) = runs_by_role(home, "student")
    assert -1.0 <= pearson <= 1.0 and student.data.metrics["validation/pearson"] == pytest.approx(pearson)
    assert "diito.teacher_run_id" not in student.data.tags  # a given checkpoint has no teacher run
    assert student.data.params["student.init_from"] == "pretrained"
    assert {"train/kd", "train/ce"} <= set(student.data.metrics)
    _, teachers = runs_by_role(home, "teacher")
    assert len(teachers) == 1  # nothing was fine-tuned for the second job


def test_a_files_task_s_label_names_reach_the_saved_teacher_and_student(home, tmp_path):
    for split, n in (("train", 24), ("dev", 8)):
        rows = ["text,label"] + [f"{'great' if i % 2 else 'awful'} film {i},{'pos' if i % 2 else 'neg'}" for i in range(n)]
        (tmp_path / f"{split}.csv").write_text("\n".join(rows) + "\n")
    task = [
        "task=files",
        "task.name=reviews",
        f"task.files.train={tmp_path / 'train.csv'}",
        f"task.files.validation={tmp_path / 'dev.csv'}",
    ]
    job.run(compose_config([*SMOKE, *task, "tracking=none", "tracking.log_model=true"]), output_dir=tmp_path / "out")
    teacher = next((home / ".cache" / "teachers").glob("reviews-*/model"))
    for folder in (tmp_path / "out" / "student", teacher):
        config = AutoModelForSequenceClassification.from_pretrained(folder).config
        assert config.id2label == {0: "neg", 1: "pos"} and config.label2id == {"neg": 0, "pos": 1}
    answers = pipeline("text-classification", model=str(tmp_path / "out" / "student"))(["a great film", "an awful film"])
    assert {a["label"] for a in answers} <= {"neg", "pos"}


def test_student_settings_never_reach_the_teacher(home, tmp_path, caplog):
    """The teacher is its own stage: student-side keys reuse the one teacher; only teacher.recipe changes it."""
    caplog.set_level("INFO", logger="diito")
    job.run(compose_config([*SMOKE, "stage=teacher"]))
    student_side = [
        ["trainer.max_train_examples=16"],
        ["trainer.max_steps=2", "trainer.grad_accum=2"],
        ["seed=7", "optim.lr=0.5", "optim.warmup_ratio=0"],
        ["trainer.precision=fp32", "trainer.max_eval_examples=8"],
    ]
    for i, overrides in enumerate(student_side):
        job.run(compose_config([*SMOKE, *overrides]), output_dir=tmp_path / str(i))
    client, (teacher,) = runs_by_role(home, "teacher")
    _, students = runs_by_role(home, "student")
    assert len(students) == 4 and len(list((home / ".cache" / "teachers").glob("*/model"))) == 1
    assert {s.data.tags["diito.teacher_source"] for s in students} == {"cache"}
    assert {s.data.tags["diito.teacher_run_id"] for s in students} == {teacher.info.run_id}
    assert {s.data.tags["diito.teacher_path"] for s in students} == {str(next((home / ".cache" / "teachers").glob("*/model")).parent)}
    assert caplog.text.count("teacher: from the cache") == 4 and "teacher: fine-tuned now" in caplog.text
    # the teacher trained on its own recipe's examples, not the student's
    assert teacher.data.params["teacher.recipe.max_train_examples"] == "64" and teacher.data.params["teacher.recipe.seed"] == "42"

    job.run(compose_config([*SMOKE, "teacher.recipe.max_train_examples=32"]), output_dir=tmp_path / "new")
    _, teachers = runs_by_role(home, "teacher")
    _, students = runs_by_role(home, "student")
    assert len(teachers) == 2 and students[-1].data.tags["diito.teacher_source"] == "fine-tuned"

    folder = next((home / ".cache" / "teachers").glob("*/model"))
    job.run(compose_config([*SMOKE, f"teacher.checkpoint={folder}"]), output_dir=tmp_path / "ckpt")
    _, students = runs_by_role(home, "student")
    tags = students[-1].data.tags
    assert tags["diito.teacher_source"] == "checkpoint" and tags["diito.teacher_path"] == str(folder)
    assert "diito.teacher_run_id" not in tags and f"teacher: the checkpoint {folder}" in caplog.text


def test_a_classifier_stuck_on_one_class_is_told_apart(caplog):
    spec = SimpleNamespace(eval_splits=["validation"], main_metric="accuracy")
    data = SimpleNamespace(spec=spec, num_labels=2, label_names=["negative", "positive"])
    assert evaluation.one_class({"validation": np.array([0, 1, 1])}, data) is None
    assert evaluation.one_class({"validation": np.array([1, 1, 1])}, data) == "positive"
    assert evaluation.one_class({"validation": np.array([0.5, 0.5])}, SimpleNamespace(spec=spec, num_labels=1)) is None
    evaluation.warn_one_class("positive", data, "the student")
    assert "the student predicts one class ('positive') for every validation example" in caplog.text
    assert "chance plateau" in caplog.text


def test_a_diverging_job_fails_naming_step_and_term_and_keeps_its_checkpoint(home):
    result = run_cli([*SMOKE, "optim.lr=1e12", "trainer.save_every=1"], home)
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: student step ") and "non-finite" in message and "Traceback" not in result.stderr
    assert any(term in message for term in ("kd=", "ce=", "diito=", "the gradient"))
    _, (student,) = runs_by_role(home, "student")
    assert student.info.status == "FAILED" and "non-finite" in student.data.tags["error"]
    (kept,) = (home / ".cache" / "runs").glob("*/checkpoint/last.pt")
    assert kept.stat().st_size > 0 and f"the last good checkpoint is {kept}" in message


def test_resume_under_hard_conditions_repeats_every_metric_history(home, tmp_path, monkeypatch):
    """Several epochs, keep-best, early stopping, evaluations and logs that do not line up with checkpoints."""
    overrides = [
        *SMOKE,
        "trainer.max_steps=null",
        "trainer.epochs=3",
        "trainer.min_steps=0",
        "trainer.early_stopping=3",
        "trainer.eval_every=3",
        "trainer.save_every=5",
        "trainer.log_every=2",
        "trainer.keep_best=true",
    ]
    cfg = compose_config(overrides)
    uninterrupted = job.run(cfg, output_dir=tmp_path / "a")
    undo = kill_after_checkpoint(monkeypatch, 5)
    with pytest.raises(RunFailed):
        job.run(cfg, output_dir=tmp_path / "b")
    undo()
    assert job.run(cfg, output_dir=tmp_path / "b") == uninterrupted
    client, (first, second) = runs_by_role(home, "student")
    assert set(first.data.metrics) == set(second.data.metrics)
    for key in (k for k in first.data.metrics if not k.startswith(TIMINGS)):
        histories = [
            [(m.step, m.value) for m in sorted(client.get_metric_history(r.info.run_id, key), key=lambda m: (m.step, m.timestamp))]
            for r in (first, second)
        ]
        assert histories[0] == histories[1], key
    evaluations = [m.step for m in client.get_metric_history(first.info.run_id, "validation/accuracy")]
    assert len(evaluations) >= 4 and max(evaluations) > 5  # evaluations on both sides of the kill


def test_the_logged_student_reproduces_the_logged_numbers(home, tmp_path):
    from diito.batching import Prepared
    from diito.evaluation import Evaluator
    from diito.models import load_finetuned, load_tokenizer
    from diito.sources import load_task

    job.run(compose_config([*SMOKE, "stage=teacher"]))
    (teacher_folder,) = (home / ".cache" / "teachers").glob("*/model")
    before = {f.name: f.read_bytes() for f in teacher_folder.iterdir()}
    cfg = compose_config(SMOKE)
    job.run(cfg, output_dir=tmp_path)
    assert {f.name: f.read_bytes() for f in teacher_folder.iterdir()} == before  # the cached teacher is untouched

    client, (student,) = runs_by_role(home, "student")
    mlflow.set_tracking_uri(client.tracking_uri)  # MLflow finds a run's logged model through the process's tracking URI
    folder = Path(download_artifacts(run_id=student.info.run_id, artifact_path="student"))
    model = load_finetuned(folder / "model")
    c = job.validate(cfg).config
    data = Prepared.from_task(load_task(c.task), load_tokenizer(str(folder / "components" / "tokenizer"))).limited(
        c.trainer.max_train_examples, c.trainer.max_eval_examples
    )
    evaluator = Evaluator(data, c.trainer.eval_batch_size, c.trainer.precision, torch.device("cpu"))
    assert evaluator.metrics(model) == {
        k: v for k, v in student.data.metrics.items() if k.startswith("validation/") and "ii" not in k and "efficacy" not in k
    }
    predicted = evaluator.predict(model, ["test"])["test"]
    logged = download_artifacts(run_id=student.info.run_id, artifact_path="predictions/test.tsv", tracking_uri=client.tracking_uri)
    rows = [line.split("\t") for line in open(logged).read().splitlines()[1:]]
    assert [r[0] for r in rows] == data.encoded["test"].ids and [int(r[1]) for r in rows] == predicted.tolist()


def test_no_student_tensor_shares_storage_with_its_teacher():
    from diito.models import build_student, load_pretrained

    teacher = load_pretrained("tiny", 2, 0)
    student = build_student(teacher, [0, 2], copy_classifier=True)
    teacher_storage = {t.untyped_storage().data_ptr() for t in teacher.state_dict().values()}
    assert not teacher_storage & {t.untyped_storage().data_ptr() for t in student.state_dict().values()}
    torch.testing.assert_close(student.bert.encoder.layer[1].output.dense.weight, teacher.bert.encoder.layer[2].output.dense.weight)


def test_a_long_param_is_logged_whole_as_an_artifact(home, tmp_path):
    entries = ",".join(["{student:{layers:[0]},teacher:{layers:[0,1]}}"] * 150)  # longer than MLflow's 6000 characters
    job.run(compose_config([*SMOKE, "mapping=explicit", f"mapping.entries=[{entries}]"]), output_dir=tmp_path)
    client, (student,) = runs_by_role(home, "student")
    param = student.data.params["mapping.entries"]
    assert len(param) <= 6000 and param.endswith("(truncated: the whole value is in the artifact params/mapping.entries.txt)")
    whole = open(
        download_artifacts(run_id=student.info.run_id, artifact_path="params/mapping.entries.txt", tracking_uri=client.tracking_uri)
    ).read()
    assert len(whole) > 6000 and whole.count("'student'") == 150 and whole.startswith(param[:100])


def test_damaged_entries_are_reported_and_replaced(home, tmp_path, caplog, monkeypatch):
    caplog.set_level("INFO", logger="diito")
    job.run(compose_config([*SMOKE, "stage=teacher"]))
    (weights,) = (home / ".cache" / "teachers").glob("*/model/model.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated cached teacher
    job.run(compose_config([*SMOKE, "stage=teacher"]))
    assert "is damaged: model.safetensors is unreadable" in caplog.text and "building it again" in caplog.text
    _, teachers = runs_by_role(home, "teacher")
    assert len(teachers) == 1 and weights.stat().st_size > 100  # fine-tuned again (in its own run, continued)

    cfg = compose_config([*SMOKE, "trainer.max_steps=6", "trainer.save_every=2"])
    undo = kill_after_checkpoint(monkeypatch, 4)
    with pytest.raises(RunFailed):
        job.run(cfg, output_dir=tmp_path / "a")
    undo()
    (last,) = (home / ".cache" / "runs").glob("*/checkpoint/last.pt")
    last.write_bytes(last.read_bytes()[:1000])  # damaged, as by a failing disk
    (last.parent.parent / "run.json").write_text("{not json")
    job.run(cfg, output_dir=tmp_path / "a")
    assert f"checkpoint {last} is damaged" in caplog.text and "student: resuming from step 2" in caplog.text  # previous.pt
    assert "run state" in caplog.text and "is unreadable" in caplog.text
    client, students = runs_by_role(home, "student")
    assert students[-1].info.status == "FINISHED"


def state_folder(home, cfg) -> Path:
    """Where a job keeps what it needs to resume: ``.cache/runs/<its identity>``."""
    return home / ".cache" / "runs" / job.validate(cfg).hash


def _uninterrupted_and_killed(mine, other, tmp_path, monkeypatch) -> None:
    """Job ``mine`` run to its end (in ``uninterrupted/``), and job ``other`` killed right after its
    checkpoint at step 4 (in ``a/``), leaving its resume state behind."""
    job.run(mine, output_dir=tmp_path / "uninterrupted")
    undo = kill_after_checkpoint(monkeypatch, 4)
    with pytest.raises(RunFailed):
        job.run(other, output_dir=tmp_path / "a")
    undo()


def test_a_checkpoint_of_another_job_is_never_loaded(home, tmp_path, monkeypatch, caplog):
    """Another job's resume state (its checkpoints and its run) found where this job looks: passed
    over in one line, and the job ends like an uninterrupted one, in a run of its own."""
    caplog.set_level("INFO", logger="diito")
    steps = [*SMOKE, "trainer.max_steps=6", "trainer.save_every=2", "trainer.keep_best=false"]
    cfg_a, cfg_b = compose_config([*steps, "optim.lr=5e-4"]), compose_config(steps)
    _uninterrupted_and_killed(cfg_b, cfg_a, tmp_path, monkeypatch)
    shutil.copytree(state_folder(home, cfg_a), state_folder(home, cfg_b), dirs_exist_ok=True)

    job.run(cfg_b, output_dir=tmp_path / "b")
    last = state_folder(home, cfg_b) / "checkpoint" / "last.pt"
    assert f"student: checkpoint {last} belongs to another job" in caplog.text and "student: resuming" not in caplog.text
    _, (uninterrupted, a, b) = runs_by_role(home, "student")
    assert a.info.status == "FAILED" and b.info.status == "FINISHED"  # A's run was not continued by B
    first, again = (load_file(tmp_path / name / "student" / "model.safetensors") for name in ("uninterrupted", "b"))
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_a_checkpoint_that_does_not_fit_the_model_starts_afresh(home, tmp_path, monkeypatch, caplog):
    """A checkpoint of another shape (say, an older version's, under this job's identity) is passed
    over in one line before anything is loaded: no traceback on every re-run."""
    caplog.set_level("INFO", logger="diito")
    steps = [*SMOKE, "trainer.max_steps=6", "trainer.save_every=2"]
    cfg_a, cfg_b = compose_config([*steps, "student.layers=2"]), compose_config(steps)
    _uninterrupted_and_killed(cfg_b, cfg_a, tmp_path, monkeypatch)
    mine = state_folder(home, cfg_b) / "checkpoint"
    mine.mkdir(parents=True)
    for name in ("last.pt", "previous.pt"):  # a 2-layer student's checkpoints, stamped with the 3-layer job's identity
        checkpoint = torch.load(state_folder(home, cfg_a) / "checkpoint" / name, weights_only=True)
        torch.save(checkpoint | {"owner": job.validate(cfg_b).hash}, mine / name)

    job.run(cfg_b, output_dir=tmp_path / "b")
    assert f"student: checkpoint {mine / 'last.pt'} does not fit the model" in caplog.text
    assert "starting afresh" in caplog.text and "student: resuming" not in caplog.text
    _, students = runs_by_role(home, "student")
    assert students[-1].info.status == "FINISHED"
    first, again = (load_file(tmp_path / name / "student" / "model.safetensors") for name in ("uninterrupted", "b"))
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_a_second_identical_job_is_refused_in_one_line_before_compute(home):
    """The first job holds its state folder's lock for all its life; the second ends at once."""
    cfg = compose_config(SMOKE)
    folder = state_folder(home, cfg)
    folder.mkdir(parents=True)
    with FileLock(str(folder / ".lock")):  # the running job
        result = run_cli(SMOKE, home)
    assert result.returncode == 75, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: an identical job is already running (its state: {folder}); wait for it to end, or change a setting to run another job"
    )
    assert "Traceback" not in result.stderr
    assert not (home / ".cache" / "teachers").exists()  # nothing computed: not even the teacher
    _, students = runs_by_role(home, "student")
    _, teachers = runs_by_role(home, "teacher")
    assert students == teachers == []


def test_the_identity_holds_a_digest_of_the_data_read_before_compute(home, tmp_path):
    """The same settings on changed data are another job: known at validation, without reading a
    row (a hub dataset is known by its id: it is not downloaded before compute)."""

    def identity(overrides: list[str]) -> tuple[str, str]:
        validated = job.validate(compose_config([*SMOKE, *overrides]))
        return validated.hash, validated.data_digest

    task = ["task=files", f"task.files.train={tmp_path / 'train.csv'}", f"task.files.validation={tmp_path / 'dev.csv'}"]
    (tmp_path / "dev.csv").write_text("text,label\nfine,pos\npoor,neg\n")
    (tmp_path / "train.csv").write_text("text,label\ngood,pos\nbad,pos\n")
    first = identity(task)
    (tmp_path / "train.csv").write_text("text,label\ngood,pos\nbad,pos\n")  # rewritten unchanged
    assert identity(task) == first
    (tmp_path / "train.csv").write_text("text,label\ngood,pos\nbad,neg\n")  # a label fixed
    fixed = identity(task)
    assert fixed[0] != first[0] and fixed[1] != first[1]
    glue = tmp_path / "SST-2"
    glue.mkdir()
    for name, rows in (("train.tsv", "a film\t1\n"), ("dev.tsv", "a film\t0\n"), ("test.tsv", "0\ta film\n")):
        (glue / name).write_text({"test.tsv": "index\tsentence\n"}.get(name, "sentence\tlabel\n") + rows)
    sst2 = identity(["task=sst2", f"task.data_dir={tmp_path}"])  # the GLUE root: its SST-2 folder is read
    (glue / "dev.tsv").write_text("sentence\tlabel\na film\t1\n")
    assert identity(["task=sst2", f"task.data_dir={tmp_path}"])[1] != sst2[1]
    assert identity(["task=sst2"])[1] == identity(["task=sst2"])[1] != identity(["task=cola"])[1]  # the hub's id
    assert len({identity([])[1], first[1], sst2[1]}) == 3  # the packaged rotten_tomatoes CSV


def test_a_job_with_a_selection_split_chooses_on_it_and_reports_the_dev_set_untouched(home):
    result = run_cli([*SMOKE, "task.selection_split=true", "task.selection_size=200", "trainer.eval_every=1", "trainer.max_steps=6"], home)
    assert result.returncode == 0, result.stderr
    client, (student,) = runs_by_role(home, "student")
    assert student.data.params["task.eval_splits"] == "['selection', 'validation']"
    assert {"selection/accuracy", "validation/accuracy", "test/accuracy"} <= set(student.data.metrics)
    contexts = {d.dataset.name: [t.value for t in d.tags] for d in student.inputs.dataset_inputs}
    assert contexts["rotten_tomatoes/selection"] == contexts["rotten_tomatoes/validation"] == ["validation"]
    # keep-best read the selection split: the kept step is the first of its best evaluations
    history = client.get_metric_history(student.info.run_id, "selection/accuracy")[:-1]  # the last is the final score
    best = max(m.value for m in history)
    assert student.data.metrics["best_step"] == min(m.step for m in history if m.value == best)
    from diito.report import compared_metrics

    assert compared_metrics([student], "validation/accuracy") == (
        ["test/accuracy", "validation/accuracy", "selection/accuracy"],
        "selection",
    )
