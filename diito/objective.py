"""Loss terms as small pure functions, and the weighted sum the config describes.

A term whose weight is 0 is neither computed nor logged, so switching a term off also saves its cost.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from diito.data import model_inputs
from diito.intervention import Counterfactual, Interchange, MappingEntry, counterfactual, reference_counterfactual, sample_interchange


class LossConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "kd"
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    T: float = Field(2.0, gt=0.0)
    kl_reduction: Literal["batchmean", "mean"] = "batchmean"
    beta: float = Field(0.0, ge=0.0)
    patience_layers: list[int] | None = None
    normalize_patience: bool = True
    gamma: float = Field(0.0, ge=0.0)
    cosine: float = Field(0.0, ge=0.0)
    interchange_prop: float = Field(0.3, ge=0.0, le=1.0)
    interchange_mode: Literal["random", "consecutive"] = "random"
    interchange_max_token: int | None = Field(None, ge=1)
    interchange_min_token: int = Field(1, ge=0)
    pairing: Literal["derangement", "permutation"] = "derangement"
    eval_pairs: int = Field(256, ge=0)

    @property
    def intervenes(self) -> bool:
        return self.gamma > 0 or self.cosine > 0


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


def default_patience_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher blocks matched to student blocks 0..k-2, evenly spaced (12 -> 6: 1, 3, 5, 7, 9)."""
    return [(i + 1) * teacher_layers // student_layers - 1 for i in range(student_layers - 1)]


class DistillationObjective:
    """alpha * KD + (1 - alpha) * CE + beta * patience + gamma * DIITO + cosine * causal cosine.

    ``fast=False`` computes the counterfactual runs the original's way (three full passes per
    model); the fast path gives the same losses and gradients at a fraction of the cost.
    """

    def __init__(self, config: LossConfig, patience_layers: list[int], mapping: list[MappingEntry] | None = None, fast: bool = True):
        if config.intervenes and not mapping:
            raise ValueError("loss.gamma / loss.cosine need a mapping")
        self.config, self.patience_layers, self.mapping, self.fast = config, patience_layers, mapping, fast

    @property
    def needs_hidden_states(self) -> bool:
        return self.config.beta > 0 or self.config.intervenes

    def step(self, student, teacher, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one training batch (teacher frozen), with its terms and diagnostics."""
        inputs = model_inputs(batch)
        hidden = self.needs_hidden_states
        with torch.no_grad():
            teacher_out = teacher(**inputs, output_hidden_states=hidden)
        student_out = student(**inputs, output_hidden_states=hidden)
        total, terms = self(student_out, teacher_out, batch["labels"])
        if not self.config.intervenes:
            return total, terms
        entry = self.mapping[int(torch.randint(len(self.mapping), (1,)))]
        x = self.sample(inputs["attention_mask"])
        with torch.no_grad():
            teacher_cf = self._counterfactual(teacher, inputs, teacher_out, x, entry.teacher)
        student_cf = self._counterfactual(student, inputs, student_out, x, entry.student)
        c = self.config
        if c.gamma > 0:
            terms["diito"] = kd_loss(student_cf.logits, teacher_cf.logits, c.T, c.kl_reduction)
            total = total + c.gamma * terms["diito"]
        if c.cosine > 0:
            terms["cosine"] = causal_cosine_loss(student_cf.last_hidden, teacher_cf.last_hidden, inputs["attention_mask"])
            total = total + c.cosine * terms["cosine"]
        if student_cf.logits.shape[-1] > 1:  # accuracy-style diagnostics need classes
            terms |= intervention_diagnostics(student_cf.logits, teacher_cf.logits, teacher_out.logits)
        return total, terms

    def sample(self, attention_mask: Tensor, generator: torch.Generator | None = None) -> Interchange:
        """Pairs and positions, drawn on the CPU and moved once to the batch's device."""
        c = self.config
        x = sample_interchange(attention_mask.sum(1).cpu(), c.interchange_prop, c.interchange_mode, c.interchange_min_token,
                               c.interchange_max_token, c.pairing == "derangement", generator)
        return x.to(attention_mask.device)

    def _counterfactual(self, model, inputs, out, x: Interchange, sites) -> Counterfactual:
        if self.fast:
            return counterfactual(model, inputs, out.hidden_states, x, sites)
        return reference_counterfactual(model, inputs, x, sites)

    @torch.no_grad()
    def evaluate_interventions(self, student, teacher, batches, seed: int) -> dict[str, float]:
        """Interchange-intervention accuracy and efficacy on fixed pairs: the same seed gives the
        same entries, pairs and positions at every evaluation, so the numbers are comparable."""
        generator = torch.Generator().manual_seed(seed)
        sums: dict[str, float] = {}
        count = 0
        for batch in batches:
            inputs = model_inputs(batch)
            entry = self.mapping[int(torch.randint(len(self.mapping), (1,), generator=generator))]
            x = self.sample(inputs["attention_mask"], generator)
            teacher_out = teacher(**inputs, output_hidden_states=True)
            student_out = student(**inputs, output_hidden_states=True)
            teacher_cf = self._counterfactual(teacher, inputs, teacher_out, x, entry.teacher)
            student_cf = self._counterfactual(student, inputs, student_out, x, entry.student)
            n = len(batch["input_ids"])
            for name, value in intervention_diagnostics(student_cf.logits, teacher_cf.logits, teacher_out.logits).items():
                sums[name] = sums.get(name, 0.0) + float(value) * n
            count += n
        return {name: value / count for name, value in sums.items()}

    def __call__(self, student_out, teacher_out, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.config
        terms: dict[str, Tensor] = {}
        weighted: list[Tensor] = []
        if c.alpha > 0:
            terms["kd"] = kd_loss(student_out.logits, teacher_out.logits, c.T, c.kl_reduction)
            weighted.append(c.alpha * terms["kd"])
        if c.alpha < 1:
            terms["ce"] = task_loss(student_out.logits, labels)
            weighted.append((1 - c.alpha) * terms["ce"])
        if c.beta > 0:
            # hidden_states[0] is the embedding output; block i's output is hidden_states[i + 1].
            student_cls = [h[:, 0] for h in student_out.hidden_states[1:-1]]
            teacher_cls = [teacher_out.hidden_states[i + 1][:, 0] for i in self.patience_layers]
            terms["patience"] = patience_loss(student_cls, teacher_cls, c.normalize_patience)
            weighted.append(c.beta * terms["patience"])
        return torch.stack(weighted).sum(), terms  # alpha in [0, 1]: KD or CE is always on


def intervention_diagnostics(student_cf: Tensor, teacher_cf: Tensor, teacher_base: Tensor) -> dict[str, Tensor]:
    """iia: how often student and teacher agree on the counterfactual's class; efficacy: how often
    the intervention changes the teacher's predicted class."""
    teacher_class = teacher_cf.argmax(-1)
    return {
        "iia": (student_cf.argmax(-1) == teacher_class).float().mean().detach(),
        "efficacy": (teacher_class != teacher_base.argmax(-1)).float().mean().detach(),
    }
