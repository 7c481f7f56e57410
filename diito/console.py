"""What the console shows: one line format, log lines that leave the progress bar whole, and the
libraries' own noise (their load and save bars, transformers' load report) kept off it.

Hydra's ``conf/hydra/job_logging/diito.yaml`` installs :class:`ProgressSafeHandler` and
:class:`OneNamePerLine`; :func:`quiet_libraries` runs at the start of every job.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from tqdm import tqdm

log = logging.getLogger(__name__)


def columns(lines: list[list[str]]) -> list[str]:
    """Rows of cells as lines of left-aligned columns, two spaces apart (the tables the commands print)."""
    widths = [max(len(cell) for cell in column) for column in zip(*lines)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]


class ProgressSafeHandler(logging.StreamHandler):
    """A console handler that writes through ``tqdm.write``: a log line printed while a progress
    bar runs clears the bar, prints, and redraws the bar below it (tqdm's own
    ``logging_redirect_tqdm`` does this for the duration of a block; this does it for the job)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging's own convention: report and go on
            self.handleError(record)


class OneNamePerLine(logging.Formatter):
    """Every line of a record starts with its time, level and logger name, so a multi-line message
    (a table) keeps saying where it comes from, and ``grep diito.job`` finds all of it."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)  # sets record.message
        line = self.formatMessage(record)
        if "\n" not in record.message or not line.endswith(record.message):
            return text
        head = line[: len(line) - len(record.message)]
        return text.replace(record.message, "\n".join(head + part if i else part for i, part in enumerate(record.message.split("\n"))), 1)


def quiet_libraries() -> None:
    """Turn off what the libraries print that tells a user nothing: transformers' "Loading
    weights" and "Writing model shards" bars, and MLflow's INFO lines (creating its tables)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("mlflow").setLevel(logging.WARNING)


@contextlib.contextmanager
def load_report_silenced() -> Iterator[None]:
    """transformers' LOAD REPORT (a coloured table, logged as a warning) is withheld while a base
    model loads; :func:`note_new_head` says what it would have said, in one line. A filter, not a
    higher level: transformers checks its tensor-parallel plan (and warns about it) when the level
    is raised."""
    logger = logging.getLogger("transformers.modeling_utils")
    report = _LoadReport()
    logger.addFilter(report)
    try:
        yield
    finally:
        logger.removeFilter(report)


class _LoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def note_new_head(model: str, loading: dict, head: tuple[str, ...]) -> None:
    """One line for the expected (a classification head the base model has not got: initialised
    at random), a warning naming the weights for anything else missing or left over."""
    missing = sorted(loading.get("missing_keys", []))
    new_head = [k for k in missing if k.startswith(head)]
    if new_head:
        log.info("%s: a new classification head (%s), initialised at random", model, ", ".join(new_head))
    others = [k for k in missing if not k.startswith(head)]
    mismatched = [str(k) for k in loading.get("mismatched_keys", [])]
    if others or mismatched:
        log.warning("%s: weights not in the checkpoint, initialised at random: %s", model, ", ".join(others + mismatched))
    if loading.get("unexpected_keys"):
        log.debug("%s: checkpoint weights the classifier does not use: %s", model, ", ".join(sorted(loading["unexpected_keys"])))
