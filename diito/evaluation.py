"""Evaluation: predictions and metrics for the evaluation and test splits, the intervention probe,
the one-class (chance plateau) check, and GLUE submission files.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diito.batching import Prepared, make_loader, model_inputs
from diito.intervention import Interchange, MappingEntry, counterfactual
from diito.metrics import compute_metrics, write_glue_predictions
from diito.objective import DistillationObjective, intervention_diagnostics
from diito.trainer import autocast

log = logging.getLogger(__name__)

PROGRESS_BATCHES = 8  # a split of at least this many batches is evaluated under a progress bar (on a terminal)


@torch.no_grad()
def predict(
    model: torch.nn.Module, loader: torch.utils.data.DataLoader, precision: str, device: torch.device, progress: bool = True
) -> np.ndarray:
    """Logits for every example of ``loader``, in the loader's order; dropout off. With ``progress``,
    a split of :data:`PROGRESS_BATCHES` batches or more shows a bar, on a terminal only (tqdm's
    ``disable=None``), and leaves nothing behind."""
    model.eval()
    outputs = []
    shown = progress and len(loader) >= PROGRESS_BATCHES
    for batch in tqdm(loader, desc="evaluating", leave=False, disable=None if shown else True):
        inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
        with autocast(precision, device):
            outputs.append(model(**inputs).logits.float().cpu())
    return torch.cat(outputs).numpy()


class Evaluator:
    """Predicts and scores a model on the splits of ``data``."""

    def __init__(self, data: Prepared, batch_size: int, precision: str, device: torch.device, progress: bool = True):
        self.data, self.batch_size, self.precision, self.device, self.progress = data, batch_size, precision, device, progress

    def predict(self, model: torch.nn.Module, splits: list[str]) -> dict[str, np.ndarray]:
        """Predicted class ids (or scores, for regression) for each split."""
        out = {}
        for split in splits:
            logits = predict(model, self.data.loader(split, self.batch_size), self.precision, self.device, self.progress)
            out[split] = logits[:, 0] if self.data.spec.regression else logits.argmax(-1)
        return out

    def score(self, predictions: dict[str, np.ndarray]) -> dict[str, float]:
        """``<split>/<metric>`` for each labelled split."""
        metrics = {}
        for split, predicted in predictions.items():
            labels = self.data.encoded[split].labels
            if labels is not None:
                for name, value in compute_metrics(self.data.spec.metrics, predicted, labels).items():
                    metrics[f"{split}/{name}"] = value
        return metrics

    def metrics(self, model: torch.nn.Module) -> dict[str, float]:
        """The metrics of every labelled evaluation split."""
        return self.score(self.predict(model, self.data.labelled_eval_splits))

    @torch.no_grad()
    def footprint(self, models: dict[str, torch.nn.Module], repeats: int = 5) -> dict[str, float]:
        """What users ask first of a model: the parameters and weight size of each of ``models``
        (by name), their latency per example at batch 1 and at batch 32 (medians, on this device and
        precision, on the first evaluation split's examples), and a student's speed-up over its teacher."""
        split = self.data.encoded[self.data.spec.eval_splits[0]]
        singles = [
            model_inputs(b)
            for b in make_loader(
                split.head(repeats * 4), 1, shuffle=False, seed=0, length_grouped=False, pad_token_id=self.data.pad_token_id
            )
        ]
        (full,) = [
            model_inputs(b)
            for b in make_loader(split.head(32), 32, shuffle=False, seed=0, length_grouped=False, pad_token_id=self.data.pad_token_id)
        ]
        out: dict[str, float] = {}
        for name, model in models.items():
            model.eval()
            out[f"model/{name}_params"] = sum(p.numel() for p in model.parameters())
            out[f"model/{name}_mb"] = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
            seconds = lambda inputs, model=model: self._seconds(model, inputs)  # noqa: E731
            seconds(singles[0])  # warm-up: kernels and allocator
            out[f"latency/{name}_ms_batch1"] = 1000 * float(np.median([seconds(inputs) for inputs in singles]))
            out[f"latency/{name}_ms_per_example_batch32"] = (
                1000 * float(np.median([seconds(full) for _ in range(repeats)])) / len(full["input_ids"])
            )
        for batch in ("batch1", "per_example_batch32") if {"student", "teacher"} <= models.keys() else ():
            out[f"speedup/{batch.removeprefix('per_example_')}"] = out[f"latency/teacher_ms_{batch}"] / out[f"latency/student_ms_{batch}"]
        return out

    def _seconds(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> float:
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast(self.precision, self.device):
            model(**inputs)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def intervention_probe(
    objective: DistillationObjective,
    student,
    teacher,
    data: Prepared,
    batch_size: int,
    seed: int,
    device: torch.device,
    precision: str = "fp32",
) -> Callable[[], dict[str, float]] | None:
    """Interchange-intervention accuracy and efficacy on fixed pairs: the first ``eval_pairs``
    examples of the first evaluation split, with entries, pairs and positions drawn from ``seed``, so
    every evaluation measures the same interventions. None when there is nothing to measure. Run in
    the job's ``precision``, as its evaluation is.

    The frozen teacher's runs on those fixed interventions are the same at every evaluation: they are
    computed at the first and kept, so later evaluations run only the student's."""
    if objective.intervention is None or data.num_labels == 1 or objective.intervention.config.eval_pairs == 0:
        return None
    split = data.spec.eval_splits[0]
    subset = data.encoded[split].head(objective.intervention.config.eval_pairs)
    subset = type(subset)(subset.input_ids, subset.token_type_ids, None, subset.ids, subset.lengths, subset.rows)
    loader = make_loader(subset, batch_size, shuffle=False, seed=0, length_grouped=False, pad_token_id=data.pad_token_id)
    teacher_runs: list[tuple[dict[str, torch.Tensor], MappingEntry, Interchange, torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def probe() -> dict[str, float]:
        with autocast(precision, device):
            return measured()

    def measured() -> dict[str, float]:
        if not teacher_runs:
            generator = torch.Generator().manual_seed(seed)
            for batch in loader:
                inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
                base = teacher(**inputs, output_hidden_states=True)
                entry, x = objective.intervention.draw(inputs["attention_mask"], generator)
                teacher_runs.append(
                    (inputs, entry, x, base.logits, counterfactual(teacher, inputs, base.hidden_states, x, entry.teacher).logits)
                )
        student.eval()
        sums: dict[str, float] = {}
        count = 0
        for inputs, entry, x, teacher_logits, teacher_cf_logits in teacher_runs:
            base = student(**inputs, output_hidden_states=True)
            student_cf = counterfactual(student, inputs, base.hidden_states, x, entry.student)
            n = len(inputs["input_ids"])
            for name, value in intervention_diagnostics(
                student_cf.logits.float(), teacher_cf_logits.float(), teacher_logits.float()
            ).items():
                sums[name] = sums.get(name, 0.0) + float(value) * n
            count += n
        return {f"{split}/{name}": value / count for name, value in sums.items()}

    return probe


def one_class(predictions: dict[str, np.ndarray], data: Prepared) -> str | None:
    """The class a classifier predicts for every example of its first evaluation split, if it
    predicts only one: it never left the chance plateau, and its accuracy is the class prior."""
    predicted = predictions.get(data.spec.eval_splits[0])
    if data.num_labels == 1 or predicted is None or len(np.unique(predicted)) > 1:
        return None
    names = data.label_names
    return names[int(predicted[0])] if names else str(int(predicted[0]))


def warn_one_class(label: str, data: Prepared, who: str) -> None:
    log.warning(
        "%s predicts one class (%r) for every %s example: it never left the chance plateau, so its %s is the "
        "class prior, not a result. Train longer (trainer.min_steps) or with a higher learning rate.",
        who,
        label,
        data.spec.eval_splits[0],
        data.spec.main_metric,
    )


def write_predictions(data: Prepared, predictions: dict[str, np.ndarray], folder: Path) -> list[Path]:
    """GLUE-format prediction files of the test splits (``SST-2.tsv``, ``MNLI-m.tsv`` ...)."""
    spec = data.spec
    return [
        write_glue_predictions(
            folder / spec.submission_files.get(split, f"{split}.tsv"),
            data.encoded[split].ids,
            predictions[split],
            label_names=spec.submission_label_names,
            regression=spec.regression,
        )
        for split in data.test_splits
    ]
