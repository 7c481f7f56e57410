"""The orchestration layer: the only code that reads the config tree.

config -> task data -> teacher (fine-tuned once, cached) -> student -> objective -> trainer ->
evaluation -> tracking. Each step hands plain Python objects to the next.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from diito import cache, tracking
from diito.config import Job, digest, job_hash, validate
from diito.data import Encoded, TaskData, TaskSpec, encode, load_task, make_loader, model_inputs
from diito.intervention import mapping_table
from diito.metrics import compute_metrics, write_glue_predictions
from diito.models import build_student, load_finetuned, load_pretrained, load_tokenizer, save_model
from diito.objective import DistillationObjective, task_loss
from diito.trainer import LoopConfig, OptimConfig, Trainer, TrainerConfig, autocast_dtype, predict, resolve_device, seed_everything

log = logging.getLogger(__name__)


# -- data ------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """The task's splits, tokenised once, and how to batch them."""

    spec: TaskSpec
    encoded: dict[str, Encoded]
    fingerprint: str
    pad_token_id: int
    num_labels: int  # 1 for regression
    test_splits: list[str]  # the test splits actually present (a `files` task may have none)

    def limited(self, loop: LoopConfig) -> Prepared:
        """What one stage sees: the first ``max_train_examples`` training examples and the first
        ``max_eval_examples`` of every other split (each stage has its own limits)."""
        encoded = {split: enc.head(loop.max_train_examples if split == "train" else loop.max_eval_examples)
                   for split, enc in self.encoded.items()}
        return dataclasses.replace(self, encoded=encoded)

    def loader(self, split: str, batch_size: int, *, train: bool, seed: int = 0, length_grouped: bool = True):
        return make_loader(
            self.encoded[split], batch_size, shuffle=train, seed=seed,
            length_grouped=length_grouped if train else False, pad_token_id=self.pad_token_id,
        )


def prepare(spec: TaskSpec, tokenizer) -> Prepared:
    """Every split of the task, tokenised once (each stage then takes its own slice: ``limited``)."""
    data: TaskData = load_task(spec)
    encoded = {split: encode(examples, tokenizer, spec.max_length) for split, examples in data.splits.items()}
    fingerprint = digest([data.fingerprint(), spec.max_length])
    return Prepared(spec, encoded, fingerprint, tokenizer.pad_token_id, data.num_labels, data.test_splits)


def to_predictions(logits: np.ndarray, regression: bool) -> np.ndarray:
    return logits[:, 0] if regression else logits.argmax(-1)


def predict_splits(model, data: Prepared, splits: list[str], trainer: TrainerConfig, device) -> dict[str, np.ndarray]:
    """Predicted class ids (or scores) for each split."""
    amp = autocast_dtype(trainer.precision, device)
    return {
        split: to_predictions(predict(model, data.loader(split, trainer.eval_batch_size, train=False), device, amp), data.spec.regression)
        for split in splits
    }


def score(data: Prepared, predictions: dict[str, np.ndarray]) -> dict[str, float]:
    """``<split>/<metric>`` for each labelled split."""
    metrics = {}
    for split, predicted in predictions.items():
        labels = data.encoded[split].labels
        if labels is not None:
            for name, value in compute_metrics(data.spec.metrics, predicted, labels).items():
                metrics[f"{split}/{name}"] = value
    return metrics


def evaluate(model, data: Prepared, splits: list[str], trainer: TrainerConfig, device) -> dict[str, float]:
    labelled = [s for s in splits if data.encoded[s].labels is not None]
    return score(data, predict_splits(model, data, labelled, trainer, device))


