"""What makes two jobs the same job, and two fine-tuned teachers the same teacher.

A job is the digest of its validated settings that can change its result and of the data it reads
(:func:`job_hash`); a teacher is the digest of its data, base model and recipe (:func:`teacher_key`).
:data:`RESULT_INDEPENDENT` is the one list of settings that never change a result: they are left out
of both identities (changing them neither reruns a finished job nor fine-tunes another teacher), of
runs' params, and of what tells configurations apart in a report.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

RESULT_INDEPENDENT = frozenset(
    {
        "paths",
        "rerun",
        "trainer.progress",
        "trainer.resume",
        "trainer.log_every",
        "trainer.save_every",
        "trainer.num_threads",
        "trainer.eval_batch_size",
        "tracking",
    }
)
"""Settings that change where a job writes, how fast it runs or how it looks, never what it computes."""

DATA_DIGEST = "data_digest"  # the key of the data's digest, in the job's identity and its params


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"loss": {"alpha": 0.7}}`` -> ``{"loss.alpha": 0.7}``; lists stay whole values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def result_settings(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened settings that can change a result (all but :data:`RESULT_INDEPENDENT`)."""
    return {k: v for k, v in flat.items() if not any(k == d or k.startswith(d + ".") for d in RESULT_INDEPENDENT)}


def digest(tree: Mapping[str, Any]) -> str:
    """A short digest of the settings in ``tree`` that can change a result. Take it on validated
    values, so ``loss.T=4`` and ``loss.T=4.0`` are one job."""
    flat = result_settings(flatten(json.loads(json.dumps(tree, default=str))))
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def job_hash(config: BaseModel, data_digest: str) -> str:
    """The job's identity: its validated settings that can change its result, and the digest of the
    data it reads (:func:`diito.sources.data_digest`), so the same settings on changed data are
    another job (never skipped as finished, never resumed from the old data's checkpoints)."""
    return digest(config.model_dump(mode="json") | {DATA_DIGEST: data_digest})


def teacher_key(data_fingerprint: str, model: str, recipe: BaseModel) -> str:
    """What makes two fine-tuned teachers the same: the data, the base model and the recipe."""
    return digest({"data": data_fingerprint, "model": model, "recipe": recipe.model_dump(mode="json")})


def params(tree: Mapping[str, Any], leave_out: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A run's params: the settings that can change its result, flattened, less ``leave_out``
    (settings the run does not use, like a KD baseline's interchange_prop) and less those left
    unset (None: a feature the run does not use, such as no teacher.checkpoint)."""
    return {k: v for k, v in result_settings(flatten(tree)).items() if k not in leave_out and v is not None}
