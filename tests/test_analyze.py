"""The alignment map: every cell against interventions computed the independent (three-pass) way,
a student that is its teacher, and the command on a logged run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from transformers import AutoModelForSequenceClassification, BertConfig

from diito import analyze, job
from diito.analyze import alignment_map
from diito.batching import Encoded
from diito.intervention import InterchangeConfig, MappingEntry, Site, reference_counterfactual, sample_interchange
from diito.models import build_student
from tests.conftest import compose_config


def _models(layers: int = 3):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
        initializer_range=0.6,
    )  # 3 classes and large weights: predictions that vary
    teacher = AutoModelForSequenceClassification.from_config(config).eval()
    return teacher, build_student(teacher, [0, 2], copy_classifier=True).eval()


def _data(n: int = 12, seed: int = 0) -> Encoded:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 11, size=n)
    ids = [[2, *rng.integers(5, 60, size=length - 2), 3] for length in lengths]
    return Encoded(ids, None, None, [str(i) for i in range(n)], lengths)


def _batch(data: Encoded) -> dict[str, torch.Tensor]:
    width = int(max(data.lengths))
    ids = torch.tensor([row + [0] * (width - len(row)) for row in data.input_ids])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


@pytest.mark.parametrize("dims", [None, (4, 12)])
def test_every_cell_is_the_agreement_of_independently_computed_interventions(dims):
    teacher, student = _models()
    data, interchange = _data(), InterchangeConfig(interchange_prop=0.5)
    mapping = [MappingEntry((Site(0, dims),), (Site(0, dims), Site(1, dims))), MappingEntry((Site(1, dims),), (Site(2, dims),))]
    m = alignment_map(student, teacher, data, 0, interchange, seed=7, batch_size=64, device=torch.device("cpu"), dims=dims, mapping=mapping)
    assert m.iia.shape == (2, 3) and m.pairs == 12

    batch = _batch(data)  # one batch: the map drew its pairs and positions exactly so
    x = sample_interchange(batch["attention_mask"].sum(1), 0.5, "random", 1, None, True, torch.Generator().manual_seed(7))
    with torch.no_grad():
        predicted = lambda model, layer: reference_counterfactual(model, batch, x, (Site(layer, dims),)).logits.argmax(-1)  # noqa: E731
        teacher_cf = [predicted(teacher, j) for j in range(3)]
        student_cf = [predicted(student, i) for i in range(2)]
        teacher_base = teacher(**batch).logits.argmax(-1)
        joint = [
            (
                reference_counterfactual(student, batch, x, e.student).logits.argmax(-1),
                reference_counterfactual(teacher, batch, x, e.teacher).logits.argmax(-1),
            )
            for e in mapping
        ]
        student_base = student(**batch).logits.argmax(-1)
    expected = np.array([[float((s == t).float().mean()) for t in teacher_cf] for s in student_cf])
    np.testing.assert_allclose(m.iia, expected, atol=1e-9)
    np.testing.assert_allclose(m.efficacy, [float((t != teacher_base).float().mean()) for t in teacher_cf], atol=1e-9)
    assert len(np.unique(expected)) > 1  # the cells really differ: the check compares something
    assert m.agreement == pytest.approx(float((student_base == teacher_base).float().mean()))
    # each mapping entry with its teacher blocks swapped jointly, as training swaps them (not a single-block cell)
    assert list(m.mapped.values()) == pytest.approx([float((s == t).float().mean()) for s, t in joint], abs=1e-6)
    assert list(m.mapped_efficacy.values()) == pytest.approx([float((t != teacher_base).float().mean()) for _, t in joint], abs=1e-6)
    assert list(m.mapped) == [
        f"{mapping[0].student[0]} <-> {mapping[0].teacher[0]}+{mapping[0].teacher[1]}",
        f"{mapping[1].student[0]} <-> {mapping[1].teacher[0]}",
    ]


def test_several_runs_are_one_mean_with_the_spread_of_each_cell():
    teacher, student = _models()
    data, interchange = _data(), InterchangeConfig(interchange_prop=0.5)
    maps = [
        alignment_map(student, teacher, data, 0, interchange, seed=seed, batch_size=64, device=torch.device("cpu")) for seed in (1, 2, 3)
    ]
    mean = analyze.AlignmentMap.mean(maps)
    stacked = np.stack([m.iia for m in maps])
    np.testing.assert_allclose(mean.iia, stacked.mean(0))
    np.testing.assert_allclose(mean.iia_std, stacked.std(0, ddof=1))
    assert mean.runs == 3 and mean.agreement == pytest.approx(np.mean([m.agreement for m in maps]))
    assert mean.iia_std.max() > 0  # the seeds draw other positions: the spread is real
    assert set(mean.to_json()) >= {"iia", "iia_std", "teacher_efficacy", "base_agreement", "mapped_iia", "runs"}


def test_a_student_that_is_its_teacher_agrees_on_the_diagonal():
    teacher, _ = _models()
    twin = build_student(teacher, [0, 1, 2], copy_classifier=True).eval()
    m = alignment_map(
        twin, teacher, _data(40), 0, InterchangeConfig(interchange_prop=0.5), seed=1, batch_size=16, device=torch.device("cpu")
    )
    assert np.diag(m.iia).tolist() == [1.0, 1.0, 1.0]
    assert m.iia.min() < 1.0  # off the diagonal the same swap is another intervention


def test_the_command_maps_logged_runs_and_logs_the_map_to_each(home, tmp_path, capsys):
    for loss, seed in (("kd", 1), ("diito", 1), ("diito", 2)):
        job.run(
            compose_config(["teacher=tiny", "trainer=debug", f"loss={loss}", f"seed={seed}", "tracking.log_model=true"]),
            output_dir=tmp_path / f"{loss}{seed}",
        )
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], filter_string="tags.`diito.role` = 'student'")
    ids = [r.info.run_id for r in runs]
    analyze.main([*ids, "--pairs", "20", "--out", str(tmp_path / "maps"), "--tracking-uri", f"sqlite:///{home}/mlflow.db"])
    assert (tmp_path / "maps" / "iia_map.png").read_bytes()[:4] == b"\x89PNG"
    for run_id in ids:
        logged = {a.path for a in client.list_artifacts(run_id, "alignment")}
        assert logged == {"alignment/iia_map.png", "alignment/iia_map.json"}
        saved = json.loads(open(client.download_artifacts(run_id, "alignment/iia_map.json")).read())
        assert saved == json.loads((tmp_path / "maps" / f"{run_id}.json").read_text())  # each run keeps its own map
        assert np.array(saved["iia"]).shape == (3, 4) and saved["pairs"] == 20  # 3 student blocks x 4 tiny-teacher blocks
        assert all(0.0 <= v <= 1.0 for row in saved["iia"] for v in row)
        assert len(saved["mapped_iia"]) == 3 and 0.0 <= saved["base_agreement"] <= 1.0  # the full mapping, 4 -> 3 blocks
    # two DIITO runs: drawn as their mean, with each cell's spread
    mean = json.loads((tmp_path / "maps" / "diito_mean.json").read_text())
    assert mean["runs"] == 2 and np.array(mean["iia_std"]).shape == (3, 4)
    assert "diito: mean of 2 runs" in capsys.readouterr().out
    # two methods: compared on the seed both ran (one here: too few to test, and said so)
    compared = (tmp_path / "maps" / "comparisons.txt").read_text()
    assert compared.startswith("diito - kd, paired by seed")
    row = next(line for line in compared.splitlines() if line.startswith("base agreement (no swap)"))
    assert row.split()[4] == "1" and row.endswith("too few seeds to test")  # n = 1: seed 1


def _summary(agreement: float, mapped: float) -> analyze.AlignmentMap:
    return analyze.AlignmentMap(
        np.zeros((1, 1)), np.zeros(1), [Site(0)], [Site(0)], 100, agreement, {"0 <-> 0+1": mapped}, {"0 <-> 0+1": 0.1}
    )


def test_two_methods_are_compared_seed_by_seed_as_computed_by_hand():
    kd = {seed: _summary(0.80, 0.70) for seed in (1, 2, 3)}
    diito = {3: _summary(0.83, 0.75), 1: _summary(0.81, 0.72), 2: _summary(0.82, 0.70), 4: _summary(0.99, 0.99)}  # seed 4: KD never ran it
    rows = {r["quantity"]: r for r in analyze.compare_methods({"diito": diito, "kd": kd})}
    agreement, mapped, beyond = (
        rows["base agreement (no swap)"],
        rows["mapped 0 <-> 0+1: IIA"],
        rows["mapped 0 <-> 0+1: IIA - base agreement"],
    )
    # by hand: differences per seed 1, 2, 3; with 2 degrees of freedom the two-sided p of t is 1 - t / sqrt(2 + t^2)
    # agreement [.01, .02, .03]: mean .02, sd .01, t 3.4641, p 0.07418; 95% CI .02 -/+ 4.3027 * .01 / sqrt(3)
    assert (agreement["n"], agreement["wins"], agreement["ties"], agreement["losses"]) == (3, 3, 0, 0)
    assert agreement["mean_diff"] == pytest.approx(0.02) and agreement["p_t"] == pytest.approx(0.07418, abs=1e-5)
    assert (agreement["ci_low"], agreement["ci_high"]) == pytest.approx((-0.004841, 0.044841), abs=1e-6)
    # mapped [.02, 0, .05]: a tie at seed 2; mean .023333, sd .025166, t 1.6059, p 0.24953
    assert (mapped["wins"], mapped["ties"], mapped["losses"]) == (2, 1, 0)
    assert mapped["mean_diff"] == pytest.approx(0.023333, abs=1e-6) and mapped["p_t"] == pytest.approx(0.24953, abs=1e-5)
    # beyond agreement [.01, -.02, .02]: mean .003333, sd .020817, t 0.27735, p 0.80755
    assert (beyond["wins"], beyond["losses"]) == (2, 1) and beyond["p_t"] == pytest.approx(0.80755, abs=1e-5)
    # Holm over the 3 rows: 3 x 0.07418, then max(that, 2 x 0.24953), then max(that, 0.80755)
    assert [agreement["p_holm"], mapped["p_holm"], beyond["p_holm"]] == pytest.approx([0.22254, 0.49906, 0.80755], abs=1e-4)
    assert all(r["verdict"] == "not supported at 0.05 after correction" for r in rows.values())
    assert analyze.format_comparisons(list(rows.values())).startswith("diito - kd, paired by seed")
    # no seed in common: nothing is compared, and the file says so
    assert analyze.compare_methods({"diito": {4: diito[4]}, "kd": kd}) == []
    assert analyze.format_comparisons([]) == "no seed was run by both methods: nothing to compare"
    # two runs of one method and seed: which would be paired is ambiguous, so nothing is
    assert analyze.pair_by_seed([("kd", 1, kd[1]), ("diito", 1, diito[1])]) == {"kd": {1: kd[1]}, "diito": {1: diito[1]}}
    with pytest.raises(ValueError, match="two kd runs of seed 1"):
        analyze.pair_by_seed([("kd", 1, kd[1]), ("diito", 1, diito[1]), ("kd", 1, kd[2])])


def test_a_run_without_a_logged_student_is_refused_by_name(home, tmp_path):
    job.run(compose_config(["teacher=tiny", "trainer=debug", "tracking.log_model=false"]), output_dir=tmp_path / "out")
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()], filter_string="tags.`diito.role` = 'student'")
    with pytest.raises(LookupError, match=f"run {run.info.run_id} has no logged student"):
        analyze.main([run.info.run_id, "--out", str(tmp_path / "maps"), "--tracking-uri", f"sqlite:///{home}/mlflow.db"])
