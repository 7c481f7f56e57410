"""The failure policy (diito.failures): one line and exit code per kind of failure, and a sweep
callback that reports instead of ending the process."""

from __future__ import annotations

import pytest

from diito import failures
from diito.config import ConfigError
from diito.resume import JobRunning
from diito.sources import DataError
from diito.sweep import SweepCallback
from diito.tracking import RunFailed
from diito.trainer import NonFiniteLoss
from tests.conftest import compose_config


@pytest.mark.parametrize(
    "error, code, line",
    [
        (ConfigError("loss.alpha: too large"), 2, "error: loss.alpha: too large"),
        (DataError("train.csv:3: the label is empty"), 2, "error: train.csv:3: the label is empty"),
        (failures.Refused(ConfigError("paths.cache: read-only")), 2, "error: paths.cache: read-only"),
        (JobRunning("an identical job is already running"), 75, "error: an identical job is already running"),
        (RunFailed("0123", NonFiniteLoss("student step 3: non-finite kd=nan")), 1, "error: student step 3: non-finite kd=nan"),
        (RuntimeError("http://alice:s3cret@host/ went away"), 1, None),
    ],
    ids=["config", "data", "refused by a callback", "running", "in its run", "masked"],
)
def test_each_failure_ends_with_its_line_and_code(error, code, line, capsys):
    assert failures.end(error) == code
    said = capsys.readouterr().err
    if line:
        assert said.strip() == line
    else:  # a credential in the error: its traceback, masked
        assert "RuntimeError: http://alice:***@host/ went away" in said and "s3cret" not in said


def test_a_failure_with_nothing_to_say_keeps_its_traceback():
    with pytest.raises(KeyError):
        failures.end(KeyError("a bug"))


def test_the_sweep_callback_refuses_bad_input_without_ending_the_process(home):
    cfg = compose_config(["paths.cache=/proc/diito-cache"], hydra=True)
    with pytest.raises(failures.Refused) as refused:
        SweepCallback().on_run_start(cfg)
    assert str(refused.value).startswith("paths.cache: ") and isinstance(refused.value.error, ConfigError)


def test_a_sweep_with_failed_jobs_is_reported_and_its_exit_status_decided_by_the_policy(home, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(failures, "_sweep_failed", False)
    sweep_dir = tmp_path / "sweep"
    cfg = compose_config(["tracking=none", f"hydra.sweep.dir={sweep_dir}"], hydra=True)
    failures._note(sweep_dir, sweep_dir / "1", "loss.alpha=1.5", ConfigError("loss.alpha: too large"))
    SweepCallback().on_multirun_end(cfg)  # returns: no sys.exit inside the callback
    assert "FAILED loss.alpha=1.5: ConfigError: loss.alpha: too large" in capsys.readouterr().err
    assert failures.exit_status() == 1
