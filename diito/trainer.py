"""The training loop shared by teacher fine-tuning and distillation.

One loop, readable top to bottom: AdamW with linear warm-up/decay, gradient accumulation, global
norm clipping, mixed precision where the device has it, evaluation every N steps and at each epoch
end (a fit that ``min_steps`` stretches over many epochs: ``epochs`` times, evenly), keep-best, early
stopping, and checkpoints that hold everything needed to resume exactly (model, optimizer,
scheduler, step, position in the epoch, every RNG state).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt
from torch import Tensor
from tqdm.auto import tqdm

from diito.files import atomic_write
from diito.interrupts import Interrupted

log = logging.getLogger(__name__)
Batch = dict[str, Tensor]
LossFn = Callable[[Batch], tuple[Tensor, dict[str, Tensor]]]
LogFn = Callable[[dict[str, float], int], None]


class LoopConfig(BaseModel):
    """Everything that decides what a fit produces. The student's ``trainer`` and the teacher's
    ``teacher.recipe`` each hold a complete copy, so no setting of one stage changes the other."""

    model_config = ConfigDict(extra="forbid")
    epochs: PositiveInt = 2
    min_steps: NonNegativeInt = 0
    max_steps: PositiveInt | None = None
    batch_size: PositiveInt = 32
    grad_accum: PositiveInt = 1
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    eval_every: PositiveInt | None = None
    keep_best: bool = True
    early_stopping: PositiveInt | None = None
    shuffle: bool = True
    length_grouped: bool = True
    max_train_examples: PositiveInt | None = None
    max_eval_examples: PositiveInt | None = None
    skip_nonfinite: NonNegativeInt = 0

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps of the whole fit: ``max_steps`` when set, else ``epochs`` epochs but at
        least ``min_steps`` (a small training set needs more passes than a large one)."""
        if self.max_steps:
            return self.max_steps
        return max(self.epochs * math.ceil(batches_per_epoch / self.grad_accum), self.min_steps)

    def eval_spacing(self, batches_per_epoch: int) -> int | None:
        """Optimizer steps between the scheduled evaluations of a fit that ``min_steps`` stretched
        beyond ``epochs`` epochs: ``epochs`` evaluations, evenly spaced, as the learning-rate schedule
        is. None when the fit evaluates at its epoch ends: otherwise a small training set stretched
        into many short epochs would be evaluated (and checkpointed) after each of them."""
        total = self.total_steps(batches_per_epoch)
        if self.max_steps or total <= self.epochs * math.ceil(batches_per_epoch / self.grad_accum):
            return None
        return math.ceil(total / self.epochs)


class TrainerConfig(LoopConfig):
    """The student's loop, plus how the job runs (shared with the teacher's fine-tune: none of
    these but ``subset_seed`` changes what is computed, only where, how fast and how visibly)."""

    # The student's own: which max_train_examples examples it trains on. None draws them with the
    # job's seed (each seed its own sample); a number fixes the draw across seeds. The teacher's
    # limit (teacher.recipe.max_train_examples) keeps the first examples.
    subset_seed: int | None = Field(None, ge=0, le=2**32 - 1)

    eval_batch_size: PositiveInt = 128
    device: str = "auto"
    devices: PositiveInt = 1  # ranks training the student (DDP); a launcher's own ranks need no setting
    num_threads: PositiveInt | None = None
    save_every: PositiveInt | None = 100
    log_every: PositiveInt = 20
    resume: bool = True
    progress: bool = True

    def with_loop(self, loop: LoopConfig) -> TrainerConfig:
        """These run settings with another stage's loop (the teacher's recipe)."""
        return self.model_copy(update={k: getattr(loop, k) for k in LoopConfig.model_fields})


class ScheduleConfig(BaseModel):
    """The learning-rate schedule: a function (or class) called as ``_target_(optimizer,
    num_warmup_steps=…, num_training_steps=…, **its other keys)`` that returns a scheduler stepped
    once per optimizer step (transformers' ``get_*_schedule_with_warmup`` follow it)."""

    model_config = ConfigDict(extra="allow", validate_by_name=True, serialize_by_alias=True)
    target: str = Field("transformers.get_linear_schedule_with_warmup", alias="_target_", min_length=1)


