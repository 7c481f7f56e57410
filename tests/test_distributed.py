"""One job on several processes (DDP, gloo on CPU): the sampler, equivalence with one process, replicas."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from diito import distributed, job
from diito.batching import EpochBatchSampler
from tests.conftest import ROOT, compose_config

TINY = ["teacher=tiny", "trainer=debug", "trainer.precision=fp32", "trainer.num_threads=1", "trainer.max_steps=4"]


@pytest.mark.parametrize("length_grouped", [True, False])
def test_ranks_share_an_epoch_without_overlap_in_equal_numbers(length_grouped):
    lengths = np.random.default_rng(0).integers(3, 40, size=83)  # 11 batches of 8: one is left out with 2 ranks
    full = EpochBatchSampler(lengths, 8, shuffle=True, seed=3, length_grouped=length_grouped)
    ranks = [EpochBatchSampler(lengths, 8, shuffle=True, seed=3, length_grouped=length_grouped, rank=r, world=2) for r in range(2)]
    for epoch in range(2):
        full.set_epoch(epoch)
        for sampler in ranks:
            sampler.set_epoch(epoch)
        shares = [list(sampler) for sampler in ranks]
        assert [len(share) for share in shares] == [5, 5] == [len(sampler) for sampler in ranks]
        seen = [i for share in shares for batch in share for i in batch]
        assert len(seen) == len(set(seen))  # no example on two ranks
        global_batches = [b.tolist() for b in full.batches()]
        assert shares[0] == global_batches[0:10:2] and shares[1] == global_batches[1:10:2]  # every second global batch
        for sampler in ranks:  # resume after 3 rounds: skip counts global batches
            sampler.set_epoch(epoch, skip=6)
        assert [list(sampler) for sampler in ranks] == [global_batches[6:10:2], global_batches[7:10:2]]
    with pytest.raises(ValueError, match="whole number of rounds"):
        ranks[0].set_epoch(0, skip=3)


def _student_weights(home, overrides: list[str], name: str) -> dict[str, torch.Tensor]:
    job.run(compose_config([*TINY, *overrides]), output_dir=home / name)
    return load_file(home / name / "student" / "model.safetensors")


def test_two_ranks_of_batch_b_equal_one_process_accumulating_two_batches(home):
    """DIITO on: the draws and dropout of each global batch come from (seed, epoch, batch), so the
    number of ranks does not change what is computed."""
    one = _student_weights(home, ["trainer.grad_accum=2"], "one")
    two = _student_weights(home, ["trainer.devices=2"], "two")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-6, rtol=0, msg=key)
    teacher = load_file(next((home / ".cache" / "teachers").glob("*/model/model.safetensors")))
    key = "bert.encoder.layer.0.attention.self.query.weight"  # first_k: the student's block 0 began as the teacher's
    assert not torch.equal(one[key], teacher[key])  # so both really trained


def _train_kd_without_dropout(world: int, batch_size: int, folder: str) -> float:
    """A tiny KD-only student trained directly (no dropout, so batches of 2b and 2 ranks of b are one computation)."""
    if world == 1:
        return _train_kd(batch_size, folder)
    with distributed.process_group("cpu"):
        return _train_kd(batch_size, folder)


def _train_kd(batch_size: int, folder: str) -> float:
    from torch.nn.parallel import DistributedDataParallel
    from transformers import AutoModelForSequenceClassification, BertConfig

    from diito.batching import Encoded, make_loader
    from diito.models import build_student
    from diito.objective import DistillationObjective, DistillationStep, LossConfig
    from diito.trainer import OptimConfig, Trainer, TrainerConfig, Validation

    rank, size = distributed.rank_and_size()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    teacher = AutoModelForSequenceClassification.from_config(config).eval()
    student = build_student(teacher, [1], copy_classifier=True)
    rng = np.random.default_rng(0)
    ids = [list(rng.integers(3, 50, size=9)) for _ in range(32)]  # equal lengths: padding cannot differ
    encoded = Encoded(ids, None, rng.integers(0, 2, size=32), [str(i) for i in range(32)], np.full(32, 9))
    loader = make_loader(encoded, batch_size, shuffle=True, seed=1, length_grouped=False, pad_token_id=0, rank=rank, world=size)
    step = DistillationStep(student, teacher, DistillationObjective(LossConfig(alpha=0.5), []))
    if size > 1:
        step = DistributedDataParallel(step)
    settings = TrainerConfig(epochs=2, device="cpu", precision="fp32", progress=False, save_every=None)
    Trainer(student, step, loader, settings, OptimConfig(lr=1e-3), Path(folder) / f"c{size}",
            Validation(lambda: {"m": 0.0}, "m"), log=lambda *a: None).fit()
    torch.save(student.state_dict(), f"{folder}/rank{rank}-of-{size}.pt")
    return 0.0


def test_kd_two_ranks_of_batch_b_equal_one_process_of_batch_2b_and_replicas_agree(tmp_path):
    _train_kd_without_dropout(1, 8, str(tmp_path))
    distributed.spawn(2, _train_kd_without_dropout, (2, 4, str(tmp_path)))
    one = torch.load(tmp_path / "rank0-of-1.pt")
    ranks = [torch.load(tmp_path / f"rank{r}-of-2.pt") for r in range(2)]
    for key in one:
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # the replicas never drift apart
        torch.testing.assert_close(ranks[0][key], one[key], atol=1e-6, rtol=0, msg=key)


def test_ranks_started_by_torchrun_train_one_job(home):
    """torchrun starts the ranks; the job reads them from the environment: one output folder, one
    MLflow student run, and the weights of one process accumulating 2 batches."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"DIITO_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(ROOT / "run.py"),
                             *TINY, "hydra.run.dir=torchrun"], cwd=home, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], filter_string="tags.`diito.role` = 'student'")
    assert [r.info.status for r in runs] == ["FINISHED"]
    ranks = load_file(home / "torchrun" / "student" / "model.safetensors")
    one = _student_weights(home, ["trainer.grad_accum=2"], "one")
    for key in one:
        torch.testing.assert_close(ranks[key], one[key], atol=1e-6, rtol=0, msg=key)
