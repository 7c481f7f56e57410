"""Validation of the composed config, before any compute: one typed schema built from the settings
model each library module owns, plus the checks that need two sections at once (a student no deeper
than its teacher, patience layers inside both models). With :mod:`diito.job`, the only reader of the
config tree.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, ValidationError
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

from diito import families, files, identity, renamed, store, targets, tracking
from diito.intervention import InterchangeConfig, MappingConfig, MappingEntry, Shape, build_mapping
from diito.models import (
    StudentConfig,
    count_parameters,
    load_model_config,
    load_tokenizer,
    max_positions,
    num_layers,
    select_blocks,
    tokenizer_mismatch,
)
from diito.objective import LossConfig, default_patience_layers, term_class
from diito.sources import DataError, check_task, data_digest, glue_folder
from diito.tasks import TaskSpec
from diito.teacher import TeacherConfig
from diito.tracking import TrackingConfig
from diito.trainer import OptimConfig, Seed, TrainerConfig


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


class Paths(BaseModel):
    model_config = ConfigDict(extra="forbid")
    root: str
    cache: str


class JobConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: Seed
    stage: Literal["teacher", "distill"]
    rerun: bool = False
    paths: Paths
    task: TaskSpec
    teacher: TeacherConfig
    student: StudentConfig
    loss: LossConfig
    mapping: MappingConfig
    intervention: InterchangeConfig
    optim: OptimConfig
    trainer: TrainerConfig
    tracking: TrackingConfig


@dataclass(frozen=True)
class Job:
    """The validated job, plus what validation learnt about the models."""

    config: JobConfig
    student_blocks: list[int]
    patience_layers: list[int]
    mapping: list[MappingEntry] | None  # the checked intervention sites; None when nothing intervenes
    data_digest: str  # of the data the task reads (sources.data_digest)
    teacher_params: int = 0  # parameters of the teacher and the student, for the disk space their files take
    student_params: int = 0

    @property
    def hash(self) -> str:
        """The job's identity (:func:`diito.identity.job_hash`)."""
        return identity.job_hash(self.config, self.data_digest)

    @property
    def unused_settings(self) -> frozenset[str]:
        """Settings the job does not use: the intervention's, when nothing intervenes (so a KD
        baseline never shows an interchange_prop it did not use)."""
        if self.mapping is not None:
            return frozenset()
        return frozenset(f"{section}.{name}" for section, model in INTERVENTION_SECTIONS.items() for name in model.model_fields)


INTERVENTION_SECTIONS = {"intervention": InterchangeConfig, "mapping": MappingConfig}
"""The settings read only when a loss term needs the counterfactual pair."""


def _format(error: dict[str, Any]) -> str:
    """One pydantic error as ``dotted.key: message (got value)``."""
    key = ".".join(str(part) for part in error["loc"])
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    if kind == "value_error":  # a section's own consistency check: "field: problem; field: problem"
        message = message.removeprefix("Value error, ")
        inner = re.match(r"([\w.]+): ", message)
        return f"{key}.{message}" if inner else f"{key}: {message}"
    if kind != "missing":
        message += f" (got {error['input']!r})"
    return f"{key}: {message}"


def resolve(cfg: DictConfig) -> dict[str, Any]:
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{key}: {e.msg}" if key else str(e)) from None


