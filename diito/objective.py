"""The distillation objective: a weighted sum of named loss terms, each a small pure function.

    total = alpha·kd + (1 − alpha)·ce + gamma·diito + beta·patience + cosine·causal-cosine

A term whose weight is 0 is neither computed nor logged, so switching a term off also saves its cost.
:meth:`DistillationObjective.forward` runs the base runs, :meth:`DistillationObjective.intervene` adds
the counterfactual pair (once per batch, for every term that needs it), and
:meth:`DistillationObjective.terms` reads the terms off them.
"""

from __future__ import annotations

import copy
import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from diito.batching import model_inputs
from diito.intervention import (
    Counterfactual, InterchangeConfig, Intervention, MappingEntry, counterfactual, reference_counterfactual,
)


class LossConfig(InterchangeConfig):
    """The terms' weights and settings; the intervention's settings (inherited) sit beside them on
    the command line (``loss.interchange_prop``), but belong to :class:`InterchangeConfig`."""

    alpha: float = Field(0.5, ge=0.0, le=1.0)
    T: float = Field(2.0, gt=0.0)
    kl_reduction: Literal["batchmean", "mean"] = "batchmean"
    beta: float = Field(0.0, ge=0.0)
    patience_layers: list[int] | None = None
    normalize_patience: bool = True
    gamma: float = Field(0.0, ge=0.0)
    cosine: float = Field(0.0, ge=0.0)

    @property
    def intervenes(self) -> bool:
        return self.gamma > 0 or self.cosine > 0

    @property
    def interchange(self) -> InterchangeConfig:
        return InterchangeConfig(**self.model_dump(include=set(InterchangeConfig.model_fields)))

    @property
    def kind(self) -> str:
        """What the weights make of it: ``kd`` or ``diito``, with ``+patience``/``+cosine`` when on."""
        parts = ["diito" if self.gamma > 0 else "kd"] + [name for name in ("patience", "cosine") if self.weights[name] > 0]
        return "+".join(parts)

    @property
    def weights(self) -> dict[str, float]:
        """Every term's weight, in the order the total sums them."""
        return {"kd": self.alpha, "ce": 1 - self.alpha, "patience": self.beta, "diito": self.gamma, "cosine": self.cosine}


# -- the terms ---------------------------------------------------------------------------------------
def kd_loss(student_logits: Tensor, teacher_logits: Tensor, T: float, reduction: str = "batchmean") -> Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2; for one output (regression) the MSE of the outputs.

    ``mean`` divides the batch-mean KL by the number of classes, as the original code did.
    """
    if student_logits.shape[-1] == 1:
        return F.mse_loss(student_logits.float(), teacher_logits.float())
    log_p_student = F.log_softmax(student_logits.float() / T, dim=-1)
    p_teacher = F.softmax(teacher_logits.float() / T, dim=-1)
    kl = F.kl_div(log_p_student, p_teacher, reduction="batchmean")
    if reduction == "mean":  # written out: torch plans to change what its own "mean" means here
        kl = kl / student_logits.shape[-1]
    return kl * (T * T)


def task_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy with the gold labels; MSE for regression."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def patience_loss(student_cls: list[Tensor], teacher_cls: list[Tensor], normalize: bool) -> Tensor:
    """PKD: MSE between matched [CLS] vectors, optionally L2-normalised first."""
    losses = []
    for s, t in zip(student_cls, teacher_cls, strict=True):
        s, t = s.float(), t.float()
        if normalize:
            s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
        losses.append(F.mse_loss(s, t))
    return torch.stack(losses).mean()


def causal_cosine_loss(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor) -> Tensor:
    """1 - cosine similarity of counterfactual last-block outputs, averaged over real tokens."""
    cos = F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)
    mask = mask.to(cos.dtype)
    return ((1 - cos) * mask).sum() / mask.sum()


def intervention_diagnostics(student_cf: Tensor, teacher_cf: Tensor, teacher_base: Tensor) -> dict[str, Tensor]:
    """iia: how often student and teacher agree on the counterfactual's class; efficacy: how often
    the intervention changes the teacher's predicted class."""
    teacher_class = teacher_cf.argmax(-1)
    return {
        "iia": (student_cf.argmax(-1) == teacher_class).float().mean().detach(),
        "efficacy": (teacher_class != teacher_base.argmax(-1)).float().mean().detach(),
    }


def default_patience_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher blocks matched to student blocks 0..k-2, evenly spaced (12 -> 6: 1, 3, 5, 7, 9)."""
    return [(i + 1) * teacher_layers // student_layers - 1 for i in range(student_layers - 1)]


# -- the objective -----------------------------------------------------------------------------------
BASE_TERMS = ("kd", "ce", "patience")  # read the base runs
COUNTERFACTUAL_TERMS = ("diito", "cosine")  # read the counterfactual pair
@dataclass
class Outputs:
    """One batch through both models: what every term reads."""

    student: Any  # the models' outputs (logits, and hidden_states when a term needs them)
    teacher: Any
    labels: Tensor | None
    attention_mask: Tensor
    model_inputs: dict[str, Tensor] | None = None
    student_cf: Counterfactual | None = None  # the counterfactual pair (see DistillationObjective.intervene)
    teacher_cf: Counterfactual | None = None


class DistillationStep(torch.nn.Module):
    """One batch's loss as a module, so DistributedDataParallel runs the whole step (base runs,
    counterfactual runs, the teacher's no-grad runs) through its forward and reduces the gradients
    correctly. The student is its only registered part: the frozen teacher stays outside it."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, objective: DistillationObjective):
        super().__init__()
        self.student, self.objective = student, objective
        self._teacher = (teacher,)  # a tuple, so the teacher is not a submodule

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return self.objective(self.student, self._teacher[0], batch)


