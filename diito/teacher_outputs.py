"""The frozen teacher's outputs, computed once and shared by every job and rank that needs them.

The teacher is frozen and in eval mode, so its base run on an example is the same in every step of
every student distilled from it. A sweep of students therefore computes it once per (fine-tuned
teacher, task data, tokenisation, precision, what is stored) into a cache entry beside the teacher
cache, under the same build-once lock, and every step reads it instead of running the teacher:

- the logits (what KD reads, and the intervention diagnostics);
- for DIITO and the causal cosine, the outputs of the teacher blocks at and below the mapping's
  intervened blocks, since the fast counterfactual run recomputes only the blocks above the
  intervened one from the base run's block outputs (:func:`diito.intervention.counterfactual`);
- for the patience term, the [CLS] vectors of its teacher blocks (when not stored whole anyway).

Examples are stored unpadded, token-major (a flat ``(tokens, blocks, hidden)`` array and each
example's offsets), in the precision's dtype (bf16 stores 2 bytes a number), and read memory-mapped,
a batch at a time, padded to the batch's length. Padding never reaches a real token, so an example's
outputs computed at another padded length differ only by rounding (the tests show how much).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import transformers
from torch import Tensor

from diito import cache, files, tags
from diito.batching import Encoded, PadCollate, Prepared, model_inputs
from diito.config import ConfigError
from diito.models import load_model_config
from diito.teacher import cache_entry
from diito.trainer import autocast, autocast_dtype

if TYPE_CHECKING:
    from diito.config import Job
    from diito.intervention import MappingEntry

log = logging.getLogger(__name__)
FORMAT = 1  # of the files below; a new format is a new key
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}  # numpy has no bf16: its bits as uint16


@dataclass(frozen=True)
class Stored:
    """What a job's terms read of the teacher's base run, per example of each split."""

    splits: tuple[str, ...]
    layers: tuple[int, ...]  # hidden_states entries (block i's output is entry i + 1) stored at every token
    cls_layers: tuple[int, ...]  # entries stored at [CLS] only: the patience term's, where not stored whole

    @classmethod
    def of(cls, mapping: list[MappingEntry] | None, patience_layers: list[int] | None, splits: tuple[str, ...]) -> Stored:
        """For a job intervening with ``mapping`` (None: no intervention) and matching [CLS] vectors at
        ``patience_layers`` (None: no patience term)."""
        top = 0
        for entry in mapping or []:
            for site in entry.teacher:
                # A block-output site reads its block's output; an attention-heads site recomputes its
                # block from the block's input (the output below it).
                top = max(top, site.layer + 1 if site.heads is None else site.layer)
        layers = tuple(range(1, top + 1))
        return cls(splits, layers, tuple(sorted({p + 1 for p in patience_layers or []} - set(layers))))


def storage_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype outputs are stored in: the precision's autocast dtype, fp32 without one."""
    return autocast_dtype(precision, device) or torch.float32


def nbytes(stored: Stored, splits: dict[str, Encoded], hidden: int, labels: int, dtype: torch.dtype) -> int:
    """Bytes a cache entry takes on disk: per token ``hidden × stored blocks × itemsize``, plus per
    example its logits, [CLS] vectors and offsets."""
    size = dtype.itemsize
    total = 0
    for split in stored.splits:
        enc = splits[split]
        n, tokens = len(enc), int(enc.lengths.sum())
        total += tokens * len(stored.layers) * hidden * size + n * len(stored.cls_layers) * hidden * size
        total += n * labels * 4 + (2 * n + 1) * 8  # logits (fp32), rows and offsets (int64)
    return total


