"""Encoding and batching: tokenised splits, dynamic padding, length-grouped batches that resume exactly.

What the trainer and the objective need of the data, and nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

if TYPE_CHECKING:
    from diito.sources import Examples, TaskData
    from diito.tasks import TaskSpec


@dataclass
class Encoded:
    """Unpadded token ids of one split; padding happens per batch in the collate function."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    """None for tokenizers without segment ids (e.g. RoBERTa)."""
    labels: np.ndarray | None
    ids: list[str]
    lengths: np.ndarray
    rows: np.ndarray | None = None
    """Each example's position in its whole split (None: 0..n-1, the whole split itself): what a
    batch's ``index`` carries, so a job's sample reads the teacher outputs cached for the split."""

    @property
    def positions(self) -> np.ndarray:
        return np.arange(len(self)) if self.rows is None else self.rows

    def __len__(self) -> int:
        return len(self.input_ids)

    def digest(self) -> str:
        """Of the examples as the models see them (token ids and labels): MLflow's dataset digest."""
        h = hashlib.sha256(np.concatenate([np.asarray(row, dtype=np.int64) for row in self.input_ids] or [np.zeros(0)]).tobytes())
        h.update(self.lengths.astype(np.int64).tobytes())
        if self.labels is not None:
            h.update(np.asarray(self.labels).tobytes())
        return h.hexdigest()[:16]

    def head(self, n: int | None) -> Encoded:
        """The first ``n`` examples (all of them for None): quick evaluations, the teacher's own limit."""
        if n is None or n >= len(self):
            return self
        return self.take(np.arange(n))

    def take(self, rows: np.ndarray) -> Encoded:
        """The examples at ``rows``, in that order."""
        pick = lambda values: [values[i] for i in rows]  # noqa: E731
        types = None if self.token_type_ids is None else pick(self.token_type_ids)
        labels = None if self.labels is None else self.labels[rows]
        return Encoded(pick(self.input_ids), types, labels, pick(self.ids), self.lengths[rows], self.positions[rows])

    def sample(self, n: int | None, seed: int) -> Encoded:
        """``n`` examples drawn at random with ``seed`` (all of them for None), stratified by class
        when the labels are classes and every class can be split so, kept in the file's order. Each
        seed draws another sample, so runs over seeds vary the training data, not only their own
        randomness."""
        if n is None or n >= len(self):
            return self
        from sklearn.model_selection import train_test_split

        rows = np.arange(len(self))
        classes = self.labels if self.labels is not None and self.labels.dtype.kind in "iu" else None
        if classes is not None:
            counts = np.unique(classes, return_counts=True)[1]
            if counts.min() < 2 or n < len(counts):  # too few of a class (or too small a sample) to stratify
                classes = None
        chosen, _ = train_test_split(rows, train_size=n, stratify=classes, random_state=seed % 2**32)
        return self.take(np.sort(chosen))


def encode(examples: Examples, tokenizer: Any, max_length: int) -> Encoded:
    """Tokenise a split in one fast-tokenizer batch call, truncated to `max_length`, unpadded."""
    first = [t[0] for t in examples.texts]
    second = [t[1] for t in examples.texts] if examples.texts and len(examples.texts[0]) == 2 else None
    enc = tokenizer(first, second, truncation=True, max_length=max_length, padding=False, return_attention_mask=False)
    input_ids = enc["input_ids"]
    lengths = np.fromiter(map(len, input_ids), dtype=np.int64, count=len(input_ids))
    return Encoded(input_ids, enc.get("token_type_ids"), examples.labels, examples.ids, lengths)


