"""Sweeps: parent and child runs in MLflow, failure isolation, skip-finished, parallel jobs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf

from diito import report
from tests.conftest import run_cli

SMOKE = ["teacher=tiny", "trainer=debug", "trainer.max_steps=2"]


def sweep_runs(home):
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    parents = [r for r in runs if r.data.tags.get("diito.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("diito.role") == "student"]
    return client, parents, children


def check_grid(home, parents, children, client):
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.data.tags["diito.sweep_id"] for c in children} == {parent.data.tags["diito.sweep_id"]}
    assert {(c.data.params["loss.alpha"], c.data.params["trainer.max_eval_examples"]) for c in children} == {
        ("0.3", "5"),
        ("0.3", "7"),
        ("0.7", "5"),
        ("0.7", "7"),
    }
    assert all("loss.alpha=" in c.info.run_name and "trainer.max_eval_examples=" in c.info.run_name for c in children)
    assert all("validation/accuracy" in c.data.metrics and "train/diito" in c.data.metrics for c in children)
    assert parent.data.params["sweep.loss.alpha"] == "0.3,0.7"
    summary = json.loads(open(client.download_artifacts(parent.info.run_id, "summary.json")).read())
    assert summary["jobs"] == 4 and summary["failed"] == 0
    # 5 and 7 validation examples give different accuracies, so the best child is told from the others
    by_score = sorted(children, key=lambda c: c.data.metrics["validation/accuracy"])
    assert by_score[0].data.metrics["validation/accuracy"] < by_score[-1].data.metrics["validation/accuracy"]
    assert summary["best_value"] == by_score[-1].data.metrics["validation/accuracy"]
    assert parent.data.tags["best_run_id"] == summary["best_run_id"]
    assert client.get_run(summary["best_run_id"]).data.metrics["validation/accuracy"] == by_score[-1].data.metrics["validation/accuracy"]


@pytest.mark.parametrize(
    "launcher",
    [[], pytest.param(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], marks=pytest.mark.slow)],  # joblib: parallel processes
    ids=["basic", "joblib"],
)
def test_grid_sweep_makes_a_parent_with_children(home, launcher):
    result = run_cli(["-m", *SMOKE, "loss.alpha=0.3,0.7", "trainer.max_eval_examples=5,7", *launcher], home)
    assert result.returncode == 0, result.stderr[-3000:]
    client, parents, children = sweep_runs(home)
    check_grid(home, parents, children, client)
    assert len({t for t in (home / ".cache" / "teachers").glob("*/info.json")}) == 1  # one teacher for the sweep
    assert (
        len(
            [
                r
                for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
                if r.data.tags.get("diito.role") == "teacher"
            ]
        )
        == 1
    )
    assert "sweep: 4/4 jobs finished" in result.stdout and "database is locked" not in result.stdout + result.stderr
    if launcher:  # the joblib launcher really ran jobs side by side: some children's runs overlap in time
        spans = sorted((c.info.start_time, c.info.end_time) for c in children)
        assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))

    sweep_id = parents[0].data.tags["diito.sweep_id"]
    report.main(
        [
            sweep_id,
            "--x",
            "loss.alpha",
            "--y",
            "trainer.max_eval_examples",
            "--out",
            str(home / "report"),
            "--tracking-uri",
            f"sqlite:///{home}/mlflow.db",
        ]
    )
    lines = (home / "report" / "report.txt").read_text().splitlines()
    assert lines[0].split()[:2] == ["loss.alpha", "trainer.max_eval_examples"] and len(lines) == 1 + 4 + 3
    assert lines[-2].startswith("wall time: 4 runs, ") and lines[-1].startswith(
        "training time (time/train_seconds, without stops): 4 runs, "
    )
    assert (home / "report" / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    logged = {a.path for a in client.list_artifacts(parents[0].info.run_id, "report")}
    assert logged == {"report/report.txt", "report/heatmap.png", "report/runs.csv"}


@pytest.mark.slow  # two sweeps
def test_a_job_failing_inside_its_run_is_one_failed_child_and_runs_again(home):
    sweep = ["-m", "teacher=tiny", "trainer=debug", "optim.lr=1e-3,1e12"]  # the second diverges after its run exists
    assert run_cli(sweep, home).returncode == 1
    client, (parent,), children = sweep_runs(home)
    failed = [c for c in children if c.info.status == "FAILED"]
    assert len(children) == 2 and len(failed) == 1 and "non-finite" in failed[0].data.tags["error"]
    summary = json.loads(open(client.download_artifacts(parent.info.run_id, "summary.json")).read())
    assert (summary["failed"], summary["finished"]) == (1, 1)
    again = run_cli(sweep, home)
    assert again.returncode == 1 and "skipped (rerun=true runs it again)" in again.stdout + again.stderr  # the finished one
    _, parents, children = sweep_runs(home)
    newest = max(parents, key=lambda p: p.info.start_time)
    summary = json.loads(open(client.download_artifacts(newest.info.run_id, "summary.json")).read())
    assert (summary["failed"], summary["finished"]) == (1, 1)  # the failed job ran again, in its own run, now in this sweep
    # the finished job is reused, not taken: it stays the first sweep's child, and the new sweep records it
    assert len(children) == 2
    (finished,), (rerun,) = [[c for c in children if (c.info.status == "FINISHED") == done] for done in (True, False)]
    assert finished.data.tags["mlflow.parentRunId"] == parent.info.run_id and f"diito.reused.{finished.info.run_id}" in newest.data.tags
    assert rerun.data.tags["mlflow.parentRunId"] == newest.info.run_id  # an unfinished run continues in the sweep that runs it


def test_failing_job_is_recorded_and_the_others_finish(home):
    result = run_cli(["-m", *SMOKE, "loss.alpha=0.5,1.5"], home)
    assert result.returncode != 0
    _, (parent,), children = sweep_runs(home)
    by_alpha = {c.info.run_name.split(",")[0]: c for c in children}  # names are the overrides, sorted
    assert by_alpha["loss.alpha=0.5"].info.status == "FINISHED"
    failed = by_alpha["loss.alpha=1.5"]
    assert failed.info.status == "FAILED" and "loss.alpha" in failed.data.tags["error"]
    assert failed.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.info.status == "FAILED"
    assert "sweep: 1/2 jobs finished" in result.stderr and "FAILED loss.alpha=1.5" in result.stderr


@pytest.mark.slow  # three sweeps, two at once
def test_overlapping_sweeps_reuse_finished_runs_without_taking_them_and_both_report_every_job(home):
    first = run_cli(["-m", *SMOKE, "loss.alpha=0.3,0.7", "loss.T=4"], home)
    assert first.returncode == 0, first.stderr[-3000:]
    client, (parent_a,), children_a = sweep_runs(home)
    tags_before = {c.info.run_id: c.data.tags for c in children_a}
    # the same jobs, spelled differently (4.0 is 4) and with settings that cannot change a result, and one more
    again = run_cli(["-m", *SMOKE, "loss.alpha=0.3,0.7,0.9", "loss.T=4.0", "trainer.num_threads=1", "trainer.progress=true"], home)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped (rerun=true runs it again)") + again.stderr.count("skipped (rerun=true runs it again)") == 2
    _, parents, children = sweep_runs(home)
    assert len(children) == 3  # only alpha=0.9 ran anew
    parent_b = max(parents, key=lambda p: p.info.start_time)
    # the finished runs are left as they were: still the first sweep's children, and named by it
    assert {c.info.run_id: c.data.tags for c in children if c.info.run_id in tags_before} == tags_before
    assert {k.removeprefix("diito.reused.") for k in parent_b.data.tags if k.startswith("diito.reused.")} == set(tags_before)
    # the second sweep's closing lines: every job (reused ones too) in the report's table, ties named as ties
    assert "sweep: 3/3 jobs finished" in again.stdout
    closing = again.stdout[again.stdout.index("sweep: 3/3 jobs finished") :].splitlines()
    assert closing[1].split() == ["loss.alpha", "n", "validation/accuracy"] and len(closing) == 1 + 1 + 3 + 1
    scores = sorted((c.data.metrics["validation/accuracy"] for c in children), reverse=True)
    if scores[0] == scores[1]:
        assert closing[-1].startswith(f"{scores.count(scores[0])} configurations tie at validation/accuracy {scores[0]:.4f}: loss.alpha=")
    else:
        assert closing[-1].startswith(f"best validation/accuracy: {scores[0]:.4f} (loss.alpha=")
    # python -m diito.report follows the reuse: both sweeps report every one of their jobs
    for parent, jobs in ((parent_a, 2), (parent_b, 3)):
        out = home / parent.info.run_id
        report.main([parent.data.tags["diito.sweep_id"], "--out", str(out), "--tracking-uri", f"sqlite:///{home}/mlflow.db"])
        assert len((out / "runs.csv").read_text().splitlines()) == 1 + jobs
    forced = run_cli(["-m", *SMOKE, "loss.alpha=0.3", "loss.T=4", "rerun=true"], home)
    assert forced.returncode == 0
    assert len(sweep_runs(home)[2]) == 4


def _run(params: dict, value: float):
    return SimpleNamespace(data=SimpleNamespace(params=params, metrics={"validation/accuracy": value}, tags={"loss": "diito"}))


def test_report_table_groups_seeds_best_first():
    runs = [
        _run({"seed": "1", "loss.T": "2.0", "loss.alpha": "0.5"}, 0.80),
        _run({"seed": "2", "loss.T": "2.0", "loss.alpha": "0.5"}, 0.84),
        _run({"seed": "1", "loss.T": "10.0", "loss.alpha": "0.5"}, 0.90),
        _run({"seed": "2", "loss.T": "10.0", "loss.alpha": "0.5"}, 0.86),
    ]
    keys, rows = report.table(runs, "validation/accuracy")
    assert keys == ["loss.T"]  # the seed and the constant alpha are not configurations
    assert [(r["loss.T"], r["n"]) for r in rows] == [("10.0", 2), ("2.0", 2)]
    assert rows[0]["mean"] == pytest.approx(0.88) and rows[0]["std"] == pytest.approx(0.0282842712)
    assert "0.8800 ± 0.0283" in report.format_table(keys, rows, "validation/accuracy")


@pytest.mark.slow  # starts a server
def test_sweep_against_a_real_tracking_server(home, mlflow_server):
    result = run_cli(["-m", *SMOKE, "loss.alpha=0.3,0.7", "tracking=server", f"tracking.uri={mlflow_server.uri}"], home)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (home / "mlflow.db").exists()  # everything went to the server
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("rotten_tomatoes-debug")  # a smoke configuration's experiment
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("diito.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("diito.role") == "student"]
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.data.params["loss.alpha"] for c in children} == {"0.3", "0.7"}
    assert "config.yaml" in {a.path for a in client.list_artifacts(children[0].info.run_id)}


@pytest.mark.slow  # an Optuna search of several jobs
def test_optuna_search_with_current_optuna(home):
    result = run_cli(
        [
            "-m",
            "hydra/sweeper=optuna",
            "hydra.sweeper.n_trials=3",
            "hydra.sweeper.seed=0",
            *SMOKE,
            "loss.alpha=interval(0.5,0.9)",
            "loss.T=choice(2,10)",
        ],
        home,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (results_file,) = home.glob("multirun/*/*/optimization_results.yaml")
    results = OmegaConf.to_container(OmegaConf.load(results_file))
    assert results["completed"] == 3 and set(results["best_params"]) == {"loss.alpha", "loss.T"}
    _, (parent,), children = sweep_runs(home)
    assert len(children) == 3 and {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert all(0.5 <= float(c.data.params["loss.alpha"]) <= 0.9 and c.data.params["loss.T"] in {"2.0", "10.0"} for c in children)
    assert results["best_value"] == max(c.data.metrics["validation/accuracy"] for c in children)


def test_a_sweep_that_hydra_stops_with_an_error_ends_its_parent_failed(home):
    result = run_cli(["-m", *SMOKE, "loss=kd,diito,dito"], home)  # a typo: Hydra finds no loss/dito, after the parent was opened
    assert result.returncode == 1 and "Could not find 'loss/dito'" in result.stderr
    _, (parent,), children = sweep_runs(home)
    assert parent.info.status == "FAILED" and "Could not find 'loss/dito'" in parent.data.tags["error"]
    assert all(c.info.status != "RUNNING" for c in children)
    assert (
        f"sweep stopped by an error: its MLflow parent run {parent.info.run_id} ({parent.info.run_name}) is marked FAILED" in result.stderr
    )


def test_the_job_name_leaves_out_every_tracking_setting():
    """A job's name (its MLflow run's, Hydra's override_dirname) never repeats a tracking.uri and its password."""
    from diito.tracking import TrackingConfig
    from tests.conftest import compose_config

    excluded = set(compose_config(hydra=True).hydra.job.config.override_dirname.exclude_keys)
    assert excluded == {"tracking"} | {f"tracking.{f.alias or name}" for name, f in TrackingConfig.model_fields.items()}


