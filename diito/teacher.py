"""The teacher stage: which fine-tuned teacher a job distils from, and how it is fine-tuned.

The teacher is its own stage with complete settings of its own (``teacher.recipe``): its data
limit, schedule, optimiser, precision and seed. No student setting (``trainer.*``, ``optim.*``,
``seed``) reaches it, so a low-data or short student run still distils from the teacher fine-tuned
on the full training set, and every job of a sweep shares it. A teacher is fine-tuned once per
(task data, base model, recipe) and cached; processes asking for the same one at once wait for one
of them to fine-tune it.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from transformers import PreTrainedModel

from diito import cache, tracking
from diito.batching import Prepared, model_inputs
from diito.evaluation import Evaluator, one_class, warn_one_class
from diito.models import load_finetuned, load_pretrained, name_labels, save_model
from diito.objective import task_loss
from diito.trainer import LoopConfig, OptimConfig, Seed, Trainer, TrainerConfig, Validation, seed_everything

log = logging.getLogger(__name__)


class Recipe(LoopConfig, OptimConfig):
    """How the teacher is fine-tuned: a complete loop and optimiser, and its own seed."""

    epochs: PositiveInt = 1
    seed: Seed = 42


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

    model: PreTrainedModel
    source: Literal["checkpoint", "cache", "fine-tuned"]
    path: str  # the checkpoint folder, or the cache entry
    run_id: str | None = None  # the MLflow run that fine-tuned it, when known
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def tags(self) -> dict[str, str]:
        """What a student run records about its teacher."""
        tags = {tracking.TEACHER_SOURCE: self.source, tracking.TEACHER_PATH: self.path}
        return tags | ({tracking.TEACHER_RUN: self.run_id} if self.run_id else {})


def obtain_teacher(config: TeacherConfig, data: Prepared, tokenizer, run_settings: TrainerConfig, tracking_config: tracking.TrackingConfig,
                   cache_dir: Path, device: torch.device) -> Teacher:
    """The fine-tuned teacher: ``config.checkpoint``, the cache entry for this recipe, or fine-tuned
    now (in its own MLflow run). ``run_settings`` lends only how the job runs (device, threads,
    progress, checkpoint interval), never what is trained."""
    if config.checkpoint:
        log.info("teacher: the checkpoint %s", config.checkpoint)
        return Teacher(load_finetuned(config.checkpoint).to(device).eval(), "checkpoint", config.checkpoint)
    key = cache_key(config, data)
    folder = cache_dir / "teachers" / f"{data.spec.name}-{key}"
    info, built = cache.build_once(folder, lambda folder: _fine_tune(config, data, tokenizer, run_settings, tracking_config, folder, key, device),
                                   check=_damage)
    shutil.rmtree(folder / "checkpoint", ignore_errors=True)  # only once the entry is complete
    main = info.get("metrics", {}).get(data.spec.main_metric_key)
    log.info("teacher: %s %s (%s%s)", "fine-tuned now," if built else "from the cache,", folder,
             f"{data.spec.main_metric_key} {main:.4f}" if main is not None else "no metric", f", run {info['run_id']}" if info.get("run_id") else "")
    model = load_finetuned(folder / "model").to(device).eval()
    return Teacher(model, "fine-tuned" if built else "cache", str(folder), info.get("run_id"), info.get("metrics", {}))


def cache_key(config: TeacherConfig, data: Prepared) -> str:
    """What makes two fine-tuned teachers the same: the data, the base model and the recipe."""
    return tracking.identity({"data": data.fingerprint, "model": config.model, "recipe": config.recipe.model_dump(mode="json")})


def cache_entry(config: TeacherConfig, data: Prepared, cache_dir: Path) -> Path:
    """The cache folder of the teacher ``config`` fine-tunes on ``data``."""
    return cache_dir / "teachers" / f"{data.spec.name}-{cache_key(config, data)}"


def entry_to_build(config: TeacherConfig, data: Prepared, cache_dir: Path) -> Path | None:
    """The cache folder this teacher will be fine-tuned into; None when no fine-tune is due (a
    checkpoint is given, or the cache holds the teacher)."""
    folder = cache_entry(config, data, cache_dir)
    return None if config.checkpoint or (folder / cache.INFO_FILE).exists() else folder


def _fine_tune(config: TeacherConfig, data: Prepared, tokenizer, run_settings: TrainerConfig, tracking_config: tracking.TrackingConfig,
               folder: Path, key: str, device: torch.device) -> dict:
    """Fine-tune the base model with the recipe into ``folder``, the cache entry ``key`` names (it
    stamps the fine-tune's checkpoints and run record, so nothing else's is resumed); returns the
    entry's info."""
    recipe = config.recipe
    log.info("teacher: fine-tuning %s on %s (teacher.recipe)", config.name, data.spec.name)
    settings = run_settings.with_loop(recipe)
    optim = OptimConfig(**recipe.model_dump(include=set(OptimConfig.model_fields)))
    data = data.limited(recipe.max_train_examples, recipe.max_eval_examples)
    model = load_pretrained(config.model, data.num_labels, recipe.seed).to(device)

    def loss_fn(batch):
        loss = task_loss(model(**model_inputs(batch)).logits, batch["labels"])
        return loss, {"ce": loss}

    tags = {tracking.ROLE: "teacher", "task": data.spec.name, "teacher": config.name} | tracking.git_tags()
    with tracking.resumable_run(folder, key, tracking_config, f"teacher-{data.spec.name}-{config.name}", tags) as run:
        run.log_params(tracking.params({"task": data.spec.model_dump(), "teacher": config.model_dump()}))
        evaluator = Evaluator(data, settings.eval_batch_size, settings.precision, device)
        seed_everything(recipe.seed)
        loader = data.loader("train", settings.batch_size, train=True, seed=recipe.seed, shuffle=settings.shuffle,
                             length_grouped=settings.length_grouped)
        trainer = Trainer(model, loss_fn, loader,
                          settings, optim, folder / "checkpoint", Validation(lambda: evaluator.metrics(model), data.spec.main_metric_key),
                          run.log_metrics, name="teacher", owner=key)
        state = trainer.fit()
        predictions = evaluator.predict(model, data.spec.eval_splits)
        metrics = evaluator.score(predictions)
        run.log_metrics(metrics | {"steps": state.step, "epochs": trainer.epochs_run, "time/train_seconds": state.train_seconds}, state.step)
        if (label := one_class(predictions, data)) is not None:
            warn_one_class(label, data, "the teacher")
            run.set_tags({tracking.PLATEAU: f"one class ({label}) on {data.spec.eval_splits[0]}"})
        name_labels(model, data.label_names)
        save_model(model, tokenizer, folder / "model")
        return {"run_id": run.run_id, "metrics": metrics, "steps": state.step}


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
