"""What a job says when it ends: the student's and the teacher's scores on the console, in
``metrics.json`` in the job folder (tracking or not), and where to see the run in MLflow; and the
names runs are shown by.
"""

from __future__ import annotations

import json
import logging
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diito.files import atomic_write_text
from diito.store import mask

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a database store
# MLflow 3's UI opens an experiment on its GenAI pages (traces); this parameter opens the runs table.
WORKFLOW = "workflowType=machine_learning"


@dataclass
class Outcome:
    """A finished job's scores and where they came from."""

    task: str
    loss: str  # kd | diito
    main_metric: str  # <split>/<metric>, the one keep-best and sweeps read
    student: dict[str, float]  # <split>/<metric> of the best student, every evaluation and test split
    teacher: dict[str, float]  # the same splits and examples, the teacher's
    student_from: dict[str, Any]  # the checkpoint kept, the examples each split held
    teacher_from: dict[str, Any]  # cache | fine-tuned | checkpoint, its folder and run
    run_id: str | None = None
    experiment_id: str | None = None
    link: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # what the run logs as params
    unlogged: str = "not logged (tracking.enabled=false)"  # what the block says when there is no run to link


def ui_link(tracking_uri: str | None, experiment_id: str) -> str:
    """The runs table of an experiment in the MLflow UI: the server's own address, or where
    ``mlflow ui`` serves a database store; never with credentials."""
    base = UI
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        parts = urllib.parse.urlsplit(tracking_uri)
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        base = parts._replace(netloc=host).geturl().rstrip("/")
    return f"{base}/#/experiments/{experiment_id}/runs?{WORKFLOW}"


def how_to_open(tracking_uri: str | None, root: str | Path) -> str:
    """What serves the link: the tracking server itself, or ``mlflow ui`` on the database store."""
    if not tracking_uri or tracking_uri.startswith(("http://", "https://")):
        return ""
    if tracking_uri == f"sqlite:///{Path(root) / 'mlflow.db'}":
        return f"(start the UI with: mlflow ui, in {root})"
    return f"(start the UI with: mlflow ui --backend-store-uri {mask(tracking_uri)})"


def write(outcome: Outcome, folder: Path) -> Path:
    """``metrics.json``: the final scores and where they came from."""
    record = {
        "task": outcome.task,
        "loss": outcome.loss,
        "main_metric": outcome.main_metric,
        "student": outcome.student,
        "teacher": outcome.teacher,
        "student_from": outcome.student_from,
        "teacher_from": outcome.teacher_from,
        "settings": outcome.settings,
        "mlflow": {"run_id": outcome.run_id, "experiment_id": outcome.experiment_id, "link": outcome.link} if outcome.run_id else None,
    }
    folder.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(folder / METRICS_FILE, json.dumps(record, indent=2) + "\n")


def read(folder: Path) -> dict[str, Any] | None:
    """A job folder's ``metrics.json``, None when the job wrote none (it failed, or is running)."""
    path = folder / METRICS_FILE
    return json.loads(path.read_text()) if path.exists() else None


TEACHER_SOURCES = {
    "fine-tuned": "fine-tuned now",
    "cache": "from the cache",
    "checkpoint": "the checkpoint",
}  # a teacher-stage block's words


def block(outcome: Outcome, metrics_file: Path, opener: str = "") -> str:
    """The lines a job ends with: a small table of scores, the run, the link. A teacher-stage job
    (``stage=teacher``, no student) shows the teacher alone."""
    name = outcome.main_metric.split("/", 1)[1]
    scored = outcome.student or outcome.teacher
    splits = [k for k in scored if k.split("/", 1)[1] == name]  # the main metric on every split
    rows = [["", *splits]]
    if outcome.student:
        rows.append(["student", *(f"{outcome.student[k]:.4f}" for k in splits)])
    rows.append(["teacher", *(f"{outcome.teacher[k]:.4f}" if k in outcome.teacher else "-" for k in splits)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    t = outcome.teacher_from
    if outcome.student:
        kept = outcome.student_from
        head = (
            f"result: {outcome.task}, {outcome.loss.upper()} student ({kept['layers']} layers, the weights of step "
            f"{kept['best_step']} of {kept['steps']}), teacher {t['name']}"
        )
    else:
        head = f"result: {outcome.task}, teacher {t['name']} ({TEACHER_SOURCES[t['source']]}: {t['path']})"
        if not splits:
            table = ["  no scores: a given checkpoint is not evaluated by stage=teacher (a distillation job scores it)"]
    lines = [head, *table]
    if outcome.run_id:
        lines.append(f"  MLflow run {outcome.run_id}: {outcome.link}" + (f" {opener}" if opener else ""))
    else:
        lines.append(f"  MLflow: {outcome.unlogged}")
    lines.append(f"  scores and where they came from: {metrics_file}")
    return "\n".join(lines)


def finish(outcome: Outcome, folder: Path, tracking_uri: str | None, root: str | Path) -> None:
    """Write ``metrics.json`` and print the closing block."""
    if outcome.run_id and outcome.experiment_id:
        outcome.link = ui_link(tracking_uri, outcome.experiment_id)
    path = write(outcome, folder)
    print(block(outcome, path, how_to_open(tracking_uri, root)), flush=True)


# -- run names ---------------------------------------------------------------------------------------
_ITEM = re.compile(r",(?=[\w./+~@-]+=)")  # Hydra's override_dirname joins key=value items with commas


def run_name(task: str, loss: str, layers: int, overrides: str, varying: list[str] | None = None) -> str:
    """A run's name. In a sweep, its overrides with the keys that vary within the sweep first (the
    UI cuts long names); alone, what it is (task, loss, student depth), then its overrides."""
    items = [i for i in _ITEM.split(overrides) if i] if overrides and overrides != "default" else []
    if varying is not None:
        key = lambda item: item.split("=", 1)[0].lstrip("+~")  # noqa: E731
        return ",".join(sorted(items, key=lambda i: key(i) not in varying)) or f"{task}-{loss}-{layers}L"
    return " ".join([f"{task}-{loss}-{layers}L", ",".join(items)]).strip()
