"""Tracking outages and secrets: a tracking server that goes away mid-job, credentials in URIs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow


def test_training_goes_on_while_the_server_is_away_and_nothing_is_lost(home, mlflow_server):
    command = [
        sys.executable,
        str(ROOT / "run.py"),
        "teacher=tiny",
        "trainer=debug",
        "trainer.max_steps=60",
        "trainer.log_every=1",
        "trainer.eval_every=10",
        "tracking=server",
        f"tracking.uri={mlflow_server.uri}",
        "tracking.retries=1",
        "tracking.timeout=2",
    ]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"DIITO_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command, cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, away = [], False
    try:
        for line in proc.stdout:
            lines.append(line)
            if "student step 5/" in line and not away:
                mlflow_server.stop()  # the server goes away in the middle of the job ...
                away = True
            if "cannot log" in line and away:
                # ... and comes back on the same port and store once the job has seen it gone (not
                # before: a restart quicker than the client's own retry would go unnoticed); while it
                # is away every step waits for a failed try, so the job cannot end before it is back
                mlflow_server.start()
                away = False
    finally:
        proc.wait(timeout=300)
    log = "".join(lines)
    assert proc.returncode == 0, log[-3000:]
    assert "cannot log" in log and "training goes on and logging is retried" in log
    client = MlflowClient(mlflow_server.uri)
    (run,) = [
        r for r in client.search_runs([e.experiment_id for e in client.search_experiments()]) if r.data.tags.get("diito.role") == "student"
    ]
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == list(range(1, 61))
    evaluations = sorted(m.step for m in client.get_metric_history(run.info.run_id, "validation/accuracy"))
    assert evaluations == [8, 10, 16, 20, 24, 30, 32, 40, 48, 50, 56, 60, 60]  # epoch ends, every 10 steps, the end, the final score


def test_a_server_that_never_comes_back_is_reported_and_the_outputs_are_kept(home, mlflow_server):
    command = [
        sys.executable,
        str(ROOT / "run.py"),
        "teacher=tiny",
        "trainer=debug",
        "trainer.max_steps=8",
        "trainer.log_every=1",
        "tracking=server",
        f"tracking.uri={mlflow_server.uri}",
        "tracking.retries=0",
        "tracking.timeout=1",
        "hydra.run.dir=outputs/job",
    ]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"DIITO_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command, cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "student step 3/" in line:
            mlflow_server.stop()
    proc.wait(timeout=300)
    log = "".join(lines)
    assert proc.returncode == 0, log[-3000:]
    assert "tracking: never reached" in log and "metric values (" in log and "the run still shows RUNNING" in log
    assert (home / "outputs" / "job" / "student" / "model.safetensors").exists()  # the trained student is not lost


def test_credentials_and_environment_values_never_reach_mlflow(home, mlflow_server, monkeypatch):
    from diito import job
    from tests.conftest import compose_config

    secret_uri = mlflow_server.uri.replace("http://", "http://alice:s3cret@")  # a server without auth ignores them
    monkeypatch.setenv("DIITO_T", "3")
    job.run(
        compose_config(["teacher=tiny", "trainer=debug", "tracking=server", f"tracking.uri={secret_uri}", "loss.T=${oc.env:DIITO_T}"]),
        output_dir=home / "out",
    )
    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {r.data.tags["diito.role"] for r in runs} == {"teacher", "student"}
    for run in runs:
        logged = [run.info.run_name, *run.data.params.values(), *run.data.tags.values()]
        for artifact in ("config.yaml", ".hydra"):
            if artifact in {a.path for a in client.list_artifacts(run.info.run_id)}:
                folder = client.download_artifacts(run.info.run_id, artifact, str(home / "download" / run.info.run_id))
                logged += [p.read_text() for p in __import__("pathlib").Path(folder).rglob("*") if p.is_file()] or [open(folder).read()]
        assert not any("s3cret" in str(text) for text in logged), run.data.tags["diito.role"]
    (student,) = [r for r in runs if r.data.tags["diito.role"] == "student"]
    assert student.data.params["loss.T"] == "<$DIITO_T>" and "tracking.uri" not in student.data.params


@pytest.mark.parametrize("given", ["override", "environment"])
def test_a_sweep_never_prints_or_stores_the_password_of_its_tracking_uri(home, mlflow_server, given):
    """A sweep of finishing and failing jobs against a server reached as http://alice:<password>@...
    (a server without auth ignores the credentials; MLflow's client sends them): the password is in
    neither the console, nor the server's database and artifacts, nor what the project writes in the
    sweep folder."""
    password = "Pa55-w0rd-7q"
    secret_uri = mlflow_server.uri.replace("http://", f"http://alice:{password}@")
    where = {"override": ([f"tracking.uri={secret_uri}"], {}), "environment": ([], {"MLFLOW_TRACKING_URI": secret_uri})}
    overrides, env = where[given]
    result = run_cli(
        ["-m", "teacher=tiny", "trainer=debug", "trainer.max_steps=2", "loss.T=2,4", "loss.alpha=0.5,1.5", "tracking=server", *overrides],
        home,
        **env,
    )
    assert result.returncode == 1 and "sweep: 2/4 jobs finished" in result.stderr, result.stderr[-3000:]  # alpha=1.5 fails
    assert password not in result.stdout + result.stderr

    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.data.tags["diito.role"] for r in runs) == ["student"] * 4 + ["sweep", "teacher"]
    downloads = home / "downloads"
    for run in runs:
        client.download_artifacts(run.info.run_id, "", str(downloads / run.info.run_id))
    assert any(downloads.rglob("overrides.yaml")) and any(downloads.rglob("summary.json"))  # the files that held it
    (sweep_dir,) = home.glob("multirun/*/*")
    hydra_own = {sweep_dir / "multirun.yaml", *sweep_dir.glob("*/.hydra/*")}  # the user's command line, on their disk
    project_files = [p for p in sweep_dir.rglob("*") if p.is_file() and p not in hydra_own]
    assert {"sweep.json", "1.json", "3.json"} <= {p.name for p in project_files}
    for path in [*mlflow_server.folder.rglob("*"), *downloads.rglob("*"), *project_files]:
        assert not path.is_file() or password.encode() not in path.read_bytes(), path


def test_an_error_that_quotes_the_uri_is_printed_masked(home):
    """A server that answers its health check but drops every request: MLflow's error quotes the URI
    with its password, and the console shows it masked."""
    import http.server
    import threading

    class DropsRequests(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/health"):
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"OK")
            else:
                self.close_connection = True  # no answer at all

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), DropsRequests)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = run_cli(
            [
                "teacher=tiny",
                "trainer=debug",
                "tracking=server",
                f"tracking.uri=http://alice:s3cret@127.0.0.1:{server.server_port}",
                "tracking.retries=0",
                "tracking.timeout=1",
            ],
            home,
            timeout=300,
        )
    finally:
        server.shutdown()
    # The store's check before compute meets the error first: one line, masked, exit 2 (no traceback to mask)
    assert result.returncode == 2 and f"API request to http://alice:***@127.0.0.1:{server.server_port}/api/" in result.stderr, (
        result.stderr[-3000:]
    )
    assert result.stderr.strip().splitlines()[-1].startswith("error: tracking.uri: cannot open the store http://alice:***@")
    assert "s3cret" not in result.stdout + result.stderr