# -- runs that survive a kill ----------------------------------------------------------------------
@contextlib.contextmanager
def resumable_run(state_dir: Path, config: tracking.TrackingConfig, run_name: str | None, tags: dict[str, str]) -> Iterator[tracking.Run]:
    """An MLflow run whose id is kept in ``state_dir``, so re-running an interrupted job continues
    the same run. Holding the folder's lock keeps two identical jobs from sharing one state."""
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(state_dir / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RuntimeError(f"an identical job is already running (its state: {state_dir})") from None
    try:
        id_file = state_dir / "run.json"
        run_id = json.loads(id_file.read_text())["run_id"] if id_file.exists() else None
        with tracking.open_run(config, run_name, tags, run_id=run_id) as run:
            if run_id is None and run.run_id:
                id_file.write_text(json.dumps({"run_id": run.run_id}))
            yield run
    finally:
        lock.release()


def train(model, loss_fn, data: Prepared, trainer: TrainerConfig, optim: OptimConfig, seed: int,
          state_dir: Path, run, device, desc: str, extra_metrics: Callable[[], dict[str, float]] | None = None):
    """Fit ``model`` (resuming from ``state_dir`` when allowed) and return the trainer's final state;
    ``extra_metrics`` adds to each evaluation."""
    seed_everything(seed)

    def evaluate_all() -> dict[str, float]:
        metrics = evaluate(model, data, data.spec.eval_splits, trainer, device)
        return metrics | (extra_metrics() if extra_metrics else {})

    fitter = Trainer(
        model, loss_fn,
        data.loader("train", trainer.batch_size, train=True, seed=seed, length_grouped=trainer.length_grouped),
        evaluate=evaluate_all,
        main_metric=data.spec.main_metric_key, config=trainer, optim=optim,
        checkpoint_dir=state_dir / "checkpoint", log=run.log_metrics, device=device, desc=desc,
    )
    if trainer.resume and fitter.try_resume():
        log.info("%s: resuming from step %d", desc, fitter.state.step)
    return fitter.fit()


def intervention_probe(objective: DistillationObjective, student, teacher, data: Prepared, c, device) -> Callable[[], dict[str, float]] | None:
    """Interchange-intervention accuracy and efficacy on a fixed, seeded set of validation pairs
    (the first ``loss.eval_pairs`` examples of the first evaluation split), for each evaluation."""
    if not c.loss.intervenes or c.loss.eval_pairs == 0 or data.num_labels == 1:
        return None
    split = c.task.eval_splits[0]
    encoded = data.encoded[split]
    subset = Encoded(encoded.input_ids[: c.loss.eval_pairs],
                     encoded.token_type_ids[: c.loss.eval_pairs] if encoded.token_type_ids else None,
                     None, encoded.ids[: c.loss.eval_pairs], encoded.lengths[: c.loss.eval_pairs])
    loader = make_loader(subset, c.trainer.eval_batch_size, shuffle=False, seed=0, length_grouped=False, pad_token_id=data.pad_token_id)

    def probe() -> dict[str, float]:
        student.eval()
        batches = ({k: v.to(device) for k, v in batch.items()} for batch in loader)
        results = objective.evaluate_interventions(student, teacher, batches, seed=c.seed)
        return {f"{split}/{name}": value for name, value in results.items()}

    return probe


# -- teacher -----------------------------------------------------------------------------------------
def obtain_teacher(job: Job, data: Prepared, tokenizer, device) -> tuple[Any, dict[str, Any]]:
    """The fine-tuned teacher and where it came from: ``teacher.checkpoint``, the cache, or fine-tuned
    now with ``teacher.recipe`` (once, whatever the number of processes asking) in its own MLflow run.
    Only the recipe, the task's data and the base model decide which teacher it is."""
    c = job.config
    if c.teacher.checkpoint:
        log.info("teacher: the checkpoint %s", c.teacher.checkpoint)
        return load_finetuned(c.teacher.checkpoint).to(device).eval(), {"source": "checkpoint", "path": c.teacher.checkpoint}
    recipe = c.teacher.recipe
    trainer_cfg = c.trainer.with_loop(recipe)
    optim = OptimConfig(**recipe.model_dump(include=set(OptimConfig.model_fields)))
    identity = {"data": data.fingerprint, "model": c.teacher.model, "recipe": recipe.model_dump(mode="json")}
    folder = Path(c.paths.cache) / "teachers" / f"{c.task.name}-{digest(identity)}"

    def fine_tune(folder: Path) -> dict[str, Any]:
        log.info("teacher: fine-tuning %s on %s (teacher.recipe)", c.teacher.name, c.task.name)
        teacher_data = data.limited(recipe)
        model = load_pretrained(c.teacher.model, data.num_labels, recipe.seed).to(device)

        def loss_fn(batch):
            loss = task_loss(model(**model_inputs(batch)).logits, batch["labels"])
            return loss, {"ce": loss}

        tags = {"diito.role": "teacher", "task": c.task.name, "teacher": c.teacher.name, "teacher_layers": job.teacher_layers}
        with resumable_run(folder, c.tracking, f"teacher-{c.task.name}-{c.teacher.name}", tags | _git()) as run:
            run.log_params(tracking.flatten({"task": c.task.model_dump(), "teacher": c.teacher.model_dump()}))
            state = train(model, loss_fn, teacher_data, trainer_cfg, optim, recipe.seed, folder, run, device, desc="teacher")
            predictions = predict_splits(model, teacher_data, c.task.eval_splits, trainer_cfg, device)
            metrics = score(teacher_data, predictions)
            run.log_metrics(metrics, state.step)
            warn_if_one_class(predictions, data, run, "teacher")
            save_model(model, tokenizer, folder / "model")
            shutil.rmtree(folder / "checkpoint", ignore_errors=True)
            return {"run_id": run.run_id, "metrics": metrics, "steps": state.step}

    info, built = cache.build_once(folder, fine_tune)
    source = "fine-tuned" if built else "cache"
    main = info.get("metrics", {}).get(c.task.main_metric_key)
    log.info("teacher: %s %s (%s%s)", "fine-tuned now," if built else "from the cache,", folder,
             f"{c.task.main_metric_key} {main:.4f}" if main is not None else "no metric", f", run {info['run_id']}" if info.get("run_id") else "")
    return load_finetuned(folder / "model").to(device).eval(), info | {"source": source, "path": str(folder)}


def warn_if_one_class(predictions: dict[str, np.ndarray], data: Prepared, run, who: str) -> bool:
    """Say so when a classifier predicts one class for every example of its first evaluation split:
    it never left the chance plateau, and its accuracy is the class prior, not a result."""
    split = data.spec.eval_splits[0]
    predicted = predictions.get(split)
    if data.num_labels == 1 or predicted is None or len(np.unique(predicted)) > 1:
        return False
    names = data.spec.label_names
    label = names[int(predicted[0])] if names else str(int(predicted[0]))
    log.warning("%s predicts one class (%r) for every %s example: it never left the chance plateau, so its %s is the "
                "class prior, not a result. Train longer (trainer.min_steps) or with a higher learning rate.", who, label, split,
                data.spec.main_metric)
    run.set_tags({"diito.plateau": f"one class ({label}) on {split}"})
    return True


@functools.cache
def _git() -> dict[str, str]:
    """Tags naming the commit of the code that runs (not of the project folder, which may differ)."""
    return tracking.git_tags(Path(__file__).resolve().parent)


def job_params(job: Job) -> dict[str, Any]:
    """The validated config, flattened (validated, so 4 and 4.0 log alike). Intervention settings
    are left out of runs that make no interventions, so a KD baseline never shows an
    interchange_prop it did not use."""
    params = tracking.flatten(job.config.model_dump(mode="json"))
    if job.mapping is None:
        unused = ("loss.interchange_", "loss.pairing", "loss.eval_pairs", "mapping.")
        params = {k: v for k, v in params.items() if not k.startswith(unused)}
    return params


# -- the job -------------------------------------------------------------------------------------------
def sweep_tags(sweep: dict[str, str] | None) -> dict[str, str]:
    """Tags that make a job a child of its sweep's parent run in MLflow."""
    return {"mlflow.parentRunId": sweep["parent_run_id"], "diito.sweep_id": sweep["sweep_id"]} if sweep else {}


def finished_run(config: tracking.TrackingConfig, config_hash: str):
    """A FINISHED student run of exactly this config, if there is one."""
    client = tracking.MlflowClient(tracking_uri=config.uri)
    found = client.search_runs([tracking.experiment_id(config)], max_results=1, filter_string=(
        f"tags.config_hash = '{config_hash}' and tags.`diito.role` = 'student' and attributes.status = 'FINISHED'"))
    return (client, found[0]) if found else (client, None)


def record_failure(cfg: DictConfig, job_name: str, sweep: dict[str, str], error: BaseException) -> None:
    """A FAILED child run for a sweep job that failed before its own run existed (say, an invalid
    combination of values), so the sweep shows it with its error and its config."""
    settings = tracking.TrackingConfig(**OmegaConf.to_container(cfg.tracking, resolve=True))
    if not settings.enabled:
        return
    client = tracking.MlflowClient(tracking_uri=settings.uri)
    tags = sweep_tags(sweep) | {"diito.role": "student", "error": f"{type(error).__name__}: {error}"[:5000]}
    run_id = client.create_run(tracking.experiment_id(settings), run_name=job_name, tags=tags).info.run_id
    tracking.Run(client, run_id).log_params(tracking.flatten(OmegaConf.to_container(cfg, resolve=False)))
    client.set_terminated(run_id, status="FAILED")


def run(cfg: DictConfig, output_dir: Path | None = None, hydra_dir: Path | None = None, job_name: str = "default",
        sweep: dict[str, str] | None = None) -> float:
    """Run the job ``cfg`` describes; returns the student's main validation metric (the teacher's
    with ``stage=teacher``), which Hydra sweepers optimise. ``job_name`` (the command line's
    overrides, under Hydra) names the MLflow run unless ``tracking.run_name`` does. In a ``sweep``
    the run is a child of the sweep's parent, and a job that already FINISHED with the same config
    is not run again (unless ``rerun=true``): its run joins this sweep instead."""
    job = validate(cfg)
    c = job.config
    config_hash = job_hash(job.resolved)
    if sweep and c.tracking.enabled and not cfg.get("rerun", False) and c.stage == "distill":
        client, done = finished_run(c.tracking, config_hash)
        if done is not None:
            log.info("already finished as run %s: skipped (rerun=true runs it again)", done.info.run_id)
            tracking.Run(client, done.info.run_id).set_tags(sweep_tags(sweep))
            return done.data.metrics.get(c.task.main_metric_key, float("nan"))
    if c.trainer.num_threads:
        torch.set_num_threads(c.trainer.num_threads)
    device = resolve_device(c.trainer.device)
    tokenizer = load_tokenizer(c.teacher.checkpoint or c.teacher.model)
    all_data = prepare(c.task, tokenizer)
    teacher, teacher_info = obtain_teacher(job, all_data, tokenizer, device)
    if c.stage == "teacher":
        return teacher_info.get("metrics", {}).get(c.task.main_metric_key, float("nan"))
    data = all_data.limited(c.trainer)

    output_dir = Path(output_dir or tempfile.mkdtemp(prefix="diito-"))
    state_dir = Path(c.paths.cache) / "runs" / config_hash
    tags = sweep_tags(sweep) | {
        "diito.role": "student", "task": c.task.name, "teacher": c.teacher.name,
        "student_layers": c.student.layers, "loss": c.loss.name, "config_hash": config_hash,
        "diito.teacher_source": teacher_info["source"], "diito.teacher_path": teacher_info["path"],
    }
    if teacher_info.get("run_id"):
        tags["diito.teacher_run_id"] = teacher_info["run_id"]
    with resumable_run(state_dir, c.tracking, c.tracking.run_name or job_name, tags | _git()) as run_:
        run_.log_params(job_params(job))
        run_.log_dict(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        if hydra_dir and hydra_dir.exists():
            run_.log_artifacts(hydra_dir, ".hydra")

        source = teacher if c.student.init_from == "teacher" else load_pretrained(c.teacher.model, data.num_labels, c.seed)
        student = build_student(source, job.student_blocks, copy_classifier=c.student.init_from == "teacher").to(device)
        objective = DistillationObjective(c.loss, job.patience_layers, job.mapping)
        if job.mapping:
            log.info("intervention mapping (student <-> teacher blocks):\n%s", mapping_table(job.mapping))
        probe = intervention_probe(objective, student, teacher, data, c, device)
        state = train(student, lambda batch: objective.step(student, teacher, batch), data, c.trainer, c.optim, c.seed,
                      state_dir, run_, device, desc="student", extra_metrics=probe)
        predictions = predict_splits(student, data, list(c.task.eval_splits) + data.test_splits, c.trainer, device)
        final = score(data, predictions)
        run_.log_metrics(final | {"best_step": state.best_step or state.step}, state.step)
        warn_if_one_class(predictions, data, run_, "the student")
        for split in data.test_splits:
            write_glue_predictions(output_dir / "predictions" / c.task.submission_files.get(split, f"{split}.tsv"),
                                   data.encoded[split].ids, predictions[split],
                                   label_names=c.task.submission_label_names, regression=c.task.regression)
        if data.test_splits:
            run_.log_artifacts(output_dir / "predictions", "predictions")
        if c.tracking.log_model:
            run_.log_artifacts(save_model(student, tokenizer, output_dir / "student"), "student")
        shutil.rmtree(state_dir / "checkpoint", ignore_errors=True)
        (state_dir / "run.json").unlink(missing_ok=True)  # a later identical job is a new run
    return final[c.task.main_metric_key]
