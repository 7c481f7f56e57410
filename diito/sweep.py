"""Sweeps in MLflow: one parent run per multirun, each job a child run, a summary at the end.

:class:`SweepCallback` is a Hydra callback (registered in ``conf/config.yaml``). Before Hydra
creates a job's or a sweep's folder it checks that the folders can be written. Before any job
starts it checks the tracking store, prepares it and the experiment once (so parallel jobs never
race to create them) and opens the parent run; jobs find it in ``<sweep dir>/sweep.json``. When
all jobs have returned, it writes the summary (best child, failures) to the parent and tells
:mod:`diito.failures` (which decides the exit status) whether any job failed. A sweep that stops
before that (:func:`end_stopped_sweep`) ends its parent KILLED or FAILED.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from diito import config as job_config
from diito import failures, interrupts, tracking

log = logging.getLogger(__name__)
SWEEP_FILE = "sweep.json"


_open: tuple[tracking.TrackingConfig, dict[str, str]] | None = None  # the parent run this process opened and has not ended


def sweep_info(sweep_dir: str | Path) -> dict[str, str] | None:
    """The parent run of the sweep writing to ``sweep_dir``, if tracking made one."""
    path = Path(sweep_dir) / SWEEP_FILE
    return json.loads(path.read_text()) if path.exists() else None


class SweepCallback(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            job_config.check_hydra_folder(config, "hydra.run.dir")
        except job_config.ConfigError as e:
            raise failures.Refused(e) from None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _open
        settings = job_config.tracking_settings(config)
        try:
            job_config.check_hydra_folder(config, "hydra.sweep.dir")
            if settings.enabled:  # the parent run is opened here, before any job validates its config
                job_config.check_store(settings)
        except job_config.ConfigError as e:
            raise failures.Refused(e) from None
        if not settings.enabled:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        info = tracking.start_sweep(settings, sweep_dir, list(config.hydra.overrides.task))
        info["varying"] = varying_keys(config)  # its jobs' run names lead with them
        _open = settings, info
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(info))
        log.info("MLflow parent run %s (%s)", info["parent_run_id"], info["name"])

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global _open
        settings = job_config.tracking_settings(config)
        info = sweep_info(config.hydra.sweep.dir)
        if settings.enabled and info is not None:
            summary = tracking.finish_sweep(settings, info, job_config.main_metric_key(config))
            _open = None
        else:  # no tracking: the sweep's folder knows which jobs failed
            failed_jobs = failures.job_failures(config.hydra.sweep.dir)
            jobs = len(list(Path(config.hydra.sweep.dir).glob("*/.hydra")))
            summary = {"jobs": jobs, "finished": jobs - len(failed_jobs), "failed": len(failed_jobs), "failures": failed_jobs}
        failed = summary["failed"] > 0
        lines = [f"sweep: {summary['finished']}/{summary['jobs']} jobs finished"]
        if summary["finished"]:
            tracked = settings.enabled and info is not None
            runs = tracking.find_student_runs(settings, info["sweep_id"])[0] if tracked else jobs_on_disk(config.hydra.sweep.dir)
            lines += closing_table(runs, job_config.main_metric_key(config))
        lines += [f"FAILED {f['run']}: {f['error']}" for f in summary["failures"]]
        print("\n".join(lines), file=sys.stderr if failed else sys.stdout)
        failures.sweep_ended(failed)


def varying_keys(config: DictConfig) -> list[str]:
    """The keys a sweep varies: its command line's lists and sweep functions, and its preset's
    ``hydra.sweeper.params``."""
    swept = re.compile(r"^(range|choice|interval|glob|tag)\(|(?<!\\),")
    keys = [o.split("=", 1)[0].lstrip("+~") for o in config.hydra.overrides.task if "=" in o and swept.search(o.split("=", 1)[1])]
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    return list(dict.fromkeys([*keys, *params]))


def jobs_on_disk(sweep_dir: str | Path) -> list[Any]:
    """A sweep's finished jobs as runs (params, metrics, method) from each job folder's
    ``metrics.json``: what a sweep without tracking tables."""
    from types import SimpleNamespace

    from diito import summary, tags

    found = [summary.read(folder) for folder in sorted(Path(sweep_dir).iterdir()) if folder.is_dir()]
    return [
        SimpleNamespace(
            data=SimpleNamespace(params={k: str(v) for k, v in r["settings"].items()}, metrics=r["student"], tags={tags.LOSS: r["loss"]})
        )
        for r in found
        if r and r["student"]
    ]


def closing_table(runs: list[Any], metric: str) -> list[str]:
    """The sweep's jobs as ``python -m diito.report`` tables them (mean ± std over seeds, best
    first), and which configuration leads: ties are named as ties, not one of them crowned."""
    from diito import report

    keys, rows = report.table(runs, metric)
    if not rows:
        return []
    lines = report.format_table(keys, rows, metric).splitlines()
    top = [row for row in rows if row["mean"] == rows[0]["mean"]]
    named = lambda row: ", ".join(f"{k}={row[k]}" for k in keys) or "every job"  # noqa: E731
    if len(top) == 1:
        lines.append(f"best {metric}: {rows[0]['mean']:.4f} ({named(rows[0])})")
    else:
        lines.append(f"{len(top)} configurations tie at {metric} {rows[0]['mean']:.4f}: " + "; ".join(named(r) for r in top))
    return lines


def end_stopped_sweep(stop: BaseException) -> None:
    """For a sweep that ``stop`` ended before its end (Ctrl-C, SIGTERM, or an error Hydra raises
    between jobs, such as a choice that names no config): end its parent run KILLED or FAILED
    instead of leaving it RUNNING, and say so."""
    global _open
    if _open is None:
        return
    settings, info = _open
    _open = None
    parent = f"its MLflow parent run {info['parent_run_id']} ({info['name']})"
    if isinstance(stop, KeyboardInterrupt):
        tracking.stop_sweep(settings, info, "KILLED")
        print(
            f"sweep stopped by {interrupts.signal_name()}: {parent} is marked KILLED; run the same command again to "
            "finish it (finished jobs are skipped)",
            file=sys.stderr,
        )
    else:  # Hydra prints an error and exits: the error is the exit's context
        error = stop.__context__ if isinstance(stop, SystemExit) else stop
        tracking.stop_sweep(settings, info, "FAILED", f"{type(error).__name__}: {error}" if error else f"exit code {stop.code}")
        print(f"sweep stopped by an error: {parent} is marked FAILED", file=sys.stderr)
