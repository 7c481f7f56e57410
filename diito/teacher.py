"""The teacher stage: which fine-tuned teacher a job distils from, and how it is fine-tuned.

The teacher is its own stage with complete settings of its own (``teacher.recipe``): its data
limit, schedule, optimiser, precision and seed. No student setting (``trainer.*``, ``optim.*``,
``seed``) reaches it, so a low-data or short student run still distils from the teacher fine-tuned
on the full training set, and every job of a sweep shares it. A teacher is fine-tuned once per
(task data, base model, recipe) and cached; processes asking for the same one at once wait for one
of them to fine-tune it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator
from pydantic_core import InitErrorDetails
from safetensors import safe_open
from transformers import PreTrainedModel

from diito import cache, identity, stage, summary, tags, tracking
from diito.batching import Prepared, model_inputs
from diito.distributed import Rank
from diito.models import load_finetuned, load_pretrained, name_labels, save_model
from diito.objective import task_loss
from diito.resume import ResumeState
from diito.store import mask
from diito.trainer import LoopConfig, OptimConfig, Seed, TrainerConfig, seed_everything

log = logging.getLogger(__name__)


class Recipe(BaseModel):
    """How the teacher is fine-tuned: a complete loop and optimiser of its own, and its own seed.
    Written flat, as ``conf/teacher/recipe/finetune.yaml`` lists them (``teacher.recipe.lr``,
    ``teacher.recipe.max_steps``): each key goes to the part that reads it, and is logged and named
    in errors as it was written."""

    model_config = ConfigDict(extra="forbid")
    FLAT: ClassVar[tuple[str, ...]] = ("loop", "optim")  # the parts whose keys are written, logged and named without their part's name
    loop: LoopConfig
    optim: OptimConfig
    seed: Seed = 42

    @model_validator(mode="wrap")
    @classmethod
    def _from_flat(cls, given: Any, handler):
        if isinstance(given, dict) and not {"loop", "optim"} & given.keys():
            # the optimizer takes every other key: its own arguments (betas, eps ...) are open-ended
            given = {
                "loop": {"epochs": 1} | {k: v for k, v in given.items() if k in LoopConfig.model_fields},
                "optim": {k: v for k, v in given.items() if k not in LoopConfig.model_fields and k != "seed"},
                **({"seed": given["seed"]} if "seed" in given else {}),
            }
        try:
            return handler(given)
        except ValidationError as e:  # teacher.recipe.lr, not teacher.recipe.optim.lr: the key as written
            raise ValidationError.from_exception_data(
                e.title,
                [
                    InitErrorDetails(
                        type=err["type"],
                        loc=tuple(err["loc"][1:] if err["loc"][:1] in [(part,) for part in cls.FLAT] else err["loc"]),
                        input=err["input"],
                        ctx=err.get("ctx", {}),
                    )
                    for err in e.errors()
                ],
            ) from None

    @model_serializer(mode="wrap")
    def _flat(self, handler) -> dict[str, Any]:
        dumped = handler(self)
        return {k: v for part in self.FLAT for k, v in dumped.pop(part).items()} | dumped


class TeacherConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    model: str = Field(min_length=1)
    checkpoint: str | None = None
    recipe: Recipe
    cache_outputs: bool = True  # the teacher's outputs computed once and read by every step (diito.teacher_outputs)


@dataclass
class Teacher:
    """A fine-tuned teacher, and where it came from."""

    model: PreTrainedModel | None  # None while it travels to another rank (:meth:`on` loads it there)
    source: Literal["checkpoint", "cache", "fine-tuned"]
    path: str  # the checkpoint folder, or the cache entry
    run_id: str | None = None  # the MLflow run that fine-tuned it, when known
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def tags(self) -> dict[str, str]:
        """What a student run records about its teacher."""
        found = {tags.TEACHER_SOURCE: self.source, tags.TEACHER_PATH: self.path}
        return found | ({tags.TEACHER_RUN: self.run_id} if self.run_id else {})

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (for a spawned rank) without its weights: that process loads them on its own device (:meth:`on`)."""
        return self.__dict__ | {"model": None}

    def on(self, device: torch.device) -> Teacher:
        """This teacher with its weights on ``device``, loaded from its folder unless already there."""
        if self.model is not None and self.model.device == device:
            return self
        folder = Path(self.path) if self.source == "checkpoint" else Path(self.path) / "model"
        return dataclasses.replace(self, model=load_finetuned(folder).to(device).eval())


def obtain_teacher(
    config: TeacherConfig,
    data: Prepared,
    tokenizer,
    run_settings: TrainerConfig,
    tracking_config: tracking.TrackingConfig,
    cache_dir: Path,
    device: torch.device,
) -> Teacher:
    """The fine-tuned teacher: ``config.checkpoint``, the cache entry for this recipe, or fine-tuned
    now (in its own MLflow run). ``run_settings`` lends only how the job runs (threads, progress,
    checkpoint interval), never what is trained."""
    if config.checkpoint:
        log.info("teacher: the checkpoint %s", config.checkpoint)
        return Teacher(None, "checkpoint", config.checkpoint).on(device)
    folder = cache_entry(config, data, cache_dir)
    state = ResumeState(folder, cache_key(config, data))  # the fine-tune's checkpoints and run, in the entry itself
    info, built = cache.build_once(
        folder, lambda folder: _fine_tune(config, data, tokenizer, run_settings, tracking_config, state, device), check=_damage
    )
    state.clear_checkpoints()  # only once the entry is complete; its run's id stays, should the entry ever be rebuilt
    main = info.get("metrics", {}).get(data.spec.main_metric_key)
    log.info(
        "teacher: %s %s (%s%s)",
        "fine-tuned now," if built else "from the cache,",
        folder,
        f"{data.spec.main_metric_key} {main:.4f}" if main is not None else "no metric",
        f", run {info['run_id']}" if info.get("run_id") else "",
    )
    return Teacher(None, "fine-tuned" if built else "cache", str(folder), info.get("run_id"), info.get("metrics", {})).on(device)


