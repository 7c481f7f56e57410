"""Stopped from outside: Ctrl-C (SIGINT) and SIGTERM (kill, docker stop, a scheduler's cancel) end a job's
run and a sweep's parent KILLED, say how to continue, and the same command continues."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT, run_cli
from tests.test_sweep import sweep_runs

pytestmark = pytest.mark.slow

# long enough (a few seconds) that the signal always finds the student training; a checkpoint every 10 steps
JOB = ["teacher=tiny", "trainer=debug", "trainer.max_steps=100", "trainer.save_every=10", "trainer.log_every=1"]
SIGNALS = [signal.SIGINT, signal.SIGTERM]


def stop_at(home, args: list[str], line: str, sig: signal.Signals) -> tuple[int, str]:
    """Start ``python run.py ARGS``, send it ``sig`` once its log shows ``line``; its exit code and output."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"DIITO_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=home,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # a shell starts background commands with SIGINT ignored, and a child inherits that; the job must
        # see Ctrl-C as a terminal would deliver it, however the tests were started
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines = []
    try:
        for output in proc.stdout:
            lines.append(output)
            if line in output:
                proc.send_signal(sig)
                break
        else:
            pytest.fail(f"the job ended without logging {line!r}:\n{''.join(lines)[-3000:]}")
        lines += proc.stdout.readlines()
    finally:
        proc.wait(timeout=120)
    return proc.returncode, "".join(lines)


def runs(home) -> list:
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_a_stopped_job_is_killed_says_how_to_continue_and_the_same_command_continues(home, sig):
    code, output = stop_at(home, [*JOB, "hydra.run.dir=outputs/job"], "student step 15/", sig)
    assert code == 128 + sig, output[-3000:]  # 130 after Ctrl-C, 143 after SIGTERM, as a shell reports them
    said = re.search(
        rf"^stopped by {sig.name} at student step (\d+); run the same command again to continue from its "
        r"checkpoint at step (\d+)$",
        output,
        re.MULTILINE,
    )
    assert said, output[-3000:]
    assert "Traceback" not in output
    stopped, checkpoint = int(said[1]), int(said[2])
    assert 10 <= checkpoint <= stopped < 100
    (student,) = [r for r in runs(home) if r.data.tags["diito.role"] == "student"]
    assert student.info.status == "KILLED"

    again = run_cli([*JOB, "hydra.run.dir=outputs/job"], home)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"student: resuming from step {checkpoint}" in again.stdout + again.stderr
    (continued,) = [r for r in runs(home) if r.data.tags["diito.role"] == "student"]
    assert continued.info.run_id == student.info.run_id and continued.info.status == "FINISHED"


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_a_stopped_sweep_ends_its_parent_and_the_running_child_killed(home, sig):
    code, output = stop_at(home, ["-m", *JOB, "loss.T=2,4"], "student step 15/", sig)
    assert code == 128 + sig, output[-3000:]
    _, (parent,), (child,) = sweep_runs(home)
    assert parent.info.status == "KILLED" and child.info.status == "KILLED"
    assert (
        f"sweep stopped by {sig.name}: its MLflow parent run {parent.info.run_id} ({parent.info.run_name}) is marked KILLED; "
        "run the same command again to finish it"
    ) in output
    assert f"stopped by {sig.name} at student step " in output and "Traceback" not in output
