"""Loss terms as one table (built-in and your own, from ``loss.terms``), the optimizer and schedule from
``optim._target_``, and settings that cannot act refused instead of ignored."""

from __future__ import annotations

import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from mlflow import MlflowClient

from diito.config import ConfigError, validate
from diito.objective import BUILTIN_TERMS, DistillationObjective, LossConfig, Outputs, TermSpec
from tests.conftest import ROOT, compose_config, run_cli

TINY = ["teacher=tiny"]
SMOKE = ["teacher=tiny", "trainer=debug"]


class ConstantTerm:
    """A term of the protocol: its ``value``, and a diagnostic."""

    needs = ()

    def __init__(self, value: float = 1.0):
        self.value = value

    def __call__(self, out):
        loss = out.student.logits.sum() * 0 + self.value
        return loss, {"twice": loss * 2}


class NoNeeds:
    def __call__(self, out):
        return out.student.logits.sum()


def test_a_term_of_your_own_is_an_entry_of_the_table_beside_the_built_ins():
    spec = TermSpec.model_validate({"_target_": "tests.test_terms.ConstantTerm", "weight": 0.5, "value": 3.0})
    config = LossConfig(alpha=1.0, T=1.0, terms={"const": spec})
    assert list(config.weights) == [*BUILTIN_TERMS, "const"] and config.kind == "kd+const"
    objective = DistillationObjective(config, [])
    student = SimpleNamespace(logits=torch.tensor([[0.0, 0.0]], requires_grad=True), hidden_states=None)
    teacher = SimpleNamespace(logits=torch.tensor([[math.log(3.0), 0.0]]), hidden_states=None)
    terms, diagnostics = objective.terms(Outputs(student, teacher, torch.tensor([1]), torch.ones(1, 1)))
    assert set(terms) == {"kd", "const"} and diagnostics == {"const/twice": pytest.approx(torch.tensor(6.0))}
    kd = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert objective.total(terms).item() == pytest.approx(kd + 0.5 * 3.0, rel=1e-6)
    off = LossConfig(alpha=1.0, terms={"const": spec.model_copy(update={"weight": 0.0})})
    assert [t.name for t in DistillationObjective(off, []).table] == ["kd"] and off.kind == "kd"  # weight 0: not computed, not in the tag


def test_what_the_terms_need_decides_what_runs():
    hidden = LossConfig(terms={"h": TermSpec.model_validate({"_target_": "examples.terms.HiddenStateMSE", "weight": 1.0})})
    assert hidden.needs == {"teacher", "hidden_states"} and not hidden.intervenes
    assert LossConfig(gamma=1.0).intervenes and LossConfig(alpha=0.0).needs == frozenset()  # CE alone: no teacher run


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["+loss.terms.x._target_=examples.terms.Nope", "+loss.terms.x.weight=1"],
            "^loss.terms.x._target_: cannot import 'examples.terms.Nope': module 'examples.terms' has no 'Nope'$",
        ),
        (
            ["+loss.terms.x._target_=no_such_package.Term", "+loss.terms.x.weight=1"],
            "^loss.terms.x._target_: cannot import 'no_such_package.Term'",
        ),
        (
            ["+loss.terms.x._target_=tests.test_terms.NoNeeds", "+loss.terms.x.weight=1"],
            r"^loss.terms.x._target_: tests.test_terms.NoNeeds.needs is None",
        ),
        (
            ["+loss.terms.x._target_=torch.nn.functional.mse_loss", "+loss.terms.x.weight=1"],
            "^loss.terms.x._target_: .* is not a loss term",
        ),
        (
            ["+loss/terms=hidden_mse", "+loss.terms.hidden_mse.layer=2"],
            r"^loss.terms.hidden_mse.layer: examples.terms.HiddenStateMSE does not accept it \(it takes student_layer, teacher_layer\)$",
        ),
        (
            ["+loss.terms.kd._target_=tests.test_terms.ConstantTerm", "+loss.terms.kd.weight=1"],
            "^loss.terms.kd: the name of a built-in term",
        ),
        (["+loss.terms.x._target_=tests.test_terms.ConstantTerm"], "^loss.terms.x.weight: Field required"),
        (
            ["optim._target_=torch.optim.Nadamx"],
            "^optim._target_: cannot import 'torch.optim.Nadamx': module 'torch.optim' has no 'Nadamx'$",
        ),
        (["optim._target_=torch.nn.Linear"], r"^optim._target_: torch.nn.Linear is not an optimizer"),
        (["optim._target_=torch.optim.SGD"], r"^optim.betas: torch.optim.SGD does not accept it \(it takes lr, momentum"),
        (["+optim.momentun=0.9"], "^optim.momentun: torch.optim.AdamW does not accept it"),
        (
            ["optim.schedule._target_=torch.optim.lr_scheduler.StepLR"],
            "^optim.schedule.num_warmup_steps: torch.optim.lr_scheduler.StepLR does not accept it",
        ),
        (
            ["optim.schedule._target_=torch.optim.SGD"],
            "^optim.schedule._target_: torch.optim.SGD did not return a learning-rate scheduler|^optim.schedule",
        ),
        (["+teacher.recipe.momentum=0.9"], "^teacher.recipe.momentum: torch.optim.AdamW does not accept it"),
    ],
)
def test_a_wrong_target_is_refused_naming_the_key(home, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config([*TINY, *overrides]), overrides=[])


def test_a_wrong_target_stops_the_command_in_one_line_before_compute(home):
    result = run_cli([*SMOKE, "+loss/terms=hidden_mse", "loss.terms.hidden_mse._target_=examples.terms.HiddenMSE"], home)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: loss.terms.hidden_mse._target_: cannot import 'examples.terms.HiddenMSE': module 'examples.terms' has no 'HiddenMSE'"
    ]
    assert not (home / "mlflow.db").exists() and not (home / ".cache").exists()


