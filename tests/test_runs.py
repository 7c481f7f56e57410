"""The owners of a job's identity, its resume state and its runs' logger, on their own."""

from __future__ import annotations

import inspect

import pytest

from diito import identity, resume
from diito.tracking import NullRun, Run


def test_a_null_run_has_the_methods_of_a_run_and_refuses_misspelt_ones():
    public = {name for name, _ in inspect.getmembers(Run, inspect.isfunction) if not name.startswith("_")}
    assert public == {name for name, _ in inspect.getmembers(NullRun, inspect.isfunction) if not name.startswith("_")}
    for name in public:  # the same signatures: a call that works with tracking works without
        assert inspect.signature(getattr(NullRun, name)).parameters.keys() == inspect.signature(getattr(Run, name)).parameters.keys(), name
    with pytest.raises(AttributeError):
        NullRun().log_metric({"loss": 1.0}, 1)  # log_metrics, misspelt


def test_settings_that_cannot_change_a_result_are_not_part_of_the_identity():
    tree = {"loss": {"alpha": 0.5}, "trainer": {"progress": True, "max_steps": 4}, "paths": {"root": "/a"}}
    same = {"loss": {"alpha": 0.5}, "trainer": {"progress": False, "max_steps": 4}, "paths": {"root": "/b"}}
    assert identity.digest(tree) == identity.digest(same) != identity.digest(tree | {"loss": {"alpha": 0.7}})
    assert identity.params(tree) == {"loss.alpha": 0.5, "trainer.max_steps": 4}
    assert identity.params(tree, leave_out=frozenset({"loss.alpha"})) == {"trainer.max_steps": 4}


def test_the_resume_state_keeps_its_run_for_its_identity_and_store_only(tmp_path):
    where = {"uri": "sqlite:///a.db", "experiment": "e"}
    state = resume.ResumeState(tmp_path / "s", "job-a")
    state.save_run("run-1", where)
    assert state.saved_run(where) == "run-1"
    assert state.saved_run(where | {"experiment": "f"}) is None  # another experiment
    assert resume.ResumeState(tmp_path / "s", "job-b").saved_run(where) is None  # another job's record
    state.checkpoints.mkdir()
    state.clear()
    assert not state.checkpoints.exists() and state.saved_run(where) is None


def test_one_process_holds_a_job_s_resume_state(tmp_path):
    state = resume.of_job(tmp_path, "0123")
    assert state.folder == tmp_path / "runs" / "0123"
    with resume.held(state):
        with pytest.raises(resume.JobRunning, match=f"an identical job is already running \\(its state: {state.folder}\\)"):
            with resume.held(state):
                pass
        with resume.held(state, holder=False):  # a launcher's rank other than 0 runs inside rank 0's hold
            pass
