"""The student stage: a student built from the teacher's blocks, distilled with the job's objective
in a tracked stage (:mod:`diito.stage`) on each rank, then saved, with its test predictions, by rank 0.
"""

from __future__ import annotations

import functools
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from diito import config, identity, logged_model, resume, stage, summary, tags, tracking
from diito.batching import Prepared
from diito.config import Job
from diito.distributed import Rank
from diito.evaluation import Evaluator, intervention_probe, write_predictions
from diito.intervention import mapping_table
from diito.models import build_student, load_pretrained, name_labels, save_model
from diito.objective import DistillationObjective, DistillationStep
from diito.teacher import Teacher
from diito.teacher_outputs import TeacherOutputs
from diito.trainer import seed_everything

log = logging.getLogger(__name__)


def distill(
    rank: Rank,
    job: Job,
    cfg: DictConfig,
    all_data: Prepared,
    tokenizer,
    teacher: Teacher,
    outputs: TeacherOutputs | None,
    output_dir: Path | None,
    hydra_dir: Path | None,
    job_name: str,
    sweep: dict[str, str] | None,
) -> float:
    """Distil the job's student from ``teacher`` (its base runs read from ``outputs`` when cached) on
    this ``rank``; returns its main validation metric (NaN on ranks other than 0, which neither
    evaluate nor log)."""
    c = job.config
    if c.trainer.num_threads:
        torch.set_num_threads(c.trainer.num_threads)
    data = all_data.limited(c.trainer.max_train_examples, c.trainer.max_eval_examples, subset_seed(c))
    teacher = teacher.on(rank.device)
    state = resume.of_job(c.paths.cache, job.hash)
    run_tags = (
        tracking.sweep_tags(sweep)
        | teacher.tags
        | (outputs.tags if outputs else {tags.TEACHER_OUTPUTS: "live"})
        | tracking.git_tags()
        | {
            tags.TASK: c.task.name,
            tags.TEACHER: c.teacher.name,
            tags.STUDENT_LAYERS: c.student.layers,
            tags.LOSS: c.loss.kind,
            tags.CONFIG_HASH: job.hash,
        }
    )
    name = c.tracking.run_name or summary.run_name(c.task.name, c.loss.kind, c.student.layers, job_name, sweep and sweep.get("varying"))
    recorded = record(job, cfg, hydra_dir)
    with stage.tracked(tags.STUDENT_ROLE, state, c.tracking, name, run_tags, recorded, data, rank) as run:
        seed_everything(c.seed)  # the student's fresh weights (a new classifier) come from the job's seed
        source = teacher.model if c.student.init_from == "teacher" else load_pretrained(c.teacher.model, data.num_labels, c.seed)
        student = build_student(source, job.student_blocks, copy_classifier=c.student.init_from == "teacher").to(rank.device)
        objective = DistillationObjective(
            c.loss, job.patience_layers, job.mapping, interchange=c.intervention, teacher_outputs=outputs and outputs.reader("train")
        )
        if job.mapping and rank.index == 0:
            log.info("intervention mapping (student <-> teacher blocks):\n%s", mapping_table(job.mapping))
        probe = intervention_probe(
            objective, student, teacher.model, data, c.trainer.eval_batch_size, c.seed, rank.device, c.trainer.precision
        )
        fitted = stage.fit(
            "student",
            student,
            DistillationStep(student, teacher.model, objective),
            data,
            c.trainer,
            c.optim,
            c.seed,
            rank,
            state,
            run,
            c.tracking,
            probe,
            reference={"teacher": teacher.model},
        )
        if fitted is None:
            return math.nan
        output_dir = Path(output_dir or tempfile.mkdtemp(prefix="diito-"))
        if write_predictions(data, fitted.predictions, output_dir / "predictions"):
            run.log_artifacts(output_dir / "predictions", "predictions")
        if c.tracking.log_model:
            log.info("student: saving to %s", output_dir / "student")
            name_labels(student, data.label_names)
            folder = save_model(student, tokenizer, output_dir / "student")
            logged_model.log_student(
                run,
                student,
                tokenizer,
                input_example(data, tokenizer),
                folder,
                fitted.scores,
                fitted.state.step,
                stage.datasets(data),
                c.tracking.registered_model,
            )
        evaluator = Evaluator(data, c.trainer.eval_batch_size, c.trainer.precision, rank.device, c.trainer.progress)
        teacher_scores = evaluator.score(evaluator.predict(teacher.model, list(c.task.eval_splits) + data.test_splits))
        run.log_metrics({f"teacher/{k}": v for k, v in teacher_scores.items()}, fitted.state.step)
        summary.finish(outcome(job, data, fitted, teacher_scores, teacher, run, recorded.params), output_dir, c.tracking.uri, c.paths.root)
        state.clear()
    return fitted.scores[c.task.main_metric_key]


