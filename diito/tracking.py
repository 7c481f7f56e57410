"""Runs: the one module that talks to MLflow.

It names the tags, opens, resumes, finishes and fails runs, builds their params, makes sweeps'
parent runs and summaries, answers the report's queries, and defines a job's identity: the digest
of everything that can change its result (:data:`RESULT_INDEPENDENT` lists what cannot).

Everything goes through ``MlflowClient`` with an explicit run id instead of MLflow's global
"active run", so a job can never log into a run that another job (or an earlier job of the same
worker process) left open.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from pydantic import BaseModel, ConfigDict, Field

from diito import store
from diito.files import atomic_write_text
from diito.store import mask

log = logging.getLogger(__name__)

# -- tags ------------------------------------------------------------------------------------------
ROLE = "diito.role"  # teacher | student | sweep
SWEEP_ID = "diito.sweep_id"
PARENT_RUN = "mlflow.parentRunId"  # MLflow's own: nests a job under its sweep in the UI
CONFIG_HASH = "config_hash"
TEACHER_RUN = "diito.teacher_run_id"
TEACHER_SOURCE = "diito.teacher_source"  # checkpoint | cache | fine-tuned
TEACHER_PATH = "diito.teacher_path"
PLATEAU = "diito.plateau"
ERROR = "error"
BEST_RUN, BEST_RUN_ID = "best_run", "best_run_id"

MAX_PARAM_LENGTH = MAX_PARAM_VAL_LENGTH  # MLflow's limit on a param value

RESULT_INDEPENDENT = frozenset({
    "paths", "rerun", "trainer.progress", "trainer.resume", "trainer.log_every", "trainer.save_every",
    "trainer.num_threads", "trainer.eval_batch_size", "tracking",
})
"""Settings that change where a job writes, how fast it runs or how it looks, never what it computes:
left out of a job's identity (so changing them neither reruns a finished job nor fine-tunes another
teacher), of its params, and of what tells configurations apart in a report."""


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    enabled: bool = True
    uri: str | None = None
    artifact_location: str | None = None
    experiment: str
    run_name: str | None = None
    log_model: bool = True
    # tracking.register=<name>: the logged student becomes a new version of that registered model
    # ("register" is a BaseModel attribute, hence the alias)
    registered_model: str | None = Field(None, alias="register")
    system_metrics: float | None = Field(None, gt=0)  # seconds between samples of CPU, memory (and GPU) use (system/* metrics)
    retries: int = Field(3, ge=0)  # a tracking server that stops answering: tries per request
    timeout: float = Field(10.0, gt=0)  # seconds per try


class RunFailed(Exception):
    """A job failed inside its run, which is already marked FAILED with the error (the cause)."""

    def __init__(self, run_id: str, error: BaseException):
        super().__init__(f"{type(error).__name__}: {error}")
        self.run_id = run_id


# -- identity and params -----------------------------------------------------------------------------
def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"loss": {"alpha": 0.7}}`` -> ``{"loss.alpha": 0.7}``; lists stay whole values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def result_settings(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened settings that can change a result (all but :data:`RESULT_INDEPENDENT`)."""
    return {k: v for k, v in flat.items() if not any(k == d or k.startswith(d + ".") for d in RESULT_INDEPENDENT)}


