"""The distillation objective: a weighted sum of named loss terms, read from one table.

    total = alpha·kd + (1 − alpha)·ce + beta·patience + gamma·diito + cosine·causal-cosine + Σ weight·<your term>

Each built-in term is one entry of :data:`BUILTIN_TERMS` (its weight's setting, its function, what it
needs); terms of your own are entries of ``loss.terms`` (see :class:`LossTerm`). Names, the
``train/<term>`` metrics, the ``loss`` tag and the report's methods all come from the table. A term
whose weight is 0 is neither computed nor logged, so switching a term off also saves its cost, and
what the active terms need decides what runs: the teacher, the models' hidden states, the
counterfactual pair (:meth:`DistillationObjective.intervene`, once per batch for every term that
needs it).
"""

from __future__ import annotations

import copy
import functools
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from diito import targets
from diito.batching import model_inputs
from diito.intervention import (
    Counterfactual,
    InterchangeConfig,
    Intervention,
    MappingEntry,
    counterfactual,
    reference_counterfactual,
)

# What a term may need besides the student's outputs and the labels.
TEACHER = "teacher"  # the frozen teacher's outputs on the same batch
HIDDEN_STATES = "hidden_states"  # every block's output, in both models' outputs (``out.student.hidden_states``)
COUNTERFACTUAL = "counterfactual"  # the counterfactual pair (``out.student_cf``, ``out.teacher_cf``); implies the other two
NEEDS = (TEACHER, HIDDEN_STATES, COUNTERFACTUAL)