def validate(cfg: DictConfig, overrides: list[str] | None = None) -> Job:
    """Check every key of ``cfg``; raise :class:`ConfigError` naming the first bad key. ``overrides``
    (the command line's, by default Hydra's for this job) tell the settings a user gave."""
    resolved = resolve(cfg)
    for old in renamed.MOVED:
        section, _, name = old.partition(".")
        if name in (resolved.get(section) or {}):
            raise ConfigError(renamed.message(old))
    try:
        job = JobConfig.model_validate(resolved)
    except ValidationError as e:
        raise ConfigError("; ".join(_format(err) for err in e.errors())) from None
    check_terms(job.loss)
    check_optim(job.optim, "optim")
    check_optim(job.teacher.recipe.optim, "teacher.recipe")
    check_acting(job, command_line() if overrides is None else overrides)
    try:
        job.task = glue_folder(job.task)
        check_task(job.task)
        digest = data_digest(job.task)
    except DataError as e:
        raise ConfigError(str(e)) from None
    check_device(job.trainer.device)
    if job.stage == "teacher" and job.trainer.devices > 1:
        raise ConfigError(
            f"trainer.devices: {job.trainer.devices} ranks train the student, but stage=teacher only fine-tunes the teacher, "
            "in one process (set trainer.devices=1)"
        )
    check_places(job.paths, job.tracking)

    teacher_key = "teacher.checkpoint" if job.teacher.checkpoint else "teacher.model"
    teacher_config = _model_config(job.teacher.checkpoint or job.teacher.model, teacher_key)
    if job.teacher.checkpoint:
        _check_checkpoint(Path(job.teacher.checkpoint), teacher_config, job.task)
    teacher_layers = num_layers(teacher_config)
    # The student copies its source's architecture: the teacher, or with init_from=pretrained the base
    # model (which differs from a given teacher.checkpoint's, possibly in depth and width).
    pretrained_source = job.student.init_from == "pretrained" and job.teacher.checkpoint
    source_config = _model_config(job.teacher.model, "teacher.model") if pretrained_source else teacher_config
    _check_max_length(
        job.task,
        teacher_key,
        job.teacher.checkpoint or job.teacher.model,
        {teacher_key: teacher_config} | ({"teacher.model": source_config} if pretrained_source else {}),
    )
    if job.stage == "distill":
        _check_families(job, teacher_config, source_config if pretrained_source else None)
    source_layers, k = num_layers(source_config), job.student.layers
    if k > source_layers:
        raise ConfigError(
            f"student.layers: {k} is deeper than the {source_layers}-layer {'teacher.model' if pretrained_source else 'teacher'}"
        )
    try:
        blocks = select_blocks(job.student.init, source_layers, k, job.student.blocks)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        families.check_blocks(source_config, blocks, "student.blocks")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    patience = job.loss.patience_layers
    if patience is None:
        patience = default_patience_layers(teacher_layers, k)
    if job.loss.beta > 0:
        if k < 2:
            raise ConfigError("loss.beta: the patience loss matches student blocks 0..layers-2, so it needs student.layers >= 2")
        if len(patience) != k - 1:
            raise ConfigError(f"loss.patience_layers: {len(patience)} teacher layers given; a {k}-layer student matches {k - 1}")
        if any(not 0 <= p < teacher_layers for p in patience):
            raise ConfigError(f"loss.patience_layers: {patience} outside the teacher's blocks 0..{teacher_layers - 1}")
    teacher_shape = Shape.of(teacher_config)
    student_shape = dataclasses.replace(Shape.of(source_config), layers=k)
    if job.loss.cosine > 0 and student_shape.hidden != teacher_shape.hidden:
        raise ConfigError(
            f"loss.cosine: the causal cosine compares last-block outputs of equal width; the student's are "
            f"{student_shape.hidden} wide, the teacher's {teacher_shape.hidden} (set loss.cosine=0)"
        )
    if job.loss.beta > 0 and student_shape.hidden != teacher_shape.hidden:
        raise ConfigError(
            f"loss.beta: the patience loss compares [CLS] vectors of equal width; the student's are "
            f"{student_shape.hidden} wide, the teacher's {teacher_shape.hidden} (set loss.beta=0)"
        )
    if pretrained_source and job.stage == "distill" and (why := tokenizer_mismatch(job.teacher.checkpoint, job.teacher.model)):
        raise ConfigError(
            f"student.init_from: pretrained builds the student from teacher.model {job.teacher.model!r}, which cannot read "
            f"the teacher checkpoint's token ids: {why}"
        )
    mapping = None
    if job.loss.intervenes:
        try:
            mapping = build_mapping(job.mapping, teacher_shape, student_shape)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    student_config = copy.deepcopy(source_config)
    student_config.num_hidden_layers = k
    try:  # for the disk space the job's files take
        sizes = count_parameters(teacher_config), count_parameters(student_config)
    except ValueError as e:  # an architecture without a sequence-classification head
        raise ConfigError(f"teacher.model: cannot build a text classifier from {job.teacher.model!r}: {str(e).splitlines()[0]}") from None
    return Job(job, blocks, patience, mapping, digest, *sizes)


def check_terms(loss: LossConfig) -> None:
    """Every ``loss.terms`` entry names a class that follows the loss-term protocol, takes the
    arguments given and can be built with them."""
    for name, spec in loss.terms.items():
        try:
            found = term_class(spec, f"loss.terms.{name}")
        except targets.TargetError as e:
            raise ConfigError(str(e)) from None
        try:
            found.cls(**spec.arguments)
        except Exception as e:  # noqa: BLE001 - the term's own check of its arguments
            raise ConfigError(f"loss.terms.{name}: {spec.target}({_arguments(spec.arguments)}) fails: {type(e).__name__}: {e}") from None