def outcome(
    teacher: Teacher, config: TeacherConfig, task: str, main_metric: str, tracking_config: tracking.TrackingConfig
) -> summary.Outcome:
    """A teacher-stage job's result (``stage=teacher``): the teacher's final scores and its run."""
    unlogged, experiment = "not logged (tracking.enabled=false)", None
    if teacher.source == "checkpoint":
        unlogged = "no run (a given checkpoint, fine-tuned elsewhere)"
    elif teacher.run_id and tracking_config.enabled:
        try:
            experiment = tracking.client(tracking_config).get_run(teacher.run_id).info.experiment_id
        except (MlflowException, OSError):  # the cache is shared by every store: it was fine-tuned while logging to another
            unlogged = f"run {teacher.run_id} is in the store it was fine-tuned with, not in {mask(tracking_config.uri or '')}"
    return summary.Outcome(
        task=task,
        loss="",
        main_metric=main_metric,
        student={},
        teacher=teacher.metrics,
        student_from={},
        teacher_from={"name": config.name, "source": teacher.source, "path": teacher.path, "run_id": teacher.run_id},
        run_id=teacher.run_id if experiment else None,
        experiment_id=experiment,
        unlogged=unlogged,
    )


def cache_key(config: TeacherConfig, data: Prepared) -> str:
    """What makes two fine-tuned teachers the same (:func:`diito.identity.teacher_key`)."""
    return identity.teacher_key(data.fingerprint, config.model, config.recipe)


def cache_entry(config: TeacherConfig, data: Prepared, cache_dir: Path) -> Path:
    """The cache folder of the teacher ``config`` fine-tunes on ``data``."""
    return cache_dir / "teachers" / f"{data.spec.name}-{cache_key(config, data)}"


def entry_to_build(config: TeacherConfig, data: Prepared, cache_dir: Path) -> Path | None:
    """The cache folder this teacher will be fine-tuned into; None when no fine-tune is due (a
    checkpoint is given, or the cache holds the teacher)."""
    folder = cache_entry(config, data, cache_dir)
    return None if config.checkpoint or (folder / cache.INFO_FILE).exists() else folder


def _fine_tune(
    config: TeacherConfig,
    data: Prepared,
    tokenizer,
    run_settings: TrainerConfig,
    tracking_config: tracking.TrackingConfig,
    state: ResumeState,
    device: torch.device,
) -> dict:
    """Fine-tune the base model with the recipe into the cache entry ``state`` names (its identity
    stamps the fine-tune's checkpoints and run record, so nothing else's is resumed): a tracked
    stage like the student's. Returns the entry's info."""
    recipe = config.recipe
    log.info("teacher: fine-tuning %s on %s (teacher.recipe)", config.name, data.spec.name)
    data = data.limited(recipe.loop.max_train_examples, recipe.loop.max_eval_examples)
    model = load_pretrained(config.model, data.num_labels, recipe.seed).to(device)

    def loss_fn(batch):
        loss = task_loss(model(**model_inputs(batch)).logits, batch["labels"])
        return loss, {"ce": loss}

    asked = {"task": data.spec.model_dump(mode="json"), "teacher": config.model_dump(mode="json")}
    record = stage.Record(
        identity.params({"task": data.spec.model_dump(), "teacher": config.model_dump()}), OmegaConf.to_yaml(OmegaConf.create(asked))
    )
    run_tags = {tags.TASK: data.spec.name, tags.TEACHER: config.name} | tracking.git_tags()
    here = Rank(0, 1, device)  # one process fine-tunes the teacher, whatever the student's ranks
    with stage.tracked(
        tags.TEACHER_ROLE, state, tracking_config, f"teacher-{data.spec.name}-{config.name}", run_tags, record, data, here
    ) as run:
        seed_everything(recipe.seed)
        fitted = stage.fit(
            "teacher",
            model,
            loss_fn,
            data,
            run_settings.with_loop(recipe.loop),
            recipe.optim,
            recipe.seed,
            here,
            state,
            run,
            tracking_config,
        )
        name_labels(model, data.label_names)
        save_model(model, tokenizer, state.folder / "model")
        return {"run_id": run.run_id, "metrics": fitted.scores, "steps": fitted.state.step}


def _damage(folder: Path) -> str | None:
    """What is wrong with a cached teacher's saved model, or None."""
    model = folder / "model"
    if not (model / "config.json").is_file() or not any(model.glob("*.safetensors")):
        return f"{model} holds no model (config.json and *.safetensors)"
    try:
        for weights in model.glob("*.safetensors"):
            with safe_open(str(weights), "pt") as f:
                f.keys()
    except Exception as e:  # noqa: BLE001 - any unreadable weights file is damage
        return f"{weights.name} is unreadable ({type(e).__name__})"
    return None
