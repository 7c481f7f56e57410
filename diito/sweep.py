"""Sweeps in MLflow: one parent run per multirun, each job a child run, a summary at the end.

:class:`SweepCallback` is a Hydra callback (registered in ``conf/config.yaml``). Before any job
starts it prepares the store and the experiment once (so parallel jobs never race to create them)
and opens the parent run; jobs find it in ``<sweep dir>/sweep.json``. When all jobs have returned,
it writes the summary (best child, failures) to the parent and makes the sweep's exit status say
whether any job failed.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import uuid
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from diito import tracking
from diito.data import TaskSpec

log = logging.getLogger(__name__)
SWEEP_FILE = "sweep.json"


def sweep_info(sweep_dir: str | Path) -> dict[str, str] | None:
    """The parent run of the sweep writing to ``sweep_dir``, if tracking made one."""
    path = Path(sweep_dir) / SWEEP_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _tracking(config: DictConfig) -> tracking.TrackingConfig:
    return tracking.TrackingConfig(**OmegaConf.to_container(config.tracking, resolve=True))


def _main_metric(config: DictConfig) -> str:
    return TaskSpec(**OmegaConf.to_container(config.task, resolve=True)).main_metric_key


class SweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        settings = _tracking(config)
        if not settings.enabled:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        overrides = list(config.hydra.overrides.task)
        sweep_id = uuid.uuid4().hex[:12]
        name = f"sweep {sweep_dir.parent.name}/{sweep_dir.name}"
        client = tracking.MlflowClient(tracking_uri=settings.uri)
        run = client.create_run(tracking.experiment_id(settings), run_name=name,
                                tags={"diito.role": "sweep", "diito.sweep_id": sweep_id, "sweep_dir": str(sweep_dir)})
        tracking.Run(client, run.info.run_id).log_params({"sweep.overrides": " ".join(overrides)} | {
            f"sweep.{o.split('=', 1)[0]}": o.split("=", 1)[1] for o in overrides if "=" in o})
        (sweep_dir / SWEEP_FILE).write_text(json.dumps({"parent_run_id": run.info.run_id, "sweep_id": sweep_id}))
        log.info("MLflow parent run %s (%s)", run.info.run_id, name)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        settings = _tracking(config)
        info = sweep_info(config.hydra.sweep.dir)
        if not settings.enabled or info is None:
            return
        client = tracking.MlflowClient(tracking_uri=settings.uri)
        parent = client.get_run(info["parent_run_id"])
        children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.`diito.sweep_id` = '{info['sweep_id']}' and tags.`diito.role` != 'sweep'")
        metric = _main_metric(config)
        failed = [r for r in children if r.info.status != "FINISHED"]
        scored = [r for r in children if r.info.status == "FINISHED" and math.isfinite(r.data.metrics.get(metric, math.nan))]
        summary = {"jobs": len(children), "finished": len(children) - len(failed), "failed": len(failed), "metric": metric,
                   "failures": [{"run": r.info.run_name, "error": r.data.tags.get("error", "")} for r in failed]}
        run = tracking.Run(client, parent.info.run_id)
        if scored:
            best = max(scored, key=lambda r: r.data.metrics[metric])
            summary |= {"best_run_id": best.info.run_id, "best_run": best.info.run_name, "best_value": best.data.metrics[metric]}
            run.set_tags({"best_run_id": best.info.run_id, "best_run": best.info.run_name})
            run.log_metrics({f"best/{metric}": best.data.metrics[metric]}, step=0)
        run.log_metrics({"jobs_finished": summary["finished"], "jobs_failed": summary["failed"]}, step=0)
        run.log_dict(summary, "summary.json")
        client.set_terminated(parent.info.run_id, status="FAILED" if failed else "FINISHED")
        lines = [f"sweep: {summary['finished']}/{summary['jobs']} jobs finished"]
        if scored:
            lines.append(f"best {metric} = {summary['best_value']:.4f}: {summary['best_run']}")
        lines += [f"FAILED {f['run']}: {f['error']}" for f in summary["failures"]]
        print("\n".join(lines), file=sys.stderr if failed else sys.stdout)
        if failed:
            sys.exit(1)
