"""The intervention probe: the same fixed interventions at every evaluation, the teacher's runs computed once."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

from diito import families
from diito.batching import Encoded, Prepared, make_loader
from diito.evaluation import intervention_probe
from diito.intervention import InterchangeConfig, MappingConfig, Shape, build_mapping
from diito.models import build_student
from diito.objective import DistillationObjective, LossConfig, intervention_diagnostics
from diito.tasks import TaskSpec


def _probe_setting(pairs: int = 20):
    config = families.tiny_config("bert", 100, {"pad": 0, "cls": 1, "sep": 2}, hidden=32, layers=4, heads=4)
    config.num_labels = 2
    torch.manual_seed(0)
    teacher = families.prepare(AutoModelForSequenceClassification.from_config(config)).eval()
    student = build_student(teacher, [0, 1], copy_classifier=True)
    mapping = build_mapping(MappingConfig(name="full"), Shape.of(teacher.config), Shape.of(student.config))
    objective = DistillationObjective(LossConfig(gamma=1.0), [], mapping, interchange=InterchangeConfig(eval_pairs=pairs))
    rng = np.random.default_rng(0)
    ids = [[1, *rng.integers(3, 100, size=int(n)).tolist(), 2] for n in rng.integers(2, 12, size=30)]
    encoded = Encoded(
        ids, [[0] * len(x) for x in ids], np.zeros(30, dtype=np.int64), [str(i) for i in range(30)], np.array([len(x) for x in ids])
    )
    spec = TaskSpec(
        name="t", source="rotten_tomatoes", text_fields=["text"], label_names=["a", "b"], metrics=["accuracy"], main_metric="accuracy"
    )
    data = Prepared(spec, {"validation": encoded}, "x", 0, ["a", "b"], [])
    return teacher, student, objective, data, encoded.head(pairs)


def _measured_the_long_way(objective, student, teacher, subset: Encoded, batch_size: int, seed: int) -> dict[str, float]:
    """Both models' base and counterfactual runs, every time, as the objective computes them in training."""
    subset = Encoded(subset.input_ids, subset.token_type_ids, None, subset.ids, subset.lengths)
    student.eval()
    generator, sums, count = torch.Generator().manual_seed(seed), {}, 0
    with torch.no_grad():
        for batch in make_loader(subset, batch_size, shuffle=False, seed=0, length_grouped=False, pad_token_id=0):
            out = objective.forward(student, teacher, batch)
            objective.intervene(out, student, teacher, generator)
            for name, value in intervention_diagnostics(out.student_cf.logits, out.teacher_cf.logits, out.teacher.logits).items():
                sums[name] = sums.get(name, 0.0) + float(value) * len(batch["input_ids"])
            count += len(batch["input_ids"])
    return {f"validation/{name}": value / count for name, value in sums.items()}


def test_the_probe_runs_the_teacher_once_and_measures_what_both_models_runs_measure():
    teacher, student, objective, data, subset = _probe_setting()
    teacher_runs = []
    teacher.register_forward_hook(lambda *_: teacher_runs.append(1))
    probe = intervention_probe(objective, student, teacher, data, batch_size=8, seed=5, device=torch.device("cpu"))
    first = probe()
    assert len(teacher_runs) == 6  # 3 batches: a base and a counterfactual run each
    assert first == _measured_the_long_way(objective, student, teacher, subset, 8, 5)
    with torch.no_grad():  # the student learns; the teacher is frozen
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    runs = len(teacher_runs)
    second = probe()
    assert len(teacher_runs) == runs  # the teacher's runs are kept, not repeated
    assert second == _measured_the_long_way(objective, student, teacher, subset, 8, 5) != first
