"""Faults of the machine a job runs on, not of its config: a tracking store that is not a database, is
locked, read-only or has its experiment deleted; a folder that cannot be written (a real read-only
file system); a disk too small for the job. Each is refused before compute in one line naming the
key (exit code 2, nothing cached, no run). A disk that fills up during the job anyway ends it in one
line (exit code 1), its run FAILED with that line and what it had written kept.

Real read-only and real small file systems need mounts: those tests run the job in a mount namespace
of its own (``unshare``), with a read-only bind mount or a small tmpfs, and are skipped where the
machine does not allow that."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from diito import job
from diito.config import ConfigError
from diito.files import NoSpace, atomic_write
from diito.trainer import save
from tests.conftest import ROOT, compose_config, run_cli

TINY = ["teacher=tiny", "trainer=debug"]
EXPERIMENT = "rotten_tomatoes-debug"  # the experiment a smoke job (teacher=tiny, trainer=debug) logs to


def store(home: Path) -> str:
    return f"sqlite:///{home}/mlflow.db"


def refused(overrides: list[str], home: Path) -> str:
    """The one-line message a job with ``overrides`` is refused with, once nothing was started."""
    with pytest.raises(ConfigError) as error:
        job.run(compose_config([*TINY, *overrides]), output_dir=home / "out")
    assert "\n" not in str(error.value)
    assert not (home / ".cache").exists() and not (home / "out").exists()
    return str(error.value)


# -- folders -------------------------------------------------------------------------------------------
def test_on_the_command_line_a_root_under_a_file_is_one_line(home):
    """Hydra creates the job's folder (under paths.root) before the job starts: checked before that."""
    (home / "somefile").write_text("not a folder")
    result = run_cli([*TINY, f"paths.root={home}/somefile/x"], home, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: paths.root: {home}/somefile is a file, so {home}/somefile/x cannot be "
        "a folder under it; set paths.root=<a writable folder>"
    )
    assert "Traceback" not in result.stderr


# -- the tracking store ---------------------------------------------------------------------------------
def test_a_store_that_is_not_a_database_is_refused_and_left_as_it_was(home):
    (home / "mlflow.db").write_text("my notes, not a database\n")
    message = refused([], home)
    assert message.startswith(f"tracking.uri: {store(home)} is not an SQLite database (")
    assert (home / "mlflow.db").read_text() == "my notes, not a database\n"


