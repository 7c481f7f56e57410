"""Tracking: the one package that talks to MLflow, by concern.

- :mod:`~diito.tracking.client`: the settings (``tracking.*``), the one client (with the retries
  they give), the store and experiment checked before compute, and the store a command outside a
  job opens (:func:`settings`);
- :mod:`~diito.tracking.runs`: a run's resilient logger (:class:`Run`, :class:`NullRun`) and the
  logged model;
- :mod:`~diito.tracking.lifecycle`: opening, continuing and ending runs, finding a job's finished run,
  recording a job that failed before its run existed;
- :mod:`~diito.tracking.sweeps`: a sweep's parent run and summary;
- :mod:`~diito.tracking.queries`: what the report and the alignment map read.

Tag names are :mod:`diito.tags`; what makes two jobs the same is :mod:`diito.identity`.
"""

from diito.tracking.client import TrackingConfig, check_experiment, client, experiment_id, settings
from diito.tracking.lifecycle import RunFailed, finished_run, git_tags, no_run, open_run, record_failure, resumable_run, system_metrics
from diito.tracking.queries import download, find_student_runs, log_files, run_record
from diito.tracking.runs import DatasetRecord, NullRun, Run
from diito.tracking.sweeps import finish_sweep, reuse_in_sweep, reused_runs, start_sweep, stop_sweep, sweep_tags

__all__ = [
    "DatasetRecord",
    "NullRun",
    "Run",
    "RunFailed",
    "TrackingConfig",
    "check_experiment",
    "client",
    "download",
    "experiment_id",
    "find_student_runs",
    "finish_sweep",
    "finished_run",
    "git_tags",
    "log_files",
    "no_run",
    "open_run",
    "record_failure",
    "resumable_run",
    "reuse_in_sweep",
    "reused_runs",
    "run_record",
    "settings",
    "start_sweep",
    "stop_sweep",
    "sweep_tags",
    "system_metrics",
]
