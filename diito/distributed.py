"""One job on several processes: PyTorch DistributedDataParallel, started here or by a launcher.

``trainer.devices=N`` spawns N ranks inside the job (one folder, one MLflow run); ``torchrun`` or
submitit with ``tasks_per_node`` start the ranks themselves and say so in the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). gloo on CPU, nccl on CUDA with one
GPU per rank. Rank 0 alone evaluates, checkpoints and talks to MLflow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def launched() -> bool:
    """Whether a launcher started this process as one of several ranks."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return True
    try:  # submitit with tasks_per_node > 1 describes the ranks its own way
        import submitit

        environment = submitit.JobEnvironment()
        if environment.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
            return True
    except (ImportError, RuntimeError):
        pass
    return False


def rank_and_size() -> tuple[int, int]:
    """(this process's rank, the number of ranks): (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def process_group(device: str) -> Iterator[tuple[int, int, torch.device]]:
    """Join the ranks described by the environment: yields (rank, world size, this rank's device)."""
    rank_, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", rank_))
        torch.cuda.set_device(local)
        here = torch.device("cuda", local)
    else:
        here = torch.device("cpu")
        # the ranks on this machine share its cores (trainer.num_threads, when set, decides instead)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank_, world_size=world)
    try:
        yield rank_, world, here
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def spawn(world: int, function: Callable[..., float], args: tuple) -> float:
    """Run ``function(*args)`` as ``world`` ranks on this machine; returns rank 0's result. A rank's
    failure comes back as the exception rank 0 raised, when it raised one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="diito-ranks-") as folder:
        outcome = Path(folder) / "rank0.json"
        try:
            mp.spawn(_rank, args=(world, port, outcome, function, args), nprocs=world, join=True)
        except mp.ProcessRaisedException:
            details = json.loads(outcome.read_text()) if outcome.exists() else {}
            if "error" in details:
                raise RankFailed(details) from None
            raise
        return json.loads(outcome.read_text())["result"]


class RankFailed(RuntimeError):
    """Rank 0 of a spawned job failed; ``details`` holds its error (and its MLflow run, if any)."""

    def __init__(self, details: dict[str, Any]):
        super().__init__(details["error"])
        self.details = details


def _rank(index: int, world: int, port: int, outcome: Path, function: Callable[..., float], args: tuple) -> None:
    os.environ |= {"RANK": str(index), "LOCAL_RANK": str(index), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    # A spawned process starts without the job's logging: rank 0 speaks as the job would, the others only warn.
    logging.basicConfig(level=logging.INFO if index == 0 else logging.WARNING, force=True,
                        format=f"[%(asctime)s][%(name)s][%(levelname)s][rank {index}] - %(message)s")
    try:
        result = function(*args)
    except Exception as e:
        if index == 0:
            run_id = getattr(e, "run_id", None)
            outcome.write_text(json.dumps({"error": f"{type(e.__cause__ or e).__name__}: {e.__cause__ or e}", "run_id": run_id}))
        raise
    if index == 0:
        outcome.write_text(json.dumps({"result": result}))
