"""A loss term of your own, outside the package: named in a config by ``_target_`` (see
``conf/loss/terms/hidden_mse.yaml`` and :class:`diito.objective.LossTerm` for the protocol)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class HiddenStateMSE:
    """The mean squared difference between a student block's and a teacher block's outputs over the
    batch's real tokens (padding left out): a hidden-state distillation term (as TinyBERT's). Both
    outputs must be equally wide. Diagnostic: their mean cosine similarity."""

    needs = ("teacher", "hidden_states")

    def __init__(self, student_layer: int = -1, teacher_layer: int = -1):
        self.student_layer, self.teacher_layer = student_layer, teacher_layer

    def __call__(self, out) -> tuple[Tensor, dict[str, Tensor]]:
        student = out.student.hidden_states[self.student_layer].float()
        teacher = out.teacher.hidden_states[self.teacher_layer].float()
        if student.shape[-1] != teacher.shape[-1]:
            raise ValueError(
                f"HiddenStateMSE compares outputs of equal width; the student's are {student.shape[-1]} wide, "
                f"the teacher's {teacher.shape[-1]}"
            )
        mask = out.attention_mask.to(student.dtype).unsqueeze(-1)
        mse = ((student - teacher) ** 2 * mask).sum() / (mask.sum() * student.shape[-1])
        with torch.no_grad():
            cosine = (F.cosine_similarity(student, teacher, dim=-1) * mask.squeeze(-1)).sum() / mask.sum()
        return mse, {"cosine": cosine}
