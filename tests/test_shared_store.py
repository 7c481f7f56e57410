"""A tracking store many machines can share: PostgreSQL, behind an MLflow server or written directly,
with its schema prepared once however many jobs start at the same moment."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow import MlflowClient

from tests.conftest import MlflowServer, run_cli
from tests.test_sweep import SMOKE, check_grid

PARALLEL = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=4", "trainer.num_threads=1"]
GRID = ["loss.alpha=0.3,0.7", "trainer.max_eval_examples=5,7"]  # 4 jobs


def runs_of(client: MlflowClient):
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return ([r for r in runs if r.data.tags.get("diito.role") == "sweep"], [r for r in runs if r.data.tags.get("diito.role") == "student"])


@pytest.mark.slow  # a parallel sweep through a server
def test_parallel_sweep_through_a_server_on_postgresql(home, tmp_path, postgres):
    server = MlflowServer(tmp_path / "server", store=postgres.create_database("mlflow"))
    server.start()
    try:
        result = run_cli(["-m", *SMOKE, *GRID, *PARALLEL, "tracking=server", f"tracking.uri={server.uri}"], home)
        assert result.returncode == 0, result.stderr[-3000:]
        client = MlflowClient(server.uri)
        parents, children = runs_of(client)
        check_grid(home, parents, children, client)  # the parent, 4 children, params, metrics, the summary
        for child in children:  # every logged step arrived
            assert [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")] == [1, 2]
    finally:
        server.stop()
    assert not (home / "mlflow.db").exists()


@pytest.mark.slow  # a parallel sweep
def test_parallel_sweep_writing_to_a_fresh_postgresql_database(home, postgres):
    uri = postgres.create_database("direct")
    result = run_cli(["-m", *SMOKE, *GRID, *PARALLEL, f"tracking.uri={uri}"], home)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(uri)
    parents, children = runs_of(client)
    check_grid(home, parents, children, client)
    assert "already exists" not in result.stdout + result.stderr


PREPARE = """
import sys
from diito.tracking import TrackingConfig, experiment_id
print(experiment_id(TrackingConfig(uri=sys.argv[1], experiment="shared")))
"""


def test_jobs_starting_together_on_a_fresh_database_prepare_its_schema_once(postgres):
    """Without the database lock, all but one of these processes fail with duplicate tables."""
    uri = postgres.create_database("race")
    processes = [
        subprocess.Popen([sys.executable, "-c", PREPARE, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert all(p.returncode == 0 for p in processes), [err[-2000:] for _, err in outputs]
    assert len({out.strip() for out, _ in outputs}) == 1  # one experiment, the same id for every job


def test_an_unreachable_database_stops_the_job_before_any_compute(home, postgres):
    result = run_cli(["teacher=tiny", "trainer=debug", f"tracking.uri={postgres.uri}/missing"], home)
    assert result.returncode == 2
    assert (
        "error: tracking.uri: cannot reach the tracking database" in result.stderr and 'database "missing" does not exist' in result.stderr
    )
    assert not (home / ".cache").exists()


def test_an_experiment_deleted_in_the_database_stops_the_job_before_any_compute(home, postgres):
    uri = postgres.create_database("deleted")
    client = MlflowClient(uri)
    experiment = client.create_experiment("rotten_tomatoes-debug")  # a smoke job's experiment
    client.delete_experiment(experiment)
    result = run_cli(["teacher=tiny", "trainer=debug", f"tracking.uri={uri}"], home)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: tracking.experiment: 'rotten_tomatoes-debug' is deleted; restore it (MLFLOW_TRACKING_URI={uri} mlflow experiments restore "
        f"--experiment-id {experiment}, or in the UI's trash) or set tracking.experiment=<another name>"
    )
    assert "Traceback" not in result.stderr and not (home / ".cache").exists()
    assert not client.search_runs([experiment])
