"""The ranks of one job: how many processes train its student, who starts them, and which device each uses.

This module alone decides the topology (:func:`topology`): *launched* when a launcher started this
process as one of several ranks (``torchrun``, or submitit with ``tasks_per_node``: they say so in the
environment, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); *spawned*
when ``trainer.devices=N`` asks this process to start N ranks itself (one folder, one MLflow run);
*single* otherwise. PyTorch DistributedDataParallel over gloo on CPU, nccl on CUDA with one GPU per
rank: a rank's device is the kind ``trainer.device`` names (or ``auto`` finds) with the rank's own
local index. Rank 0 alone evaluates, checkpoints and talks to MLflow; a spawned job's failure is rank
0's own exception, raised again in the job's process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

log = logging.getLogger(__name__)
Topology = Literal["launched", "spawned", "single"]


@dataclass(frozen=True)
class Rank:
    """One process of a job: its rank, the number of ranks, and the device it computes on."""

    index: int
    world: int
    device: torch.device


def _named(name: str) -> torch.device:
    """``trainer.device`` as written: ``auto`` is CUDA where there is a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)


def resolve_device(name: str) -> torch.device:
    """The device of a job's only process: ``trainer.device``, on CUDA with the GPU's index."""
    found = _named(name)
    return torch.device("cuda", torch.cuda.current_device()) if found.type == "cuda" and found.index is None else found


def rank_device(device: str, local_rank: int) -> torch.device:
    """The device of the rank with index ``local_rank`` on its machine: the kind ``device`` names,
    and on CUDA the GPU of that index (never the index ``device`` may name: one GPU per rank)."""
    kind = _named(device).type
    return torch.device(kind, local_rank) if kind == "cuda" else torch.device(kind)


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


def topology(devices: int) -> Topology:
    """Who runs the job's ranks: a launcher (``launched``), this process (``spawned``, for
    ``trainer.devices`` > 1), or nobody but this process alone (``single``)."""
    if launched():
        return "launched"
    return "spawned" if devices > 1 else "single"


class Ranks:
    """The job's ranks as this process sees them (see :func:`ranks`)."""

    def __init__(self, kind: Topology, here: Rank, devices: int, device: str):
        self.kind, self.here, self._devices, self._device = kind, here, devices, device

    @property
    def leader(self) -> bool:
        """Whether this process leads the job: holds its lock, fine-tunes its teacher, logs it."""
        return self.here.index == 0

    @contextlib.contextmanager
    def leader_first(self) -> Iterator[None]:
        """The block runs on the leader first, then on the other launched ranks (which find what it
        made, say the teacher, in the cache)."""
        if not self.leader:
            barrier()
        yield
        if self.leader:
            barrier()

    def run(self, work: Callable[..., float], *args: Any) -> float:
        """``work(rank, *args)`` on every rank of the job; returns rank 0's result. A spawned rank 0's
        error is raised here as it was raised there."""
        if self.kind == "spawned":
            return spawn(self._devices, self._device, work, args)
        return work(self.here, *args)


@contextlib.contextmanager
def ranks(devices: int, device: str) -> Iterator[Ranks]:
    """The ranks of a job asking for ``devices`` ranks on ``device`` (``trainer.devices``,
    ``trainer.device``). Launched ranks join their process group here, for the whole job; under a
    launcher, ``trainer.devices`` other than 1 or the launcher's own number of ranks is refused."""
    kind = topology(devices)
    if kind != "launched":
        yield Ranks(kind, Rank(0, 1, resolve_device(device)), devices, device)
        return
    world = int(os.environ["WORLD_SIZE"])
    if devices not in (1, world):
        from diito.config import ConfigError

        raise ConfigError(
            f"trainer.devices: {devices} ranks asked for, but a launcher started {world}; its ranks need no setting "
            "(set trainer.devices=1, or launch that many)"
        )
    with process_group(device) as here:
        yield Ranks(kind, here, devices, device)


def rank_and_size() -> tuple[int, int]:
    """(this process's rank, the number of ranks): (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def process_group(device: str) -> Iterator[Rank]:
    """Join the ranks described by the environment: yields this rank, on its own device."""
    index, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    here = rank_device(device, int(os.environ.get("LOCAL_RANK", index)))
    if here.type == "cuda":
        torch.cuda.set_device(here)
    else:  # the ranks on this machine share its cores (trainer.num_threads, when set, decides instead)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    dist.init_process_group("nccl" if here.type == "cuda" else "gloo", rank=index, world_size=world)
    try:
        yield Rank(index, world, here)
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def spawn(world: int, device: str, work: Callable[..., float], args: tuple) -> float:
    """Run ``work(rank, *args)`` as ``world`` ranks on this machine, each on its own device; returns
    rank 0's result, or raises rank 0's own exception (:class:`RankFailed` when it cannot be carried
    over, or when another rank failed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="diito-ranks-") as folder:
        outcome = Path(folder) / "rank0.pickle"
        try:
            mp.spawn(_rank, args=(world, port, device, outcome, work, args), nprocs=world, join=True)
        except mp.ProcessRaisedException as e:
            try:
                failed = pickle.loads(outcome.read_bytes()) if outcome.exists() else None
            except Exception:  # noqa: BLE001 - an exception whose class does not unpickle is said in its last line
                failed = None
            if isinstance(failed, BaseException):
                raise failed from None
            raise RankFailed(str(e).strip().splitlines()[-1]) from None
        return pickle.loads(outcome.read_bytes())


class RankFailed(RuntimeError):
    """A spawned rank failed with an error that could not be carried over whole: its last line."""


def _rank(index: int, world: int, port: int, device: str, outcome: Path, work: Callable[..., float], args: tuple) -> None:
    os.environ |= {
        "RANK": str(index),
        "LOCAL_RANK": str(index),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    # A spawned process starts without the job's logging: rank 0 speaks as the job would, the others only warn.
    logging.basicConfig(
        level=logging.INFO if index == 0 else logging.WARNING,
        force=True,
        format=f"[%(asctime)s][%(name)s][%(levelname)s][rank {index}] - %(message)s",
    )
    try:
        with process_group(device) as here:
            result = work(here, *args)
    except Exception as e:
        if index == 0:
            try:
                outcome.write_bytes(pickle.dumps(e))
            except Exception:  # noqa: BLE001 - an error that does not pickle is said in its last line
                pass
        raise
    if index == 0:
        outcome.write_bytes(pickle.dumps(result))
