"""Kills: a job killed with SIGKILL at any point and run again ends exactly like an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from tests.conftest import ROOT, TIMINGS

pytestmark = pytest.mark.slow

JOB = [
    "teacher=tiny",
    "trainer=debug",
    "teacher.recipe.max_steps=8",
    "trainer.max_steps=12",
    "trainer.save_every=5",
    "hydra.job_logging.root.level=DEBUG",  # checkpoint writes are logged at debug level
    "trainer.eval_every=4",
    "trainer.log_every=1",
    "trainer.keep_best=true",
    "hydra.run.dir=outputs/job",
]
KILL_POINTS = {  # a line of the job's log, and the moment it stands for
    "teacher step 3/": "during the teacher fine-tune",
    "student step 7/": "between checkpoints",
    "student: writing checkpoint at step 10": "while a checkpoint is being written",
    "student: final evaluation": "during the final evaluation",
    "student: saving to": "while the student is being saved",
}


def command(home) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"DIITO_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return [sys.executable, str(ROOT / "run.py"), *JOB], env


def run_to_the_end(home) -> None:
    cmd, env = command(home)
    result = subprocess.run(cmd, cwd=home, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def kill_at(home, line: str) -> None:
    """Start the job and SIGKILL it as soon as its log shows ``line``."""
    cmd, env = command(home)
    proc = subprocess.Popen(cmd, cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for output in proc.stdout:
            if line in output:
                proc.send_signal(signal.SIGKILL)
                break
        else:
            pytest.fail(f"the job ended without logging {line!r}")
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def outcome(home) -> dict:
    """The final student's weights, and every run with the full history of every metric."""
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    histories = {}
    for run in runs:
        role = run.data.tags["diito.role"]
        assert role not in histories, f"more than one {role} run"
        histories[role] = {
            "status": run.info.status,
            "metrics": {
                key: [
                    (m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
                ]
                for key in run.data.metrics
                if not key.startswith(TIMINGS)
            },
        }
    return {"weights": load_file(home / "outputs" / "job" / "student" / "model.safetensors"), "runs": histories}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    home = tmp_path_factory.mktemp("uninterrupted")
    run_to_the_end(home)
    return outcome(home)


@pytest.mark.parametrize("line", list(KILL_POINTS), ids=list(KILL_POINTS.values()))
def test_killed_and_run_again_ends_like_an_uninterrupted_job(tmp_path, uninterrupted, line):
    kill_at(tmp_path, line)
    run_to_the_end(tmp_path)
    got = outcome(tmp_path)
    assert set(got["runs"]) == {"teacher", "student"}  # one run each: the second attempt continued the first
    for role, run in got["runs"].items():
        assert run["status"] == "FINISHED", role
        assert run["metrics"] == uninterrupted["runs"][role]["metrics"], role  # step by step: nothing lost, nothing twice
    assert got["weights"].keys() == uninterrupted["weights"].keys()
    assert all(torch.equal(got["weights"][k], uninterrupted["weights"][k]) for k in got["weights"])


def test_a_killed_two_rank_job_run_again_ends_like_an_uninterrupted_one(tmp_path):
    """Both ranks and their parent killed with SIGKILL between checkpoints; the re-run resumes in global batches."""
    two_ranks = [*JOB, "trainer.devices=2", "trainer.precision=fp32"]

    def start(home, **kwargs):
        cmd, env = command(home)
        return subprocess.Popen([*cmd[:2], *two_ranks], cwd=home, env=env, start_new_session=True, text=True, **kwargs)

    uninterrupted = tmp_path / "a"
    uninterrupted.mkdir()
    assert start(uninterrupted, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait(timeout=600) == 0
    home = tmp_path / "b"
    home.mkdir()
    proc = start(home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in proc.stdout:
        if "student step 7/" in line:
            os.killpg(proc.pid, signal.SIGKILL)  # the parent and both ranks
            break
    proc.wait(timeout=60)
    assert start(home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait(timeout=600) == 0
    a = load_file(uninterrupted / "outputs" / "job" / "student" / "model.safetensors")
    b = load_file(home / "outputs" / "job" / "student" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    runs = outcome(home)["runs"]
    assert runs["student"]["status"] == "FINISHED" and runs["student"]["metrics"] == outcome(uninterrupted)["runs"]["student"]["metrics"]
