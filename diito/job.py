"""The job, top to bottom: validate, skip a finished one, the teacher, the ranks, the distillation.

With :mod:`diito.config`, the only code that reads the config tree; every step hands plain objects
(tensors, dataclasses, Hugging Face models) to the next.
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig

from diito import config, console, distributed, resume, student, summary, teacher_outputs, tracking
from diito.batching import Prepared
from diito.config import Job, validate
from diito.models import load_model_config, load_tokenizer
from diito.sources import DataError, load_task
from diito.teacher import Teacher, entry_to_build, obtain_teacher
from diito.teacher import outcome as teacher_outcome

log = logging.getLogger(__name__)


def run(
    cfg: DictConfig,
    output_dir: Path | None = None,
    hydra_dir: Path | None = None,
    job_name: str = "default",
    sweep: dict[str, str] | None = None,
) -> float:
    """Run the job ``cfg`` describes; returns the student's main validation metric (the teacher's
    with ``stage=teacher``), which Hydra sweepers optimise. ``job_name`` (the command line's
    overrides, under Hydra) names the MLflow run unless ``tracking.run_name`` does. In a ``sweep``
    the run is a child of the sweep's parent, and a job that already FINISHED with the same config
    is not run again (unless ``rerun=true``): the sweep's parent records that it reused that run,
    whose own tags stay as they are (it stays in the sweep it finished in). The student trains
    on the ranks :func:`diito.distributed.ranks` finds. :class:`~diito.resume.JobRunning` when an
    identical job holds the job's resume state, before any compute."""
    console.quiet_libraries()
    job = validate(cfg)
    c = job.config
    with (
        distributed.ranks(c.trainer.devices, c.trainer.device) as ranks,
        resume.held(resume.of_job(c.paths.cache, job.hash), holder=ranks.leader and c.stage == "distill"),
    ):
        if sweep and (done := _finished(job, sweep)) is not None:
            return done
        if c.trainer.num_threads:
            torch.set_num_threads(c.trainer.num_threads)
        with ranks.leader_first():  # fine-tuned by the leader; the other ranks find it in the cache
            tokenizer, data, teacher, outputs = _data_and_teacher(job, ranks.here.device, output_dir)
        if c.stage == "teacher":
            if output_dir is not None and ranks.leader:
                result = teacher_outcome(teacher, c.teacher, c.task.name, c.task.main_metric_key, c.tracking)
                summary.finish(result, output_dir, c.tracking.uri, c.paths.root)
            return teacher.metrics.get(c.task.main_metric_key, math.nan)
        return ranks.run(student.distill, job, cfg, data, tokenizer, teacher, outputs, output_dir, hydra_dir, job_name, sweep)


def _finished(job: Job, sweep: dict[str, str]) -> float | None:
    """The main metric of this job's FINISHED run, which joins the sweep instead of running again."""
    c = job.config
    if not c.tracking.enabled or c.rerun or c.stage != "distill":
        return None
    done = tracking.finished_run(c.tracking, job.hash)
    if done is None:
        return None
    run_, metrics = done
    log.info("already finished as run %s: skipped (rerun=true runs it again)", run_.run_id)
    tracking.reuse_in_sweep(c.tracking, sweep, run_.run_id)  # recorded on the sweep; the run's own tags stay its own
    return metrics.get(c.task.main_metric_key, math.nan)


def _data_and_teacher(
    job: Job, device: torch.device, output_dir: Path | None
) -> tuple[object, Prepared, Teacher, teacher_outputs.TeacherOutputs | None]:
    """The data, tokenised once for the whole job, the teacher (fine-tuned now unless cached) and its
    outputs on the training data (computed now unless cached; None with teacher.cache_outputs=false),
    once the job's files are known to fit on their disks (which needs the data: it tells whether the
    teacher is cached)."""
    c = job.config
    tokenizer = load_tokenizer(c.teacher.checkpoint or c.teacher.model)
    task_data = load_task(c.task)
    if c.teacher.checkpoint and (heads := load_model_config(c.teacher.checkpoint).num_labels) != task_data.num_labels:
        raise DataError(
            f"teacher.checkpoint: {c.teacher.checkpoint} has a {heads}-output head; the data of task {c.task.name} has "
            f"{task_data.num_labels} {'classes ' + str(task_data.label_names) if task_data.label_names else 'output'}"
        )
    data = Prepared.from_task(task_data, tokenizer)
    config.check_space(
        job,
        Path(output_dir or tempfile.gettempdir()),
        resume.of_job(c.paths.cache, job.hash).folder,
        entry_to_build(c.teacher, data, Path(c.paths.cache)),
    )
    outputs = teacher_outputs.plan(job, data, device)  # refused here, before compute, when it would not fit
    teacher = obtain_teacher(c.teacher, data, tokenizer, c.trainer, c.tracking, Path(c.paths.cache), device)
    return tokenizer, data, teacher, outputs and outputs.obtain(teacher.model)
