import math
from types import SimpleNamespace

import pytest
import torch

from diito.objective import (
    DistillationObjective,
    LossConfig,
    Outputs,
    default_patience_layers,
    kd_loss,
    patience_loss,
    task_loss,
)


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _softmax(z):
    e = [math.exp(x) for x in z]
    return [x / sum(e) for x in e]


@pytest.mark.parametrize("T", [1.0, 2.0, 20.0])
def test_kd_is_batchmean_kl_times_T_squared(T):
    s = [[0.0, 0.0], [1.0, -1.0]]
    t = [[math.log(3.0), 0.0], [0.0, 2.0]]
    expected = sum(_kl(_softmax([x / T for x in ti]), _softmax([x / T for x in si])) for si, ti in zip(s, t)) / 2 * T * T
    got = kd_loss(torch.tensor(s), torch.tensor(t), T)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # the original code's "mean" reduction divides by the number of classes as well
    assert kd_loss(torch.tensor(s), torch.tensor(t), T, "mean").item() == pytest.approx(expected / 2, rel=1e-5)


def test_kd_by_hand_value():
    # p_teacher = (0.75, 0.25), p_student = (0.5, 0.5): KL = 0.75 ln 1.5 + 0.25 ln 0.5
    got = kd_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]), 1.0)
    assert got.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-6)


def test_regression_uses_mse():
    s, t, y = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [4.0]]), torch.tensor([1.5, 2.0])
    assert kd_loss(s, t, 5.0).item() == pytest.approx((1 + 4) / 2)
    assert task_loss(s, y).item() == pytest.approx(0.25 / 2)


def test_cross_entropy_by_hand():
    got = task_loss(torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([1]))
    assert got.item() == pytest.approx(-math.log(0.25))


def test_patience_loss_normalised_and_not():
    s, t = [torch.tensor([[3.0, 4.0]])], [torch.tensor([[6.0, 8.0]])]
    assert patience_loss(s, t, normalize=True).item() == pytest.approx(0.0, abs=1e-7)
    assert patience_loss(s, t, normalize=False).item() == pytest.approx((9 + 16) / 2)


def test_default_patience_layers_match_the_original():
    assert default_patience_layers(12, 6) == [1, 3, 5, 7, 9]
    assert default_patience_layers(6, 3) == [1, 3]


def _outputs(logits, hidden):
    return SimpleNamespace(logits=torch.tensor(logits), hidden_states=hidden)


def _base_loss(objective, student, teacher, labels):
    terms, _ = objective.terms(Outputs(student, teacher, labels, torch.ones(len(labels), 1)))
    return objective.total(terms), terms


def test_weighted_sum_and_terms_switched_off():
    s = _outputs([[0.0, 0.0]], None)
    t = _outputs([[math.log(3.0), 0.0]], None)
    y = torch.tensor([1])
    kd, ce = 0.75 * math.log(1.5) + 0.25 * math.log(0.5), -math.log(0.5)
    total, terms = _base_loss(DistillationObjective(LossConfig(alpha=0.7, T=1.0), []), s, t, y)
    assert set(terms) == {"kd", "ce"}
    assert total.item() == pytest.approx(0.7 * kd + 0.3 * ce, rel=1e-6)
    total, terms = _base_loss(DistillationObjective(LossConfig(alpha=1.0, T=1.0), []), s, t, y)
    assert set(terms) == {"kd"} and total.item() == pytest.approx(kd, rel=1e-6)
    total, terms = _base_loss(DistillationObjective(LossConfig(alpha=0.0, T=1.0), []), s, t, y)
    assert set(terms) == {"ce"} and total.item() == pytest.approx(ce, rel=1e-6)


def test_patience_term_uses_the_mapped_teacher_layers():
    # student: 3 blocks -> hidden_states has 4 entries; blocks 0 and 1 are matched
    student_hidden = [torch.zeros(1, 2, 2)] + [torch.tensor([[[1.0, 0.0], [9.0, 9.0]]])] * 3
    teacher_hidden = [torch.zeros(1, 2, 2)] + [torch.tensor([[[float(i), 0.0], [0.0, 0.0]]]) for i in range(6)]
    s = _outputs([[0.0, 0.0]], student_hidden)
    t = _outputs([[0.0, 0.0]], teacher_hidden)
    objective = DistillationObjective(LossConfig(alpha=1.0, beta=2.0, normalize_patience=False), [1, 3])
    total, terms = _base_loss(objective, s, t, torch.tensor([0]))
    # block outputs 1 and 3 of the teacher have [CLS] = (1, 0) and (3, 0)
    assert terms["patience"].item() == pytest.approx((0.0 + 4.0 / 2) / 2)
    assert total.item() == pytest.approx(2.0 * terms["patience"].item())