@pytest.mark.slow  # three sweeps (test_job.py checks the identity itself in seconds)
def test_a_sweep_run_again_on_changed_files_is_a_new_job(home, tmp_path):
    """A job is its settings and the bytes of the files it reads: unchanged files are skipped in a
    re-run sweep; the same files with their labels fixed are a new job (and a new teacher)."""
    words = ["good", "bad", "fine", "great", "awful", "okay", "nice", "poor"]
    rng = __import__("random").Random(0)
    rows = {
        split: [(" ".join(rng.choices(words, k=4)), rng.choice(["neg", "pos"])) for _ in range(n)]
        for split, n in (("train", 24), ("dev", 8))
    }

    def write(flip: int) -> None:  # the first ``flip`` training labels wrong, as a user's first draft
        for split, examples in rows.items():
            lines = ["text,label"] + [
                f"{text},{ ({'neg': 'pos', 'pos': 'neg'}[label] if split == 'train' and i < flip else label) }"
                for i, (text, label) in enumerate(examples)
            ]
            (tmp_path / f"{split}.csv").write_text("\n".join(lines) + "\n")

    sweep = [
        "-m",
        *SMOKE,
        "task=files",
        "task.name=mine",
        f"task.files.train={tmp_path / 'train.csv'}",
        f"task.files.validation={tmp_path / 'dev.csv'}",
        "loss.alpha=0.5",
    ]
    write(flip=6)
    assert run_cli(sweep, home).returncode == 0
    unchanged = run_cli(sweep, home)
    assert unchanged.returncode == 0 and "skipped (rerun=true runs it again)" in unchanged.stdout + unchanged.stderr
    write(flip=0)  # the labels fixed, in the same files
    fixed = run_cli(sweep, home)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "skipped" not in fixed.stdout + fixed.stderr
    _, parents, children = sweep_runs(home)
    assert len(parents) == 3 and len(children) == 2
    old, new = sorted(children, key=lambda c: c.info.start_time)
    assert new.data.tags["mlflow.parentRunId"] == max(parents, key=lambda p: p.info.start_time).info.run_id
    assert old.data.tags["config_hash"] != new.data.tags["config_hash"]
    assert len(list((home / ".cache" / "teachers").glob("*/info.json"))) == 2  # the teacher, fine-tuned on the fixed labels