def identity(tree: Mapping[str, Any]) -> str:
    """A short digest of the settings in ``tree`` that can change a result. Take it on validated
    values, so ``loss.T=4`` and ``loss.T=4.0`` are one job."""
    flat = result_settings(flatten(json.loads(json.dumps(tree, default=str))))
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def params(tree: Mapping[str, Any], leave_out: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A run's params: the settings that can change its result, flattened, less ``leave_out``
    (settings the run does not use, like a KD baseline's interchange_prop) and less those left
    unset (None: a feature the run does not use, such as no teacher.checkpoint)."""
    return {k: v for k, v in result_settings(flatten(tree)).items() if k not in leave_out and v is not None}


@functools.cache
def git_tags() -> dict[str, str]:
    """The commit of the code that runs (not of the working directory), and whether its tree had
    uncommitted changes."""
    folder = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, check=True).stdout.strip()

    source = {"mlflow.source.type": "LOCAL", "mlflow.source.name": sys.argv[0] or "python"}  # the runs table's Source column
    try:
        commit = git("rev-parse", "HEAD")
        return source | {"git_commit": commit, "mlflow.source.git.commit": commit, "git_dirty": str(bool(git("status", "--porcelain")))}
    except (OSError, subprocess.CalledProcessError):
        return source


# -- runs --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetRecord:
    name: str  # task/split
    digest: str  # of the examples as tokenised
    source: str  # a folder, file or package
    rows: int
    context: str  # training | validation | test


class Run:
    """One MLflow run, addressed by id.

    A run continued after an interruption knows what it had logged (``logged``: the steps of each
    metric): the resumed job recomputes those values exactly, so they are not logged twice. When
    the store stops answering, training goes on: what could not be sent is kept and sent with the
    next call, and :meth:`unsent` says what never arrived. Values are masked (:func:`mask`) and a
    param too long for MLflow is logged whole as an artifact and visibly truncated."""

    def __init__(self, client: MlflowClient, run_id: str, logged: dict[str, Counter] | None = None):
        self.client, self.run_id = client, run_id
        self._replay = logged or {}
        self._pending: list[Metric] = []  # metric values the store did not take yet
        self._failed: list[str] = []  # params, tags and artifacts it never took
        self._warned = False

    @classmethod
    def continued(cls, client: MlflowClient, run_id: str) -> Run:
        logged = {key: Counter(m.step for m in client.get_metric_history(run_id, key)) for key in client.get_run(run_id).data.metrics}
        return cls(client, run_id, logged)

    def _send(self, what: str, call: Callable[[], Any]) -> bool:
        try:
            call()
            return True
        except (MlflowException, OSError) as e:  # requests' errors are OSErrors
            if not self._warned:
                log.warning("tracking: cannot log %s to %s (%s); training goes on and logging is retried", what,
                            mask(self.client.tracking_uri), mask(str(e).splitlines()[0] if str(e) else type(e).__name__))
                self._warned = True
            return False

    def log_params(self, params: Mapping[str, Any]) -> None:
        values, long = {}, {}
        for key, value in params.items():
            value = mask(str(value))
            if len(value) > MAX_PARAM_LENGTH:
                long[key] = value
                note = f" ... (truncated: the whole value is in the artifact params/{key}.txt)"
                value = value[: MAX_PARAM_LENGTH - len(note)] + note
            values[key] = value
        for key, value in long.items():
            if not self._send(f"param {key}", lambda key=key, value=value: self.client.log_text(self.run_id, value, f"params/{key}.txt")):
                self._failed.append(f"params/{key}.txt")
        if not self._send("params", lambda: self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in values.items()])):
            self._failed.append(f"{len(values)} params")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if self._replay.get(key, {}).get(step, 0) > 0:  # logged before the interruption
                self._replay[key][step] -= 1
            else:
                self._pending.append(Metric(key, float(value), now, step))
        self.flush()

    def flush(self) -> bool:
        """Send the metric values the store has not taken yet; True when none is left."""
        while self._pending:
            batch = self._pending[:1000]  # MLflow takes at most 1000 metrics per call
            if not self._send(f"{len(self._pending)} metric values", lambda: self.client.log_batch(self.run_id, metrics=batch)):
                return False
            del self._pending[: len(batch)]
        return True

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self._send("tags", lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, mask(str(v))) for k, v in tags.items()])):
            self._failed.append("tags " + ", ".join(tags))

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        if not self._send(artifact_file, lambda: self.client.log_dict(self.run_id, obj, artifact_file)):
            self._failed.append(artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        if not self._send(artifact_file, lambda: self.client.log_text(self.run_id, text, artifact_file)):
            self._failed.append(artifact_file)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        if not self._send(f"{artifact_path or folder}", lambda: self.client.log_artifacts(self.run_id, str(folder), artifact_path)):
            self._failed.append(f"{artifact_path or folder}/ (kept in {folder})")

    def log_datasets(self, datasets: list[DatasetRecord]) -> None:
        """The data a run read, as MLflow run inputs (the runs table's Dataset column)."""
        inputs = [DatasetInput(Dataset(d.name, d.digest, "local" if Path(d.source).exists() else "code", json.dumps({"uri": d.source}),
                                       profile=json.dumps({"num_rows": d.rows})), [InputTag("mlflow.data.context", d.context)])
                  for d in datasets]
        if not self._send("datasets", lambda: self.client.log_inputs(self.run_id, datasets=inputs)):
            self._failed.append("datasets")

    def unsent(self) -> list[str]:
        """What never reached the store, after a last try."""
        self.flush()
        if not self._pending:
            return list(self._failed)
        keys = sorted({m.key for m in self._pending})
        steps = sorted({m.step for m in self._pending})
        return [*self._failed, f"{len(self._pending)} metric values ({', '.join(keys)} at steps {steps[0]}..{steps[-1]})"]


class NullRun:
    """Tracking switched off: the methods of :class:`Run`, doing nothing."""

    run_id = None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def _client(config: TrackingConfig) -> MlflowClient:
    """A client whose requests to a server give up after ``retries`` tries of ``timeout`` seconds
    (MLflow's own defaults wait minutes per request), unless the environment says otherwise."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(config.retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(config.timeout))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    if mask(config.uri or "") != (config.uri or ""):  # MLflow's "View run at <uri>" lines would print the password
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return MlflowClient(tracking_uri=config.uri)


def check_experiment(config: TrackingConfig) -> None:
    """Before compute: the store opens (MLflow's schema is current) and the job's experiment is
    active, or absent (it is then created). Raises :class:`store.StoreError` naming the key and what
    to do. A store not created yet is left alone: MLflow creates it, with the experiment."""
    if store.is_new(config.uri):
        return
    try:
        with store.lock(config.uri):
            found = _client(config).get_experiment_by_name(config.experiment)
    except (MlflowException, OSError) as e:
        reason = mask(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        raise store.StoreError(f"tracking.uri: cannot open the store {mask(config.uri or '')} ({reason})") from None
    if found is not None and found.lifecycle_stage == "deleted":
        raise _deleted(config, found.experiment_id)


def _deleted(config: TrackingConfig, experiment: str) -> store.StoreError:
    uri = f"MLFLOW_TRACKING_URI={mask(config.uri)} " if config.uri else ""
    return store.StoreError(f"tracking.experiment: {config.experiment!r} is deleted; restore it ({uri}mlflow experiments restore "
                            f"--experiment-id {experiment}, or in the UI's trash) or set tracking.experiment=<another name>")


def experiment_id(config: TrackingConfig) -> str:
    """The experiment's id, creating it (with artifacts under ``artifact_location`` for database
    stores, so they never land in a job's working directory) if it does not exist yet."""
    with store.lock(config.uri):
        client = _client(config)
        found = client.get_experiment_by_name(config.experiment)
        if found is not None:
            if found.lifecycle_stage == "deleted":  # since the job was validated
                raise _deleted(config, found.experiment_id)
            return found.experiment_id
        is_database = not str(config.uri).startswith(("http://", "https://", "databricks"))
        location = Path(config.artifact_location).resolve().as_uri() if config.artifact_location and is_database else None
        try:
            return client.create_experiment(config.experiment, artifact_location=location)
        except MlflowException:  # created by a concurrent job in the meantime
            return client.get_experiment_by_name(config.experiment).experiment_id


@contextlib.contextmanager
def open_run(config: TrackingConfig, run_name: str | None, tags: Mapping[str, Any], run_id: str | None = None) -> Iterator[Run | NullRun]:
    """Start a run (or continue ``run_id``) and end it FINISHED; an error marks it FAILED and comes
    out as :class:`RunFailed`, Ctrl-C marks it KILLED."""
    if not config.enabled:
        yield NullRun()
        return
    client = _client(config)
    if run_id is not None:
        try:
            client.update_run(run_id, status="RUNNING")
            if ERROR in client.get_run(run_id).data.tags:
                client.delete_tag(run_id, ERROR)  # the interruption's error no longer describes the run
            run = Run.continued(client, run_id)
            run.set_tags(tags)  # say, the sweep that runs it now
        except MlflowException as e:
            log.warning("cannot continue MLflow run %s (%s); this job starts a new run", run_id, str(e).splitlines()[0])
            run_id = None
    if run_id is None:
        tags = {k: mask(str(v)) for k, v in tags.items()}
        run_id = client.create_run(experiment_id(config), run_name=mask(run_name) if run_name else None, tags=tags).info.run_id
        run = Run(client, run_id)
    try:
        yield run
    except Exception as error:
        _end(run, "FAILED", f"{type(error).__name__}: {error}")
        raise RunFailed(run_id, error) from error
    except BaseException:
        _end(run, "KILLED")
        raise
    _end(run, "FINISHED")


def _end(run: Run, status: str, error: str | None = None) -> None:
    """Record the run's end; say what never reached the store (the job's own outputs are kept)."""
    if error:
        run.set_tags({ERROR: error[:5000]})
    unsent = run.unsent()
    if not run._send("the run's end", lambda: run.client.set_terminated(run.run_id, status=status)):
        unsent.append(f"the run's end ({status}: the run still shows RUNNING)")
    if unsent:
        log.warning("tracking: never reached %s for run %s: %s", mask(run.client.tracking_uri), run.run_id, "; ".join(unsent))


@contextlib.contextmanager
def system_metrics(run: Run | NullRun, config: TrackingConfig) -> Iterator[None]:
    """With ``tracking.system_metrics=<seconds>``, MLflow's monitor samples CPU, memory, disk, network
    (and GPU) use that often into the run's ``system/*`` metrics while the block runs."""
    if not (config.enabled and config.system_metrics and run.run_id):
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run.run_id, sampling_interval=config.system_metrics, resume_logging=True, tracking_uri=config.uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


@contextlib.contextmanager
def no_run() -> Iterator[NullRun]:
    """Where a run would be, for a process that does not log (a rank other than 0)."""
    yield NullRun()


@contextlib.contextmanager
def resumable_run(state_dir: Path, identity: str, config: TrackingConfig, run_name: str | None,
                  tags: Mapping[str, Any]) -> Iterator[Run | NullRun]:
    """A run whose id is kept in ``state_dir`` with the ``identity`` of what it runs (a job's
    hash, a teacher's cache key), so re-running an interrupted job continues the same run, and a
    record of anything else starts a new one. The caller holds the folder's lock, so no other
    process shares this state."""
    state_dir.mkdir(parents=True, exist_ok=True)
    id_file = state_dir / "run.json"
    where = {"identity": identity, "uri": mask(config.uri or ""), "experiment": config.experiment}
    run_id = _saved_run_id(id_file, where)
    with open_run(config, run_name, tags, run_id=run_id) as run:
        if run.run_id and run.run_id != run_id:
            atomic_write_text(id_file, json.dumps({"run_id": run.run_id} | where))
        yield run


def _saved_run_id(id_file: Path, where: dict[str, str]) -> str | None:
    """The run an interrupted job was logging to, if it ran the same identity and logged to the
    same store and experiment (a record without an identity is an older version's: not this job's
    for sure); an unreadable record starts a new run (said aloud)."""
    if not id_file.exists():
        return None
    try:
        saved = json.loads(id_file.read_text())
        run_id = saved["run_id"]
    except (OSError, ValueError, KeyError) as e:
        log.warning("run state %s is unreadable (%s); this job starts a new MLflow run", id_file, type(e).__name__)
        return None
    return run_id if all(saved.get(k) == v for k, v in where.items()) else None


def finished_run(config: TrackingConfig, config_hash: str) -> tuple[Run, dict[str, float]] | None:
    """A FINISHED student run of exactly this job, with its metrics, if there is one."""
    client = _client(config)
    found = client.search_runs([experiment_id(config)], max_results=1, filter_string=(
        f"tags.{CONFIG_HASH} = '{config_hash}' and tags.`{ROLE}` = 'student' and attributes.status = 'FINISHED'"))
    return (Run(client, found[0].info.run_id), found[0].data.metrics) if found else None


REUSED = "diito.reused."  # a sweep parent's tag per finished run it reused: diito.reused.<run id> = the run's name


def reuse_in_sweep(config: TrackingConfig, sweep: Mapping[str, str], run_id: str) -> None:
    """Record on the sweep's parent that it reused the finished run ``run_id`` instead of running
    the job again. The run itself is left as it is: it stays in the sweep (or at the top level)
    it finished in. One tag per run, so parallel jobs never overwrite each other's record."""
    client = _client(config)
    Run(client, sweep["parent_run_id"]).set_tags({REUSED + run_id: client.get_run(run_id).info.run_name or ""})


def reused_runs(client: MlflowClient, parent: Any) -> list[Any]:
    """The finished runs a sweep's parent reused (see :func:`reuse_in_sweep`) that still exist."""
    found = []
    for key in parent.data.tags:
        if key.startswith(REUSED):
            try:
                found.append(client.get_run(key.removeprefix(REUSED)))
            except MlflowException:  # deleted since
                pass
    return found


def record_failure(config: TrackingConfig, run_name: str, tags: Mapping[str, Any], params: Mapping[str, Any], error: BaseException) -> None:
    """A FAILED run for a job that failed before its own run existed (say, an invalid combination of
    values in a sweep), so the sweep shows it with its error and its config."""
    client = _client(config)
    tags = {k: mask(str(v)) for k, v in tags.items()} | {ERROR: mask(f"{type(error).__name__}: {error}")[:5000]}
    run_id = client.create_run(experiment_id(config), run_name=mask(run_name), tags=tags).info.run_id
    Run(client, run_id).log_params(params)
    client.set_terminated(run_id, status="FAILED")


# -- sweeps ------------------------------------------------------------------------------------------
def sweep_tags(sweep: Mapping[str, str] | None) -> dict[str, str]:
    """Tags that make a job a child of its sweep's parent run."""
    return {PARENT_RUN: sweep["parent_run_id"], SWEEP_ID: sweep["sweep_id"]} if sweep else {}


def start_sweep(config: TrackingConfig, sweep_dir: Path, overrides: list[str]) -> dict[str, str]:
    """Prepare the store and the experiment once, before any job starts, and open the sweep's
    parent run (named after its folder, with the sweep's overrides as ``sweep.<key>`` params)."""
    sweep_id = uuid.uuid4().hex[:12]
    client = _client(config)
    name = f"sweep {sweep_dir.parent.name}/{sweep_dir.name}"
    run = client.create_run(experiment_id(config), run_name=name, tags={ROLE: "sweep", SWEEP_ID: sweep_id, "sweep_dir": str(sweep_dir)})
    Run(client, run.info.run_id).log_params({"sweep.overrides": " ".join(overrides)} | {
        f"sweep.{o.split('=', 1)[0]}": o.split("=", 1)[1] for o in overrides if "=" in o})
    return {"parent_run_id": run.info.run_id, "sweep_id": sweep_id, "name": name}


def finish_sweep(config: TrackingConfig, sweep: Mapping[str, str], metric: str) -> dict[str, Any]:
    """The sweep's summary (jobs finished and failed, the best child by ``metric``), logged to its
    parent run, which ends FAILED when a job failed. Run names and errors are masked again: a run
    that joined from an older store may hold them unmasked."""
    client = _client(config)
    parent = client.get_run(sweep["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.`{SWEEP_ID}` = '{sweep['sweep_id']}' and tags.`{ROLE}` != 'sweep'")
    children += reused_runs(client, parent)  # jobs this sweep found finished in another
    failed = [r for r in children if r.info.status != "FINISHED"]
    scored = [r for r in children if r.info.status == "FINISHED" and math.isfinite(r.data.metrics.get(metric, math.nan))]
    summary = {"jobs": len(children), "finished": len(children) - len(failed), "failed": len(failed), "metric": metric,
               "failures": [{"run": mask(r.info.run_name), "error": mask(r.data.tags.get(ERROR, ""))} for r in failed]}
    run = Run(client, parent.info.run_id)
    if scored:
        best = max(scored, key=lambda r: r.data.metrics[metric])
        summary |= {"best_run_id": best.info.run_id, "best_run": mask(best.info.run_name), "best_value": best.data.metrics[metric]}
        run.set_tags({BEST_RUN_ID: best.info.run_id, BEST_RUN: summary["best_run"]})
        run.log_metrics({f"best/{metric}": best.data.metrics[metric]}, step=0)
    run.log_metrics({"jobs_finished": summary["finished"], "jobs_failed": summary["failed"]}, step=0)
    run.log_dict(summary, "summary.json")
    client.set_terminated(parent.info.run_id, status="FAILED" if failed else "FINISHED")
    return summary


def stop_sweep(config: TrackingConfig, sweep: Mapping[str, str], status: str, error: str | None = None) -> None:
    """End the parent run of a sweep that stopped before its summary: KILLED when it was interrupted,
    FAILED (with the ``error`` tag) when an error stopped it."""
    _end(Run(_client(config), sweep["parent_run_id"]), status, error)


# -- queries for reports -----------------------------------------------------------------------------
def find_student_runs(tracking_uri: str, target: str) -> tuple[list[Any], str | None]:
    """The finished student runs of a sweep (by sweep id or parent run id) or of an experiment (by
    name), and the sweep's parent run id (None for an experiment)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(experiments, filter_string=f"tags.`{ROLE}` = 'sweep' and tags.`{SWEEP_ID}` = '{target}'")
    if not parents:
        parents = [r for r in client.search_runs(experiments, filter_string=f"tags.`{ROLE}` = 'sweep'") if r.info.run_id == target]
    students = f"tags.`{ROLE}` = 'student' and attributes.status = 'FINISHED'"
    if parents:
        parent = parents[0]
        query = f"tags.`{SWEEP_ID}` = '{parent.data.tags[SWEEP_ID]}' and " + students
        reused = [r for r in reused_runs(client, parent) if r.info.status == "FINISHED"]
        return client.search_runs([parent.info.experiment_id], filter_string=query) + reused, parent.info.run_id
    experiment = client.get_experiment_by_name(target)
    if experiment is None:
        raise LookupError(f"no experiment, sweep id or sweep run named {target!r}")
    return client.search_runs([experiment.experiment_id], filter_string=students), None


def run_record(tracking_uri: str, run_id: str) -> Any:
    """A run's record (info, params, metrics, tags); LookupError naming the run and the store if absent."""
    try:
        return MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    except MlflowException:
        raise LookupError(f"no run {run_id} in {mask(tracking_uri)}") from None


def download(tracking_uri: str, run_id: str, artifact_path: str, folder: Path) -> Path:
    """One of a run's artifacts (a file or a folder), copied into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    return Path(MlflowClient(tracking_uri=tracking_uri).download_artifacts(run_id, artifact_path, str(folder)))


def log_files(tracking_uri: str, run_id: str, files: list[Path], artifact_path: str) -> None:
    client = MlflowClient(tracking_uri=tracking_uri)
    for f in files:
        client.log_artifact(run_id, str(f), artifact_path)