class DistillationObjective:
    """The weighted sum the config describes.

    The fast counterfactual run takes the source's activations from the base run (the sources are
    the batch, permuted) and recomputes only the blocks above the intervened one. In eval mode that
    is exactly the original's three passes (source, base, counterfactual); in train mode the source
    activations and the blocks below reuse the base run's dropout masks instead of fresh ones, which
    leaves each pair's counterfactual unbiased when no example is its own source (derangement
    pairing). ``loss.separate_passes=true`` runs the student's source and counterfactual as passes of
    their own, as the original did (the frozen teacher is in eval mode: exact either way);
    ``fast=False`` runs both models the three-pass way, to prove the fast path exact."""

    def __init__(self, config: LossConfig, patience_layers: list[int], mapping: list[MappingEntry] | None = None, fast: bool = True,
                 teacher_outputs: Callable[[dict[str, Tensor]], Any] | None = None):
        if config.intervenes and not mapping:
            raise ValueError("loss.gamma / loss.cosine need a mapping")
        self.config, self.patience_layers, self.fast = config, patience_layers, fast
        # The teacher's base run read from its cache (diito.teacher_outputs) instead of run: the
        # frozen teacher gives every step the same outputs.
        self.teacher_outputs = teacher_outputs
        self.intervention = Intervention(mapping, config.interchange) if config.intervenes else None
        self.weights = {name: w for name, w in config.weights.items() if w > 0}

    def forward(self, student, teacher, batch: dict[str, Tensor]) -> Outputs:
        """The base runs of one batch (the teacher frozen)."""
        inputs = model_inputs(batch)
        hidden = self.config.beta > 0 or self.intervention is not None
        with torch.no_grad():
            teacher_out = self.teacher_outputs(batch) if self.teacher_outputs else teacher(**inputs, output_hidden_states=hidden)
        student_out = student(**inputs, output_hidden_states=hidden)
        return Outputs(student_out, teacher_out, batch.get("labels"), inputs["attention_mask"], model_inputs=inputs)

    def reading(self, teacher_outputs: Callable[[dict[str, Tensor]], Any] | None) -> DistillationObjective:
        """This objective, reading the teacher's base runs from ``teacher_outputs`` (another split's cache)."""
        other = copy.copy(self)
        other.teacher_outputs = teacher_outputs
        return other

    def intervene(self, out: Outputs, student, teacher, generator: torch.Generator | None = None) -> None:
        """Add the counterfactual pair to ``out``: one mapping entry and interchange drawn from
        ``generator`` (the global RNG when None), applied to both models."""
        entry, x = self.intervention.draw(out.attention_mask, generator)
        with torch.no_grad():
            out.teacher_cf = self._counterfactual(teacher, out.model_inputs, out.teacher, x, entry.teacher)
        separate = self.config.separate_passes and student.training  # in eval mode both ways are the same computation
        out.student_cf = self._counterfactual(student, out.model_inputs, out.student, x, entry.student, separate)

    def _counterfactual(self, model, inputs, base_out, x, sites, separate: bool = False) -> Counterfactual:
        """The fast run from the base run's activations, or (``separate``, or ``fast=False`` for the
        proofs) the original's: a source pass and a full counterfactual pass of their own."""
        if self.fast and not separate:
            return counterfactual(model, inputs, base_out.hidden_states, x, sites)
        return reference_counterfactual(model, inputs, x, sites)

    def terms(self, out: Outputs, names: tuple[str, ...]) -> dict[str, Tensor]:
        """The terms among ``names`` that have a non-zero weight, unweighted."""
        c = self.config
        compute = {
            "kd": lambda: kd_loss(out.student.logits, out.teacher.logits, c.T, c.kl_reduction),
            "ce": lambda: task_loss(out.student.logits, out.labels),
            # hidden_states[0] is the embedding output; block i's output is hidden_states[i + 1].
            "patience": lambda: patience_loss([h[:, 0] for h in out.student.hidden_states[1:-1]],
                                              [out.teacher.hidden_states[i + 1][:, 0] for i in self.patience_layers],
                                              c.normalize_patience),
            "diito": lambda: kd_loss(out.student_cf.logits, out.teacher_cf.logits, c.T, c.kl_reduction),
            "cosine": lambda: causal_cosine_loss(out.student_cf.last_hidden, out.teacher_cf.last_hidden, out.attention_mask),
        }
        return {name: compute[name]() for name in self.weights if name in names}

    def total(self, terms: dict[str, Tensor]) -> Tensor:
        """The weighted sum (alpha is in [0, 1], so KD or CE is always there)."""
        weighted = [self.weights[name] * value for name, value in terms.items()]
        return functools.reduce(operator.add, weighted)

    def __call__(self, student, teacher, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The training loss of one batch, and what to log: every term and, when intervening on a
        classifier, the intervention diagnostics."""
        out = self.forward(student, teacher, batch)
        # The base terms are built before the counterfactual runs: the order in which the terms'
        # graphs are built fixes the order in which backward sums gradients (the result's last bits).
        terms = self.terms(out, BASE_TERMS)
        logged = dict(terms)
        if self.intervention is not None:
            self.intervene(out, student, teacher)
            terms |= self.terms(out, COUNTERFACTUAL_TERMS)
            logged = dict(terms)
            if out.student_cf.logits.shape[-1] > 1:  # accuracy-style diagnostics need classes
                logged |= intervention_diagnostics(out.student_cf.logits, out.teacher_cf.logits, out.teacher.logits)
        return self.total(terms), logged
