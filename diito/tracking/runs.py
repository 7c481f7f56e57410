"""A run's logger: MLflow runs addressed by id, that keep training going while the store is away.

Everything goes through ``MlflowClient`` with an explicit run id instead of MLflow's global "active
run", so a job can never log into a run that another job (or an earlier job of the same worker
process) left open.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from diito.store import mask

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = MAX_PARAM_VAL_LENGTH  # MLflow's limit on a param value


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

    def __init__(self, client: MlflowClient, run_id: str, logged: dict[str, Counter] | None = None, experiment_id: str | None = None):
        self.client, self.run_id = client, run_id
        self.experiment_id = experiment_id  # known when the run is opened: the end of a job never has to ask the store
        self._replay = logged or {}
        self._pending: list[Metric] = []  # metric values the store did not take yet
        self._failed: list[str] = []  # params, tags and artifacts it never took
        self._warned = False

    @classmethod
    def continued(cls, client: MlflowClient, run_id: str) -> Run:
        record = client.get_run(run_id)
        logged = {key: Counter(m.step for m in client.get_metric_history(run_id, key)) for key in record.data.metrics}
        return cls(client, run_id, logged, record.info.experiment_id)

    def _send(self, what: str, call: Callable[[], Any]) -> bool:
        try:
            call()
            return True
        except (MlflowException, OSError) as e:  # requests' errors are OSErrors
            if not self._warned:
                log.warning(
                    "tracking: cannot log %s to %s (%s); training goes on and logging is retried",
                    what,
                    mask(self.client.tracking_uri),
                    mask(str(e).splitlines()[0] if str(e) else type(e).__name__),
                )
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
            if not self._send(f"{len(self._pending)} metric values", lambda batch=batch: self.client.log_batch(self.run_id, metrics=batch)):
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
        inputs = [
            DatasetInput(
                Dataset(
                    d.name,
                    d.digest,
                    "local" if Path(d.source).exists() else "code",
                    json.dumps({"uri": d.source}),
                    profile=json.dumps({"num_rows": d.rows}),
                ),
                [InputTag("mlflow.data.context", d.context)],
            )
            for d in datasets
        ]
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
    """Tracking switched off, or a rank that does not log: the methods of :class:`Run`, doing nothing
    (a misspelt one is an AttributeError here too)."""

    run_id = None
    experiment_id = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def flush(self) -> bool:
        return True

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        pass

    def log_datasets(self, datasets: list[DatasetRecord]) -> None:
        pass

    def unsent(self) -> list[str]:
        return []