def check_optim(optim: OptimConfig, key: str) -> None:
    """The optimizer and the schedule ``optim`` names import, take their arguments and work: both
    are built once on a one-element parameter (which also runs the optimizer's own value checks)."""
    arguments = {"lr": optim.lr} | optim.arguments
    cls = _target(optim.target, key)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"{key}._target_: {optim.target} is not an optimizer (a subclass of torch.optim.Optimizer)")
    _accepts(cls, optim.target, key, 1, arguments)
    try:
        optimizer = cls([{"params": [torch.nn.Parameter(torch.zeros(1))], "weight_decay": optim.weight_decay}], **arguments)
    except Exception as e:  # noqa: BLE001 - the optimizer's own checks of its values
        raise ConfigError(f"{key}: {optim.target}({_arguments(arguments)}) fails: {type(e).__name__}: {e}") from None
    arguments = {"num_warmup_steps": 0, "num_training_steps": 1} | (optim.schedule.model_extra or {})
    schedule = _target(optim.schedule.target, f"{key}.schedule")
    _accepts(schedule, optim.schedule.target, f"{key}.schedule", 1, arguments)
    try:
        scheduler = schedule(optimizer, **arguments)
    except Exception as e:  # noqa: BLE001 - the schedule's own checks
        raise ConfigError(
            f"{key}.schedule: {optim.schedule.target}(optimizer, {_arguments(arguments)}) fails: {type(e).__name__}: {e}"
        ) from None
    if not all(hasattr(scheduler, name) for name in ("step", "get_last_lr", "state_dict", "load_state_dict")):
        raise ConfigError(
            f"{key}.schedule._target_: {optim.schedule.target} did not return a learning-rate scheduler "
            "(step, get_last_lr, state_dict, load_state_dict: a torch.optim.lr_scheduler.LRScheduler)"
        )


def _target(path: str, key: str) -> Any:
    """The object ``path`` (``<key>._target_``) names."""
    try:
        return targets.locate(path)
    except targets.TargetError as e:
        raise ConfigError(f"{key}._target_: {e}") from None


def _accepts(found: Any, path: str, key: str, positional: int, arguments: dict[str, Any]) -> None:
    """``found`` takes ``arguments`` (after ``positional`` ones); else the key of the one it does not take."""
    try:
        targets.check_arguments(found, path, positional, arguments)
    except targets.TargetError as e:
        raise ConfigError(f"{key}.{e.argument}: {e}" if e.argument else f"{key}: {e}") from None


def _arguments(arguments: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in arguments.items())


def command_line() -> list[str]:
    """This job's command-line overrides under Hydra (a sweep's job: its own values), else none."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def check_acting(job: JobConfig, overrides: list[str]) -> None:
    """When no loss term needs the counterfactual pair (``loss=kd``, or ``loss.gamma=0``), the
    intervention's and the mapping's settings cannot act: refused when given on the command line
    (a group choice, ``mapping=late``, or a key, ``intervention.interchange_prop=0.3``) or set to
    anything but their defaults (by a preset), never ignored. The defaults themselves, which every
    job composes, pass."""
    if job.loss.intervenes:
        return
    why = (
        "cannot act: nothing intervenes (loss.gamma and loss.cosine are 0 and no loss term needs the counterfactual pair); "
        "leave it out, or choose loss=diito"
    )
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.split(".")[0] in INTERVENTION_SECTIONS:
            raise ConfigError(f"{override.lstrip('+~')}: {why}")
    for section, model in INTERVENTION_SECTIONS.items():
        given, default = getattr(job, section), model()
        for name in model.model_fields:
            if getattr(given, name) != getattr(default, name):
                raise ConfigError(f"{section}.{name}: {_plain(getattr(given, name))} {why}")


def _plain(value: Any) -> str:
    return repr(value.model_dump() if isinstance(value, BaseModel) else value)


def _check_families(job: JobConfig, teacher_config, other_source) -> None:
    """Both models (the teacher, and ``other_source`` when the student is built from another model)
    are of families a student can be built from and intervened on."""
    teacher_key = "teacher.checkpoint" if job.teacher.checkpoint else "teacher.model"
    for config, key in ((teacher_config, teacher_key), (other_source, "teacher.model")):
        if config is not None:
            try:
                families.family_of(config)
            except ValueError as e:
                raise ConfigError(f"{key}: {e}") from None


def check_places(paths: Paths, tracking_config: TrackingConfig) -> None:
    """The folders a job writes to can be written, and the tracking store can take its runs."""
    check_folders(paths)
    if tracking_config.enabled:
        check_store(tracking_config)


def check_folders(paths: Paths) -> None:
    for key in ("root", "cache"):
        if problem := files.unusable_folder(Path(getattr(paths, key))):
            raise ConfigError(f"paths.{key}: {problem}; set paths.{key}=<a writable folder>")


def check_store(tracking_config: TrackingConfig) -> None:
    """The store answers, opens, is writable and not locked, and the job's experiment is not deleted."""
    try:
        store.check(tracking_config.uri, tracking_config.timeout)
    except store.StoreError as e:
        raise ConfigError(f"tracking.uri: {e}") from None
    try:
        tracking.check_experiment(tracking_config)
    except store.StoreError as e:  # names its key: tracking.uri or tracking.experiment
        raise ConfigError(str(e)) from None