LOCKER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN " + sys.argv[2])
print("locked", flush=True)
time.sleep(float(sys.argv[3]))
db.execute("COMMIT")
"""


def hold_lock(path: Path, kind: str, seconds: float) -> subprocess.Popen:
    """Another program holding ``BEGIN <kind>`` on the database for ``seconds``."""
    holder = subprocess.Popen([sys.executable, "-c", LOCKER, str(path), kind, str(seconds)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.mark.parametrize("kind", ["EXCLUSIVE", "IMMEDIATE"])
def test_a_store_locked_by_another_program_is_refused_after_the_timeout(home, kind):
    MlflowClient(store(home)).create_experiment(EXPERIMENT)
    holder = hold_lock(home / "mlflow.db", kind, 600)
    try:
        message = refused(["tracking.timeout=1"], home)
    finally:
        holder.kill()
        holder.wait()
    assert message.startswith(f"tracking.uri: {store(home)} is locked by another program (still after tracking.timeout=1 s)")
    client = MlflowClient(store(home))
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_a_short_write_lock_is_waited_out(home):
    """The jobs of a parallel sweep take short write locks on the store in turn: not a fault."""
    MlflowClient(store(home)).create_experiment(EXPERIMENT)
    holder = hold_lock(home / "mlflow.db", "IMMEDIATE", 1)
    try:
        job.validate(compose_config([*TINY, "tracking.timeout=60"]))
    finally:
        holder.wait()
    assert holder.returncode == 0


def test_a_read_only_store_is_refused(home):
    MlflowClient(store(home)).create_experiment(EXPERIMENT)
    (home / "mlflow.db").chmod(0o444)  # root could write it anyway; the permissions say not to
    before = (home / "mlflow.db").read_bytes()
    message = refused([], home)
    assert message == (
        f"tracking.uri: {store(home)} is read-only ({home}/mlflow.db is read-only (permissions -r--r--r--)); "
        "make it writable or set tracking.uri=<another store>"
    )
    assert (home / "mlflow.db").read_bytes() == before


def test_no_database_is_created_before_compute(home, tmp_path):
    """An absent store is fine (MLflow creates it with the job's first run); validation creates none."""
    job.validate(compose_config(TINY))
    assert not (home / "mlflow.db").exists()


def test_a_deleted_experiment_is_refused_and_the_advice_restores_it(home):
    client = MlflowClient(store(home))
    experiment = client.create_experiment(EXPERIMENT)
    client.delete_experiment(experiment)  # what the MLflow UI's delete does
    message = refused([], home)
    command = f"MLFLOW_TRACKING_URI={store(home)} mlflow experiments restore --experiment-id {experiment}"
    assert message == (
        f"tracking.experiment: '{EXPERIMENT}' is deleted; restore it ({command}, or in the UI's trash) "
        "or set tracking.experiment=<another name>"
    )
    assert not client.search_runs([experiment])
    # the advice works: restored, the same job validates
    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    variable, *arguments = shlex.split(command)
    environment[variable.split("=", 1)[0]] = variable.split("=", 1)[1]
    subprocess.run(arguments, env=environment, check=True, capture_output=True)
    job.validate(compose_config(TINY))


@pytest.mark.slow  # starts a server
def test_a_deleted_experiment_on_a_server_is_refused(home, mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    client.delete_experiment(client.create_experiment(EXPERIMENT))
    message = refused(["tracking=server", f"tracking.uri={mlflow_server.uri}"], home)
    assert message.startswith(f"tracking.experiment: '{EXPERIMENT}' is deleted; restore it (MLFLOW_TRACKING_URI={mlflow_server.uri} mlflow")


def test_on_the_command_line_a_deleted_experiment_stops_a_sweep_before_any_job(home):
    client = MlflowClient(store(home))
    client.delete_experiment(client.create_experiment(EXPERIMENT))
    result = run_cli(["-m", *TINY, "loss.alpha=0.5,0.9"], home, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: tracking.experiment: '{EXPERIMENT}' is deleted; restore it")
    assert "Traceback" not in result.stderr
    assert not client.search_runs([e.experiment_id for e in client.search_experiments(view_type=3)])  # 3: active and deleted
    assert not (home / ".cache").exists()


# -- a full disk ---------------------------------------------------------------------------------------
def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_old_one(tmp_path):
    """The kernel's own "no space left": the temporary file the checkpoint is written to leads to
    /dev/full, where every write fails with ENOSPC."""
    last = tmp_path / "last.pt"
    save({"step": 1}, last)
    (tmp_path / ".last.pt.tmp").symlink_to("/dev/full")
    with pytest.raises(NoSpace) as error:
        atomic_write(last, lambda tmp: save({"step": 2, "weights": torch.zeros(1000)}, tmp))
    assert re.fullmatch(
        rf"no space left on device writing {last} \([\d.]+ [kMGTP]?B free\); free space there and run the job again", str(error.value)
    )
    assert torch.load(last) == {"step": 1}  # the old checkpoint is untouched
    assert not (tmp_path / ".last.pt.tmp").exists()


# -- real read-only and small file systems (in a mount namespace of the test's own) ----------------------
def _namespaces() -> bool:
    try:
        tried = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True, check=False)
    except OSError:  # no unshare
        return False
    return tried.returncode == 0


namespaces = pytest.mark.skipif(not _namespaces(), reason="this machine does not allow mount namespaces (unshare -rm)")


def job_line(args: list[str]) -> str:
    """The shell line of ``python run.py ARGS``."""
    return shlex.join([sys.executable, str(ROOT / "run.py"), *args])


def in_namespace(script: str, home: Path) -> subprocess.CompletedProcess:
    """The shell ``script`` in a mount namespace of its own (what it mounts vanishes with it), with
    ``home`` as the project folder."""
    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"DIITO_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], cwd=home, env=environment, capture_output=True, text=True, timeout=600, check=False
    )


def read_only_mount(folder: Path) -> str:
    return f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} || exit 99\n"


