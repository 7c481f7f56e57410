"""The teacher-output cache: the same losses and gradients as the live teacher, safe to share, and used by jobs.

The bound. The frozen teacher's base run on an example is a function of that example alone: padding
never reaches a real token (padded keys get zero attention weight, exactly), so an example's outputs
do not depend on the batch it is in. What does change is the padded length it is computed at (the
cache computes each example in a length-sorted batch, training in a batch of its own), and with it
the length of the reductions inside attention, whose summation order then differs. That moves results
by rounding and nothing else, so in fp32 the cached and the live losses and gradients agree to a few
units of fp32's rounding (we allow 1e-6 of the gradient's largest entry; the measured difference
is about 1e-7). In bf16 the stored block outputs are rounded to bf16 (8 significant bits) where the
live step keeps them in fp32 between blocks and rounds them only as matmul inputs: one more rounding
of the residual stream, so the cache moves a bf16 step by about as much as bf16 itself moves it from
the fp32 step (measured 1 to 2 times as much). We allow 4 times bf16's own difference, and never more
than 2^-6 of the gradient's largest entry (4 units of bf16's 2^-8).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diito import files, tags, teacher_outputs
from diito.batching import Encoded, make_loader
from diito.intervention import EntrySpec, InterchangeConfig, MappingConfig, Shape, SiteSpec, build_mapping
from diito.models import build_student, load_pretrained, load_tokenizer
from diito.objective import DistillationObjective, LossConfig
from diito.trainer import autocast

CPU = torch.device("cpu")
TEXTS = [
    "a gripping , moving film",
    "dull and far too long",
    "the best film of the year , by far , and the most moving",
    "meh",
    "an utterly forgettable sequel that nobody asked for",
    "it works",
    "a quiet , patient drama about grief and its long shadow",
    "fun",
    "not once did it surprise me",
    "warm , funny and wise",
] * 2
MAPPINGS = {
    "full": MappingConfig(name="full"),
    "full_original": MappingConfig(name="full_original"),
    "middle": MappingConfig(name="middle"),
    "late": MappingConfig(name="late"),
    "slices": MappingConfig(
        name="explicit",
        entries=[
            EntrySpec(student=SiteSpec(layers=[0], dims=(8, 24)), teacher=SiteSpec(layers=[1, 2], dims=(8, 24))),
            EntrySpec(student=SiteSpec(layers=[1], dims=(4, 20)), teacher=SiteSpec(layers=[3], dims=(4, 20))),
        ],
    ),
    "heads": MappingConfig(
        name="explicit",
        entries=[EntrySpec(student=SiteSpec(layers=[0], attention_heads=(0, 1)), teacher=SiteSpec(layers=[1, 2], attention_heads=(1, 2)))],
    ),
}
CASES = {  # (loss settings, mapping, patience layers)
    "kd": ({"alpha": 0.5}, None, None),
    "patience_cls_only": ({"alpha": 0.5, "beta": 0.5}, None, [2]),  # KD with the patience term: [CLS] vectors stored alone
    **{f"diito_{name}": ({"alpha": 0.5, "gamma": 1.0, "cosine": 0.5, "beta": 0.3}, name, [2]) for name in MAPPINGS},
    "diito_separate_passes": ({"alpha": 0.5, "gamma": 1.0, "cosine": 0.5}, "full", None),  # with intervention.separate_passes
}


@pytest.fixture(scope="module")
def setup():
    tokenizer = load_tokenizer("tiny")
    enc = tokenizer(TEXTS, truncation=True, max_length=64)
    ids = enc["input_ids"]
    encoded = Encoded(
        ids, enc["token_type_ids"], np.arange(len(ids)) % 2, [str(i) for i in range(len(ids))], np.array([len(x) for x in ids])
    )
    teacher = load_pretrained("tiny", 2, 0).eval()
    teacher.config.hidden_dropout_prob = 0.1
    return tokenizer, encoded, teacher


def _step(objective, student, teacher, batch, precision):
    student.zero_grad()
    torch.manual_seed(1)  # the same dropout masks and interchanges, live and cached
    with autocast(precision, CPU):
        loss, _ = objective(student, teacher, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def _cases(case, teacher, student):
    settings, mapping, patience = CASES[case]
    entries = build_mapping(MAPPINGS[mapping], Shape.of(teacher.config), Shape.of(student.config)) if mapping else None
    return LossConfig(**settings), entries, patience


def _max_difference(a: dict, b: dict) -> float:
    """The largest difference between two gradients, as a fraction of the first's largest entry
    (some entries are zero but for rounding, a key bias's say: a fraction of their own is noise)."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a) / max(float(a[k].abs().max()) for k in a)


def _build_widths(lengths: np.ndarray, batch_size: int) -> np.ndarray:
    """The padded length each example is computed at when the cache is built (length-sorted batches)."""
    order, widths = np.argsort(-lengths, kind="stable"), np.empty_like(lengths)
    for start in range(0, len(order), batch_size):
        widths[order[start : start + batch_size]] = lengths[order[start : start + batch_size]].max()
    return widths


def _batches(encoded, tokenizer):
    loader = make_loader(encoded, 8, shuffle=True, seed=0, length_grouped=False, pad_token_id=tokenizer.pad_token_id)
    loader.batch_sampler.set_epoch(0)
    return list(loader)


@pytest.mark.parametrize("case", CASES)
def test_cached_teacher_gives_the_live_losses_and_gradients(case, setup, tmp_path):
    tokenizer, encoded, teacher = setup
    student = build_student(teacher, [0, 2], copy_classifier=True).train()
    config, mapping, patience = _cases(case, teacher, student)
    stored = teacher_outputs.Stored.of(mapping if config.intervenes else None, patience if config.beta else None, ("train",))
    # built in batches of 3, sorted by length: each example at another padded length than in training
    outputs = teacher_outputs.obtain(
        tmp_path / "entry", teacher, {"train": encoded}, tokenizer.pad_token_id, stored, "fp32", CPU, batch_size=3
    )
    interchange = InterchangeConfig(separate_passes=case == "diito_separate_passes")
    live = DistillationObjective(config, patience or [], mapping, interchange=interchange)
    cached = live.reading(outputs.reader("train"))
    for batch in _batches(encoded, tokenizer):
        assert (_build_widths(encoded.lengths, 3)[batch["index"].numpy()] != batch["input_ids"].shape[1]).any()  # the padding differs
        live_loss, live_grads = _step(live, student, teacher, batch, "fp32")
        cached_loss, cached_grads = _step(cached, student, teacher, batch, "fp32")
        torch.testing.assert_close(cached_loss, live_loss, atol=0, rtol=1e-6)
        assert len(live_grads) == len(list(student.parameters()))
        assert _max_difference(live_grads, cached_grads) <= 1e-6


@pytest.mark.parametrize("case", ["kd", "diito_full", "diito_heads"])
def test_in_bf16_the_cache_differs_from_the_live_step_by_less_than_bf16_itself(case, setup, tmp_path):
    tokenizer, encoded, teacher = setup
    student = build_student(teacher, [0, 2], copy_classifier=True).train()
    config, mapping, patience = _cases(case, teacher, student)
    stored = teacher_outputs.Stored.of(mapping if config.intervenes else None, patience if config.beta else None, ("train",))
    outputs = teacher_outputs.obtain(
        tmp_path / "entry", teacher, {"train": encoded}, tokenizer.pad_token_id, stored, "bf16", CPU, batch_size=3
    )
    assert outputs.info["dtype"] == "bfloat16"
    live = DistillationObjective(config, patience or [], mapping)
    cached = live.reading(outputs.reader("train"))
    for batch in _batches(encoded, tokenizer):
        exact_loss, exact_grads = _step(live, student, teacher, batch, "fp32")
        live_loss, live_grads = _step(live, student, teacher, batch, "bf16")
        cached_loss, cached_grads = _step(cached, student, teacher, batch, "bf16")
        own_loss, own_grads = float((live_loss - exact_loss).abs()), _max_difference(exact_grads, live_grads)  # bf16's own rounding
        assert float((cached_loss - live_loss).abs()) <= max(4 * own_loss, 2**-8 * float(live_loss.abs()))
        assert _max_difference(live_grads, cached_grads) <= min(4 * max(own_grads, 2**-9), 2**-6)


def test_stored_block_outputs_are_those_the_mapping_reads():
    teacher, student = Shape(6, 384, 12), Shape(3, 384, 12)

    def of(name, patience=None):
        return teacher_outputs.Stored.of(build_mapping(MappingConfig(name=name), teacher, student), patience, ("train",))

    assert of("full").layers == (1, 2, 3, 4, 5, 6)  # every block's output: the top entry swaps blocks 4 and 5
    assert of("middle").layers == (1, 2, 3, 4)  # block 3 swapped: its output and those below it
    assert of("middle", [1, 4]).cls_layers == (5,)  # patience block 4's [CLS] alone; block 1's output is stored whole
    assert teacher_outputs.Stored.of(None, None, ("train",)) == teacher_outputs.Stored(("train",), (), ())  # KD: the logits
    heads = build_mapping(
        MappingConfig(
            name="explicit",
            entries=[EntrySpec(student=SiteSpec(layers=[1], attention_heads=(0, 6)), teacher=SiteSpec(layers=[2], attention_heads=(0, 6)))],
        ),
        teacher,
        student,
    )
    assert teacher_outputs.Stored.of(heads, None, ("train",)).layers == (1, 2)  # block 2 reruns from its input, block 1's output


def _entry(setup, folder: Path, **kwargs):
    tokenizer, encoded, teacher = setup
    stored = teacher_outputs.Stored(("train",), (1, 2), ())
    return teacher_outputs.obtain(folder, teacher, {"train": encoded}, tokenizer.pad_token_id, stored, "fp32", CPU, **kwargs)


@pytest.mark.parametrize("damage", ["truncated", "changed", "no manifest", "missing file"])
def test_a_damaged_or_partly_written_entry_is_built_again_never_read(damage, setup, tmp_path, caplog):
    folder = tmp_path / "entry"
    first = _entry(setup, folder)
    assert first.built
    hidden = folder / "train.hidden.npy"
    good = hidden.read_bytes()
    if damage == "truncated":
        hidden.write_bytes(good[: len(good) // 2])
    elif damage == "changed":
        hidden.write_bytes(good[:-4] + bytes(4 * [255]))
    elif damage == "no manifest":  # a build stopped before its manifest (written last) was
        (folder / "info.json").unlink()
    else:
        (folder / "train.offsets.npy").unlink()
    again = _entry(setup, folder)
    assert again.built and hidden.read_bytes() == good
    if damage != "no manifest":
        assert "is damaged" in caplog.text
    assert not _entry(setup, folder).built  # and now it is read


def test_the_key_covers_what_changes_the_outputs(setup):
    _, encoded, _ = setup
    base = {
        "teacher": "w",
        "splits": {"train": encoded},
        "stored": teacher_outputs.Stored(("train",), (1,), ()),
        "dtype": torch.float32,
        "device": CPU,
    }
    key = teacher_outputs.entry_key(**base)
    other_tokens = Encoded([row[:-2] + row[-1:] for row in encoded.input_ids], None, encoded.labels, encoded.ids, encoded.lengths - 1)
    changes = [
        {"teacher": "v"},
        {"splits": {"train": other_tokens}},
        {"stored": teacher_outputs.Stored(("train",), (1, 2), ())},
        {"dtype": torch.bfloat16},
        {"device": torch.device("cuda")},
    ]
    assert len({key} | {teacher_outputs.entry_key(**(base | change)) for change in changes}) == 1 + len(changes)


def test_disk_cost_is_what_is_written(setup, tmp_path):
    tokenizer, encoded, teacher = setup
    stored = teacher_outputs.Stored(("train",), (1, 2, 3), (4,))
    entry = teacher_outputs.obtain(tmp_path / "e", teacher, {"train": encoded}, tokenizer.pad_token_id, stored, "bf16", CPU)
    expected = teacher_outputs.nbytes(stored, {"train": encoded}, teacher.config.hidden_size, 2, torch.bfloat16)
    header = 128 * len(entry.info["files"])  # each .npy file's header
    assert expected <= files.bytes_in(tmp_path / "e") - (tmp_path / "e" / "info.json").stat().st_size <= expected + header
    assert json.loads((tmp_path / "e" / "info.json").read_text())["files"]["train.hidden.npy"] > int(encoded.lengths.sum()) * 3 * 32 * 2


# -- in a job ------------------------------------------------------------------------------------------
def _files_task(folder: Path) -> list[str]:
    for split, n in (("train", 40), ("dev", 12)):
        rows = ["text,label"] + [
            f"{'a great' if i % 2 else 'an awful'} film{' and really' * (i % 5)} {i},{'pos' if i % 2 else 'neg'}" for i in range(n)
        ]
        (folder / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return ["task=files", "task.name=reviews", f"task.files.train={folder / 'train.csv'}", f"task.files.validation={folder / 'dev.csv'}"]


JOB = [
    "teacher=tiny",
    "trainer=debug",
    "trainer.precision=fp32",
    "trainer.max_train_examples=24",
    "loss.beta=0.5",
    "loss.cosine=0.5",
    "trainer.batch_size=8",
    "intervention.eval_pairs=12",
]


def test_a_job_builds_the_cache_once_reads_it_after_and_learns_what_it_learns_live(home, tmp_path, caplog):
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    from diito import job
    from tests.conftest import compose_config

    caplog.set_level("INFO", logger="diito")
    task = _files_task(tmp_path)
    weights = {}
    for name, cached in (("live", "false"), ("built", "true"), ("cache", "true")):
        job.run(
            compose_config([*JOB, *task, f"teacher.cache_outputs={cached}", f"seed={1 + (name == 'cache')}"]), output_dir=tmp_path / name
        )
        weights[name] = load_file(tmp_path / name / "student" / "model.safetensors")
    assert caplog.text.count("teacher outputs: computed now") == 1 and caplog.text.count("teacher outputs: from the cache") == 1
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.`diito.role` = 'student'",
        order_by=["attributes.start_time ASC"],
    )
    assert [r.data.tags[tags.TEACHER_OUTPUTS] for r in runs] == ["live", "built", "cache"]
    assert [r.data.params["teacher.cache_outputs"] for r in runs] == ["False", "True", "True"]
    (entry,) = [p for p in (home / ".cache" / "teacher_outputs").iterdir() if p.is_dir()]
    assert {r.data.tags.get(tags.TEACHER_OUTPUTS_PATH) for r in runs[1:]} == {str(entry)}
    # the training split's only: the probe runs the teacher on its fixed validation pairs once per job
    assert sorted(p.name for p in entry.glob("*.hidden.npy")) == ["train.hidden.npy"]
    # the same job with and without the cache: the same student, to fp32's rounding over its 4 steps
    for key in weights["live"]:
        torch.testing.assert_close(weights["built"][key], weights["live"][key], atol=1e-5, rtol=1e-5, msg=key)
    live_metrics, built_metrics = runs[0].data.metrics, runs[1].data.metrics
    for key in ("train/kd", "train/diito", "train/patience", "train/cosine", "validation/iia", "validation/efficacy"):
        assert built_metrics[key] == pytest.approx(live_metrics[key], rel=1e-5, abs=1e-6), key


def test_a_cache_that_would_not_fit_is_refused_before_compute(home, tmp_path, monkeypatch):
    from diito import job
    from diito.config import ConfigError
    from tests.conftest import compose_config

    task = _files_task(tmp_path)
    real = files.free_space
    monkeypatch.setattr(files, "free_space", lambda path: 2000 if "teacher_outputs" in str(path) else real(path))
    with pytest.raises(ConfigError) as refused:
        job.run(compose_config([*JOB, *task, "teacher.cache_outputs=true", "tracking=none"]), output_dir=tmp_path / "out")
    message = str(refused.value)
    assert message.startswith("teacher.cache_outputs: the teacher's outputs would take ") and "2.0 kB free" in message
    assert "set teacher.cache_outputs=false" in message and "\n" not in message
    assert not (home / ".cache" / "teachers").exists() and not (home / ".cache" / "teacher_outputs").exists()  # nothing computed


@pytest.mark.parametrize("case", ["kd", "diito_full", "diito_late"])
def test_with_the_cache_the_teacher_runs_only_the_blocks_above_the_intervened_one(case, setup, tmp_path):
    """What the cache saves: the teacher's base run (every block once per step) and nothing else."""
    tokenizer, encoded, teacher = setup
    student = build_student(teacher, [0, 2], copy_classifier=True).train()
    config, mapping, patience = _cases(case, teacher, student)
    stored = teacher_outputs.Stored.of(mapping if config.intervenes else None, None, ("train",))
    outputs = teacher_outputs.obtain(tmp_path / "entry", teacher, {"train": encoded}, tokenizer.pad_token_id, stored, "fp32", CPU)
    calls = []
    hooks = [block.attention.register_forward_hook(lambda *args: calls.append(1)) for block in teacher.bert.encoder.layer]
    batch = _batches(encoded, tokenizer)[0]
    counts = {}
    for name, objective in (
        ("live", DistillationObjective(config, patience or [], mapping)),
        ("cached", DistillationObjective(config, patience or [], mapping, teacher_outputs=outputs.reader("train"))),
    ):
        calls.clear()
        _step(objective, student, teacher, batch, "fp32")
        counts[name] = len(calls)
    for hook in hooks:
        hook.remove()
    assert counts["cached"] == counts["live"] - teacher.config.num_hidden_layers
    assert counts["cached"] == 0 if case == "kd" else counts["cached"] > 0


@pytest.mark.slow  # two jobs of two spawned ranks each
def test_two_ranks_reading_the_cache_learn_what_two_live_ranks_learn(home, tmp_path, caplog):
    """The job builds the entry once, before its ranks start; each rank reads its own batches' rows."""
    from safetensors.torch import load_file

    from diito import job
    from tests.conftest import compose_config

    caplog.set_level("INFO", logger="diito")
    task = _files_task(tmp_path)
    weights = {}
    for name in ("live", "cached"):
        overrides = ["trainer.devices=2", f"teacher.cache_outputs={name == 'cached'}"]
        job.run(
            compose_config([*JOB, *task, "trainer.num_threads=1", "tracking=none", "tracking.log_model=true", *overrides]),
            output_dir=tmp_path / name,
        )
        weights[name] = load_file(tmp_path / name / "student" / "model.safetensors")
    assert caplog.text.count("teacher outputs: computed now") == 1
    for key in weights["live"]:
        torch.testing.assert_close(weights["cached"][key], weights["live"][key], atol=1e-6, rtol=1e-5, msg=key)
