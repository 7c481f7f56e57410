"""Learning curves, paired comparisons and the CSV export of python -m diito.report (on hand-made runs)."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest

from diito import report

VALUES = {  # (method, size, seed) -> validation accuracy
    ("kd", "500", "1"): 0.70, ("kd", "500", "2"): 0.72, ("kd", "None", "1"): 0.80, ("kd", "None", "2"): 0.82,
    ("diito", "500", "1"): 0.73, ("diito", "500", "2"): 0.71, ("diito", "None", "1"): 0.85, ("diito", "None", "2"): 0.86,
    ("diito", "1000", "1"): 0.77,  # a size only one method ran: in the curve, not in the comparison
}


def _runs():
    runs = []
    for i, ((method, size, seed), value) in enumerate(VALUES.items()):
        params = {"loss.gamma": "1.0" if method == "diito" else "0.0", "trainer.max_train_examples": size, "seed": seed,
                  "loss.alpha": "0.5", "student.init_from": "teacher"}
        runs.append(SimpleNamespace(info=SimpleNamespace(run_id=f"r{i}", run_name=f"task.data_dir=/data/glue/SST-2,seed={seed}", start_time=i * 10**6,
                                                             end_time=i * 10**6 + (200_000 if method == "diito" else 100_000)),
                                    data=SimpleNamespace(params=params, metrics={"validation/accuracy": value}, tags={"loss": method})))
    return runs


def test_curves_pair_the_same_seeds_against_kd_and_put_the_whole_set_last():
    curves = report.curves(_runs(), "validation/accuracy")
    assert curves == {"": {"kd": {"500": {"1": 0.70, "2": 0.72}, "None": {"1": 0.80, "2": 0.82}},
                           "diito": {"500": {"1": 0.73, "2": 0.71}, "None": {"1": 0.85, "2": 0.86}, "1000": {"1": 0.77}}}}
    rows = report.paired(curves)
    assert [(r["method"], r["baseline"], r["size"], r["n"], r["wins"]) for r in rows] == [("diito", "kd", "500", 2, 1), ("diito", "kd", "all", 2, 2)]
    assert rows[0]["mean_diff"] == pytest.approx(0.01) and rows[0]["std_diff"] == pytest.approx(0.0282842712)  # +0.03 and -0.01
    assert rows[1]["mean_diff"] == pytest.approx(0.045)
    text = report.format_curves(curves, rows, "validation/accuracy")
    header = text.splitlines()[1].split()
    assert header == ["method", "500", "1000", "all"]
    assert "diito - kd at all: +0.0450 ± 0.0071 over 2 seeds (2 of 2 better)" in text


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
