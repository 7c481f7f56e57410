"""The teacher stage: which fine-tuned teacher a job distils from, and how it is fine-tuned.

The teacher is its own stage with complete settings of its own (``teacher.recipe``): its data
limit, schedule, optimiser, precision and seed. No student setting (``trainer.*``, ``optim.*``,
``seed``) reaches it, so a low-data or short student run still distils from the teacher fine-tuned
on the full training set, and every job of a sweep shares it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from diito.trainer import LoopConfig, OptimConfig


class Recipe(LoopConfig, OptimConfig):
    """How the teacher is fine-tuned: a complete loop and optimiser, and its own seed."""

    epochs: PositiveInt = 1
    seed: int = 42


class TeacherConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    model: str = Field(min_length=1)
    checkpoint: str | None = None
    recipe: Recipe


TeacherSource = Literal["checkpoint", "cache", "fine-tuned"]
"""Where a job's teacher came from: a given folder, the teacher cache, or fine-tuned by this job."""
