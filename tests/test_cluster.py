"""Past one machine: sweeps through submitit (its local executor stands in for SLURM), ranks a
launcher started, a preempted job requeued, and a PostgreSQL store shared by parallel jobs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, run_cli
from tests.test_sweep import sweep_runs

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is not installed (pip install diito[cluster])")

SMOKE = ["teacher=tiny", "trainer=debug", "trainer.num_threads=1"]
SUBMITIT = ["hydra/launcher=submitit_local", "hydra.sweep.dir=sweep"]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "student" / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


@pytest.mark.slow  # three submitit sweeps of local processes
def test_submitit_sweep_isolates_failures_shares_the_teacher_and_skips_finished_jobs(home):
    sweep = ["-m", *SMOKE, *SUBMITIT, "optim.lr=1e-3,1e12"]  # the second diverges after its run exists
    result = run_cli(sweep, home)
    assert result.returncode == 1 and "sweep: 1/2 jobs finished" in result.stderr
    client, (parent,), children = sweep_runs(home)
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED"]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.data.tags["diito.teacher_source"] for c in children) == ["cache", "fine-tuned"]  # one fine-tune, shared
    assert len(list((home / ".cache" / "teachers").glob("*/info.json"))) == 1  # one teacher for both jobs
    finished = next(c for c in children if c.info.status == "FINISHED")
    again = run_cli(sweep, home)
    assert again.returncode == 1
    logs = "".join(p.read_text() for p in (home / "sweep" / ".submitit").rglob("*_log.*"))
    assert "skipped (rerun=true runs it again)" in logs  # said by the job, in its submitit log
    _, parents, children = sweep_runs(home)
    newest = max(parents, key=lambda p: p.info.start_time)
    # the finished run is reused, not run again, and keeps its own tags: the new sweep records the reuse
    kept = client.get_run(finished.info.run_id)
    assert (
        kept.info.status == "FINISHED"
        and kept.data.tags["mlflow.parentRunId"] == finished.data.tags["mlflow.parentRunId"] != newest.info.run_id
    )
    assert f"diito.reused.{finished.info.run_id}" in newest.data.tags
    assert len([c for c in children if c.data.tags["mlflow.parentRunId"] == newest.info.run_id]) == 1  # only the failing job ran again
    summary = json.loads(open(client.download_artifacts(newest.info.run_id, "summary.json")).read())
    assert (summary["jobs"], summary["failed"]) == (2, 1)


@pytest.mark.slow  # two submitit tasks as ranks
def test_two_tasks_per_node_train_one_job_as_two_ranks(home):
    """submitit starts 2 processes; they find their ranks in the environment and train as one job
    (one MLflow run), which equals one process accumulating 2 batches."""
    result = run_cli(["-m", *SMOKE, *SUBMITIT, "hydra.launcher.tasks_per_node=2", "trainer.precision=fp32"], home)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = {p.name: p.read_text() for p in (home / "sweep" / ".submitit").rglob("*_log.out")}
    assert len(logs) == 2 and all("global_rank=" in text for text in logs.values())
    assert any("global_rank=1(2)" in text and "student step 4/4" in text for text in logs.values())  # rank 1 trained too
    _, _, (child,) = sweep_runs(home)
    assert child.info.status == "FINISHED" and "validation/accuracy" in child.data.metrics
    one = run_cli(
        [*SMOKE, "trainer.precision=fp32", "trainer.grad_accum=2", "hydra.run.dir=one", "tracking=none", "tracking.log_model=true"], home
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert_same_weights(weights(home / "sweep" / "0"), weights(home / "one"), atol=1e-6)


def _submit_processes(sweep_dir: Path) -> list[int]:
    """The pids of submitit's task processes (``python -m submitit.core._submit <sweep>/.submitit/…``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"submitit.core._submit" in cmdline and any(str(sweep_dir).encode() in part for part in cmdline):
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_a_preempted_job_is_requeued_and_continues_its_checkpoint_and_run(home):
    steps = 160  # long enough (a few seconds) that the signal always finds the job still training
    job = [*SMOKE, f"trainer.max_steps={steps}", "trainer.save_every=8", "trainer.log_every=1", "trainer.eval_every=40"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"DIITO_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), "-m", *job, *SUBMITIT],
        cwd=home,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until the job is past its checkpoint at step 8
        logs = "".join(p.read_text() for p in (home / "sweep" / ".submitit").rglob("*_log.out")) if (home / "sweep").exists() else ""
        if "student step 10/" in logs:
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the job never reached step 10")
    (task,) = _submit_processes(home / "sweep")
    os.kill(task, signal.SIGUSR2)  # what SLURM sends before preempting or timing out a job
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    logs = "".join(p.read_text() for p in (home / "sweep" / ".submitit").rglob("*_log.*"))
    assert "this job is preempted" in logs and "Requeued job" in logs
    # the newest checkpoint when the signal came: step 8, or a later one if the job ran on while the
    # signal was sent (it trains about 16 steps a second)
    resumed = re.search(r"student: resuming from step (\d+)", logs)
    assert resumed and int(resumed.group(1)) % 8 == 0 and 8 <= int(resumed.group(1)) < steps, logs[-3000:]
    client, _, (child,) = sweep_runs(home)
    assert child.info.status == "FINISHED"
    history = client.get_metric_history(child.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, steps + 1))  # every step once: none lost, none twice

    elsewhere = home / "elsewhere"  # a project folder of its own, so nothing of the requeued job is reused
    elsewhere.mkdir()
    result = run_cli([*job, "hydra.run.dir=reference", "tracking=none", "tracking.log_model=true"], elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(weights(home / "sweep" / "0"), weights(elsewhere / "reference"))


def test_the_slurm_preset_submits_what_a_cluster_expects(home, tmp_path):
    """`hydra/launcher=slurm` through submitit's SLURM executor, with an ``sbatch`` that records the
    script it is given (and refuses it, so nothing waits on a cluster that is not there)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\necho "sbatch: error: no cluster here" >&2\nexit 1\n')
    sbatch.chmod(0o755)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for it before submitting
    (bin_dir / "srun").chmod(0o755)
    result = run_cli(
        [
            "-m",
            *SMOKE,
            "hydra/launcher=slurm",
            "hydra.sweep.dir=sweep",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.gpus_per_node=4",
            "hydra.launcher.tasks_per_node=4",
            "hydra.launcher.timeout_min=120",
            "loss.T=2,10",
        ],
        home,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
    )
    assert result.returncode != 0 and "no cluster here" in result.stderr
    script = (tmp_path / "submitted.sh").read_text()
    for line in [
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --time=120",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=32GB",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --array=0-1%2",
    ]:
        assert line in script.splitlines(), line
    assert "submitit.core._submit" in script  # each array task (both at once: fewer than 64) runs one job of the sweep