def outcome(
    job: Job, data: Prepared, fitted: stage.Fitted, teacher_scores: dict[str, float], teacher: Teacher, run, settings: dict[str, Any]
) -> summary.Outcome:
    """The job's result for the console and ``metrics.json``: both models on the same examples, and
    the settings its run logs as params (a sweep without tracking tables its jobs from them)."""
    c, end = job.config, fitted.state
    return summary.Outcome(
        task=c.task.name,
        loss=c.loss.kind,
        main_metric=c.task.main_metric_key,
        student=fitted.scores,
        teacher=teacher_scores,
        student_from={
            "layers": c.student.layers,
            "blocks": job.student_blocks,
            "best_step": end.best_step or end.step,
            "steps": end.step,
            "examples": {s: len(data.encoded[s]) for s in list(c.task.eval_splits) + data.test_splits},
        },
        teacher_from={"name": c.teacher.name, "source": teacher.source, "path": teacher.path, "run_id": teacher.run_id},
        run_id=run.run_id,
        experiment_id=run.experiment_id,
        settings=settings,
    )


def subset_seed(c: config.JobConfig) -> int:
    """The seed of the student's training sample: ``trainer.subset_seed``, else the job's seed."""
    return c.trainer.subset_seed if c.trainer.subset_seed is not None else c.seed


def record(job: Job, cfg: DictConfig, hydra_dir: Path | None) -> stage.Record:
    """What the student's run records: params (the validated settings, so 4 and 4.0 log alike; a run
    that makes no interventions leaves out their settings; the digest of the data read, part of the
    job's identity), the resolved config, and Hydra's record of the command line. Values read from
    the environment are replaced by the variable's name (and credentials are masked when logged)."""
    from_env = config.from_environment(cfg)
    params = identity.params(job.config.model_dump(mode="json"), leave_out=job.unused_settings) | {identity.DATA_DIGEST: job.data_digest}
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for key, variable in from_env.items():
        *parents, leaf = key.split(".")
        functools.reduce(dict.get, parents, resolved)[leaf] = f"<${variable}>"
    return stage.Record(
        {k: f"<${from_env[k]}>" if k in from_env else v for k, v in params.items()},
        OmegaConf.to_yaml(OmegaConf.create(resolved)),
        {".hydra": hydra_dir} if hydra_dir else {},
    )


def input_example(data: Prepared, tokenizer, n: int = 2) -> list:
    """A few evaluation texts (decoded from their tokens) as the logged model takes them: sentences,
    or text/text_pair records for sentence-pair tasks."""
    encoded = data.encoded[data.spec.eval_splits[0]]
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    examples = []
    for i in range(min(n, len(encoded))):
        ids, types = encoded.input_ids[i], encoded.token_type_ids[i] if encoded.token_type_ids else None
        if types and any(types):  # segment ids tell the pair's two texts apart
            examples.append(
                {"text": decode([t for t, s in zip(ids, types) if s == 0]), "text_pair": decode([t for t, s in zip(ids, types) if s == 1])}
            )
        else:
            examples.append(decode(ids))
    return examples
