"""The loop's contracts on a toy regression model: step counts, accumulation, keep-best, early stopping."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diito.batching import Encoded, make_loader
from diito.trainer import NonFiniteLoss, OptimConfig, Trainer, TrainerConfig, Validation, autocast_dtype, param_groups

OPTIM = OptimConfig(lr=0.1, weight_decay=0.01, warmup_ratio=0.0)
CPU = torch.device("cpu")
# Tests that watch gradients wrap optimizer.step, which the scheduler notices (harmlessly).
pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")


def toy_loader(n: int = 16, batch_size: int = 4):
    rng = np.random.default_rng(0)
    ids = [list(rng.integers(1, 9, size=int(k))) for k in rng.integers(2, 6, size=n)]
    labels = np.array([sum(x) / len(x) for x in ids], dtype=np.float32)
    encoded = Encoded(ids, None, labels, [str(i) for i in range(n)], np.array([len(x) for x in ids]))
    return make_loader(encoded, batch_size, shuffle=True, seed=0, length_grouped=False, pad_token_id=0)


def make_trainer(tmp_path, scores: list[float], **config):
    model = torch.nn.Linear(1, 1)
    snapshots: list[torch.Tensor] = []

    def loss_fn(batch):
        x = (batch["input_ids"].float().sum(1) / batch["attention_mask"].sum(1)).unsqueeze(1)
        loss = torch.nn.functional.mse_loss(model(x).squeeze(1), batch["labels"])
        return loss, {"mse": loss}

    def evaluate():
        snapshots.append(model.weight.detach().clone())
        return {"validation/score": scores[len(snapshots) - 1]}

    logged: list[tuple[dict, int]] = []
    trainer = Trainer(
        model,
        loss_fn,
        toy_loader(),
        TrainerConfig(progress=False, device="cpu", **config),
        OPTIM,
        tmp_path / "ckpt",
        Validation(evaluate, "validation/score"),
        log=lambda metrics, step: logged.append((metrics, step)),
        name="train",
        device=CPU,
    )
    return trainer, model, snapshots, logged


def test_epochs_steps_and_logging(tmp_path):
    trainer, _, snapshots, logged = make_trainer(tmp_path, [0.1, 0.2, 0.3], epochs=3, log_every=2)
    state = trainer.fit()
    assert state.step == 12  # 16 examples / batch 4 = 4 steps an epoch
    assert len(snapshots) == 3  # one evaluation per epoch end
    train_steps = [step for metrics, step in logged if "train/mse" in metrics]
    assert train_steps == [2, 4, 6, 8, 10, 12]


def test_gradient_accumulation_and_max_steps(tmp_path):
    trainer, _, _, _ = make_trainer(tmp_path, [0.0] * 10, epochs=2, grad_accum=2)
    assert trainer.total_steps == 4 and trainer.fit().step == 4
    trainer, _, snapshots, _ = make_trainer(tmp_path / "b", [0.0] * 10, epochs=5, max_steps=3)
    assert trainer.total_steps == 3 and trainer.fit().step == 3 and len(snapshots) == 1


def test_min_steps_lengthens_short_runs_only(tmp_path):
    trainer, _, snapshots, _ = make_trainer(tmp_path, [0.0] * 10, epochs=2, min_steps=10)
    assert trainer.total_steps == 10 and trainer.fit().step == 10  # 2 epochs are 8 steps: at least 10
    assert len(snapshots) == 2  # the evaluations are spread with the steps: 2 epochs' worth, not 3 epoch ends
    trainer, _, _, _ = make_trainer(tmp_path / "b", [0.0] * 10, epochs=3, min_steps=10)
    assert trainer.total_steps == 12  # 3 epochs are already more
    trainer, _, _, _ = make_trainer(tmp_path / "c", [0.0] * 10, epochs=3, min_steps=10, max_steps=5)
    assert trainer.total_steps == 5  # max_steps decides alone


def _evaluated_steps(logged: list[tuple[dict, int]]) -> list[int]:
    return [step for metrics, step in logged if "validation/score" in metrics]


def test_a_fit_stretched_by_min_steps_evaluates_and_checkpoints_epochs_times_not_at_every_epoch_end(tmp_path):
    # 4 steps an epoch; min_steps=40 makes 10 epochs of 2 epochs' worth: evaluated at steps 20 and 40
    trainer, _, _, logged = make_trainer(tmp_path, [0.0] * 20, epochs=2, min_steps=40, save_every=None)
    assert trainer.eval_spacing == 20 and trainer.fit().step == 40
    assert _evaluated_steps(logged) == [20, 40]
    assert torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)["state"]["step"] == 20  # not one per epoch end
    # eval_every still adds its evaluations; a fit that is not stretched still evaluates at its epoch ends
    trainer, _, _, logged = make_trainer(tmp_path / "b", [0.0] * 20, epochs=2, min_steps=40, eval_every=15)
    trainer.fit()
    assert _evaluated_steps(logged) == [15, 20, 30, 40]
    for config in ({"epochs": 3}, {"epochs": 2, "min_steps": 40, "max_steps": 12}):
        trainer, _, _, logged = make_trainer(tmp_path / str(config), [0.0] * 20, **config)
        trainer.fit()
        assert trainer.eval_spacing is None and _evaluated_steps(logged) == [4, 8, 12]


def test_a_stretched_fit_resumed_after_an_evaluation_at_an_epoch_end_is_the_uninterrupted_fit(tmp_path):
    def fit(folder, crash_at_step: int | None = None):
        model = torch.nn.Linear(1, 1)
        torch.nn.init.constant_(model.weight, 0.5)
        torch.nn.init.constant_(model.bias, 0.0)
        calls, evaluations = [0], []

        def loss_fn(batch):
            calls[0] += 1
            if calls[0] == crash_at_step:
                raise KeyboardInterrupt
            x = (batch["input_ids"].float().sum(1) / batch["attention_mask"].sum(1)).unsqueeze(1)
            return torch.nn.functional.mse_loss(model(x).squeeze(1), batch["labels"]), {}

        def score():
            evaluations.append(model.weight.item())
            return {"m": -abs(model.weight.item())}

        trainer = Trainer(
            model,
            loss_fn,
            toy_loader(),
            TrainerConfig(progress=False, device="cpu", epochs=2, min_steps=16, save_every=None),
            OPTIM,
            folder,
            Validation(score, "m"),
            log=lambda *a: None,
            name="train",
            device=CPU,
        )
        trainer.fit()
        return model, evaluations

    whole, evaluated = fit(tmp_path / "a")  # evaluations at steps 8 (an epoch end) and 16
    assert len(evaluated) == 2
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "b", crash_at_step=10)  # after the checkpoint of step 8
    resumed, evaluated_after = fit(tmp_path / "b")
    assert evaluated_after == evaluated[1:]  # step 8's evaluation is not repeated
    assert torch.equal(resumed.weight, whole.weight)


def test_the_fit_logs_where_its_time_went(tmp_path):
    trainer, _, _, logged = make_trainer(tmp_path, [0.0] * 10, epochs=2, save_every=2)
    state = trainer.fit()
    (parts,) = [metrics for metrics, _ in logged if "time/steps_seconds" in metrics]
    assert set(parts) == {"time/steps_seconds", "time/evaluation_seconds", "time/checkpoints_seconds"}
    assert all(value > 0 for value in parts.values()) and sum(parts.values()) <= state.train_seconds


def test_early_stopping_and_keep_best(tmp_path):
    trainer, model, snapshots, _ = make_trainer(
        tmp_path, [0.5, 0.6, 0.55, 0.54, 0.9], epochs=10, eval_every=1, early_stopping=2, keep_best=True
    )
    state = trainer.fit()
    assert state.stopped_early and state.step == 4 and state.best_step == 2
    assert torch.equal(model.weight, snapshots[1])  # the weights of the best evaluation
    assert not torch.equal(snapshots[1], snapshots[3])


def test_no_weight_decay_on_biases_and_layernorm():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    decay, no_decay = param_groups(model, 0.01)
    assert [p.shape for p in decay["params"]] == [(3, 3)] and decay["weight_decay"] == 0.01
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_precision_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert autocast_dtype("fp32", cpu) is None and autocast_dtype("bf16", cpu) == torch.bfloat16
    monkeypatch.setattr("diito.trainer.cpu_has_native_bf16", lambda: True)
    assert autocast_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr("diito.trainer.cpu_has_native_bf16", lambda: False)
    assert autocast_dtype("auto", cpu) is None


def test_bf16_training_really_runs_in_bf16_on_cpu(tmp_path):
    dtypes = []
    model = torch.nn.Linear(1, 1)

    def loss_fn(batch):
        out = model(batch["labels"].unsqueeze(1))
        dtypes.append(out.dtype)  # the autocast region's matmul output
        return out.float().pow(2).mean(), {}

    trainer = Trainer(
        model,
        loss_fn,
        toy_loader(),
        TrainerConfig(progress=False, device="cpu", epochs=1, precision="bf16"),
        OPTIM,
        tmp_path / "c",
        Validation(lambda: {"m": 0.0}, "m"),
        log=lambda *a: None,
        name="train",
        device=CPU,
    )
    assert trainer.fit().step == 4 and set(dtypes) == {torch.bfloat16}
    assert model.weight.dtype == torch.float32  # the weights stay fp32


def test_dropout_is_back_on_for_training_after_every_evaluation(tmp_path):
    events = []
    model = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Dropout(0.5))

    def loss_fn(batch):
        events.append(("train", model.training))
        return model(batch["labels"].unsqueeze(1)).pow(2).mean(), {}

    def evaluate():  # like diito.evaluation.predict, evaluation switches dropout off and leaves it off
        model.eval()
        events.append(("eval", model.training))
        return {"m": 0.0}

    trainer = Trainer(
        model,
        loss_fn,
        toy_loader(),
        TrainerConfig(progress=False, epochs=3, device="cpu", eval_every=1),
        OPTIM,
        tmp_path / "c",
        Validation(evaluate, "m"),
        log=lambda *a: None,
        name="train",
        device=CPU,
    )
    trainer.fit()
    after_eval = [events[i + 1] for i, (phase, _) in enumerate(events[:-1]) if phase == "eval" and events[i + 1][0] == "train"]
    assert len(after_eval) >= 3 and all(training for _, training in after_eval)
    assert all(training for phase, training in events if phase == "train")


def _linear_fit(tmp_path, batch_size: int, **config):
    model = torch.nn.Linear(1, 1)
    torch.nn.init.constant_(model.weight, 0.5)
    torch.nn.init.constant_(model.bias, 0.0)

    def loss_fn(batch):
        x = (batch["input_ids"].float().sum(1) / batch["attention_mask"].sum(1)).unsqueeze(1)
        loss = torch.nn.functional.mse_loss(model(x).squeeze(1), batch["labels"])
        return loss, {}

    loader = toy_loader(batch_size=batch_size)
    loader.batch_sampler.shuffle = False  # the same examples in the same order for both
    logged = []
    trainer = Trainer(
        model,
        loss_fn,
        loader,
        TrainerConfig(progress=False, device="cpu", precision="fp32", log_every=1, **config),
        OPTIM,
        tmp_path,
        Validation(lambda: {"m": 0.0}, "m"),
        log=lambda m, s: logged.append((m, s)),
        name="train",
        device=CPU,
    )
    return trainer, model, logged


def _gradients_at_each_step(trainer, model) -> list[list[torch.Tensor]]:
    seen, step = [], trainer.optimizer.step

    def step_and_record(*args, **kwargs):
        seen.append([p.grad.clone() for p in model.parameters()])
        return step(*args, **kwargs)

    trainer.optimizer.step = step_and_record
    return seen


def test_two_accumulated_batches_of_4_equal_one_batch_of_8(tmp_path):
    trainer_a, accumulated, _ = _linear_fit(tmp_path / "a", 4, epochs=1, grad_accum=2, max_grad_norm=None)
    trainer_b, whole, _ = _linear_fit(tmp_path / "b", 8, epochs=1, max_grad_norm=None)
    grads_a, grads_b = _gradients_at_each_step(trainer_a, accumulated), _gradients_at_each_step(trainer_b, whole)
    assert trainer_a.fit().step == trainer_b.fit().step == 2
    for a, b in zip(grads_a, grads_b, strict=True):
        for ga, gb in zip(a, b, strict=True):
            torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-6)  # the same gradient, summed in another order
    torch.testing.assert_close(accumulated.weight, whole.weight, atol=1e-6, rtol=0)


def test_gradients_are_clipped_to_max_grad_norm(tmp_path):
    trainer, model, _ = _linear_fit(tmp_path, 4, epochs=2, max_grad_norm=0.05)
    grads = _gradients_at_each_step(trainer, model)
    trainer.fit()
    norms = [float(torch.nn.utils.get_total_norm(step)) for step in grads]
    assert len(norms) == 8 and max(norms) <= 0.05 + 1e-6
    assert min(norms) > 0.049  # every step's gradient was larger, so each one was clipped


def test_logged_learning_rates_follow_warm_up_and_linear_decay(tmp_path):
    model, loss_fn = torch.nn.Linear(1, 1), lambda batch: (model(batch["labels"].unsqueeze(1)).pow(2).mean(), {})
    logged = []
    optim = OptimConfig(lr=0.1, warmup_ratio=0.25)  # 8 steps: 2 of warm-up, then down to 0
    trainer = Trainer(
        model,
        loss_fn,
        toy_loader(),
        TrainerConfig(progress=False, device="cpu", epochs=2, log_every=1),
        optim,
        tmp_path,
        Validation(lambda: {"m": 0.0}, "m"),
        log=lambda m, s: logged.append((m, s)),
        name="train",
        device=CPU,
    )
    trainer.fit()
    rates = [m["train/lr"] for m, _ in logged if "train/lr" in m]
    assert rates == pytest.approx([0.1 * f for f in (1 / 2, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0)])


def nan_at(step_of_nan: int, calls: list[int]):
    """A loss that turns NaN on the ``step_of_nan``-th batch, naming it ``kd``."""
    model = torch.nn.Linear(1, 1)

    def loss_fn(batch):
        calls.append(1)
        x = (batch["input_ids"].float().sum(1) / batch["attention_mask"].sum(1)).unsqueeze(1)
        loss = torch.nn.functional.mse_loss(model(x).squeeze(1), batch["labels"])
        if len(calls) == step_of_nan:
            loss = loss * float("nan")
        return loss, {"kd": loss}

    return model, loss_fn


def test_a_non_finite_loss_stops_training_naming_the_step_and_the_term(tmp_path):
    model, loss_fn = nan_at(3, [])
    trainer = Trainer(
        model,
        loss_fn,
        toy_loader(),
        TrainerConfig(progress=False, device="cpu", epochs=3, save_every=1),
        OPTIM,
        tmp_path / "c",
        Validation(lambda: {"m": 0.0}, "m"),
        log=lambda *a: None,
        name="student",
        device=CPU,
    )
    with pytest.raises(NonFiniteLoss, match=r"student step 3: non-finite kd=nan; training stopped \(the last good checkpoint is .*last.pt"):
        trainer.fit()
    kept = torch.load(tmp_path / "c" / "last.pt", weights_only=True)
    assert kept["state"]["step"] == 2 and all(torch.isfinite(p).all() for p in kept["model"].values())


def test_skip_nonfinite_skips_that_many_batches(tmp_path, caplog):
    logged = []
    model, loss_fn = nan_at(3, [])
    trainer = Trainer(
        model,
        loss_fn,
        toy_loader(),
        TrainerConfig(progress=False, device="cpu", epochs=1, skip_nonfinite=1, log_every=1),
        OPTIM,
        tmp_path / "c",
        Validation(lambda: {"m": 0.0}, "m"),
        log=lambda m, s: logged.append((m, s)),
        name="train",
        device=CPU,
    )
    state = trainer.fit()
    assert state.step == 4 and state.skipped_nonfinite == 1 and state.epoch == 1  # 5 batches for 4 steps: one skipped
    assert "step 3: non-finite kd=nan; batch skipped (1 of trainer.skip_nonfinite=1)" in caplog.text
    assert all(np.isfinite(m["train/kd"]) for m, _ in logged if "train/kd" in m)  # the skipped batch is not averaged in
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_nan_first_evaluation_does_not_freeze_keep_best(tmp_path):
    trainer, model, snapshots, _ = make_trainer(tmp_path, [float("nan"), 0.4, 0.7, 0.5], epochs=4, keep_best=True)
    state = trainer.fit()
    assert state.best_step == 12 and state.best_metric == 0.7
    assert torch.equal(model.weight, snapshots[2])


def test_training_time_survives_a_resume_and_leaves_out_the_stop(tmp_path, monkeypatch):
    clock = [0.0]  # a fake clock: each evaluation takes 10 s, the stop between the two processes 1,000 s
    monkeypatch.setattr("diito.trainer.time.perf_counter", lambda: clock[0])

    def evaluate(crash_at: int | None, calls: list[int]):
        def score():
            calls.append(1)
            clock[0] += 10.0
            if len(calls) == crash_at:
                raise KeyboardInterrupt  # the process dies during its second evaluation, after one checkpoint
            return {"m": 0.0}

        return score

    def trainer(crash_at):
        model = torch.nn.Linear(1, 1)

        def loss_fn(batch):
            loss = model(batch["input_ids"].float().mean(1, keepdim=True)).pow(2).mean()
            return loss, {"mse": loss}

        return Trainer(
            model,
            loss_fn,
            toy_loader(),
            TrainerConfig(progress=False, device="cpu", epochs=3),
            OPTIM,
            tmp_path / "c",
            Validation(evaluate(crash_at, []), "m"),
            log=lambda *a: None,
            name="train",
            device=CPU,
        )

    with pytest.raises(KeyboardInterrupt):
        trainer(crash_at=2).fit()
    assert torch.load(tmp_path / "c" / "last.pt", weights_only=True)["state"]["train_seconds"] == 10.0
    clock[0] += 1000.0
    state = trainer(crash_at=None).fit()  # resumes after epoch 1: evaluations 2 and 3 again
    assert state.step == 12 and state.train_seconds == 30.0  # kept work only: not the stop, not the lost evaluation


def _stamped(folder, model: torch.nn.Module, owner: str = "job-a") -> Trainer:
    """A one-epoch fit of ``model`` whose checkpoints go to ``folder``, stamped ``owner``."""
    return Trainer(
        model,
        lambda batch: (model(batch["labels"].unsqueeze(1)).pow(2).mean(), {}),
        toy_loader(),
        TrainerConfig(progress=False, device="cpu", epochs=1),
        OPTIM,
        folder,
        Validation(lambda: {"m": 0.0}, "m"),
        log=lambda *a: None,
        name="train",
        device=CPU,
        owner=owner,
    )


@pytest.mark.parametrize(
    "change, says",
    [
        (lambda ckpt: ckpt | {"owner": "job-b"}, "belongs to another job (job-b, this one is job-a)"),
        (lambda ckpt: {k: v for k, v in ckpt.items() if k != "owner"}, "lacks owner (an older version's, or incomplete)"),
        (lambda ckpt: {k: v for k, v in ckpt.items() if k != "running"}, "lacks running (an older version's, or incomplete)"),
        (
            lambda ckpt: ckpt | {"model": ckpt["model"] | {"weight": torch.zeros(2, 1)}},
            "does not fit the model (weight is [2, 1], the model's [1, 1])",
        ),
        (
            lambda ckpt: ckpt | {"model": {**ckpt["model"], "extra": torch.zeros(1)}},
            "does not fit the model (1 tensor(s) the model lacks, such as extra)",
        ),
    ],
    ids=["another owner", "no stamp", "an entry missing", "another shape", "another tensor"],
)
def test_a_checkpoint_that_is_not_this_fits_is_never_loaded_not_even_in_part(tmp_path, caplog, change, says):
    trained = _stamped(tmp_path, torch.nn.Linear(1, 1))
    trained.fit()
    trained.save_checkpoint()
    for name in ("last.pt", "previous.pt"):
        torch.save(change(torch.load(tmp_path / "last.pt", weights_only=True)), tmp_path / name)
    model = torch.nn.Linear(1, 1)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _stamped(tmp_path, model)
    assert not trainer.try_resume()
    assert all(torch.equal(v, fresh[k]) for k, v in model.state_dict().items())  # nothing of it was loaded
    assert trainer.optimizer.state_dict()["state"] == {} and trainer.state.step == 0
    assert f"train: checkpoint {tmp_path / 'last.pt'} {says}; trying an earlier one" in caplog.text
    assert f"train: checkpoint {tmp_path / 'previous.pt'} {says}; starting afresh" in caplog.text


def test_the_loop_computes_on_the_device_it_is_given_never_the_one_the_config_names(tmp_path):
    """A rank's device comes from its rank (with trainer.device=cuda:0 and 2 ranks, rank 1 is on
    cuda:1), so the loop never re-reads trainer.device: here it names a GPU this machine lacks."""
    model = torch.nn.Linear(1, 1)
    trainer = Trainer(
        model,
        lambda batch: (model(batch["labels"].unsqueeze(1)).pow(2).mean(), {}),
        toy_loader(),
        TrainerConfig(progress=False, device="cuda:7", epochs=1),
        OPTIM,
        tmp_path,
        Validation(lambda: {"m": 0.0}, "m"),
        log=lambda *a: None,
        name="train",
        device=CPU,
    )
    assert trainer.device == CPU and trainer.fit().step == 4


FREE_AND_MEASURE = """
import os, sys, torch
from diito.trainer import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else None
page = os.sysconf("SC_PAGE_SIZE")
def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * page / 2**20
block = torch.ones(2**24)  # 64 MB, touched
before = resident_mb()
del block
print(took, before - resident_mb())
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux's /proc")
def test_cpu_jobs_keep_large_freed_blocks_for_the_next_step():
    """By default glibc hands a freed 64 MB block straight back to the kernel (the next step pays
    page faults to get it again); after keep_freed_memory the process keeps it for reuse."""

    def freed_mb(mode: str) -> tuple[str, float]:
        out = subprocess.run([sys.executable, "-c", FREE_AND_MEASURE, mode], capture_output=True, text=True, check=True).stdout
        took, mb = out.split()
        return took, float(mb)

    took, kept_released = freed_mb("keep")
    if took != "True":
        pytest.skip("the C library is not glibc")
    assert freed_mb("default")[1] > 48  # returned to the kernel on free
    assert kept_released < 8  # kept


def test_a_cpu_trainer_keeps_freed_memory(tmp_path, monkeypatch):
    """The loop asks for it on the CPU, where each step would otherwise pay those page faults."""
    import diito.trainer

    calls = []
    monkeypatch.setattr(diito.trainer, "keep_freed_memory", lambda: calls.append(True))
    model = torch.nn.Linear(1, 1)
    loss = lambda batch: (model(batch["labels"].unsqueeze(1)).pow(2).mean(), {})  # noqa: E731
    Trainer(
        model, loss, toy_loader(), TrainerConfig(progress=False), OPTIM, tmp_path, Validation(dict, "m"), log=print, name="t", device=CPU
    )
    assert calls == [True]
