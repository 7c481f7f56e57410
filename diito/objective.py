"""Loss terms as small pure functions, and the weighted sum the config describes.

A term whose weight is 0 is neither computed nor logged, so switching a term off also saves its cost.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor


class LossConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "kd"
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    T: float = Field(2.0, gt=0.0)
    kl_reduction: Literal["batchmean", "mean"] = "batchmean"
    beta: float = Field(0.0, ge=0.0)
    patience_layers: list[int] | None = None
    normalize_patience: bool = True


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


def default_patience_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher blocks matched to student blocks 0..k-2, evenly spaced (12 -> 6: 1, 3, 5, 7, 9)."""
    return [(i + 1) * teacher_layers // student_layers - 1 for i in range(student_layers - 1)]


class DistillationObjective:
    """alpha * KD + (1 - alpha) * CE + beta * patience, on a batch the teacher and student both saw."""

    def __init__(self, config: LossConfig, patience_layers: list[int]):
        self.config = config
        self.patience_layers = patience_layers

    @property
    def needs_hidden_states(self) -> bool:
        return self.config.beta > 0

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