class _Indices(Dataset):
    """Dataset of example indices; the collate function looks the examples up."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class PadCollate:
    """Pad a batch only to its own longest sequence (a class so workers can pickle it)."""

    def __init__(self, encoded: Encoded, pad_token_id: int) -> None:
        self.encoded = encoded
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[int]) -> dict[str, torch.Tensor]:
        enc = self.encoded
        width = int(enc.lengths[batch].max())
        input_ids = np.full((len(batch), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        types = None if enc.token_type_ids is None else np.zeros((len(batch), width), dtype=np.int64)
        for row, i in enumerate(batch):
            n = enc.lengths[i]
            input_ids[row, :n] = enc.input_ids[i]
            mask[row, :n] = 1
            if types is not None:
                types[row, :n] = enc.token_type_ids[i]
        out = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(mask),
            "index": torch.from_numpy(enc.positions[batch]),
        }
        if types is not None:
            out["token_type_ids"] = torch.from_numpy(types)
        if enc.labels is not None:
            out["labels"] = torch.from_numpy(enc.labels[batch])  # int64 -> long, float32 -> float
        return out


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of indices, reshuffled deterministically from (seed, epoch), shared out among ranks.

    With `length_grouped` (shuffled loaders only), like Hugging Face's
    LengthGroupedSampler: shuffle, cut into mega-batches of 8 to 50 batches (fewer on small data),
    sort each by length, cut into batches, shuffle the batch order. Batches then
    hold similar lengths, so dynamic padding wastes little. Without `shuffle`,
    batches are in data order (evaluation). The last partial batch is kept.

    The batches of an epoch are *global*: with `world` ranks, rank r takes global batches
    r, r + world, r + 2·world, …, and every rank the same number (an epoch's last
    `len % world` batches are left out), or training would wait forever on the rank
    with one more. `skip` counts global batches, so a resumed epoch continues where
    it stopped whatever the number of ranks.
    """

    MEGA_BATCHES = 50
    MIN_MEGA_BATCHES = 8

    def __init__(
        self, lengths: np.ndarray, batch_size: int, *, shuffle: bool, seed: int, length_grouped: bool, rank: int = 0, world: int = 1
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.length_grouped = length_grouped
        self.rank, self.world = rank, world
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's order; `skip` drops its first global batches (exact mid-epoch resume)."""
        if skip % self.world:
            raise ValueError(f"skip {skip} is not a whole number of rounds of {self.world} ranks")
        self.epoch = epoch
        self.skip = skip

    @property
    def num_batches(self) -> int:
        """Global batches in a full epoch, ignoring `skip` (a multiple of `world`)."""
        batches = -(-len(self.lengths) // self.batch_size)
        return batches - batches % self.world

    def __len__(self) -> int:
        """Batches this rank's next iteration yields (its share of an epoch minus `skip`)."""
        return max(self.num_batches - self.skip, 0) // self.world

    def batches(self) -> list[np.ndarray]:
        """All global batches of the current epoch, including skipped ones."""
        n, bs = len(self.lengths), self.batch_size
        if not self.shuffle:
            batches = [np.arange(i, min(i + bs, n)) for i in range(0, n, bs)]
        else:
            rng = np.random.default_rng([self.seed, self.epoch])
            order = rng.permutation(n)
            if not self.length_grouped:
                batches = [order[i : i + bs] for i in range(0, n, bs)]
            else:
                # Smaller mega-batches on small data so batch composition still varies by epoch, but
                # never under MIN_MEGA_BATCHES batches: with fewer, batches hold lengths drawn almost
                # at random and half of a 250-example job's tokens were padding (0.88 real with 8).
                mega = bs * max(self.MIN_MEGA_BATCHES, min(self.MEGA_BATCHES, n // (4 * bs)))
                grouped = []
                for start in range(0, n, mega):
                    chunk = order[start : start + mega]
                    chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                    grouped += [chunk[i : i + bs] for i in range(0, len(chunk), bs)]
                batches = [grouped[i] for i in rng.permutation(len(grouped))]
        return batches[: self.num_batches]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches()[self.skip + self.rank :: self.world]:
            yield batch.tolist()


def make_loader(
    encoded: Encoded,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    length_grouped: bool,
    pad_token_id: int,
    rank: int = 0,
    world: int = 1,
) -> DataLoader:
    """DataLoader with dynamic padding; control the order via `loader.batch_sampler.set_epoch`."""
    sampler = EpochBatchSampler(
        encoded.lengths, batch_size, shuffle=shuffle, seed=seed, length_grouped=length_grouped, rank=rank, world=world
    )
    return DataLoader(
        _Indices(len(encoded)),
        batch_sampler=sampler,
        collate_fn=PadCollate(encoded, pad_token_id),
        # Its own generator: iterating a DataLoader otherwise draws from the global torch RNG, so
        # a resumed run's dropout masks would drift from an uninterrupted run's.
        generator=torch.Generator().manual_seed(seed),
    )


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A collated batch without its labels and example positions: what a model's forward takes."""
    return {k: v for k, v in batch.items() if k not in ("labels", "index")}


@dataclass
class Prepared:
    """A task's splits, tokenised once, and how to batch them."""

    spec: TaskSpec
    encoded: dict[str, Encoded]
    fingerprint: str  # of the examples and the tokenisation: part of the teacher cache key
    pad_token_id: int
    label_names: list[str] | None  # None for regression; a `files` task's come from its training file
    test_splits: list[str]  # the test splits actually present (a `files` task may have none)

    @classmethod
    def from_task(cls, data: TaskData, tokenizer: Any) -> Prepared:
        """Every split of the task, tokenised once (each stage then takes its own slice: ``limited``)."""
        spec = data.spec
        encoded = {split: encode(examples, tokenizer, spec.max_length) for split, examples in data.splits.items()}
        fingerprint = hashlib.sha256(f"{data.fingerprint()} {spec.max_length}".encode()).hexdigest()[:16]
        return cls(spec, encoded, fingerprint, tokenizer.pad_token_id, data.label_names, data.test_splits)

    @property
    def num_labels(self) -> int:
        """Output size of the classifier head (1 for regression)."""
        return 1 if self.label_names is None else len(self.label_names)

    def limited(self, max_train_examples: int | None, max_eval_examples: int | None, subset_seed: int | None = None) -> Prepared:
        """What one stage sees: ``max_train_examples`` training examples (drawn with ``subset_seed``,
        or the first ones when it is None) and the first ``max_eval_examples`` of every other split
        (each stage has its own limits)."""

        def limit(split: str, enc: Encoded) -> Encoded:
            if split != "train":
                return enc.head(max_eval_examples)
            return enc.head(max_train_examples) if subset_seed is None else enc.sample(max_train_examples, subset_seed)

        return dataclasses.replace(self, encoded={split: limit(split, enc) for split, enc in self.encoded.items()})

    def loader(
        self,
        split: str,
        batch_size: int,
        *,
        train: bool = False,
        seed: int = 0,
        shuffle: bool = True,
        length_grouped: bool = True,
        rank: int = 0,
        world: int = 1,
    ) -> DataLoader:
        """For training, reshuffled each epoch from ``seed`` (length-grouped unless told not to) or,
        without ``shuffle``, in the file's order every epoch (as the original read it), this rank's
        share of it; else in order."""
        shuffle = train and shuffle
        return make_loader(
            self.encoded[split],
            batch_size,
            shuffle=shuffle,
            seed=seed,
            length_grouped=length_grouped and shuffle,
            pad_token_id=self.pad_token_id,
            rank=rank,
            world=world,
        )

    @property
    def labelled_eval_splits(self) -> list[str]:
        return [s for s in self.spec.eval_splits if self.encoded[s].labels is not None]