@namespaces
def test_a_cache_on_a_read_only_file_system_is_refused(home):
    (home / "cache").mkdir()
    result = in_namespace(read_only_mount(home / "cache") + job_line([*TINY, f"paths.cache={home}/cache"]), home)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: paths.cache: {home}/cache is read-only (a read-only file system); set paths.cache=<a writable folder>"
    )
    assert "Traceback" not in result.stderr and not any((home / "cache").iterdir())


@namespaces
def test_a_store_on_a_read_only_file_system_is_refused(home):
    (home / "store").mkdir()
    MlflowClient(f"sqlite:///{home}/store/mlflow.db").create_experiment(EXPERIMENT)
    result = in_namespace(read_only_mount(home / "store") + job_line([*TINY, f"tracking.uri=sqlite:///{home}/store/mlflow.db"]), home)
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"error: tracking.uri: sqlite:///{home}/store/mlflow.db is read-only ({home}/store/mlflow.db is read-only (a read-only file system))"
        )
    )
    assert "Traceback" not in result.stderr and not (home / ".cache").exists()


@namespaces
def test_a_disk_too_small_for_the_job_is_refused_before_compute(home):
    (home / "small").mkdir()
    command = job_line([*TINY, f"paths.cache={home}/small/cache"])
    result = in_namespace(
        f"mount -t tmpfs -o size=16m tmpfs {home}/small || exit 99\n"
        f"{command}\nstatus=$?\nfind {home}/small -type f > {home}/written.txt\nexit $status",
        home,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"error: paths.cache: not enough free space: the job writes about ([\d.]+) MB \(the teacher's fine-tune and cache "
        rf"entry [\d.]+ MB in {home}/small/cache/teachers/\S+, the student's checkpoints [\d.]+ MB in {home}/small/cache/runs/\w+\) "
        r"and that disk has 16.8 MB free; free [\d.]+ MB there or move it \(paths.cache=<a folder on a larger disk>\)",
        line,
    )
    written = [f for f in (home / "written.txt").read_text().split() if not f.endswith("/.lock")]  # the job's empty lock file aside
    assert "Traceback" not in result.stderr and written == []  # nothing written
    assert not (home / "mlflow.db").exists()  # no run


FILL = """
{job} &
job=$!
# once the student's first checkpoint is written, another program fills the disk
while kill -0 $job 2>/dev/null && ! ls {small}/cache/runs/*/checkpoint/last.pt >/dev/null 2>&1; do sleep 0.05; done
dd if=/dev/zero of={small}/filler bs=1M 2>/dev/null
wait $job
status=$?
rm -f {small}/filler
cp -r {small}/cache {home}/kept
exit $status
"""


@pytest.mark.slow
@namespaces
def test_a_disk_that_fills_up_during_the_job_ends_it_in_one_line(home):
    (home / "small").mkdir()
    command = job_line([*TINY, "trainer.max_steps=400", f"paths.cache={home}/small/cache"])
    result = in_namespace(
        f"mount -t tmpfs -o size=96m tmpfs {home}/small || exit 99\n" + FILL.format(job=command, small=f"{home}/small", home=home), home
    )
    assert result.returncode == 1, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"error: no space left on device writing {home}/small/cache/runs/\w+/checkpoint/(last|best)\.pt "
        r"\([\d.]+ [kMGTP]?B free\); free space there and run the job again",
        line,
    )
    assert "Traceback" not in result.stderr and "enforce fail" not in result.stderr
    client = MlflowClient(store(home))
    (run,) = [
        r for r in client.search_runs([e.experiment_id for e in client.search_experiments()]) if r.data.tags["diito.role"] == "student"
    ]
    assert run.info.status == "FAILED" and line.removeprefix("error: ") in run.data.tags["error"]
    # what was written before is kept: the teacher's cache entry, and a checkpoint the job resumes from
    assert len(list((home / "kept" / "teachers").glob("*/info.json"))) == 1
    (checkpoints,) = (home / "kept" / "runs").glob("*/checkpoint")
    kept = [torch.load(checkpoints / name, weights_only=True) for name in ("last.pt", "previous.pt") if (checkpoints / name).exists()]
    assert kept and max(k["state"]["step"] for k in kept) >= 2
    assert not list(checkpoints.glob(".*.tmp"))  # no half-written file left taking space