class OptimConfig(BaseModel):
    """The optimizer and its schedule, each named by ``_target_``; :func:`build_optimizer` builds both.
    The optimizer is called with the parameter groups (no weight decay on biases and LayerNorm
    weights), ``lr`` and its other keys (AdamW's ``betas``, ``eps``; SGD's ``momentum`` ...)."""

    model_config = ConfigDict(extra="allow", validate_by_name=True, serialize_by_alias=True)
    target: str = Field("torch.optim.AdamW", alias="_target_", min_length=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    schedule: ScheduleConfig = ScheduleConfig()

    @property
    def arguments(self) -> dict[str, Any]:
        """The optimizer's own keyword arguments besides ``lr``."""
        return dict(self.model_extra or {})


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch_in_epoch: NonNegativeInt = 0  # global batches of the current epoch already consumed (by every rank together)
    best_metric: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    stopped_early: bool = False
    skipped_nonfinite: int = 0  # optimizer steps skipped because a loss or the gradient was not finite
    # Seconds spent training and evaluating, over every process that got this far: a resumed run's
    # cost without the time it lay stopped (work lost after the last checkpoint is not counted).
    train_seconds: float = 0.0


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated
    and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full precision. ``auto`` is mixed precision wherever the
    hardware has it: bf16 on GPUs that support it (else fp16) and on CPUs with native bf16
    (about 1.5x faster training steps), fp32 elsewhere."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(precision: str, device: torch.device):
    """The mixed-precision context of ``precision`` on ``device``: training and prediction share it."""
    dtype = autocast_dtype(precision, device)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


KEEP_FREED_BYTES = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks of up to 1 GiB for reuse (True when it took the settings). A CPU
    step frees and allocates the same large buffers every time (the word embedding's gradient is
    47 MB for a 30k vocabulary at hidden 384); by default glibc maps any block over 32 MB fresh from
    the kernel and unmaps it when freed, so each step pays page faults to zero those pages again:
    13,000 a KD step and, over a run of cached KD steps, 10% of their time on a 2-core AMD EPYC
    (113 -> 103 ms), with no measurable change in a job's peak memory. It changes where memory comes from, never a value. Process-wide,
    once; nothing where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        return bool(libc.mallopt(m_mmap_threshold, KEEP_FREED_BYTES)) & bool(libc.mallopt(m_trim_threshold, KEEP_FREED_BYTES))
    except (OSError, AttributeError):
        return False


Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
"""A seed: what NumPy's and scikit-learn's generators accept, so a bad one is refused before compute."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and LayerNorm weights (one-dimensional parameters)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def batch_seed(seed: int, epoch: int, batch: int) -> int:
    """The seed of one global batch's randomness (dropout, the interchange's pairs, sites and
    positions): a function of (seed, epoch, batch) only, so it does not depend on the number of
    ranks, and a resumed run draws what an uninterrupted one would."""
    return int(np.random.SeedSequence([seed, epoch, batch]).generate_state(1)[0])


FUSED = ("torch.optim.AdamW", "torch.optim.Adam")  # optimizers with a fused kernel on CPU and CUDA


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, total_steps: int, device: torch.device):
    """The optimizer ``optim`` names over the framework's parameter groups (fused where the device
    has the kernel, unless ``fused`` is given: one kernel for all parameters, about 5x faster steps
    than the per-tensor loop), and its schedule."""
    from diito.targets import locate

    arguments = optim.arguments
    if optim.target in FUSED and "fused" not in arguments:
        arguments["fused"] = device.type in ("cpu", "cuda")
    optimizer = locate(optim.target)(param_groups(model, optim.weight_decay), lr=optim.lr, **arguments)
    warmup = int(optim.warmup_ratio * total_steps)
    scheduler = locate(optim.schedule.target)(
        optimizer, num_warmup_steps=warmup, num_training_steps=total_steps, **(optim.schedule.model_extra or {})
    )
    return optimizer, scheduler


class NonFiniteLoss(ArithmeticError):
    """A loss term or the gradient stopped being a finite number; the message names the step and the term."""


def _rng_state() -> dict[str, Any]:
    """Every RNG's state, in types that ``torch.load(weights_only=True)`` reads back (tensors, lists)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file, so a full disk raises OSError (ENOSPC) rather than
    torch's own writer's "enforce fail ... unexpected pos"."""
    with open(path, "wb") as f:
        torch.save(obj, f)


@dataclass(frozen=True)
class Validation:
    """How the loop judges the model: ``score()`` returns metrics, among them ``main_metric``
    (higher is better), which picks the best weights and decides early stopping."""

    score: Callable[[], dict[str, float]]
    main_metric: str


CHECKPOINT_ENTRIES = ("owner", "model", "optimizer", "scheduler", "scaler", "state", "rng", "running")
"""What a checkpoint holds; one without any of them (an older version's) is not resumed."""


def _difference(ours: dict[str, tuple], theirs: dict[str, tuple]) -> str:
    """The first way two {tensor name: shape} tables differ, in words."""
    if missing := sorted(ours.keys() - theirs.keys()):
        return f"{len(missing)} tensor(s) missing, such as {missing[0]}"
    if extra := sorted(theirs.keys() - ours.keys()):
        return f"{len(extra)} tensor(s) the model lacks, such as {extra[0]}"
    key = next(k for k in ours if ours[k] != theirs[k])
    return f"{key} is {list(theirs[key])}, the model's {list(ours[key])}"


class Trainer:
    """Trains ``model`` on ``device`` (this rank's: never re-read from ``config.device``) on the
    batches of ``loader`` with ``loss_fn``; checkpoints go to ``checkpoint_dir``, stamped with
    ``owner`` (the identity of what is trained: a checkpoint stamped otherwise is never resumed),
    metrics to ``log``; ``name`` labels the progress bar and log lines."""

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn,
        loader: torch.utils.data.DataLoader,
        config: TrainerConfig,
        optim: OptimConfig,
        checkpoint_dir: Path,
        validation: Validation,
        log: LogFn,
        *,
        name: str,
        device: torch.device,
        owner: str = "",
    ):
        self.model, self.loss_fn, self.loader, self.config = model, loss_fn, loader, config
        self.checkpoint_dir, self.validation, self.log, self.name, self.owner = checkpoint_dir, validation, log, name, owner
        self.device = device
        if device.type == "cpu":
            keep_freed_memory()
        # The loader says whether this is one rank of several (the student under DDP) or a whole fit
        # (the teacher, fine-tuned by rank 0 alone while the others wait).
        self.rank, self.world = loader.batch_sampler.rank, loader.batch_sampler.world
        self.batches_per_epoch = loader.batch_sampler.num_batches  # global batches, a multiple of the world size
        self.total_steps = config.total_steps(self.batches_per_epoch // self.world)
        self.eval_spacing = config.eval_spacing(self.batches_per_epoch // self.world)
        self.optimizer, self.scheduler = build_optimizer(model, optim, self.total_steps, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=autocast_dtype(config.precision, self.device) == torch.float16)
        self.state = TrainState()
        self._started = 0.0  # perf_counter() when this process's unclocked share of state.train_seconds began (set by fit)
        self._sums: dict[str, Tensor] = {}  # training losses summed since they were last logged
        self._count = 0
        self._checkpoint_step: int | None = None  # the step of the newest checkpoint written or resumed from
        # Where this process's training time goes (logged as time/<part>_seconds at the end of the fit).
        self.seconds = dict.fromkeys(("steps", "evaluation", "checkpoints"), 0.0)

    @property
    def epochs_run(self) -> float:
        """Epochs the fit has run (the last one may have stopped part-way): with ``min_steps`` a small
        training set is read many times, and this says how many."""
        return self.state.epoch + self.state.batch_in_epoch / self.batches_per_epoch

    # -- checkpoints -----------------------------------------------------------------------------
    @property
    def _last(self) -> Path:
        return self.checkpoint_dir / "last.pt"

    @property
    def _previous(self) -> Path:
        return self.checkpoint_dir / "previous.pt"

    @property
    def _best(self) -> Path:
        return self.checkpoint_dir / "best.pt"

    def save_checkpoint(self) -> None:
        """Everything needed to resume exactly, written to a temporary name and renamed into place
        (by rank 0: the ranks hold the same weights); the checkpoint before it is kept as
        ``previous.pt`` in case this one is ever damaged."""
        running = dict(self._sums)
        if self.world > 1:  # every rank resumes with the ranks' average, which logs the same means
            for key in sorted(running):
                dist.all_reduce(running[key])
                running[key] = running[key] / self.world
        if self.rank != 0:
            return
        with self._timed("checkpoints"):
            self._write_checkpoint(running)

    def _write_checkpoint(self, running: dict[str, Tensor]) -> None:
        self._clock()
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        log.debug("%s: writing checkpoint at step %d", self.name, self.state.step)
        checkpoint = {
            "owner": self.owner,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "state": asdict(self.state),
            "rng": _rng_state(),
            "running": {"sums": running, "count": self._count},  # so a resumed train/loss average is exact
        }
        if self._last.exists():
            os.replace(self._last, self._previous)
        atomic_write(self._last, lambda tmp: save(checkpoint, tmp))
        self._checkpoint_step = self.state.step

    def try_resume(self) -> bool:
        """Load the newest checkpoint that is this fit's; True when training resumes from one. A
        damaged one, or one that is not this fit's (another owner, another shape, an older version's),
        is said in one line and passed over for the one before it (or a fresh start)."""
        candidates = [p for p in (self._last, self._previous) if p.exists()]
        for i, path in enumerate(candidates):
            try:
                ckpt = torch.load(path, map_location=self.device, weights_only=True)
                problem = self._misfit(ckpt)
            except Exception as e:  # noqa: BLE001 - any unreadable file is handled alike
                problem = f"is damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            if problem is not None:
                log.warning(
                    "%s: checkpoint %s %s; %s",
                    self.name,
                    path,
                    problem,
                    "trying an earlier one" if i + 1 < len(candidates) else "starting afresh",
                )
                continue
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
            self.state = TrainState(**ckpt["state"])
            self._sums, self._count = ckpt["running"]["sums"], ckpt["running"]["count"]
            _set_rng_state(ckpt["rng"])
            return True
        return False

    def _misfit(self, ckpt: dict[str, Any]) -> str | None:
        """Why a readable checkpoint is not this fit's to resume, or None. Checked before anything
        is loaded: ``load_state_dict`` copies the tensors that fit before it raises on one that does
        not, which would leave a model half another's."""
        if missing := [k for k in CHECKPOINT_ENTRIES if k not in ckpt]:
            return f"lacks {', '.join(missing)} (an older version's, or incomplete)"
        if ckpt["owner"] != self.owner:
            return f"belongs to another job ({ckpt['owner'] or 'unnamed'}, this one is {self.owner or 'unnamed'})"
        if set(ckpt["state"]) != {f.name for f in fields(TrainState)} or not {"sums", "count"} <= set(ckpt["running"]):
            return "holds another version's training state"
        ours = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in ckpt["model"].items()}
        if ours != theirs:
            return f"does not fit the model ({_difference(ours, theirs)})"
        groups, saved_groups = self.optimizer.param_groups, ckpt["optimizer"]["param_groups"]
        saved, states = [i for group in saved_groups for i in group["params"]], ckpt["optimizer"]["state"]
        params = [p for group in groups for p in group["params"]]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in groups] or any(
            torch.is_tensor(t) and t.dim() and t.shape != p.shape for i, p in zip(saved, params) for t in states.get(i, {}).values()
        ):
            return "does not fit the optimizer (its parameters differ)"
        if bool(ckpt["scaler"]) != self.scaler.is_enabled():
            return "was trained in another precision (fp16's loss scaling differs)"
        return None

    def _clock(self) -> None:
        """Add the seconds since the last call (or since this process began training) to the state."""
        now = time.perf_counter()
        self.state.train_seconds += now - self._started
        self._started = now

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self) -> TrainState:
        """Train to the last step (or until early stopping), resuming from the last checkpoint when
        ``config.resume`` allows; with ``keep_best``, end with the best evaluation's weights."""
        self._started = time.perf_counter()
        if self.config.resume and self.try_resume():
            log.info("%s: resuming from step %d", self.name, self.state.step)
            self._checkpoint_step = self.state.step
        elif self.rank == 0:  # an earlier attempt's (or another job's) best weights are not this fit's
            self._best.unlink(missing_ok=True)
        c, s = self.config, self.state  # after resuming, which replaces the state
        bar = tqdm(total=self.total_steps, initial=s.step, desc=self.name, disable=not c.progress, dynamic_ncols=True)
        try:
            while s.step < self.total_steps and not s.stopped_early:
                self._train_rest_of_epoch(bar)
                finished = s.step >= self.total_steps
                if s.batch_in_epoch == self.batches_per_epoch and not finished and not s.stopped_early:
                    s.epoch, s.batch_in_epoch = s.epoch + 1, 0
                if finished or (s.batch_in_epoch == 0 and not self.eval_spacing):
                    self._evaluate()  # at each epoch end (unless spaced), and once at the very end
                    if not finished and not s.stopped_early:
                        self.save_checkpoint()
        except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: say where the next run continues
            raise Interrupted(self.name, s.step, self._checkpoint_step if c.resume else None) from stop
        bar.close()
        self._clock()
        self.log({f"time/{part}_seconds": seconds for part, seconds in self.seconds.items()}, s.step)
        if c.keep_best and self._best.exists():
            self.model.load_state_dict(torch.load(self._best, map_location=self.device, weights_only=True))
        return s

    def _train_rest_of_epoch(self, bar: tqdm) -> None:
        """Optimizer steps over the rest of the current epoch, until it ends or training stops."""
        c, s = self.config, self.state
        self.model.train()
        self.loader.batch_sampler.set_epoch(s.epoch, skip=s.batch_in_epoch)
        batches = iter(self.loader)
        while s.batch_in_epoch < self.batches_per_epoch:
            # One optimizer step: grad_accum micro-batches, fewer at the end of an epoch. Checkpoints
            # are taken only between steps, so a resumed epoch starts on a step boundary.
            micro_steps = min(c.grad_accum, (self.batches_per_epoch - s.batch_in_epoch) // self.world)
            if not self.step([next(batches) for _ in range(micro_steps)]):
                continue  # a non-finite batch, skipped (trainer.skip_nonfinite)
            bar.update(1)
            if s.step % c.log_every == 0:
                self._log_training(bar)
            last_step = s.step >= self.total_steps
            epoch_end = s.batch_in_epoch == self.batches_per_epoch and not self.eval_spacing  # evaluated by fit() right after
            spaced = bool(self.eval_spacing) and s.step % self.eval_spacing == 0
            if (spaced or (c.eval_every and s.step % c.eval_every == 0)) and not last_step and not epoch_end:
                self._evaluate()
                self.model.train()
            if last_step or s.stopped_early:
                return
            if spaced or (c.save_every and s.step % c.save_every == 0):  # spaced evaluations checkpoint as epoch ends do
                self.save_checkpoint()

    def step(self, batches: list[Batch]) -> bool:
        """One optimizer step on ``batches`` (its micro-batches): forward and backward of each under
        autocast, then clipping, the optimizer and the schedule; False when it was skipped (a
        non-finite loss or gradient, within ``skip_nonfinite``). What a job pays per step, and what
        ``python -m diito.bench`` times."""
        with self._timed("steps"):
            return self._optimizer_step([self._micro_step(batch, last=i == len(batches) - 1) for i, batch in enumerate(batches)])

    @contextlib.contextmanager
    def _timed(self, part: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - start

    def _micro_step(self, batch: Batch, last: bool) -> dict[str, Tensor]:
        """Forward and backward of one micro-batch on each rank (its loss scaled so the step averages
        them; under DDP the gradients are averaged over the ranks on the step's ``last`` one only);
        returns the loss and its terms, detached."""
        s = self.state
        seed_everything(batch_seed(self.loader.batch_sampler.seed, s.epoch, s.batch_in_epoch + self.rank))
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        no_sync = getattr(self.loss_fn, "no_sync", None)
        with no_sync() if no_sync and not last else contextlib.nullcontext(), autocast(self.config.precision, self.device):
            loss, terms = self.loss_fn(batch)
            self.scaler.scale(loss / self.config.grad_accum).backward()
        s.batch_in_epoch += self.world
        return {name: value.detach().float() for name, value in {"loss": loss, **terms}.items()}

    def _log_training(self, bar: tqdm) -> None:
        sums = dict(self._sums)
        if self.world > 1:  # every rank's losses, averaged
            stacked = torch.stack([sums[k] for k in sorted(sums)])
            dist.all_reduce(stacked)
            sums = {k: v / self.world for k, v in zip(sorted(sums), stacked)}
        means = {f"train/{k}": float(v) / self._count for k, v in sums.items()}
        self.log(means | {"train/lr": self.scheduler.get_last_lr()[0]}, self.state.step)
        bar.set_postfix(loss=f"{means['train/loss']:.4f}")
        if not self.config.progress:  # no bar (sweeps, CI, logs): a line instead
            log.info("%s step %d/%d: loss %.4f", self.name, self.state.step, self.total_steps, means["train/loss"])
        self._sums, self._count = {}, 0

    def _optimizer_step(self, step_terms: list[dict[str, Tensor]]) -> bool:
        """Clip, step and count, once the step's losses and gradient are known to be finite (one
        host sync per step); False when the step was skipped instead."""
        self.scaler.unscale_(self.optimizer)
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        losses = torch.stack([value for terms in step_terms for value in terms.values()])
        # With fp16 the scaler expects an occasional overflowing gradient and skips that step itself.
        finite = torch.isfinite(losses).all() & (torch.isfinite(grad_norm) | self.scaler.is_enabled())
        if self.world > 1:  # every rank skips or stops together
            finite = finite.to(torch.int32)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not bool(finite):
            self._nonfinite(step_terms, grad_norm)
            self.optimizer.zero_grad(set_to_none=True)
            return False
        for terms in step_terms:  # summed on the device: no further host sync per batch
            for name, value in terms.items():
                self._sums[name] = self._sums.get(name, 0.0) + value
            self._count += 1
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return True

    def _nonfinite(self, step_terms: list[dict[str, Tensor]], grad_norm: Tensor) -> None:
        """Skip the step (within ``skip_nonfinite``) or stop, naming the step and the terms."""
        s = self.state
        bad = {
            name: float(value)
            for terms in step_terms
            for name, value in terms.items()
            if name != "loss" and not math.isfinite(float(value))
        }
        what = ", ".join(f"{name}={value}" for name, value in bad.items()) or f"the gradient (norm {float(grad_norm)})"
        if s.skipped_nonfinite < self.config.skip_nonfinite:
            s.skipped_nonfinite += 1
            log.warning(
                "%s: step %d: non-finite %s; batch skipped (%d of trainer.skip_nonfinite=%d)",
                self.name,
                s.step + 1,
                what,
                s.skipped_nonfinite,
                self.config.skip_nonfinite,
            )
            return
        kept = f"the last good checkpoint is {self._last}" if self._last.exists() else "no checkpoint was written before it"
        raise NonFiniteLoss(
            f"{self.name} step {s.step + 1}: non-finite {what}; training stopped ({kept}; "
            f"lower optim.lr, or let trainer.skip_nonfinite skip such batches)"
        )

    def _evaluate(self) -> None:
        """Rank 0 evaluates, keeps the best weights and decides early stopping for every rank."""
        s = self.state
        if self.rank == 0:
            with self._timed("evaluation"):
                self._judge(self.validation.score())
        if self.world > 1:
            decided = [asdict(s)]
            dist.broadcast_object_list(decided, src=0)
            for key, value in decided[0].items():
                setattr(s, key, value)

    def _judge(self, metrics: dict[str, float]) -> None:
        s = self.state
        value = metrics[self.validation.main_metric]
        self.log(metrics, s.step)
        best = math.isfinite(value) and (s.best_metric is None or value > s.best_metric)  # NaN is never the best
        log.info(
            "%s evaluation at step %d/%d (epoch %.2f): %s %.4f%s",
            self.name,
            s.step,
            self.total_steps,
            self.epochs_run,
            self.validation.main_metric,
            value,
            " (best so far)" if best or s.best_metric is None else f" (best {s.best_metric:.4f} at step {s.best_step})",
        )
        if best:
            s.best_metric, s.best_step, s.evals_since_best = value, s.step, 0
            if self.config.keep_best:
                self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
                state = self.model.state_dict()
                atomic_write(self._best, lambda tmp: save(state, tmp))
        else:
            s.evals_since_best += 1
            if self.config.early_stopping and s.evals_since_best >= self.config.early_stopping:
                s.stopped_early = True