def _digest_files(paths: list[Path]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for path in paths:
        h.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def teacher_digest(folder: Path) -> str | None:
    """Of a saved teacher's weights and config (None when it is not saved yet): the key's teacher."""
    paths = sorted(p for p in Path(folder).glob("*") if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
    return _digest_files(paths) if any(p.suffix != ".json" for p in paths) else None


def entry_key(teacher: str, splits: dict[str, Encoded], stored: Stored, dtype: torch.dtype, device: torch.device) -> str:
    """Everything that changes the stored outputs: the teacher's weights, the token ids of the stored
    splits, what is stored, the precision, and what computes it (device type, torch, transformers)."""
    parts = {
        "format": FORMAT,
        "teacher": teacher,
        "data": {s: splits[s].digest() for s in stored.splits},
        "stored": asdict(stored),
        "dtype": str(dtype),
        "device": device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


# -- building ------------------------------------------------------------------------------------------
def build(
    folder: Path,
    model: torch.nn.Module,
    splits: dict[str, Encoded],
    pad_token_id: int,
    stored: Stored,
    precision: str,
    device: torch.device,
    batch_size: int = 64,
) -> dict:
    """Run ``model`` over every example of the stored splits and write their outputs to ``folder``;
    returns the entry's manifest (its files' sizes and digest), which :func:`cache.build_once` writes
    last, so a build that stops part-way leaves no manifest and is built again."""
    dtype = storage_dtype(precision, device)
    model.eval()
    names: list[Path] = []
    for split in stored.splits:
        enc = splits[split]
        n, lengths = len(enc), enc.lengths
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        np.save(folder / f"{split}.rows.npy", enc.positions.astype(np.int64))
        np.save(folder / f"{split}.offsets.npy", offsets)
        arrays = {"logits": np.lib.format.open_memmap(folder / f"{split}.logits.npy", "w+", np.float32, (n, model.config.num_labels))}
        hidden = model.config.hidden_size
        if stored.layers:
            arrays["hidden"] = np.lib.format.open_memmap(
                folder / f"{split}.hidden.npy", "w+", _NUMPY[dtype], (int(offsets[-1]), len(stored.layers), hidden)
            )
        if stored.cls_layers:
            arrays["cls"] = np.lib.format.open_memmap(folder / f"{split}.cls.npy", "w+", _NUMPY[dtype], (n, len(stored.cls_layers), hidden))
        collate = PadCollate(enc, pad_token_id)
        order = np.argsort(-lengths, kind="stable")  # batches of similar lengths: little padding to compute
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            inputs = {k: v.to(device) for k, v in model_inputs(collate(rows.tolist())).items()}
            with torch.no_grad(), autocast(precision, device):
                out = model(**inputs, output_hidden_states=bool(stored.layers or stored.cls_layers))
            arrays["logits"][rows] = out.logits.float().cpu().numpy()
            if stored.layers:
                blocks = _numpy(torch.stack([out.hidden_states[i] for i in stored.layers], dim=2), dtype)  # (batch, tokens, blocks, hidden)
                for r, i in enumerate(rows):
                    arrays["hidden"][offsets[i] : offsets[i + 1]] = blocks[r, : lengths[i]]
            if stored.cls_layers:
                arrays["cls"][rows] = _numpy(torch.stack([out.hidden_states[i][:, 0] for i in stored.cls_layers], dim=1), dtype)
        for name, array in arrays.items():
            array.flush()
            names.append(folder / f"{split}.{name}.npy")
        names += [folder / f"{split}.rows.npy", folder / f"{split}.offsets.npy"]
        del arrays
    return {
        "format": FORMAT,
        "stored": asdict(stored),
        "dtype": str(dtype).removeprefix("torch."),
        "hidden_states": model.config.num_hidden_layers + 1,
        "files": {p.name: p.stat().st_size for p in names},
        "digest": _digest_files(sorted(names)),
    }


def _numpy(t: Tensor, dtype: torch.dtype) -> np.ndarray:
    t = t.to(dtype).cpu()
    return t.view(torch.int16).numpy().view(np.uint16) if dtype == torch.bfloat16 else t.numpy()


def damage(folder: Path) -> str | None:
    """What is wrong with a completed entry (a file missing, of another size, or changed since it was
    written), or None when it is sound."""
    info = json.loads((folder / cache.INFO_FILE).read_text())
    if info.get("format") != FORMAT or "files" not in info:
        return "its manifest is of another format"
    for name, size in info["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} is {'missing' if not path.is_file() else f'{path.stat().st_size} bytes, not {size}'}"
    if _digest_files(sorted(folder / name for name in info["files"])) != info["digest"]:
        return "its files changed since they were written (digest mismatch)"
    return None


# -- reading -------------------------------------------------------------------------------------------
@dataclass
class CachedOutputs:
    """What the objective reads of a teacher's base run: ``logits`` and ``hidden_states`` (entries not
    stored are None; a patience-only entry is its [CLS] vectors, shaped ``(batch, 1, hidden)``)."""

    logits: Tensor
    hidden_states: tuple[Tensor | None, ...] | None


class Reader:
    """The cached outputs of one split, read a batch at a time from memory-mapped files."""

    def __init__(self, folder: Path, split: str, info: dict):
        self.stored, self.dtype = Stored(**{k: tuple(v) for k, v in info["stored"].items()}), getattr(torch, info["dtype"])
        self.entries = info["hidden_states"]
        self.rows, self.offsets = np.load(folder / f"{split}.rows.npy"), np.load(folder / f"{split}.offsets.npy")
        self.logits = np.load(folder / f"{split}.logits.npy", mmap_mode="r")
        self.hidden = np.load(folder / f"{split}.hidden.npy", mmap_mode="r") if self.stored.layers else None
        self.cls = np.load(folder / f"{split}.cls.npy", mmap_mode="r") if self.stored.cls_layers else None
        self.split = split

    def _tensor(self, array: np.ndarray, device: torch.device) -> Tensor:
        t = torch.from_numpy(array)
        if self.dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        # Moved in the stored dtype (fewer bytes), then widened: the model's hidden states are fp32
        # under autocast too, so the blocks above read what they would read live, rounded.
        return t.to(device, non_blocking=True).float()

    def __call__(self, batch: dict[str, Tensor]) -> CachedOutputs:
        mask = batch["attention_mask"]
        index = batch["index"].cpu().numpy()
        slots = np.searchsorted(self.rows, index)
        found = slots < len(self.rows)
        if not found.all() or (self.rows[slots] != index).any():
            raise KeyError(
                f"teacher outputs: examples {index[~found | (self.rows[np.minimum(slots, len(self.rows) - 1)] != index)][:5].tolist()} "
                f"of split {self.split!r} are not cached"
            )
        starts, ends = self.offsets[slots], self.offsets[slots + 1]
        if not np.array_equal(ends - starts, mask.sum(1).cpu().numpy()):
            raise ValueError(f"teacher outputs: the cached lengths of split {self.split!r} are not the batch's (another split's batch?)")
        device, (b, width) = mask.device, mask.shape
        logits = torch.from_numpy(np.ascontiguousarray(self.logits[slots])).to(device)
        if self.hidden is None and self.cls is None:
            return CachedOutputs(logits, None)
        states: list[Tensor | None] = [None] * self.entries
        if self.hidden is not None:
            padded = np.zeros((len(self.stored.layers), b, width, self.hidden.shape[-1]), self.hidden.dtype)  # padding: zeros
            for r, (start, end) in enumerate(zip(starts, ends)):
                padded[:, r, : end - start] = self.hidden[start:end].transpose(1, 0, 2)
            blocks = self._tensor(padded, device)
            for j, entry in enumerate(self.stored.layers):
                states[entry] = blocks[j]
        if self.cls is not None:
            cls = self._tensor(np.ascontiguousarray(self.cls[slots]), device)
            for j, entry in enumerate(self.stored.cls_layers):
                states[entry] = cls[:, j : j + 1]
        return CachedOutputs(logits, tuple(states))


@dataclass
class TeacherOutputs:
    """A complete cache entry, and whether this job built it."""

    folder: Path
    info: dict
    built: bool

    def reader(self, split: str) -> Callable[[dict[str, Tensor]], CachedOutputs] | None:
        """The cached outputs of ``split``; None when it is not cached (the teacher runs then)."""
        return Reader(self.folder, split, self.info) if split in self.info["stored"]["splits"] else None

    @property
    def tags(self) -> dict[str, str]:
        return {tags.TEACHER_OUTPUTS: "built" if self.built else "cache", tags.TEACHER_OUTPUTS_PATH: str(self.folder)}


def obtain(
    folder: Path,
    model: torch.nn.Module,
    splits: dict[str, Encoded],
    pad_token_id: int,
    stored: Stored,
    precision: str,
    device: torch.device,
    batch_size: int = 64,
) -> TeacherOutputs:
    """The cache entry at ``folder``, built now unless complete and sound (a damaged one is said and
    built again, never read)."""
    info, built = cache.build_once(
        folder, lambda f: build(f, model, splits, pad_token_id, stored, precision, device, batch_size), check=damage
    )
    return TeacherOutputs(folder, info, built)


# -- the job's use -------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What a job will cache, known before compute (so one that would not fit is refused then)."""

    stored: Stored
    splits: dict[str, Encoded]
    pad_token_id: int
    task: str
    precision: str
    device: torch.device
    root: Path  # <paths.cache>/teacher_outputs
    batch_size: int
    teacher_folder: Path  # where the fine-tuned teacher is (or will be) saved

    def folder(self) -> Path | None:
        """The entry's folder; None while the teacher is not fine-tuned yet (its weights are in the key)."""
        digest = teacher_digest(self.teacher_folder)
        if digest is None:
            return None
        key = entry_key(digest, self.splits, self.stored, storage_dtype(self.precision, self.device), self.device)
        return self.root / f"{self.task}-{key}"

    def obtain(self, model: torch.nn.Module) -> TeacherOutputs:
        """The entry for ``model``, the teacher saved in ``teacher_folder``."""
        folder = self.folder()
        outputs = obtain(folder, model, self.splits, self.pad_token_id, self.stored, self.precision, self.device, self.batch_size)
        log.info(
            "teacher outputs: %s %s (%s)",
            "computed now," if outputs.built else "from the cache,",
            folder,
            files.size(sum(outputs.info["files"].values())),
        )
        return outputs


def plan(job: Job, data: Prepared, device: torch.device) -> Plan | None:
    """The cache a distillation job reads (None with ``teacher.cache_outputs=false``), refused in one
    line when it is not built yet and would not fit its disk's free space."""
    c = job.config
    if not c.teacher.cache_outputs or c.stage != "distill" or c.loss.terms:
        return None  # a term of the user's may read any of the teacher's blocks: it runs live then
    splits, labels, hidden = data.encoded, data.num_labels, load_model_config(c.teacher.checkpoint or c.teacher.model).hidden_size
    saved = Path(c.teacher.checkpoint) if c.teacher.checkpoint else cache_entry(c.teacher, data, Path(c.paths.cache)) / "model"
    splits_read = ("train",)  # the probe's teacher runs on its fixed validation pairs are computed once per job anyway
    stored = Stored.of(job.mapping, job.patience_layers if c.loss.beta > 0 else None, splits_read)
    result = Plan(
        stored,
        splits,
        data.pad_token_id,
        c.task.name,
        c.trainer.precision,
        device,
        Path(c.paths.cache) / "teacher_outputs",
        c.trainer.eval_batch_size,
        saved,
    )
    folder = result.folder()
    if folder is None or not (folder / cache.INFO_FILE).exists():
        need, free = nbytes(stored, splits, hidden, labels, storage_dtype(c.trainer.precision, device)), files.free_space(result.root)
        if need > free:
            raise ConfigError(
                f"teacher.cache_outputs: the teacher's outputs would take {files.size(need)} in {result.root} and that disk "
                f"has {files.size(free)} free; free space there, or set teacher.cache_outputs=false (the teacher then "
                "runs in every step)"
            )
    return result
