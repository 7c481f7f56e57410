"""Learning curves, paired comparisons and the CSV export of python -m diito.report (on hand-made runs)."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest

from diito import report

VALUES = {  # (method, size, seed) -> validation accuracy
    ("kd", "500", "1"): 0.70,
    ("kd", "500", "2"): 0.72,
    ("kd", "None", "1"): 0.80,
    ("kd", "None", "2"): 0.82,
    ("diito", "500", "1"): 0.73,
    ("diito", "500", "2"): 0.71,
    ("diito", "None", "1"): 0.85,
    ("diito", "None", "2"): 0.86,
    ("diito", "1000", "1"): 0.77,  # a size only one method ran: in the curve, not in the comparison
}


def _runs():
    runs = []
    for i, ((method, size, seed), value) in enumerate(VALUES.items()):
        params = {
            "loss.gamma": "1.0" if method == "diito" else "0.0",
            "trainer.max_train_examples": size,
            "seed": seed,
            "loss.alpha": "0.5",
            "student.init_from": "teacher",
        }
        runs.append(
            SimpleNamespace(
                info=SimpleNamespace(
                    run_id=f"r{i}",
                    run_name=f"task.data_dir=/data/glue/SST-2,seed={seed}",
                    start_time=i * 10**6,
                    end_time=i * 10**6 + (200_000 if method == "diito" else 100_000),
                ),
                data=SimpleNamespace(params=params, metrics={"validation/accuracy": value}, tags={"loss": method}),
            )
        )
    return runs


def test_curves_pair_the_same_seeds_against_kd_and_put_the_whole_set_last():
    curves = report.curves(_runs(), "validation/accuracy")
    assert curves == {
        "": {
            "kd": {"500": {"1": 0.70, "2": 0.72}, "None": {"1": 0.80, "2": 0.82}},
            "diito": {"500": {"1": 0.73, "2": 0.71}, "None": {"1": 0.85, "2": 0.86}, "1000": {"1": 0.77}},
        }
    }
    rows = report.with_verdicts(report.paired(curves, "validation/accuracy"))
    assert [(r["method"], r["baseline"], r["size"], r["n"], r["wins"], r["ties"], r["losses"]) for r in rows] == [
        ("diito", "kd", "500", 2, 1, 0, 1),
        ("diito", "kd", "all", 2, 2, 0, 0),
    ]
    assert rows[0]["mean_diff"] == pytest.approx(0.01) and rows[0]["std_diff"] == pytest.approx(0.0282842712)  # +0.03 and -0.01
    assert rows[1]["mean_diff"] == pytest.approx(0.045)
    assert report.format_curves(curves, "validation/accuracy").splitlines()[1].split() == ["method", "500", "1000", "all"]
    text = report.format_comparisons(rows, "validation")
    assert "validation/accuracy (chose the checkpoints and any tuning)" in text
    assert text.splitlines()[-1].split()[:7] == ["diito", "-", "kd", "all", "2", "+0.0450", "[-0.0185,"]


def test_the_statistics_match_values_computed_by_hand():
    """Differences +0.03, -0.01, +0.02, 0 over four seeds: mean 0.01, sd sqrt(0.001/3), t = mean / (sd/2) on
    3 degrees of freedom, whose two-sided p has a closed form; the 95% interval uses t(0.975, 3) = 3.182446
    from the tables; the sign test leaves the tie out: 2 wins, 1 loss of 3, two-sided p = 1."""
    import math

    result = report.compare([0.03, -0.01, 0.02, 0.0])
    sd = math.sqrt(0.001 / 3)
    t = 0.01 / (sd / 2)
    p = 1 - 2 / math.pi * (t / (math.sqrt(3) * (1 + t * t / 3)) + math.atan(t / math.sqrt(3)))  # Student's t, 3 d.o.f.
    assert result["mean_diff"] == pytest.approx(0.01) and result["std_diff"] == pytest.approx(sd)
    assert result["p_t"] == pytest.approx(p, rel=1e-6)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((0.01 - 3.182446 * sd / 2, 0.01 + 3.182446 * sd / 2), rel=1e-5)
    assert (result["wins"], result["ties"], result["losses"], result["p_sign"]) == (2, 1, 1, pytest.approx(1.0))
    assert report.compare([0.01] * 5)["p_sign"] == pytest.approx(2 / 32)  # five wins of five: 2 x (1/2)^5
    assert report.compare([0.0] * 5)["wins"] == 0 and report.compare([0.0] * 5)["ties"] == 5  # ties are not losses
    # Holm: sorted 0.01, 0.03, 0.04 times 3, 2, 1, kept monotone: 0.03, 0.06, 0.06; NaN (one seed) is left out
    assert report.holm([0.01, 0.04, 0.03, math.nan])[:3] == pytest.approx([0.03, 0.06, 0.06])
    rows = [{"p_holm": 0.03, "mean_diff": -0.01}, {"p_holm": 0.06, "mean_diff": 0.02}, {"p_holm": math.nan, "mean_diff": 0.0}]
    assert [report.verdict(r) for r in rows] == [
        "supported at 0.05 after correction (worse)",
        "not supported at 0.05 after correction",
        "too few seeds to test",
    ]


def test_the_report_leads_with_the_split_that_chose_nothing_and_reads_its_own_export(tmp_path, capsys):
    runs = _runs()
    for r in runs:
        r.data.metrics["test/accuracy"] = r.data.metrics["validation/accuracy"] - 0.01
    assert report.compared_metrics(runs, "validation/accuracy") == (["test/accuracy", "validation/accuracy"], "validation")
    path = report.export_csv(runs, tmp_path / "runs.csv")
    again = report.runs_from_csv(path)
    assert [(r.data.tags["loss"], r.data.params["seed"], r.data.metrics["test/accuracy"]) for r in again] == [
        (r.data.tags["loss"], r.data.params["seed"], pytest.approx(r.data.metrics["test/accuracy"])) for r in runs
    ]
    report.main([str(path), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert printed.index("test/accuracy (chose nothing)") < printed.index("validation/accuracy (chose the checkpoints")
    assert "over all 4 comparisons" in printed  # 2 sizes x 2 splits, one family
    assert (tmp_path / "out" / "by_size.png").read_bytes()[:4] == b"\x89PNG"


def test_with_a_selection_split_the_table_ranks_by_it_and_its_export_still_knows_it_chose(tmp_path, capsys):
    runs = _runs()
    for r in runs:  # the untouched dev split orders the methods the other way round
        r.data.params |= {"task.eval_splits": "['selection', 'validation']", "task.main_metric": "accuracy"}
        r.data.metrics["selection/accuracy"] = r.data.metrics["validation/accuracy"] + (0.1 if r.data.tags["loss"] == "kd" else 0.0)
    assert report.default_metric(runs) == "selection/accuracy"
    report.main([str(report.export_csv(runs, tmp_path / "runs.csv")), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    table = printed[printed.index("n  selection/accuracy") :].splitlines()
    assert table[1].split()[0] == "0.0"  # best first on the split that chose: KD (gamma 0.0) leads there
    assert printed.index("validation/accuracy (chose nothing)") < printed.index("selection/accuracy (chose the checkpoints")


def test_several_targets_are_reported_as_one_and_a_shared_run_counts_once(tmp_path, capsys):
    runs = _runs()
    kd = report.export_csv([r for r in runs if r.data.tags["loss"] == "kd"], tmp_path / "kd.csv")
    diito = report.export_csv([r for r in runs if r.data.tags["loss"] == "diito"], tmp_path / "diito.csv")
    report.main([str(kd), str(diito), str(kd), "--out", str(tmp_path / "both")])
    report.main([str(report.export_csv(runs, tmp_path / "all.csv")), "--out", str(tmp_path / "all")])
    # the KD sweep and the DIITO sweep paired as one study, as if they had been one sweep
    assert "diito - kd" in (tmp_path / "both" / "comparisons.txt").read_text()
    for name in ("comparisons.txt", "by_size.txt"):
        assert (tmp_path / "both" / name).read_text() == (tmp_path / "all" / name).read_text(), name
    assert "wall time: 9 runs" in (tmp_path / "both" / "report.txt").read_text()  # kd.csv given twice: its runs once
    with pytest.raises(SystemExit, match=r"^error: no finished runs for '.*empty.csv'"):
        report.main([str(kd), str(report.export_csv([], tmp_path / "empty.csv"))])


def test_each_setting_is_compared_with_its_own_kd_and_a_value_varying_within_a_method_names_its_line():
    runs = _runs()
    for r in runs:
        if r.data.tags["loss"] == "diito" and r.data.params["seed"] == "2":
            r.data.params["student.init_from"] = "pretrained"  # another setting: compared with its own KD only
    curves = report.curves(runs, "validation/accuracy")
    assert set(curves) == {"student.init_from=pretrained", "student.init_from=teacher"}
    assert {r["setting"] for r in report.paired(curves)} == {"student.init_from=teacher"}  # no KD ran with init_from=pretrained
    runs[-1].data.params["loss.alpha"] = "0.9"  # DIITO at 1000 examples tuned otherwise
    lines = report.curves(runs, "validation/accuracy")["student.init_from=teacher"]
    assert set(lines) == {"kd", "diito (alpha=0.5)", "diito (alpha=0.9)"}


def test_the_csv_export_holds_every_run_and_the_learning_curve_is_drawn(tmp_path):
    runs = _runs()
    path = report.export_csv(runs, tmp_path / "runs.csv")
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0])[:2] == ["run_id", "method"] and "/data/glue" not in path.read_text()  # a run's name can carry a machine's paths
    assert len(rows) == len(VALUES)
    assert {(r["method"], r["trainer.max_train_examples"], r["seed"]): float(r["validation/accuracy"]) for r in rows} == VALUES
    assert {r["method"]: float(r["seconds"]) for r in rows} == {"kd": 100.0, "diito": 200.0}
    png = report.curve_plot(report.curves(runs, "validation/accuracy"), "validation/accuracy", tmp_path / "by_size.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_wall_time_sums_the_runs_and_gives_each_method_its_median():
    runs = _runs()  # 4 KD runs of 100 s, 5 DIITO runs of 200 s
    assert report.wall_time(runs) == "wall time: 9 runs, 0.39 h in all; median per run: diito 200 s, kd 100 s"
    runs[0].info.end_time = None  # still running: not counted
    assert report.wall_time(runs).startswith("wall time: 8 runs, ")
    for r in runs[:2]:  # runs that record their training time (a resumed run's without its stop)
        r.data.metrics["time/train_seconds"] = 900.0
    assert report.wall_time(runs).splitlines()[1] == "training time (time/train_seconds, without stops): 2 runs, 0.50 h"


def test_axes_put_numbers_in_numeric_order_and_the_whole_training_set_last():
    assert report.axis_order({"2000", "None", "500", "1000"}) == ["500", "1000", "2000", "None"]
    assert report.axis_order({"10.0", "2.0"}) == ["2.0", "10.0"]
    assert report.axis_order({"teacher", "pretrained"}) == ["pretrained", "teacher"]


def test_report_and_analyze_open_the_store_jobs_log_to(home, tmp_path, monkeypatch, capsys):
    """Without --tracking-uri both commands read where jobs write (DIITO_HOME's mlflow.db, or
    MLFLOW_TRACKING_URI), whatever the working directory, through the jobs' client and retries."""
    import os

    from mlflow import MlflowClient

    from diito import analyze, tracking

    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    run = client.create_run(client.create_experiment("mine"), tags={"diito.role": "student", "loss": "kd"})
    client.log_param(run.info.run_id, "seed", "1")
    client.log_metric(run.info.run_id, "validation/accuracy", 0.75)
    client.set_terminated(run.info.run_id)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)

    report.main(["mine", "--out", str(tmp_path / "out")])
    assert "0.7500" in capsys.readouterr().out and not (tmp_path / "elsewhere" / "mlflow.db").exists()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"  # tracking.retries, as jobs have it
    with pytest.raises(LookupError, match=f"no run 0123 in sqlite:///{home}/mlflow.db"):
        analyze.main(["0123", "--out", str(tmp_path / "maps")])

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other.db")
    assert tracking.settings().uri == f"sqlite:///{tmp_path}/other.db"
    assert tracking.settings(f"sqlite:///{tmp_path}/given.db").uri == f"sqlite:///{tmp_path}/given.db"  # --tracking-uri


