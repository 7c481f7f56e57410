"""Sweeps in MLflow: the parent run of a multirun, its children's tags, its summary and its end."""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from diito import tags as tag
from diito.store import mask
from diito.tracking.client import TrackingConfig, client, experiment_id
from diito.tracking.lifecycle import _end
from diito.tracking.runs import Run


def sweep_tags(sweep: Mapping[str, str] | None) -> dict[str, str]:
    """Tags that make a job a child of its sweep's parent run."""
    return {tag.PARENT_RUN: sweep["parent_run_id"], tag.SWEEP_ID: sweep["sweep_id"]} if sweep else {}


def reuse_in_sweep(config: TrackingConfig, sweep: Mapping[str, str], run_id: str) -> None:
    """Record on the sweep's parent that it reused the finished run ``run_id`` instead of running
    the job again. The run itself is left as it is: it stays in the sweep (or at the top level)
    it finished in. One tag per run, so parallel jobs never overwrite each other's record."""
    mlflow_client = client(config)
    Run(mlflow_client, sweep["parent_run_id"]).set_tags({tag.REUSED + run_id: mlflow_client.get_run(run_id).info.run_name or ""})


def reused_runs(mlflow_client: MlflowClient, parent: Any) -> list[Any]:
    """The finished runs a sweep's parent reused (see :func:`reuse_in_sweep`) that still exist."""
    found = []
    for key in parent.data.tags:
        if key.startswith(tag.REUSED):
            try:
                found.append(mlflow_client.get_run(key.removeprefix(tag.REUSED)))
            except MlflowException:  # deleted since
                pass
    return found


def start_sweep(config: TrackingConfig, sweep_dir: Path, overrides: list[str]) -> dict[str, str]:
    """Prepare the store and the experiment once, before any job starts, and open the sweep's
    parent run (named after its folder, with the sweep's overrides as ``sweep.<key>`` params)."""
    sweep_id = uuid.uuid4().hex[:12]
    mlflow_client = client(config)
    name = f"sweep {sweep_dir.parent.name}/{sweep_dir.name}"
    run = mlflow_client.create_run(
        experiment_id(config), run_name=name, tags={tag.ROLE: tag.SWEEP_ROLE, tag.SWEEP_ID: sweep_id, tag.SWEEP_DIR: str(sweep_dir)}
    )
    Run(mlflow_client, run.info.run_id).log_params(
        {"sweep.overrides": " ".join(overrides)} | {f"sweep.{o.split('=', 1)[0]}": o.split("=", 1)[1] for o in overrides if "=" in o}
    )
    return {"parent_run_id": run.info.run_id, "sweep_id": sweep_id, "name": name}


def finish_sweep(config: TrackingConfig, sweep: Mapping[str, str], metric: str) -> dict[str, Any]:
    """The sweep's summary (jobs finished and failed, the best child by ``metric``), logged to its
    parent run, which ends FAILED when a job failed. Run names and errors are masked again: a run
    that joined from an older store may hold them unmasked."""
    mlflow_client = client(config)
    parent = mlflow_client.get_run(sweep["parent_run_id"])
    children = mlflow_client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{tag.SWEEP_ID}` = '{sweep['sweep_id']}' and tags.`{tag.ROLE}` != '{tag.SWEEP_ROLE}'",
    )
    children += reused_runs(mlflow_client, parent)  # jobs this sweep found finished in another
    failed = [r for r in children if r.info.status != "FINISHED"]
    scored = [r for r in children if r.info.status == "FINISHED" and math.isfinite(r.data.metrics.get(metric, math.nan))]
    summary = {
        "jobs": len(children),
        "finished": len(children) - len(failed),
        "failed": len(failed),
        "metric": metric,
        "failures": [{"run": mask(r.info.run_name), "error": mask(r.data.tags.get(tag.ERROR, ""))} for r in failed],
    }
    run = Run(mlflow_client, parent.info.run_id)
    if scored:
        best = max(scored, key=lambda r: r.data.metrics[metric])
        summary |= {"best_run_id": best.info.run_id, "best_run": mask(best.info.run_name), "best_value": best.data.metrics[metric]}
        run.set_tags({tag.BEST_RUN_ID: best.info.run_id, tag.BEST_RUN: summary["best_run"]})
        run.log_metrics({f"best/{metric}": best.data.metrics[metric]}, step=0)
    run.log_metrics({"jobs_finished": summary["finished"], "jobs_failed": summary["failed"]}, step=0)
    run.log_dict(summary, "summary.json")
    mlflow_client.set_terminated(parent.info.run_id, status="FAILED" if failed else "FINISHED")
    return summary


def stop_sweep(config: TrackingConfig, sweep: Mapping[str, str], status: str, error: str | None = None) -> None:
    """End the parent run of a sweep that stopped before its summary: KILLED when it was interrupted,
    FAILED (with the ``error`` tag) when an error stopped it."""
    _end(Run(client(config), sweep["parent_run_id"]), status, error)
