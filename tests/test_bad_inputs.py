"""Bad input: every bad key, file, checkpoint or tracking URI gets one line naming it (and the line, for a
bad row), exit code 2, no traceback, no MLflow run, and nothing written to the caches."""

from __future__ import annotations

import json
import types
import typing

import pytest
import torch
from mlflow import MlflowClient
from transformers import AutoModelForSequenceClassification, BertConfig

from diito import job
from diito.config import ConfigError
from diito.models import TINY_TOKENIZER, load_tokenizer
from diito.sources import DataError
from tests.conftest import GLUE, compose_config, run_cli

TINY = ["teacher=tiny"]
QUICK = [*TINY, "trainer=debug"]  # a case not refused (as on code that misses the check) ends in seconds


def files_task(tmp_path, train: str | bytes, dev: str = "text,label\ngood film,pos\nbad film,neg\n", suffix: str = ".csv") -> list[str]:
    """A `files` task whose training file holds ``train``."""
    (tmp_path / f"train{suffix}").write_bytes(train if isinstance(train, bytes) else train.encode())
    (tmp_path / "dev.csv").write_text(dev)
    return [*TINY, "task=files", f"task.files.train={tmp_path / f'train{suffix}'}", f"task.files.validation={tmp_path / 'dev.csv'}"]


def checkpoint(tmp_path, *, num_labels: int = 2, weights: bool = True, tokenizer: bool = True, config_text: str | None = None) -> str:
    """A fine-tuned teacher folder, tiny and 32 wide, optionally broken."""
    folder = tmp_path / "teacher"
    model = AutoModelForSequenceClassification.from_config(
        BertConfig(
            vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=num_labels
        )
    )
    model.save_pretrained(folder)
    if tokenizer:
        load_tokenizer(TINY_TOKENIZER).save_pretrained(folder)
    if not weights:
        (folder / "model.safetensors").unlink()
    if config_text is not None:
        (folder / "config.json").write_text(config_text)
    return str(folder)


def a_file(tmp_path) -> str:
    (tmp_path / "somefile").write_text("not a folder")
    return str(tmp_path / "somefile")


def read_only_folder(tmp_path, name: str) -> str:
    """A folder no one may write to (``chmod a-w``; root could write it anyway, but is refused too)."""
    (tmp_path / name).mkdir()
    (tmp_path / name).chmod(0o555)
    return str(tmp_path / name)