def check_hydra_folder(cfg: DictConfig, key: str) -> None:
    """Before Hydra creates the job's folder (``hydra.run.dir``) or the sweep's (``hydra.sweep.dir``),
    where a failed ``mkdir`` would end in Hydra's traceback: the project's folders and that one can
    be written (so a bad ``paths.root`` is named as such)."""
    try:
        paths = Paths.model_validate(resolve(cfg.paths))
    except ValidationError as e:
        raise ConfigError("; ".join(_format(err | {"loc": ("paths", *err["loc"])}) for err in e.errors())) from None
    check_folders(paths)
    if problem := files.unusable_folder(Path(OmegaConf.select(cfg, key))):
        raise ConfigError(f"{key}: {problem}; set {key}=<a writable folder>")


FLOAT_BYTES = 4  # weights and optimizer moments are saved in fp32


def fit_copies(keep_best: bool) -> int:
    """Copies of a model's weights a fit's checkpoint folder holds at its peak: ``previous.pt`` and
    the ``last.pt`` being written after it, each the weights and AdamW's two moments, plus
    ``best.pt`` and the one replacing it."""
    return 2 * 3 + (2 if keep_best else 0)


class Write(NamedTuple):
    key: str  # the setting that moves it elsewhere
    what: str
    where: Path
    bytes: int


def check_space(job: Job, job_folder: Path, state_dir: Path, teacher_entry: Path | None) -> None:
    """Refuse a job whose files will not fit, before it writes any: per file system, what the job
    writes at its peak (the student's checkpoints in ``state_dir``, the saved student in
    ``job_folder``, and the teacher's fine-tune and cache entry in ``teacher_entry`` when the teacher
    is not cached yet), less what an interrupted run of it left there, against the space free."""
    c = job.config
    writes = []
    if teacher_entry is not None:
        copies = fit_copies(c.teacher.recipe.loop.keep_best) + 1  # + the saved teacher
        writes.append(
            Write(
                "paths.cache",
                "the teacher's fine-tune and cache entry",
                teacher_entry,
                copies * FLOAT_BYTES * job.teacher_params - files.bytes_in(teacher_entry),
            )
        )
    if c.stage == "distill":
        writes.append(
            Write(
                "paths.cache",
                "the student's checkpoints",
                state_dir,
                fit_copies(c.trainer.keep_best) * FLOAT_BYTES * job.student_params - files.bytes_in(state_dir),
            )
        )
        if c.tracking.log_model:
            writes.append(Write("hydra.run.dir", "the saved student", job_folder, FLOAT_BYTES * job.student_params))
    disks: dict[int, list[Write]] = {}
    for write in writes:
        disks.setdefault(files.nearest_existing(write.where).stat().st_dev, []).append(write._replace(bytes=max(0, write.bytes)))
    for group in disks.values():
        need, free = sum(w.bytes for w in group), files.free_space(group[0].where)
        if need > free:
            what = ", ".join(f"{w.what} {files.size(w.bytes)} in {w.where}" for w in group)
            keys = ", ".join(dict.fromkeys(f"{w.key}=<a folder on a larger disk>" for w in group))
            raise ConfigError(
                f"{group[0].key}: not enough free space: the job writes about {files.size(need)} ({what}) and that disk "
                f"has {files.size(free)} free; free {files.size(need - free)} there or move it ({keys})"
            )