def test_the_target_and_its_arguments_are_part_of_the_job_identity(home):
    base = validate(compose_config([*TINY, "+loss/terms=hidden_mse"]), overrides=[])
    other_argument = validate(compose_config([*TINY, "+loss/terms=hidden_mse", "loss.terms.hidden_mse.teacher_layer=-2"]), overrides=[])
    other_optimizer = validate(compose_config([*TINY, "+loss/terms=hidden_mse", "optim=sgd"]), overrides=[])
    assert len({base.hash, other_argument.hash, other_optimizer.hash, validate(compose_config(TINY), overrides=[]).hash}) == 4


def test_the_default_optimizer_is_todays_adamw_with_its_schedule():
    from diito.trainer import OptimConfig, build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optim = OptimConfig.model_validate({"lr": 1e-3, "betas": [0.9, 0.99], "eps": 1e-6, "warmup_ratio": 0.25})
    optimizer, scheduler = build_optimizer(model, optim, 8, torch.device("cpu"))
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"] and optimizer.defaults["eps"] == 1e-6
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]  # no decay on biases and LayerNorm weights
    lrs = []
    for _ in range(8):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3, 1e-3 * 5 / 6, 1e-3 * 4 / 6, 1e-3 * 3 / 6, 1e-3 * 2 / 6, 1e-3 / 6])


# -- settings that cannot act -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        ["loss=kd"],
        ["loss=kd", "trainer=debug"],
        ["loss.gamma=0"],
        ["loss=kd", "+loss/terms=hidden_mse"],
        ["sweep=seeds", "loss=kd"],
    ],
)
def test_defaults_that_were_not_chosen_do_not_trip_the_refusal(home, overrides):
    cfg = compose_config([*TINY, *overrides])
    job = validate(cfg, overrides=[o for o in overrides if not o.startswith(("experiment", "sweep"))])
    assert job.mapping is None and {"intervention.interchange_prop", "mapping.name"} <= job.unused_settings


@pytest.mark.parametrize(
    "overrides, given, message",
    [
        (["loss=kd", "mapping=late"], None, "^mapping=late: cannot act: nothing intervenes"),
        (["loss=kd", "mapping=full"], None, "^mapping=full: cannot act"),  # the default, but chosen
        (["loss=kd", "intervention.interchange_prop=0.3"], None, "^intervention.interchange_prop=0.3: cannot act"),
        (["loss.gamma=0", "intervention.pairing=permutation"], None, "^intervention.pairing=permutation: cannot act"),
        (["loss=kd", "intervention.eval_pairs=16"], [], "^intervention.eval_pairs: 16 cannot act"),  # set by a preset, not the command line
    ],
)
def test_settings_that_cannot_act_are_refused(home, overrides, given, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config([*TINY, *overrides]), overrides=overrides if given is None else given)


def test_a_chosen_mapping_with_kd_stops_the_command_in_one_line(home):
    for args in (["loss=kd", "mapping=late"], ["loss=kd", "intervention.interchange_prop=0.3"]):  # 0.3: the default value, but given
        result = run_cli([*SMOKE, *args], home)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            f"error: {args[1]}: cannot act: nothing intervenes (loss.gamma and loss.cosine are 0 and no loss term needs the counterfactual "
            "pair); leave it out, or choose loss=diito"
        ]
    assert not (home / "mlflow.db").exists()


@pytest.mark.parametrize("args", [["loss.interchange_prop=0.5"], ["-m", "loss.separate_passes=true,false"], ["+loss.pairing=permutation"]])
def test_the_old_spellings_name_the_new_one(home, args):
    result = run_cli([*SMOKE, *args], home)
    key = args[-1].lstrip("+").split("=")[0]
    new = key.replace("loss.", "intervention.")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {key}: moved to {new} (the interchange settings are the intervention group's now); write {new}=..."
    ]
    with pytest.raises(ConfigError, match=f"^{key}: moved to {new}"):  # in a preset of your own, too
        validate(compose_config([*TINY, "+" + key + "=" + args[-1].split("=")[1].split(",")[0]]), overrides=[])


# -- from the command line into MLflow and the report -----------------------------------------------------
def test_a_term_and_an_optimizer_of_your_own_swept_into_mlflow_and_the_report(home):
    result = run_cli(
        ["-m", *SMOKE, "+loss/terms=hidden_mse", "loss.terms.hidden_mse.weight=0.1,0.3", "optim=sgd", "tracking.experiment=own"], home
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    experiment = client.get_experiment_by_name("own")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`diito.role` = 'student'")
    assert len(runs) == 2
    for run in runs:
        assert run.data.tags["loss"] == "diito+hidden_mse"
        assert {"train/hidden_mse", "train/hidden_mse/cosine", "train/diito", "train/kd"} <= set(run.data.metrics)
        assert run.data.params["loss.terms.hidden_mse._target_"] == "examples.terms.HiddenStateMSE"
        assert run.data.params["optim._target_"] == "torch.optim.SGD" and run.data.params["optim.momentum"] == "0.9"
        assert "optim.betas" not in run.data.params
    assert sorted(r.data.params["loss.terms.hidden_mse.weight"] for r in runs) == ["0.1", "0.3"]
    report = subprocess.run(
        [sys.executable, "-m", "diito.report", "own", "--out", str(home / "report"), "--tracking-uri", f"sqlite:///{home}/mlflow.db"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    assert "loss.terms.hidden_mse.weight" in report.stdout
