"""Shared fixtures: every test gets its own project folder (MLflow store, caches) under tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared" / "data" / "glue"  # real GLUE files, when this checkout has them

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
TIMINGS = ("latency/", "speedup/", "time/")  # metrics that time this machine: identical runs differ in them


@pytest.fixture(autouse=True)
def _mlflow_uri_restored():
    """A test that points MLflow's fluent API at its store (``mlflow.set_tracking_uri``, which also
    sets MLFLOW_TRACKING_URI) leaves the next test's jobs logging where they would without it."""
    from diito.tracking.client import process_uri_kept

    with process_uri_kept():
        yield


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An isolated project folder: DIITO_HOME points at it and no outside MLflow URI leaks in."""
    monkeypatch.setenv("DIITO_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def compose_config(overrides: list[str] | None = None, hydra: bool = False):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [], return_hydra_config=hydra)


def run_cli(args: list[str], home: Path, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    """``python run.py ARGS`` in a subprocess, with ``home`` as the project folder."""
    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    environment |= {"DIITO_HOME": str(home), "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args], cwd=home, env=environment, capture_output=True, text=True, timeout=timeout
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 with a SQLite store in ``folder`` (or the database
    ``store``); it can be stopped and started again on the same port and store."""

    def __init__(self, folder: Path, store: str | None = None):
        self.folder = folder
        self.store = store or f"sqlite:///{folder / 'mlflow.db'}"
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        import time
        import urllib.request

        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                self.store,
                "--artifacts-destination",
                str(self.folder / "artifacts"),
                "--workers",
                "1",
            ],
            cwd=self.folder,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return
            except OSError:
                time.sleep(0.5)
        pytest.fail("mlflow server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on 127.0.0.1, stopped after the test."""
    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        yield server
    finally:
        server.stop()


class PostgreSQL:
    """A real PostgreSQL server on 127.0.0.1 with its data in a temporary folder (as the ``postgres``
    user when run as root: its ``initdb`` refuses root), stopped and removed after the test."""

    def __init__(self):
        import glob
        import shutil
        import tempfile

        initdb = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))[-1:]), None)
        if initdb is None:
            pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
        try:
            import psycopg  # noqa: F401
        except ImportError:
            pytest.skip("the PostgreSQL driver is not installed (pip install 'diito[postgres]')")
        self.bin = Path(initdb).resolve().parent
        self.as_owner: list[str] = []
        self.folder = Path(tempfile.mkdtemp(prefix="diito-postgres-"))
        if os.geteuid() == 0:
            import pwd

            try:
                pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no postgres user to run PostgreSQL as")
            shutil.chown(self.folder, "postgres")
            self.as_owner = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        self.uri = f"postgresql://postgres@127.0.0.1:{self.port}"
        subprocess.run(
            [*self.as_owner, str(self.bin / "initdb"), "-D", str(self.folder / "data"), "-A", "trust", "-U", "postgres", "--no-sync"],
            check=True,
            capture_output=True,
        )
        self.proc = subprocess.Popen(
            [
                *self.as_owner,
                str(self.bin / "postgres"),
                "-D",
                str(self.folder / "data"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-k",
                str(self.folder),
                "-c",
                "fsync=off",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its URI."""
        import time

        import psycopg

        for _ in range(120):
            try:
                with psycopg.connect(f"{self.uri}/postgres", autocommit=True) as connection:
                    connection.execute(f'CREATE DATABASE "{name}"')
                return f"{self.uri}/{name}"
            except psycopg.OperationalError:  # not accepting connections yet
                time.sleep(0.25)
        pytest.fail("PostgreSQL did not start")

    def stop(self) -> None:
        import shutil

        self.proc.terminate()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def postgres():
    server = PostgreSQL()
    try:
        yield server
    finally:
        server.stop()
