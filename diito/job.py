"""The job: config -> data -> teacher -> student -> fit -> evaluate -> log, top to bottom.

With :mod:`diito.config`, the only code that reads the config tree; every step hands plain objects
(tensors, dataclasses, Hugging Face models) to the next.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from diito import config, console, distributed, logged_model, store, summary, tracking
from diito.batching import Prepared
from diito.config import Job, validate
from diito.evaluation import Evaluator, intervention_probe, one_class, warn_one_class, write_predictions
from diito.intervention import mapping_table
from diito.models import build_student, load_model_config, load_pretrained, load_tokenizer, name_labels, save_model
from diito.objective import DistillationObjective, DistillationStep
from diito.sources import DataError, load_task
from diito.teacher import entry_to_build, obtain_teacher
from diito.trainer import Trainer, Validation, resolve_device, seed_everything

log = logging.getLogger(__name__)


class JobRunning(RuntimeError):
    """An identical job (the same settings on the same data) is running: this one does not start."""


def state_folder(job: Job) -> Path:
    """Where a job keeps what it needs to resume (its checkpoints, its run's id): named by its identity."""
    return Path(job.config.paths.cache) / "runs" / job.hash


def run(cfg: DictConfig, output_dir: Path | None = None, hydra_dir: Path | None = None, job_name: str = "default",
        sweep: dict[str, str] | None = None) -> float:
    """Run the job ``cfg`` describes; returns the student's main validation metric (the teacher's
    with ``stage=teacher``), which Hydra sweepers optimise. ``job_name`` (the command line's
    overrides, under Hydra) names the MLflow run unless ``tracking.run_name`` does. In a ``sweep``
    the run is a child of the sweep's parent, and a job that already FINISHED with the same config
    is not run again (unless ``rerun=true``): its run joins this sweep instead. With
    ``trainer.devices=N`` the student trains as N ranks spawned here; under a launcher that started
    the ranks itself (torchrun, submitit), this process is one of them. :class:`JobRunning` when an
    identical job holds the state folder, before any compute."""
    console.quiet_libraries()
    job = validate(cfg)
    c = job.config
    launched = distributed.launched()
    with _held(job, holder=not launched or os.environ["RANK"] == "0"):
        if sweep and c.tracking.enabled and not c.rerun and c.stage == "distill":
            done = tracking.finished_run(c.tracking, job.hash)
            if done is not None:
                run_, metrics = done
                log.info("already finished as run %s: skipped (rerun=true runs it again)", run_.run_id)
                tracking.reuse_in_sweep(c.tracking, sweep, run_.run_id)  # recorded on the sweep; the run's own tags stay its own
                return metrics.get(c.task.main_metric_key, float("nan"))
        if launched:
            with distributed.process_group(c.trainer.device) as (rank, _, device):
                return _run(job, cfg, device, output_dir, hydra_dir, job_name, sweep, rank)
        device = resolve_device(c.trainer.device)
        if c.trainer.devices > 1 and c.stage == "distill":
            _data_and_teacher(job, device, output_dir)  # once, here, before the ranks start (they find it in the cache)
            try:
                return distributed.spawn(c.trainer.devices, _spawned, (cfg, output_dir, hydra_dir, job_name, sweep))
            except distributed.RankFailed as e:
                if e.details.get("run_id"):  # already recorded in its FAILED run
                    raise tracking.RunFailed(e.details["run_id"], e) from None
                raise
        return _run(job, cfg, device, output_dir, hydra_dir, job_name, sweep)


@contextlib.contextmanager
def _held(job: Job, holder: bool) -> Iterator[None]:
    """The job's state folder, locked for the whole job (teacher, training, logging), so a second
    identical job is refused before any compute instead of after the teacher. One process holds it:
    this one, whose spawned ranks run inside its hold, or rank 0 of a launcher's ranks (``holder``).
    A teacher-only job takes none: a second one waits for the teacher's cache entry and reuses it."""
    if job.config.stage != "distill" or not holder:
        yield
        return
    folder = state_folder(job)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise JobRunning(f"an identical job is already running (its state: {folder}); "
                         "wait for it to end, or change a setting to run another job") from None
    try:
        yield
    finally:
        lock.release()


def _spawned(cfg: DictConfig, output_dir, hydra_dir, job_name, sweep) -> float:
    """One spawned rank: the job itself, in the process group the environment describes."""
    job = validate(cfg)
    with distributed.process_group(job.config.trainer.device) as (rank, _, device):
        return _run(job, cfg, device, output_dir, hydra_dir, job_name, sweep, rank)


def _data_and_teacher(job: Job, device: torch.device, output_dir: Path | None):
    """The data, and the teacher (fine-tuned now unless cached), once the job's files are known to
    fit on their disks (which needs the data: it tells whether the teacher is cached)."""
    c = job.config
    tokenizer = load_tokenizer(c.teacher.checkpoint or c.teacher.model)
    task_data = load_task(c.task)
    if c.teacher.checkpoint and (heads := load_model_config(c.teacher.checkpoint).num_labels) != task_data.num_labels:
        raise DataError(f"teacher.checkpoint: {c.teacher.checkpoint} has a {heads}-output head; the data of task {c.task.name} has "
                        f"{task_data.num_labels} {'classes ' + str(task_data.label_names) if task_data.label_names else 'output'}")
    all_data = Prepared.from_task(task_data, tokenizer)
    config.check_space(job, Path(output_dir or tempfile.gettempdir()), state_folder(job), entry_to_build(c.teacher, all_data, Path(c.paths.cache)))
    teacher = obtain_teacher(c.teacher, all_data, tokenizer, c.trainer, c.tracking, Path(c.paths.cache), device)
    return tokenizer, all_data, teacher


def _run(job: Job, cfg: DictConfig, device: torch.device, output_dir: Path | None, hydra_dir: Path | None, job_name: str,
         sweep: dict[str, str] | None, rank: int = 0) -> float:
    """The job on this process (``rank`` of the ranks training the student, 0 when alone)."""
    c = job.config
    if c.trainer.num_threads:
        torch.set_num_threads(c.trainer.num_threads)

    # data and teacher (fine-tuned by rank 0; the other ranks find it in the cache)
    if rank != 0:
        distributed.barrier()
    tokenizer, all_data, teacher = _data_and_teacher(job, device, output_dir)
    if rank == 0:
        distributed.barrier()
    if c.stage == "teacher":
        return teacher.metrics.get(c.task.main_metric_key, float("nan"))
    data = all_data.limited(c.trainer.max_train_examples, c.trainer.max_eval_examples, subset_seed(c))

    state_dir = state_folder(job)
    tags = tracking.sweep_tags(sweep) | teacher.tags | tracking.git_tags() | {
        tracking.ROLE: "student", "task": c.task.name, "teacher": c.teacher.name, "student_layers": c.student.layers,
        "loss": c.loss.kind, tracking.CONFIG_HASH: job.hash,
    }
    name = c.tracking.run_name or summary.run_name(c.task.name, c.loss.kind, c.student.layers, job_name, sweep and sweep.get("varying"))
    runs = tracking.resumable_run(state_dir, job.hash, c.tracking, name, tags) if rank == 0 else tracking.no_run()
    with runs as run_:
        log_config(run_, job, cfg, hydra_dir)
        run_.log_datasets(datasets(data))

        # student and objective
        seed_everything(c.seed)  # the student's fresh weights (a new classifier) come from the job's seed
        source = teacher.model if c.student.init_from == "teacher" else load_pretrained(c.teacher.model, data.num_labels, c.seed)
        student = build_student(source, job.student_blocks, copy_classifier=c.student.init_from == "teacher").to(device)
        objective = DistillationObjective(c.loss, job.patience_layers, job.mapping)
        if job.mapping and rank == 0:
            log.info("intervention mapping (student <-> teacher blocks):\n%s", mapping_table(job.mapping))

        # fit: several ranks run the whole step (base and counterfactual runs) through DDP's forward
        evaluator = Evaluator(data, c.trainer.eval_batch_size, c.trainer.precision, device)
        probe = intervention_probe(objective, student, teacher.model, data, c.trainer.eval_batch_size, c.seed, device)
        step = DistillationStep(student, teacher.model, objective)
        _, world = distributed.rank_and_size()
        if world > 1:
            step = DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
        trainer = Trainer(student, step,
                          data.loader("train", c.trainer.batch_size, train=True, seed=c.seed, shuffle=c.trainer.shuffle,
                                      length_grouped=c.trainer.length_grouped, rank=rank, world=world),
                          c.trainer, c.optim, state_dir / "checkpoint",
                          Validation(lambda: evaluator.metrics(student) | (probe() if probe else {}), c.task.main_metric_key),
                          run_.log_metrics, name="student", owner=job.hash)
        with tracking.system_metrics(run_, c.tracking):
            state = trainer.fit()
        if rank != 0:  # rank 0 evaluates, saves and logs
            return float("nan")

        # evaluate and log
        log.info("student: final evaluation")
        predictions = evaluator.predict(student, list(c.task.eval_splits) + data.test_splits)
        final = evaluator.score(predictions)
        training = {"best_step": state.best_step or state.step, "steps": state.step, "epochs": trainer.epochs_run,
                    "time/train_seconds": state.train_seconds}
        run_.log_metrics(final | training | evaluator.footprint(student, teacher.model), state.step)
        if (label := one_class(predictions, data)) is not None:
            warn_one_class(label, data, "the student")
            run_.set_tags({tracking.PLATEAU: f"one class ({label}) on {c.task.eval_splits[0]}"})
        output_dir = Path(output_dir or tempfile.mkdtemp(prefix="diito-"))
        if write_predictions(data, predictions, output_dir / "predictions"):
            run_.log_artifacts(output_dir / "predictions", "predictions")
        if c.tracking.log_model:
            log.info("student: saving to %s", output_dir / "student")
            name_labels(student, data.label_names)
            folder = save_model(student, tokenizer, output_dir / "student")
            logged_model.log_student(run_, student, tokenizer, input_example(data, tokenizer), folder, final, state.step, datasets(data),
                                     c.tracking.registered_model)
        teacher_final = evaluator.score(evaluator.predict(teacher.model, list(c.task.eval_splits) + data.test_splits))
        run_.log_metrics({f"teacher/{k}": v for k, v in teacher_final.items()}, state.step)
        summary.finish(outcome(job, data, final, teacher_final, state, teacher, run_), output_dir, c.tracking.uri, c.paths.root)
        shutil.rmtree(state_dir / "checkpoint", ignore_errors=True)
        (state_dir / "run.json").unlink(missing_ok=True)  # a later identical job is a new run
    return final[c.task.main_metric_key]


def outcome(job: Job, data: Prepared, final: dict[str, float], teacher_final: dict[str, float], state, teacher, run) -> summary.Outcome:
    """The job's result for the console and ``metrics.json``: both models on the same examples."""
    c = job.config
    return summary.Outcome(
        task=c.task.name, loss=c.loss.kind, main_metric=c.task.main_metric_key, student=final, teacher=teacher_final,
        student_from={"layers": c.student.layers, "blocks": job.student_blocks, "best_step": state.best_step or state.step,
                      "steps": state.step, "examples": {s: len(data.encoded[s]) for s in list(c.task.eval_splits) + data.test_splits}},
        teacher_from={"name": c.teacher.name, "source": teacher.source, "path": teacher.path, "run_id": teacher.run_id},
        run_id=run.run_id, experiment_id=run.client.get_run(run.run_id).info.experiment_id if run.run_id else None)


def subset_seed(c: config.JobConfig) -> int:
    """The seed of the student's training sample: ``trainer.subset_seed``, else the job's seed."""
    return c.trainer.subset_seed if c.trainer.subset_seed is not None else c.seed


def input_example(data: Prepared, tokenizer, n: int = 2) -> list:
    """A few evaluation texts (decoded from their tokens) as the logged model takes them: sentences,
    or text/text_pair records for sentence-pair tasks."""
    encoded = data.encoded[data.spec.eval_splits[0]]
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    examples = []
    for i in range(min(n, len(encoded))):
        ids, types = encoded.input_ids[i], encoded.token_type_ids[i] if encoded.token_type_ids else None
        if types and any(types):  # segment ids tell the pair's two texts apart
            examples.append({"text": decode([t for t, s in zip(ids, types) if s == 0]), "text_pair": decode([t for t, s in zip(ids, types) if s == 1])})
        else:
            examples.append(decode(ids))
    return examples


def datasets(data: Prepared) -> list[tracking.DatasetRecord]:
    """The splits a student run reads, for MLflow's run inputs."""
    spec = data.spec
    contexts = {"train": "training"} | dict.fromkeys(spec.eval_splits, "validation") | dict.fromkeys(data.test_splits, "test")
    return [tracking.DatasetRecord(f"{spec.name}/{split}", data.encoded[split].digest(), spec.origin(split), len(data.encoded[split]), context)
            for split, context in contexts.items() if split in data.encoded]


def log_config(run: tracking.Run | tracking.NullRun, job: Job, cfg: DictConfig, hydra_dir: Path | None) -> None:
    """Params (the validated settings, so 4 and 4.0 log alike; a run that makes no interventions
    leaves out their settings; the digest of the data read, part of the job's identity), the
    resolved config, and Hydra's record of the command line. Values read from the environment are
    replaced by the variable's name, and credentials are masked."""
    from_env = config.from_environment(cfg)
    params = tracking.params(job.config.model_dump(mode="json"), leave_out=job.unused_settings) | {"data_digest": job.data_digest}
    run.log_params({k: f"<${from_env[k]}>" if k in from_env else v for k, v in params.items()})
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for key, variable in from_env.items():
        *parents, leaf = key.split(".")
        functools.reduce(dict.get, parents, resolved)[leaf] = f"<${variable}>"
    run.log_text(store.mask(OmegaConf.to_yaml(OmegaConf.create(resolved))), "config.yaml")
    if hydra_dir and hydra_dir.exists():
        with tempfile.TemporaryDirectory() as folder:
            for file in hydra_dir.iterdir():
                (Path(folder) / file.name).write_text(store.mask(file.read_text()))
            run.log_artifacts(Path(folder), ".hydra")
