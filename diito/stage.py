"""One tracked stage: fitting a model in an MLflow run of its own, the same way for the teacher's
fine-tune and the student's distillation.

A stage's run records what was asked (its params and ``config.yaml``) and what was read (the data
splits, as MLflow run inputs); the stage fits the model (loaders, the loop with evaluation, keep-best
and checkpoints in its resume state), then scores it on the evaluation and test splits, checks that
it predicts more than one class, and records its training time and its size and speed.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from diito import store, tags, tracking
from diito.batching import Prepared
from diito.distributed import Rank
from diito.evaluation import Evaluator, one_class, warn_one_class
from diito.resume import ResumeState
from diito.trainer import LossFn, OptimConfig, Trainer, TrainerConfig, TrainState, Validation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    """What a stage's run records before it fits: its params, its config as YAML (both masked), and
    any folder of files (Hydra's record of the command line) to log beside them."""

    params: dict[str, Any]
    config_yaml: str
    folders: dict[str, Path] = field(default_factory=dict)  # artifact path -> folder


@dataclass
class Fitted:
    """A stage's outcome, on rank 0: the loop's end state, the final scores, the predictions."""

    state: TrainState
    scores: dict[str, float]
    predictions: dict[str, np.ndarray]


def datasets(data: Prepared) -> list[tracking.DatasetRecord]:
    """The splits a stage reads, for MLflow's run inputs."""
    spec = data.spec
    contexts = {"train": "training"} | dict.fromkeys(spec.eval_splits, "validation") | dict.fromkeys(data.test_splits, "test")
    return [
        tracking.DatasetRecord(f"{spec.name}/{split}", data.encoded[split].digest(), spec.origin(split), len(data.encoded[split]), context)
        for split, context in contexts.items()
        if split in data.encoded
    ]


@contextlib.contextmanager
def tracked(
    role: str,
    state: ResumeState,
    settings: tracking.TrackingConfig,
    run_name: str,
    run_tags: dict[str, Any],
    record: Record,
    data: Prepared,
    rank: Rank,
) -> Iterator[tracking.Run | tracking.NullRun]:
    """The stage's run (rank 0's; other ranks log nothing), continued when its resume ``state``
    names one, with what it was asked and what it reads already logged."""
    runs = tracking.resumable_run(state, settings, run_name, {tags.ROLE: role} | run_tags) if rank.index == 0 else tracking.no_run()
    with runs as run:
        run.log_params(record.params)
        run.log_text(store.mask(record.config_yaml), "config.yaml")
        for artifact_path, folder in record.folders.items():
            if folder.exists():
                with tempfile.TemporaryDirectory() as masked:
                    for file in folder.iterdir():
                        (Path(masked) / file.name).write_text(store.mask(file.read_text()))
                    run.log_artifacts(Path(masked), artifact_path)
        run.log_datasets(datasets(data))
        yield run


def fit(
    name: str,
    model: torch.nn.Module,
    step: LossFn,
    data: Prepared,
    settings: TrainerConfig,
    optim: OptimConfig,
    seed: int,
    rank: Rank,
    state: ResumeState,
    run: tracking.Run | tracking.NullRun,
    tracking_settings: tracking.TrackingConfig,
    probe: Callable[[], dict[str, float]] | None = None,
    reference: dict[str, torch.nn.Module] | None = None,
) -> Fitted | None:
    """Fit ``model`` with the loss ``step`` on ``data`` (this rank's share of each batch, reshuffled
    from ``seed``), judged on the evaluation splits (and ``probe``'s metrics) for keep-best and early
    stopping; checkpoints in ``state``. On rank 0, score the final weights on every evaluation and
    test split and log them with the fit's length and time and the size and speed of ``model``
    (named ``name``) and of the ``reference`` models; None on the other ranks."""
    evaluator = Evaluator(data, settings.eval_batch_size, settings.precision, rank.device, settings.progress)
    if rank.world > 1:  # each rank runs the whole step (for the student: base and counterfactual runs) through DDP's forward
        step = DistributedDataParallel(step, device_ids=[rank.device.index] if rank.device.type == "cuda" else None)
    loader = data.loader(
        "train",
        settings.batch_size,
        train=True,
        seed=seed,
        shuffle=settings.shuffle,
        length_grouped=settings.length_grouped,
        rank=rank.index,
        world=rank.world,
    )
    validation = Validation(lambda: evaluator.metrics(model) | (probe() if probe else {}), data.spec.main_metric_key)
    trainer = Trainer(
        model,
        step,
        loader,
        settings,
        optim,
        state.checkpoints,
        validation,
        run.log_metrics,
        name=name,
        device=rank.device,
        owner=state.identity,
    )
    with tracking.system_metrics(run, tracking_settings):
        end = trainer.fit()
    if rank.index != 0:  # rank 0 evaluates and logs
        return None

    log.info("%s: final evaluation", name)
    predictions = evaluator.predict(model, list(data.spec.eval_splits) + data.test_splits)
    scores = evaluator.score(predictions)
    training = {
        "best_step": end.best_step or end.step,
        "steps": end.step,
        "epochs": trainer.epochs_run,
        "time/train_seconds": end.train_seconds,
    }
    run.log_metrics(scores | training | evaluator.footprint({name: model} | (reference or {})), end.step)
    if (label := one_class(predictions, data)) is not None:
        warn_one_class(label, data, f"the {name}")
        run.set_tags({tags.PLATEAU: f"one class ({label}) on {data.spec.eval_splits[0]}"})
    return Fitted(end, scores, predictions)
