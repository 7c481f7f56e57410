"""GLUE metrics and GLUE submission files.

Metrics come from scikit-learn and scipy rather than the `evaluate` package,
because `evaluate` fetches its metric scripts from the Hugging Face hub and
runs must work offline.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from diito.files import atomic_write
from diito.tasks import METRICS

_Metric = Callable[[np.ndarray, np.ndarray], float]

_FUNCTIONS: dict[str, _Metric] = {
    "accuracy": lambda p, y: accuracy_score(y, p),
    "f1": lambda p, y: f1_score(y, p, average="binary"),
    "matthews": lambda p, y: matthews_corrcoef(y, p),
    "pearson": lambda p, y: pearsonr(p, y).statistic,
    "spearman": lambda p, y: spearmanr(p, y).statistic,
}

assert set(_FUNCTIONS) == set(METRICS), "every metric a task may name is computed here"


def compute_metrics(names: Sequence[str], predictions: Sequence | np.ndarray, labels: Sequence | np.ndarray) -> dict[str, float]:
    """Score predictions against gold labels.

    `predictions` are class ids for classification tasks (argmax already taken)
    and scores for regression tasks; `f1` is the binary F1 of class 1, as GLUE
    reports it for MRPC and QQP. Pearson/Spearman of constant predictions are NaN.
    """
    unknown = [name for name in names if name not in _FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known metrics: {', '.join(METRICS)}")
    pred, gold = np.asarray(predictions), np.asarray(labels)
    if pred.shape != gold.shape:
        raise ValueError(f"predictions shape {pred.shape} != labels shape {gold.shape}")
    return {name: float(_FUNCTIONS[name](pred, gold)) for name in names}


def write_glue_predictions(
    path: str | Path,
    ids: Sequence[str],
    predictions: Sequence | np.ndarray,
    label_names: Sequence[str] | None = None,
    regression: bool = False,
) -> Path:
    """Write one GLUE submission TSV (`index<TAB>prediction`).

    GLUE wants class names for tasks whose gold labels are words (RTE, MNLI,
    QNLI) and class ids for the 0/1 tasks, so the caller passes `label_names`
    only for the former; regression scores (STS-B) are clipped to GLUE's [0, 5].
    Returns the path written; parent folders are created.
    """
    if len(ids) != len(predictions):
        raise ValueError(f"{len(ids)} ids but {len(predictions)} predictions")
    if regression:
        values = [f"{v:.3f}" for v in np.clip(np.asarray(predictions, dtype=float), 0.0, 5.0)]
    elif label_names is not None:
        values = [label_names[int(p)] for p in predictions]
    else:
        values = [str(int(p)) for p in predictions]

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")
            writer.writerow(["index", "prediction"])
            writer.writerows(zip(ids, values))

    return atomic_write(Path(path), write)