def _plain(params: dict, value: float, method: str = "diito"):
    return SimpleNamespace(
        info=SimpleNamespace(run_id=str(value), start_time=0, end_time=1000),
        data=SimpleNamespace(params=params, metrics={"validation/accuracy": value}, tags={"loss": method}),
    )


def test_runs_of_other_teachers_or_limits_are_never_averaged_into_one_cell(tmp_path, capsys):
    """An unset data limit logs no param (the whole set), a KD run no interchange settings: the first
    is another configuration, the second is not; runs of another teacher get heatmaps of their own."""
    runs = [
        _plain({"teacher.name": teacher, "loss.alpha": alpha, "loss.T": T, "seed": "1", "loss.interchange_prop": "0.3"}, value)
        for teacher, base in (("minilm", 0.8), ("tiny", 0.5))
        for alpha in ("0.5", "0.9")
        for T, value in (("2", base), ("4", base + 0.01))
    ]
    runs += [
        _plain({"teacher.name": "minilm", "loss.alpha": "0.5", "loss.T": "2", "seed": "1", "trainer.max_train_examples": "500"}, 0.7, "kd")
    ]
    assert report.varying_keys(runs) == ["loss.T", "loss.alpha", "teacher.name", "trainer.max_train_examples"]
    keys, rows = report.table(runs, "validation/accuracy")
    assert {(row["teacher.name"], row["trainer.max_train_examples"]) for row in rows} == {
        ("minilm", "None"),
        ("tiny", "None"),
        ("minilm", "500"),
    }
    csv_file = tmp_path / "runs.csv"
    report.export_csv(runs, csv_file)
    report.main([str(csv_file), "--x", "loss.alpha", "--y", "loss.T", "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "these runs differ in teacher.name, trainer.max_train_examples: one heatmap for each, never averaged into one cell" in printed
    assert sorted(p.name for p in (tmp_path / "out").glob("heatmap*.png")) == ["heatmap-1.png", "heatmap-2.png", "heatmap-3.png"]