class TermSpec(BaseModel):
    """One ``loss.terms`` entry: ``{_target_: my_pkg.MyTerm, weight: 0.1, <the class's own arguments>}``."""

    model_config = ConfigDict(extra="allow", validate_by_name=True, serialize_by_alias=True)
    target: str = Field(alias="_target_", min_length=1)
    weight: float = Field(ge=0.0)

    @property
    def arguments(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class LossConfig(BaseModel):
    """The built-in terms' weights and settings, and the terms of your own (``loss.terms``)."""

    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    T: float = Field(2.0, gt=0.0)
    kl_reduction: Literal["batchmean", "mean"] = "batchmean"
    beta: float = Field(0.0, ge=0.0)
    patience_layers: list[int] | None = None
    normalize_patience: bool = True
    gamma: float = Field(0.0, ge=0.0)
    cosine: float = Field(0.0, ge=0.0)
    terms: dict[str, TermSpec] = {}

    @field_validator("terms")
    @classmethod
    def _names(cls, terms: dict[str, TermSpec]) -> dict[str, TermSpec]:
        for name in terms:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
                raise ValueError(f"{name}: a term's name is lower-case letters, digits and _, starting with a letter")
            if name in BUILTIN_TERMS or name in RESERVED_NAMES:
                raise ValueError(f"{name}: the name of a built-in term or metric; name yours otherwise")
        return terms

    @property
    def weights(self) -> dict[str, float]:
        """Every term's weight, in the order the total sums them (the built-ins', then yours)."""
        return {name: term.weight(self) for name, term in BUILTIN_TERMS.items()} | {name: t.weight for name, t in self.terms.items()}

    @property
    def needs(self) -> frozenset[str]:
        """What the terms with a non-zero weight need (a term of your own is imported to ask it)."""
        return frozenset().union(*(needs for name, needs in self._needs().items() if self.weights[name] > 0))

    @property
    def intervenes(self) -> bool:
        return COUNTERFACTUAL in self.needs

    @property
    def kind(self) -> str:
        """The ``loss`` tag: ``kd`` or ``diito``, then ``+<term>`` for every other term that is on
        (``diito+patience``, ``kd+hidden_mse``)."""
        on = [name for name, weight in self.weights.items() if weight > 0]
        return "+".join(["diito" if "diito" in on else "kd", *(name for name in on if name not in ("kd", "ce", "diito"))])

    def _needs(self) -> dict[str, frozenset[str]]:
        return {name: term.needs for name, term in BUILTIN_TERMS.items()} | {
            name: term_class(spec, f"loss.terms.{name}").needs for name, spec in self.terms.items()
        }


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


# -- the table ---------------------------------------------------------------------------------------
@dataclass
class Outputs:
    """One batch through both models: what every term reads."""

    student: Any  # the student's outputs: logits, and hidden_states when a term needs them
    teacher: Any  # the teacher's, when a term needs them (else None)
    labels: Tensor | None
    attention_mask: Tensor
    model_inputs: dict[str, Tensor] | None = None
    student_cf: Counterfactual | None = None  # the counterfactual pair (logits, last_hidden), when a term needs it
    teacher_cf: Counterfactual | None = None


@dataclass(frozen=True)
class BuiltinTerm:
    """A built-in term: its weight (from the ``loss`` settings), its function and what it needs."""

    weight: Callable[[LossConfig], float]
    loss: Callable[[Outputs, DistillationObjective], Tensor]
    needs: frozenset[str]


BUILTIN_TERMS: dict[str, BuiltinTerm] = {  # in the order the total sums them
    "kd": BuiltinTerm(
        lambda c: c.alpha,
        lambda out, o: kd_loss(out.student.logits, out.teacher.logits, o.config.T, o.config.kl_reduction),
        frozenset({TEACHER}),
    ),
    "ce": BuiltinTerm(lambda c: 1 - c.alpha, lambda out, o: task_loss(out.student.logits, out.labels), frozenset()),
    # hidden_states[0] is the embedding output; block i's output is hidden_states[i + 1].
    "patience": BuiltinTerm(
        lambda c: c.beta,
        lambda out, o: patience_loss(
            [h[:, 0] for h in out.student.hidden_states[1:-1]],
            [out.teacher.hidden_states[i + 1][:, 0] for i in o.patience_layers],
            o.config.normalize_patience,
        ),
        frozenset({TEACHER, HIDDEN_STATES}),
    ),
    "diito": BuiltinTerm(
        lambda c: c.gamma,
        lambda out, o: kd_loss(out.student_cf.logits, out.teacher_cf.logits, o.config.T, o.config.kl_reduction),
        frozenset({TEACHER, HIDDEN_STATES, COUNTERFACTUAL}),
    ),
    "cosine": BuiltinTerm(
        lambda c: c.cosine,
        lambda out, o: causal_cosine_loss(out.student_cf.last_hidden, out.teacher_cf.last_hidden, out.attention_mask),
        frozenset({TEACHER, HIDDEN_STATES, COUNTERFACTUAL}),
    ),
}
RESERVED_NAMES = ("loss", "lr", "iia", "efficacy")  # other train/<name> metrics


@runtime_checkable
class LossTerm(Protocol):
    """A loss term of your own, named in ``loss.terms`` by its class::

        loss:
          terms:
            hidden_mse:                       # its name: train/hidden_mse, the loss tag's +hidden_mse
              _target_: my_pkg.terms.HiddenStateMSE
              weight: 0.1                     # its weight in the total; 0 switches it off
              layer: -1                       # any other key is an argument of the class

    The class says what it ``needs`` (a class attribute: any of ``"teacher"``, ``"hidden_states"``,
    ``"counterfactual"``; the student's outputs and the labels are always there) and is called once
    per batch with the batch's :class:`Outputs`. It returns its loss, a scalar tensor (unweighted: the
    weight is applied by the objective), or the loss and a dict of diagnostics (scalar tensors,
    logged as ``train/<name>/<key>``, never differentiated). It holds no trainable parameters: the
    optimizer sees the student's only."""

    needs: tuple[str, ...] | frozenset[str]

    def __call__(self, out: Outputs) -> Tensor | tuple[Tensor, dict[str, Tensor]]: ...


@dataclass(frozen=True)
class TermClass:
    """A ``loss.terms`` entry's class, checked against :class:`LossTerm`."""

    cls: type
    needs: frozenset[str]


def term_class(spec: TermSpec, key: str) -> TermClass:
    """The class ``spec`` names, following the protocol and taking its arguments; :class:`targets.TargetError`
    naming ``key`` otherwise."""
    try:
        cls = targets.locate(spec.target)
    except targets.TargetError as e:
        raise targets.TargetError(f"{key}._target_: {e}") from None
    if not isinstance(cls, type) or not any("__call__" in vars(k) for k in cls.__mro__[:-1]):
        raise targets.TargetError(
            f"{key}._target_: {spec.target} is not a loss term: a class whose instances are called with "
            "the batch's outputs (see diito.objective.LossTerm)"
        )
    needs = getattr(cls, "needs", None)
    if isinstance(needs, str) or not isinstance(needs, (tuple, list, set, frozenset)) or not set(needs) <= set(NEEDS):
        raise targets.TargetError(
            f"{key}._target_: {spec.target}.needs is {needs!r}; a loss term says what it needs: a tuple "
            f"of {', '.join(map(repr, NEEDS))} (empty: the student's outputs and the labels only)"
        )
    try:
        targets.check_arguments(cls, spec.target, 0, spec.arguments)
    except targets.TargetError as e:
        raise targets.TargetError(f"{key}.{e.argument}: {e}" if e.argument else f"{key}: {e}") from None
    needs = frozenset(needs)
    return TermClass(cls, needs | {TEACHER, HIDDEN_STATES} if COUNTERFACTUAL in needs else needs)


@dataclass(frozen=True)
class Term:
    """One active entry of the objective's table: a term with a non-zero weight, ready to compute."""

    name: str
    weight: float
    loss: Callable[[Outputs], Tensor | tuple[Tensor, dict[str, Tensor]]]
    needs: frozenset[str]


def active_terms(config: LossConfig, patience_layers: list[int], objective: DistillationObjective) -> list[Term]:
    """The terms with a non-zero weight, those reading the base runs first (the order in which the
    terms' graphs are built fixes the order in which backward sums gradients: the result's last bits)."""
    table = [
        Term(name, config.weights[name], functools.partial(term.loss, o=objective), term.needs) for name, term in BUILTIN_TERMS.items()
    ]
    for name, spec in config.terms.items():
        found = term_class(spec, f"loss.terms.{name}")
        table.append(Term(name, spec.weight, found.cls(**spec.arguments), found.needs))
    on = [t for t in table if t.weight > 0]
    return [t for t in on if COUNTERFACTUAL not in t.needs] + [t for t in on if COUNTERFACTUAL in t.needs]


# -- the objective -----------------------------------------------------------------------------------
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
    pairing). ``intervention.separate_passes=true`` runs the student's source and counterfactual as
    passes of their own, as the original did (the frozen teacher is in eval mode: exact either way);
    ``fast=False`` runs both models the three-pass way, to prove the fast path exact."""

    def __init__(
        self,
        config: LossConfig,
        patience_layers: list[int],
        mapping: list[MappingEntry] | None = None,
        fast: bool = True,
        interchange: InterchangeConfig | None = None,
        teacher_outputs: Callable[[dict[str, Tensor]], Any] | None = None,
    ):
        self.config, self.patience_layers, self.fast = config, patience_layers, fast
        # The teacher's base run read from its cache (diito.teacher_outputs) instead of run: the
        # frozen teacher gives every step the same outputs.
        self.teacher_outputs = teacher_outputs
        self.table = active_terms(config, patience_layers, self)
        self.needs = frozenset().union(*(t.needs for t in self.table))
        if COUNTERFACTUAL in self.needs and not mapping:
            raise ValueError("a term that needs the counterfactual pair (loss.gamma, loss.cosine, ...) needs a mapping")
        self.intervention = Intervention(mapping, interchange or InterchangeConfig()) if COUNTERFACTUAL in self.needs else None
        self.weights = {t.name: t.weight for t in self.table}

    def forward(self, student, teacher, batch: dict[str, Tensor]) -> Outputs:
        """The base runs of one batch (the teacher frozen, and run only when a term needs it)."""
        inputs = model_inputs(batch)
        hidden = HIDDEN_STATES in self.needs
        teacher_out = None
        if TEACHER in self.needs:
            with torch.no_grad():
                teacher_out = self.teacher_outputs(batch) if self.teacher_outputs else teacher(**inputs, output_hidden_states=hidden)
        student_out = student(**inputs, output_hidden_states=hidden)
        return Outputs(student_out, teacher_out, batch.get("labels"), inputs["attention_mask"], model_inputs=inputs)

    def reading(self, teacher_outputs: Callable[[dict[str, Tensor]], Any] | None) -> DistillationObjective:
        """This objective, reading the teacher's base runs from ``teacher_outputs`` (None: running it)."""
        other = copy.copy(self)
        other.teacher_outputs = teacher_outputs
        return other

    def intervene(self, out: Outputs, student, teacher, generator: torch.Generator | None = None) -> None:
        """Add the counterfactual pair to ``out``: one mapping entry and interchange drawn from
        ``generator`` (the global RNG when None), applied to both models."""
        entry, x = self.intervention.draw(out.attention_mask, generator)
        with torch.no_grad():
            out.teacher_cf = self._counterfactual(teacher, out.model_inputs, out.teacher, x, entry.teacher)
        separate = self.intervention.config.separate_passes and student.training  # in eval mode both ways are the same computation
        out.student_cf = self._counterfactual(student, out.model_inputs, out.student, x, entry.student, separate)

    def _counterfactual(self, model, inputs, base_out, x, sites, separate: bool = False) -> Counterfactual:
        """The fast run from the base run's activations, or (``separate``, or ``fast=False`` for the
        proofs) the original's: a source pass and a full counterfactual pass of their own."""
        if self.fast and not separate:
            return counterfactual(model, inputs, base_out.hidden_states, x, sites)
        return reference_counterfactual(model, inputs, x, sites)

    def terms(self, out: Outputs, counterfactual: bool = False) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The active terms that read the base runs (or, ``counterfactual``, the counterfactual
        pair), unweighted, and their diagnostics (``<term>/<key>``)."""
        values, diagnostics = {}, {}
        for term in self.table:
            if (COUNTERFACTUAL in term.needs) == counterfactual:
                result = term.loss(out)
                values[term.name], extra = result if isinstance(result, tuple) else (result, {})
                diagnostics |= {f"{term.name}/{key}": value.detach() for key, value in extra.items()}
        return values, diagnostics

    def total(self, terms: dict[str, Tensor]) -> Tensor:
        """The weighted sum (alpha is in [0, 1], so KD or CE is always there)."""
        weighted = [self.weights[name] * value for name, value in terms.items()]
        return functools.reduce(operator.add, weighted)

    def __call__(self, student, teacher, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The training loss of one batch, and what to log: every term, its diagnostics and, when
        intervening on a classifier, the intervention diagnostics."""
        out = self.forward(student, teacher, batch)
        # The base terms are built before the counterfactual runs: the order in which the terms'
        # graphs are built fixes the order in which backward sums gradients (the result's last bits).
        terms, diagnostics = self.terms(out)
        if self.intervention is not None:
            self.intervene(out, student, teacher)
            counterfactual_terms, counterfactual_diagnostics = self.terms(out, counterfactual=True)
            terms |= counterfactual_terms
            diagnostics |= counterfactual_diagnostics
            if out.student_cf.logits.shape[-1] > 1:  # accuracy-style diagnostics need classes
                diagnostics |= intervention_diagnostics(out.student_cf.logits, out.teacher_cf.logits, out.teacher.logits)
        return self.total(terms), terms | diagnostics