def _model_config(model: str, key: str):
    try:
        return load_model_config(model)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot load model {model!r}: {str(e).splitlines()[0]}") from None


def _check_max_length(task: TaskSpec, key: str, model: str, configs: dict[str, Any]) -> None:
    """``task.max_length`` holds the special tokens the tokenizer of ``model`` (the job's, given by
    ``key``) adds and a token of each text (else truncation is silently skipped), and no more
    positions than the models of ``configs`` ({key: config}) have (else an example that long fails
    mid-evaluation)."""
    try:
        tokenizer = load_tokenizer(model)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot load the tokenizer of {model!r}: {str(e).splitlines()[0]}") from None
    texts = len(task.text_fields)
    special = tokenizer.num_special_tokens_to_add(pair=texts == 2)
    if task.max_length < special + texts:
        raise ConfigError(
            f"task.max_length: {task.max_length} leaves no room for text: the tokenizer adds {special} special tokens to "
            f"{'a pair of texts' if texts == 2 else 'a text'}; at least {special + texts}, with one token of "
            f"{'each text' if texts == 2 else 'text'}"
        )
    limits = []
    for where, config in configs.items():
        if (found := max_positions(config)) is not None:
            limits.append((found[0], f"{found[1]}, in {where}'s config"))
    if tokenizer.model_max_length < VERY_LARGE_INTEGER:  # a real limit, not the "none given" placeholder
        limits.append((tokenizer.model_max_length, f"model_max_length of {key}'s tokenizer"))
    for limit, why in limits:
        if task.max_length > limit:
            raise ConfigError(f"task.max_length: {task.max_length} is more tokens than the model takes: at most {limit} ({why})")


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "spm.model", "sentencepiece.bpe.model")
"""Files one of which a saved tokenizer holds (fast tokenizers, WordPiece, BPE, SentencePiece)."""


def _check_checkpoint(folder: Path, config, task: TaskSpec) -> None:
    """A given teacher folder holds weights, its tokenizer, and a head of the task's size (a `files`
    task's classes are known once its data is read: the job checks them then)."""
    if not any(folder.glob("*.safetensors")) and not (folder / "pytorch_model.bin").is_file():
        raise ConfigError(f"teacher.checkpoint: {folder} holds no weights (model.safetensors or pytorch_model.bin)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        # transformers would otherwise build a tokenizer of a handful of tokens: every word [UNK]
        raise ConfigError(
            f"teacher.checkpoint: {folder} holds no tokenizer ({', '.join(TOKENIZER_FILES)}); "
            "save it beside the model: tokenizer.save_pretrained(folder)"
        )
    expected = 1 if task.regression else len(task.label_names) if task.label_names else None
    if expected is not None and config.num_labels != expected:
        raise ConfigError(f"teacher.checkpoint: {folder} has a {config.num_labels}-output head; task {task.name} needs {expected}")


def check_device(device: str) -> None:
    """The device exists on this machine."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        raise ConfigError(f"trainer.device: {device!r} is not a device (auto, cpu, cuda, cuda:N, mps)")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.device: {device} asked for, but this machine has no CUDA device (use auto or cpu)")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"trainer.device: {device} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.device: mps asked for, but this machine has no MPS device (use auto or cpu)")


def tracking_settings(cfg: DictConfig) -> TrackingConfig:
    """The tracking section alone, for the sweep callback and for recording a job that failed
    before its config could be validated as a whole."""
    return TrackingConfig.model_validate(resolve(cfg.tracking))


def main_metric_key(cfg: DictConfig) -> str:
    return TaskSpec.model_validate(resolve(cfg.task)).main_metric_key


def raw_params(cfg: DictConfig) -> dict[str, Any]:
    """The config as given, flattened and unresolved: what a job that failed validation was asked to do."""
    return identity.flatten(OmegaConf.to_container(cfg, resolve=False))


def from_environment(cfg: DictConfig) -> dict[str, str]:
    """Settings whose value was read from an environment variable that is set: ``{key: variable}``.
    Such values (a tracking URI with a token, say) are never logged."""
    found = {}
    for key, value in raw_params(cfg).items():
        for name in re.findall(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)", str(value)):
            if name in os.environ:
                found[key] = name
    return found