GOOD_ROWS = "text,label\ngreat,pos\nawful,neg\n"
CASES = {  # name: (overrides, or a function of tmp_path giving them; what the message must say, or a function of tmp_path giving it)
    "type": (["trainer.epochs=abc"], "trainer.epochs: Input should be a valid integer"),
    "epochs 0": (["trainer.epochs=0"], "trainer.epochs: Input should be greater than 0"),
    "negative batch": (["trainer.batch_size=-1"], "trainer.batch_size: Input should be greater than 0"),
    "grad_accum 0": (["trainer.grad_accum=0"], "trainer.grad_accum: Input should be greater than 0"),
    "max_grad_norm 0": (["trainer.max_grad_norm=0"], "trainer.max_grad_norm: Input should be greater than 0"),
    "min_steps": (["trainer.min_steps=-5"], "trainer.min_steps: Input should be greater than or equal to 0"),
    "eval_every": (["trainer.eval_every=0"], "trainer.eval_every: Input should be greater than 0"),
    "skip_nonfinite": (["trainer.skip_nonfinite=-1"], "trainer.skip_nonfinite: Input should be greater than or equal to 0"),
    "precision": (["trainer.precision=fp8"], "trainer.precision: Input should be 'auto', 'fp32', 'bf16' or 'fp16'"),
    "no such device": (["trainer.device=tpu"], "trainer.device: 'tpu' is not a device"),
    "lr 0": (["optim.lr=0"], "optim.lr: Input should be greater than 0"),
    "weight decay": (["optim.weight_decay=-1"], "optim.weight_decay: Input should be greater than or equal to 0"),
    "warmup": (["optim.warmup_ratio=1.5"], "optim.warmup_ratio: Input should be less than or equal to 1"),
    "eps": (
        ["optim.eps=-1"],
        "optim: torch.optim.AdamW(lr=0.0001, betas=[0.9, 0.999], eps=-1) fails: ValueError: Invalid epsilon value: -1",
    ),
    "betas": (
        ["optim.betas=[0.9,1.5]"],
        "optim: torch.optim.AdamW(lr=0.0001, betas=[0.9, 1.5], eps=1e-06) fails: ValueError: Invalid beta",
    ),
    "teacher lr": (["teacher.recipe.lr=-1"], "teacher.recipe.lr: Input should be greater than 0"),
    "teacher data": (["teacher.recipe.max_train_examples=0"], "teacher.recipe.max_train_examples: Input should be greater than 0"),
    "alpha": (["loss.alpha=1.5"], "loss.alpha: Input should be less than or equal to 1"),
    "T": (["loss.T=0"], "loss.T: Input should be greater than 0"),
    "gamma": (["loss.gamma=-1"], "loss.gamma: Input should be greater than or equal to 0"),
    "interchange_prop": (["intervention.interchange_prop=2"], "intervention.interchange_prop: Input should be less than or equal to 1"),
    "interchange_mode": (
        ["intervention.interchange_mode=spans"],
        "intervention.interchange_mode: Input should be 'random' or 'consecutive'",
    ),
    "kl_reduction": (["loss.kl_reduction=sum"], "loss.kl_reduction: Input should be 'batchmean' or 'mean'"),
    "max_token": (
        ["intervention.interchange_max_token=0"],
        "intervention.interchange_max_token: Input should be greater than or equal to 1",
    ),
    "patience of one block": (["loss.beta=1", "student.layers=1"], "loss.beta: the patience loss matches student blocks"),
    "student depth 0": (["student.layers=0"], "student.layers: Input should be greater than 0"),
    "student too deep": (["student.layers=7"], "student.layers: 7 is deeper than the 6-layer teacher"),
    "student init": (["student.init=random"], "student.init: Input should be 'first_k' or 'skip'"),
    "student blocks": (["student.blocks=[0,9,1]"], "student.blocks: [0, 9, 1] outside the teacher's blocks 0..5"),
    "student blocks out of order": (["student.blocks=[2,0,1]"], "student.blocks: [2, 0, 1] is not in increasing order"),
    "student block twice": (["student.blocks=[0,0,1]"], "student.blocks: [0, 0, 1] is not in increasing order"),
    "mapping range": (
        ["mapping=explicit", "mapping.entries=[{student:{layers:[5]},teacher:{layers:[1]}}]"],
        "mapping.entries[0].student.layers: 5 outside blocks 0..2",
    ),
    "mapping widths": (
        ["mapping=explicit", "mapping.entries=[{student:{layers:[0],dims:[0,8]},teacher:{layers:[1],dims:[0,16]}}]"],
        "mapping.entries[0]: student and teacher slices differ in width [8, 16]",
    ),
    "unknown mapping": (["mapping.name=diagonal"], "mapping.name: Input should be 'full', 'full_original', 'middle', 'late' or 'explicit'"),
    "seed": (["seed=abc"], "seed: Input should be a valid integer"),
    "negative seed": (["seed=-1"], "seed: Input should be greater than or equal to 0"),
    "seed above 2**32-1": (["seed=4294967296"], "seed: Input should be less than or equal to 4294967295"),
    "teacher seed": (["teacher.recipe.seed=-1"], "teacher.recipe.seed: Input should be greater than or equal to 0"),
    "stage": (["stage=bogus"], "stage: Input should be 'teacher' or 'distill'"),
    "max_length": (["task.max_length=0"], "task.max_length: Input should be greater than 0"),
    "max_length without room for text": (
        ["task.max_length=2"],
        "task.max_length: 2 leaves no room for text: the tokenizer adds 2 special tokens",
    ),
    "max_length of a pair without room for text": (
        ["task=rte", "task.max_length=4"],
        "task.max_length: 4 leaves no room for text: the tokenizer adds 3 special tokens to a pair",
    ),
    "max_length beyond the positions": (
        ["task.max_length=513"],
        "task.max_length: 513 is more tokens than the model takes: at most 512 (max_position_embeddings 512",
    ),
    "unknown metric": (["task.metrics=[bleu]", "task.main_metric=bleu"], "task.metrics.0: Input should be 'accuracy'"),
    "files not given": ([*TINY, "task=files"], "task.files.train: no path given"),
    "file missing": (
        lambda tmp: [*TINY, "task=files", f"task.files.train={tmp}/none.csv", f"task.files.validation={tmp}/none.csv"],
        "task.files.train: file not found: ",
    ),
    "empty file": (lambda tmp: files_task(tmp, ""), "train.csv: the file is empty; fix task.files.train"),
    "header only": (lambda tmp: files_task(tmp, "text,label\n"), "train.csv: no rows"),
    "not UTF-8": (
        lambda tmp: files_task(tmp, "text,label\ngood,pos\ncaf\xe9 noir,neg\n".encode("latin-1")),
        "train.csv:3: not UTF-8 text (byte 0xe9); save the file as UTF-8",
    ),
    "bad JSONL line": (
        lambda tmp: files_task(tmp, '{"text": "good", "label": "pos"}\n{"text": "bad", "label"\n', suffix=".jsonl"),
        "train.jsonl:2: invalid JSON",
    ),
    "missing label": (lambda tmp: files_task(tmp, "text,label\ngreat,pos\nawful,\n"), "train.csv:3: the label is empty"),
    "short row": (
        lambda tmp: files_task(tmp, "text,label\ngreat,pos\nawful\n"),
        "train.csv:3: 1 field(s), fewer than the 2 of the first line",
    ),
    "unseen label": (
        lambda tmp: files_task(tmp, GOOD_ROWS, dev="text,label\nfine,neutral\n"),
        "dev.csv:2: label 'neutral' is not a label of the training file ",
    ),
    "more fields than the header": (
        lambda tmp: files_task(tmp, "text,label\ngreat,pos\ngood, really good,pos\nawful,neg\n"),
        "train.csv:3: 3 fields, more than the 2 of the first line (a comma inside an unquoted text? quote it",
    ),
    "a tab inside a TSV text": (
        lambda tmp: files_task(tmp, "text\tlabel\ngreat\tpos\nawful\tfilm\tneg\n", suffix=".tsv"),
        "train.tsv:3: 3 fields, more than the 2 of the first line (a tab inside a text?)",
    ),
    "two columns of one name": (
        lambda tmp: files_task(tmp, "text,label,text\ngreat,pos,film\nawful,neg,film\n"),
        "train.csv:1: two columns named 'text' (columns 1 and 3); rename one",
    ),
    "a quote never closed": (
        lambda tmp: files_task(tmp, 'text,label\n"great,pos\nawful,neg\n'),
        "train.csv:2: a quote opens a text that is never closed",
    ),
    "JSONL line without its label": (
        lambda tmp: files_task(tmp, '{"text": "great", "label": "pos"}\n\n{"text": "awful"}\n', suffix=".jsonl"),
        "train.jsonl:3: no key 'label'",
    ),
    "JSONL null text": (
        lambda tmp: files_task(tmp, '{"text": "great", "label": "pos"}\n{"text": null, "label": "neg"}\n', suffix=".jsonl"),
        "train.jsonl:2: 'text' is null, not a string",
    ),
    "JSONL null label": (
        lambda tmp: files_task(tmp, '{"text": "great", "label": "pos"}\n{"text": "awful", "label": null}\n', suffix=".jsonl"),
        "train.jsonl:2: 'label' is null, not a string or a number",
    ),
    "JSONL line not an object": (
        lambda tmp: files_task(tmp, '{"text": "great", "label": "pos"}\n["awful", "neg"]\n', suffix=".jsonl"),
        "train.jsonl:2: a list, not an object",
    ),
    "JSONL key twice": (
        lambda tmp: files_task(
            tmp, '{"text": "great", "label": "pos"}\n{"text": "awful", "text": "bad", "label": "neg"}\n', suffix=".jsonl"
        ),
        "train.jsonl:2: the key 'text' twice",
    ),
    "validation labels 0/1, training labels 1/2": (
        lambda tmp: files_task(tmp, "text,label\ngreat,2\nawful,1\n", dev="text,label\nfine,1\nbad,0\n"),
        "dev.csv:3: label '0' is not a label of the training file ",
    ),
    "one label spelt two ways": (
        lambda tmp: files_task(tmp, "text,label\ngreat,1\nawful,0\nfine,1.0\n"),
        "train.csv:4: label '1.0' is line 2's '1' spelt another way",
    ),
    "label names and ids mixed": (
        lambda tmp: [*files_task(tmp, "text,label\ngreat,pos\nawful,0\n"), "task.label_names=[neg,pos]"],
        "train.csv:3: label '0' is a class id, but line 2's 'pos' is a name of label_names ['neg', 'pos']",
    ),
    "no text column": (lambda tmp: files_task(tmp, "sentence,label\ngreat,pos\nawful,neg\n"), "train.csv: no column 'text'"),
    "no GLUE folder": (lambda tmp: [*TINY, "task=sst2", f"task.data_dir={tmp}/glue"], "task.data_dir: no such folder"),
    "no checkpoint": (lambda tmp: [f"teacher.checkpoint={tmp}/none"], "teacher.checkpoint: cannot load model"),
    "damaged checkpoint config": (
        lambda tmp: [f"teacher.checkpoint={checkpoint(tmp, config_text='{not json')}"],
        "teacher.checkpoint: cannot load model",
    ),
    "checkpoint without weights": (lambda tmp: [f"teacher.checkpoint={checkpoint(tmp, weights=False)}"], "holds no weights"),
    "checkpoint without a tokenizer": (
        lambda tmp: [f"teacher.checkpoint={checkpoint(tmp, tokenizer=False)}"],
        "holds no tokenizer (tokenizer.json, vocab.txt",
    ),
    "checkpoint head for a files task": (
        lambda tmp: [*files_task(tmp, GOOD_ROWS), f"teacher.checkpoint={checkpoint(tmp, num_labels=3)}", "student.layers=2"],
        "has a 3-output head; the data of task files has 2 classes ['neg', 'pos']",
    ),
    "checkpoint head": (
        lambda tmp: [f"teacher.checkpoint={checkpoint(tmp, num_labels=3)}"],
        "has a 3-output head; task rotten_tomatoes needs 2",
    ),
    "cosine with a narrower teacher": (
        lambda tmp: [f"teacher.checkpoint={checkpoint(tmp)}", "student.init_from=pretrained", "student.layers=2", "loss.cosine=0.5"],
        "loss.cosine: the causal cosine compares last-block outputs of equal width; the student's are 384 wide",
    ),
    "tracking scheme": (["tracking.uri=ftp://example.org/x"], "tracking.uri: 'ftp://example.org/x' is not a tracking URI"),
    "no server": (
        ["tracking=server", "tracking.uri=http://127.0.0.1:9", "tracking.timeout=2"],
        "tracking.uri: no MLflow server answers at http://127.0.0.1:9",
    ),
    "unwritable store": (["tracking.uri=sqlite:////proc/diito/mlflow.db"], "tracking.uri: cannot create the database's folder /proc/diito"),
    "root under a file": (
        lambda tmp: [*QUICK, f"paths.root={a_file(tmp)}/x"],
        lambda tmp: f"paths.root: {tmp}/somefile is a file, so {tmp}/somefile/x cannot be a folder under it",
    ),
    "cache is a file": (
        lambda tmp: [*QUICK, f"paths.cache={a_file(tmp)}"],
        lambda tmp: f"paths.cache: {tmp}/somefile is a file, not a folder",
    ),
    "read-only cache": (
        lambda tmp: [*QUICK, f"paths.cache={read_only_folder(tmp, 'cache')}"],
        lambda tmp: f"paths.cache: {tmp}/cache is read-only (permissions dr-xr-xr-x)",
    ),
    "read-only root": (
        lambda tmp: [*QUICK, f"paths.root={read_only_folder(tmp, 'root')}"],
        lambda tmp: f"paths.root: {tmp}/root is read-only (permissions dr-xr-xr-x)",
    ),
    "cache under a read-only folder": (
        lambda tmp: [*QUICK, f"paths.cache={read_only_folder(tmp, 'shared')}/cache"],
        lambda tmp: f"paths.cache: cannot create {tmp}/shared/cache: {tmp}/shared is read-only",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_in_one_line_with_nothing_started(home, tmp_path, case):
    overrides, message = CASES[case]
    overrides = overrides(tmp_path) if callable(overrides) else overrides
    message = message(tmp_path) if callable(message) else message
    with pytest.raises((ConfigError, DataError)) as error:
        job.run(compose_config(overrides), output_dir=tmp_path / "out")
    text = str(error.value)
    assert message in text and "\n" not in text
    if (home / "mlflow.db").exists():  # nothing was started, so nothing is left RUNNING
        client = MlflowClient(f"sqlite:///{home}/mlflow.db")
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert not any((home / ".cache").rglob("*.safetensors")) and not any((home / ".cache").rglob("*.pt"))
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused(home):
    with pytest.raises(ConfigError, match="trainer.device: cuda asked for, but this machine has no CUDA device"):
        job.run(compose_config(["trainer.device=cuda"]))


def test_credentials_never_reach_the_message(home):
    with pytest.raises(ConfigError) as error:
        job.run(compose_config(["tracking=server", "tracking.uri=http://alice:s3cret@127.0.0.1:9", "tracking.timeout=2"]))
    assert "http://alice:***@127.0.0.1:9" in str(error.value) and "s3cret" not in str(error.value)


@pytest.mark.parametrize(
    "text, masked",
    [
        ("http://alice:s3cret@host:5000", "http://alice:***@host:5000"),
        (
            r"tracking.uri=http\://alice\:s3cret@host\:5000,loss.T=2",
            r"tracking.uri=http\://alice\:***@host\:5000,loss.T=2",
        ),  # Hydra's job name
        ("postgresql+psycopg://mlflow:s3cret@db:5432/mlflow", "postgresql+psycopg://mlflow:***@db:5432/mlflow"),
        ("View run x at: https://:s3cret@host/#/experiments/1", "View run x at: https://:***@host/#/experiments/1"),
        ("http://host:5000/a and sqlite:///a/b.db", "http://host:5000/a and sqlite:///a/b.db"),
    ],
)
def test_every_form_of_a_password_in_a_uri_is_masked(text, masked):
    from diito.store import mask

    assert mask(text) == masked


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["loss.alpha=2"], "error: loss.alpha: Input should be less than or equal to 1"),
        (
            ["task=files", "task.files.train=/none/train.csv", "task.files.validation=/none/dev.csv"],
            "error: task.files.train: file not found",
        ),
        (
            ["tracking=server", "tracking.uri=http://bob:hunter2@127.0.0.1:9", "tracking.timeout=2"],
            "error: tracking.uri: no MLflow server answers at http://bob:***@",
        ),
    ],
)
def test_on_the_command_line_bad_input_exits_2_without_a_traceback(home, overrides, message):
    result = run_cli([*TINY, *overrides], home, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in result.stderr and "hunter2" not in result.stderr + result.stdout
    assert not (home / "mlflow.db").exists() and not (home / ".cache" / "teachers").exists()


def test_byte_order_mark_and_crlf_are_read(home, tmp_path):
    rows = "text,label\r\ngreat film,pos\r\nawful film,neg\r\nfine film,pos\r\n"
    overrides = files_task(tmp_path, "\ufeff" + rows) + ["stage=teacher", "tracking=none"]
    job.run(compose_config(overrides))
    from diito.sources import load_task

    data = load_task(job.validate(compose_config(overrides)).config.task)
    assert data.label_names == ["neg", "pos"] and data.splits["train"].texts[0] == ("great film",)


def test_a_glue_root_is_accepted_for_data_dir(home, tmp_path, caplog):
    caplog.set_level("INFO", logger="diito")
    folder = tmp_path / "glue_data" / "SST-2"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text("sentence\tlabel\ngreat\t1\nawful\t0\n")
    (folder / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    (folder / "test.tsv").write_text("index\tsentence\n0\tok\n")
    config = job.validate(compose_config([*TINY, "task=sst2", f"task.data_dir={tmp_path / 'glue_data'}"])).config
    assert config.task.data_dir == str(folder)
    assert f"{tmp_path / 'glue_data'} is a GLUE root; reading its SST-2 folder" in caplog.text


@pytest.mark.skipif(not (GLUE / "SST-2").exists(), reason="GLUE reference files not present")
def test_the_real_glue_root(home):
    assert job.validate(compose_config([*TINY, "task=sst2", f"task.data_dir={GLUE}"])).config.task.data_dir == str(GLUE / "SST-2")


def test_sweep_without_tracking_exits_non_zero_when_a_job_fails(home):
    result = run_cli(["-m", *TINY, "trainer=debug", "tracking=none", "loss.alpha=0.5,1.5"], home)
    assert result.returncode == 1
    assert "sweep: 1/2 jobs finished" in result.stderr and "FAILED loss.alpha=1.5" in result.stderr
    failures = [json.loads(f.read_text()) for f in home.glob("multirun/*/*/failed/*.json")]
    assert len(failures) == 1 and "loss.alpha" in failures[0]["error"]


def _numeric_settings():
    """Every numeric setting of the schema, with the bounds its type declares."""
    import annotated_types
    from pydantic import BaseModel

    from diito.config import JobConfig

    def walk(model: type[BaseModel], prefix: str):
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            args = (
                typing.get_args(field.annotation)
                if typing.get_origin(field.annotation) in (typing.Union, types.UnionType)
                else (field.annotation,)
            )
            metadata = list(field.metadata)
            kinds = []
            for arg in args:
                if typing.get_origin(arg) is typing.Annotated:
                    arg, *extra = typing.get_args(arg)
                    metadata += extra
                if arg is not type(None):
                    kinds.append(arg)
            nested = [k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)]
            if nested:  # a part written flat (teacher.recipe's loop and optim) adds no name of its own
                yield from walk(nested[0], prefix if name in getattr(model, "FLAT", ()) else key + ".")
            elif any(k in (int, float) for k in kinds):
                bounds = {
                    type(m).__name__: getattr(m, type(m).__name__.lower())
                    for m in metadata
                    if isinstance(m, (annotated_types.Gt, annotated_types.Ge, annotated_types.Lt, annotated_types.Le))
                }
                yield key, int in kinds and float not in kinds, bounds

    return [s for s in walk(JobConfig, "") if not s[0].startswith(("paths.", "task.tsv."))]  # tsv columns are names or positions


NUMERIC = _numeric_settings()


@pytest.mark.parametrize("key, integer, bounds", NUMERIC, ids=[k for k, _, _ in NUMERIC])
def test_every_numeric_setting_refuses_the_wrong_type_and_out_of_range_values(home, key, integer, bounds):
    with pytest.raises(ConfigError, match=f"^{key}: Input should be a valid (integer|number)"):
        job.validate(compose_config([*TINY, f"{key}=abc"]))
    if integer:
        with pytest.raises(ConfigError, match=f"^{key}: Input should be a valid integer, got a number with a fractional part"):
            job.validate(compose_config([*TINY, f"{key}=1.5"]))
    for kind, bound in bounds.items():
        value, word = {
            "Gt": (bound, "greater than"),
            "Ge": (bound - 1, "greater than or equal to"),
            "Lt": (bound, "less than"),
            "Le": (bound + 1, "less than or equal to"),
        }[kind]
        with pytest.raises(ConfigError, match=f"^{key}: Input should be {word} {bound if isinstance(bound, int) else format(bound, 'g')} "):
            job.validate(compose_config([*TINY, f"{key}={value}"]))


def test_the_numeric_settings_are_all_covered():
    keys = {k for k, _, _ in NUMERIC}
    assert {
        "trainer.epochs",
        "trainer.max_grad_norm",
        "optim.lr",
        "loss.alpha",
        "intervention.interchange_prop",
        "student.layers",
        "teacher.recipe.lr",
        "task.max_length",
        "seed",
        "tracking.timeout",
    } <= keys and len(keys) >= 40
