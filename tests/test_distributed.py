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
from diito.config import ConfigError
from diito.tracking import RunFailed
from diito.trainer import NonFiniteLoss
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


def _files_task(folder: Path) -> list[str]:
    """A `files` task whose training file has a rare label, which reading it warns of."""
    rows = ["text,label"] + [f"good film {i},pos" for i in range(40)] + [f"bad film {i},neg" for i in range(40)] + ["odd film,odd"]
    (folder / "train.csv").write_text("\n".join(rows) + "\n")
    (folder / "dev.csv").write_text("text,label\ngood,pos\nbad,neg\nodd,odd\n")
    return ["task=files", f"task.files.train={folder / 'train.csv'}", f"task.files.validation={folder / 'dev.csv'}"]


def test_two_ranks_of_batch_b_equal_one_process_accumulating_two_batches(home, tmp_path, capfd, caplog):
    """DIITO on: the draws and dropout of each global batch come from (seed, epoch, batch), so the
    number of ranks does not change what is computed. The spawned ranks take the validated job and
    its data from the job's process: the training file is read (and its rare label warned of) once."""
    task = _files_task(tmp_path)
    one = _student_weights(home, [*task, "trainer.grad_accum=2"], "one")
    capfd.readouterr()
    caplog.clear()
    two = _student_weights(home, [*task, "trainer.devices=2"], "two")
    ranks = capfd.readouterr().err  # what the spawned ranks logged (this process's own records are in caplog)
    assert "][rank 0] - student: final evaluation" in ranks
    assert (caplog.text + ranks).count("label 'odd' occurs only 1 time(s)") == 1
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-6, rtol=0, msg=key)
    teacher = load_file(next((home / ".cache" / "teachers").glob("*/model/model.safetensors")))
    key = "bert.encoder.layer.0.attention.self.query.weight"  # first_k: the student's block 0 began as the teacher's
    assert not torch.equal(one[key], teacher[key])  # so both really trained


def _train_kd_on(rank: distributed.Rank, batch_size: int, folder: str) -> float:
    """One spawned rank of :func:`_train_kd` (no dropout, so batches of 2b and 2 ranks of b are one computation)."""
    assert rank.device == torch.device("cpu") and (rank.index, rank.world) == distributed.rank_and_size()
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
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
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
    Trainer(
        student,
        step,
        loader,
        settings,
        OptimConfig(lr=1e-3),
        Path(folder) / f"c{size}",
        Validation(lambda: {"m": 0.0}, "m"),
        log=lambda *a: None,
        name="train",
        device=torch.device("cpu"),
    ).fit()
    torch.save(student.state_dict(), f"{folder}/rank{rank}-of-{size}.pt")
    return 0.0


def test_kd_two_ranks_of_batch_b_equal_one_process_of_batch_2b_and_replicas_agree(tmp_path):
    _train_kd(8, str(tmp_path))
    distributed.spawn(2, "cpu", _train_kd_on, (4, str(tmp_path)))
    one = torch.load(tmp_path / "rank0-of-1.pt")
    ranks = [torch.load(tmp_path / f"rank{r}-of-2.pt") for r in range(2)]
    for key in one:
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # the replicas never drift apart
        torch.testing.assert_close(ranks[0][key], one[key], atol=1e-6, rtol=0, msg=key)


@pytest.mark.slow  # torchrun starts two processes
def test_ranks_started_by_torchrun_train_one_job(home):
    """torchrun starts the ranks; the job reads them from the environment: one output folder, one
    MLflow student run, and the weights of one process accumulating 2 batches."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"DIITO_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(ROOT / "run.py"),
            *TINY,
            "hydra.run.dir=torchrun",
        ],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], filter_string="tags.`diito.role` = 'student'")
    assert [r.info.status for r in runs] == ["FINISHED"]
    ranks = load_file(home / "torchrun" / "student" / "model.safetensors")
    one = _student_weights(home, ["trainer.grad_accum=2"], "one")
    for key in one:
        torch.testing.assert_close(ranks[key], one[key], atol=1e-6, rtol=0, msg=key)


def test_the_topology_is_decided_in_one_place(monkeypatch):
    assert distributed.topology(1) == "single" and distributed.topology(2) == "spawned"
    monkeypatch.setenv("WORLD_SIZE", "2")  # a launcher's rank
    monkeypatch.setenv("RANK", "1")
    assert distributed.topology(1) == distributed.topology(2) == "launched"
    with pytest.raises(ConfigError, match=r"^trainer\.devices: 3 ranks asked for, but a launcher started 2"):
        with distributed.ranks(3, "cpu"):
            pass


def test_each_rank_s_device_comes_from_its_rank():
    """trainer.device names the kind; the index is the rank's own (rank 1 of cuda:0 is on cuda:1)."""
    assert distributed.rank_device("cuda:0", 1) == torch.device("cuda", 1)
    assert distributed.rank_device("cuda", 0) == torch.device("cuda", 0)
    assert distributed.rank_device("cpu", 1) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert distributed.rank_device("auto", 1) == torch.device("cpu")


def _fail(rank: distributed.Rank, error: Exception) -> float:
    if rank.index == 0:
        raise error
    return 0.0


def test_a_spawned_job_fails_with_rank_0_s_own_error():
    error = RunFailed("0123abcd", NonFiniteLoss("student step 3: non-finite kd=nan"))
    with pytest.raises(RunFailed) as raised:
        distributed.spawn(2, "cpu", _fail, (error,))
    assert str(raised.value) == str(error)  # what the failure policy reads: the run, and the error itself
    assert raised.value.run_id == "0123abcd" and isinstance(raised.value.error, NonFiniteLoss)
