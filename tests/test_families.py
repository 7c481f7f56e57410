"""Every model family as teacher and student: a student built from chosen blocks is its teacher with
the other blocks skipped, it saves and loads whole, what a family cannot do is refused before any
compute, and a job per family runs from the command line, logs a usable MLflow model and maps its
alignment."""

from __future__ import annotations

import json
import re

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

from diito import analyze, families, job
from diito.config import ConfigError, validate
from diito.intervention import block_list
from diito.models import (
    build_student,
    load_finetuned,
    load_pretrained,
    load_tokenizer,
    save_model,
)
from tests.conftest import compose_config, run_cli

FAMILIES = list(families.FAMILIES)


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    texts = ["a gripping, moving film with a thin plot", "dull", "the acting carries it, mostly"]
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


def _skipping(model, dropped: set[int]):
    """``model`` with the blocks ``dropped`` passing their input through unchanged."""
    returns_tuple = families.family_of(model).returns_tuple
    for i in dropped:
        block_list(model)[2][i].forward = lambda hidden, *args, **kwargs: (hidden, None) if returns_tuple else hidden
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_a_student_is_its_teacher_with_the_other_blocks_skipped(family):
    """Blocks 0 and 3 of 4: whatever the family keeps beside the block list (relative embeddings,
    attention types per block, rotary positions, a final norm) stays consistent."""
    teacher = load_pretrained(f"tiny:{family}", num_labels=3, seed=0).eval()
    student = build_student(teacher, [0, 3], copy_classifier=True).eval()
    assert student.config.num_hidden_layers == 2 and len(block_list(student)[2]) == 2
    if family == "modernbert":  # each kept block keeps its own attention type (teacher: full, local, local, full)
        assert teacher.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
        assert student.config.layer_types == ["full_attention", "full_attention"]
        assert [b.attn.sliding_window for b in block_list(student)[2]] == [None, None]
    batch = _batch(load_tokenizer(f"tiny:{family}"))
    with torch.no_grad():
        expected = _skipping(teacher, {1, 2})(**batch).logits
        got = student(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_student_saves_and_loads_whole(family, tmp_path):
    teacher = load_pretrained(f"tiny:{family}", num_labels=2, seed=0).eval()
    student = build_student(teacher, [0, 2, 3], copy_classifier=True).eval()
    tokenizer = load_tokenizer(f"tiny:{family}")
    loaded = load_finetuned(save_model(student, tokenizer, tmp_path / "student")).eval()
    settings = lambda model: {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert settings(loaded) == settings(student)
    reloaded_tokenizer = load_tokenizer(str(tmp_path / "student"))
    assert reloaded_tokenizer.model_input_names == tokenizer.model_input_names
    batch = _batch(reloaded_tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(**batch, output_hidden_states=True).hidden_states[-1],
            student(**batch, output_hidden_states=True).hidden_states[-1],
            atol=0,
            rtol=0,
        )


def test_tiny_tokenizers_give_what_the_family_reads():
    """A family with one segment (RoBERTa's, ModernBERT, MPNet, DeBERTa-v3) gets no token types from the borrowed vocabulary."""
    with_types = {family for family in FAMILIES if "token_type_ids" in load_tokenizer(f"tiny:{family}").model_input_names}
    assert with_types == {"bert", "electra"}


def test_modernbert_hidden_states_end_with_the_last_block_output():
    """Hugging Face puts the final norm's output last; a prepared model gives the last block's own
    output there, as every other entry is a block's output (and the fast path starts from them)."""
    model = load_pretrained("tiny:modernbert", num_labels=2, seed=0).eval()
    batch = _batch(load_tokenizer("tiny:modernbert"))
    last = []
    block_list(model)[2][-1].register_forward_hook(lambda m, a, out: last.append(out))
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        assert torch.equal(out.hidden_states[-1], last[0])
        fresh = AutoModelForSequenceClassification.from_config(
            model.config.__class__.from_dict({**model.config.to_dict(), "tie_last_hidden_states": None})
        )
        fresh.load_state_dict(model.state_dict())
        assert not torch.equal(fresh.eval()(**batch, output_hidden_states=True).hidden_states[-1], last[0])  # what the check is for


# -- refused before compute ---------------------------------------------------------------------------------
def _other_vocabulary(folder):
    """A tokenizer with a vocabulary of its own (8 words), saved in ``folder``."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "film", "dull", "plot"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_input_names=["input_ids", "attention_mask"],
    ).save_pretrained(folder)


def _checkpoint(tmp_path, family: str, tokenizer_of: str | None = None):
    """A fine-tuned tiny teacher folder of ``family``, with the tiny tokenizer or another vocabulary."""
    folder = tmp_path / f"teacher-{family}"
    model = load_pretrained(f"tiny:{family}", num_labels=2, seed=0)
    save_model(model, load_tokenizer(f"tiny:{family}"), folder)
    if tokenizer_of == "other":
        _other_vocabulary(folder)
    return folder


def test_unsupported_family_is_refused_before_compute(home, tmp_path):
    from transformers import XLNetConfig

    folder = tmp_path / "xlnet"
    model = AutoModelForSequenceClassification.from_config(XLNetConfig(vocab_size=50, d_model=16, n_layer=2, n_head=2, d_inner=32))
    save_model(model, load_tokenizer("tiny"), folder)
    result = run_cli(["teacher=tiny", f"teacher.checkpoint={folder}", "trainer=debug"], home, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("error: teacher.checkpoint: model family 'xlnet' is not supported (supported: bert, ")
    )
    assert not (home / "mlflow.db").exists() and not (home / ".cache").exists()


@pytest.mark.parametrize(
    "blocks, message",
    [
        (
            "[1,3]",
            (
                "student.blocks: [1, 3] cannot build a modernbert student: ModernBERT's block 0 has no attention norm and every other "
                "block has one, so the student's first block must be the teacher's block 0, and no later one"
            ),
        ),
        ("[2,0]", "student.blocks: [2, 0] is not in increasing order"),  # block 0 reused later: refused for every family
    ],
)
def test_modernbert_students_start_with_block_0(home, blocks, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose_config(["teacher=tiny", "teacher.model=tiny:modernbert", "student.layers=2", f"student.blocks={blocks}"]))
    validate(compose_config(["teacher=tiny", "teacher.model=tiny:modernbert", "student.layers=2", "student.blocks=[0,3]"]))


def test_a_student_from_another_model_must_read_the_teachers_token_ids(home, tmp_path):
    """init_from=pretrained builds the student from teacher.model: across families that works when
    both read the same token ids (tiny RoBERTa and XLM-R share a vocabulary), and is refused when not."""
    same = _checkpoint(tmp_path, "roberta")
    job_ = validate(
        compose_config(
            [
                "teacher=tiny",
                f"teacher.checkpoint={same}",
                "teacher.model=tiny:xlm-roberta",
                "student.init_from=pretrained",
                "student.layers=2",
            ]
        )
    )
    assert job_.student_blocks == [0, 1]
    other = _checkpoint(tmp_path / "other", "roberta", tokenizer_of="other")
    with pytest.raises(
        ConfigError,
        match=r"student.init_from: pretrained builds the student from teacher.model 'tiny:xlm-roberta', which "
        r"cannot read the teacher checkpoint's token ids: its tokenizer has another vocabulary \(30522 "
        r"tokens; the teacher's 8\)",
    ):
        validate(
            compose_config(
                [
                    "teacher=tiny",
                    f"teacher.checkpoint={other}",
                    "teacher.model=tiny:xlm-roberta",
                    "student.init_from=pretrained",
                    "student.layers=2",
                ]
            )
        )
    with pytest.raises(
        ConfigError,
        match=r"it reads \['attention_mask', 'input_ids', 'token_type_ids'\]; the teacher's tokenizer gives "
        r"\['attention_mask', 'input_ids'\]",
    ):
        validate(
            compose_config(
                ["teacher=tiny", f"teacher.checkpoint={same}", "teacher.model=tiny", "student.init_from=pretrained", "student.layers=2"]
            )
        )
    with pytest.raises(ConfigError, match="teacher.model: cannot load model 'tiny:xlnet': no tiny model of family 'xlnet'"):
        validate(compose_config(["teacher=tiny", "teacher.model=tiny:xlnet"]))


@pytest.mark.parametrize(
    "preset, model, lr",
    [
        ("deberta-v3-base", "microsoft/deberta-v3-base", 1.5e-5),
        ("modernbert-base", "answerdotai/ModernBERT-base", 8e-5),
        ("xlm-roberta-base", "FacebookAI/xlm-roberta-base", 1e-5),
    ],
)
def test_presets_name_their_hub_model_and_recipe(home, preset, model, lr):
    """The hub is out of reach here: a preset is checked as far as its settings go."""
    from omegaconf import OmegaConf

    from diito.teacher import TeacherConfig

    teacher = TeacherConfig.model_validate(OmegaConf.to_container(compose_config([f"teacher={preset}"]).teacher, resolve=True))
    assert (teacher.name, teacher.model, teacher.recipe.optim.lr) == (model, model, lr)


def test_the_alignment_map_keeps_head_sites_and_leaves_out_an_old_mapping(capsys):
    """--dims restricts block-output sites only; a logged run's old heads: spelling leaves its mapping out, saying why."""
    from types import SimpleNamespace

    from diito.intervention import EntrySpec, MappingConfig, Site, SiteSpec

    teacher = load_pretrained("tiny:modernbert", num_labels=2, seed=0)
    student = build_student(teacher, [0, 2], copy_classifier=True)
    new = MappingConfig(
        name="explicit",
        entries=[EntrySpec(student=SiteSpec(layers=[1], attention_heads=(0, 1)), teacher=SiteSpec(layers=[2, 3], dims=(16, 32)))],
    )
    (entry,) = analyze._mapping(SimpleNamespace(mapping=new, run_id="r1"), teacher, student, (0, 16))
    assert entry.student == (Site(1, (0, 16), heads=(0, 1)),) and entry.teacher == (Site(2, (0, 16)), Site(3, (0, 16)))
    old = MappingConfig(
        name="explicit", entries=[EntrySpec(student=SiteSpec(layers=[1], heads=(0, 1)), teacher=SiteSpec(layers=[2], heads=(0, 1)))]
    )
    assert analyze._mapping(SimpleNamespace(mapping=old, run_id="r2"), teacher, student, None) == []
    assert (
        "run r2: its mapping is left out (mapping.entries[0].student.heads: [0, 1] would slice the block output" in capsys.readouterr().out
    )


# -- jobs ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_smoke_job_per_family_from_the_command_line(home, family):
    result = run_cli(["teacher=tiny", f"teacher.model=tiny:{family}", "trainer=debug", "tracking=none"], home, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "student: final evaluation" in result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_job_per_family_logs_a_usable_model_and_maps_its_alignment(home, tmp_path, family):
    """The teacher fine-tuned, a DIITO student on attention-head sites trained, logged as an MLflow
    (transformers flavor) model that pyfunc loads and predicts with, and its alignment map."""
    heads = "'mapping.entries=[{student:{layers:[0]},teacher:{layers:[1]}},{student:{layers:[1],attention_heads:[0,1]},teacher:{layers:[3],attention_heads:[1,2]}}]'"
    job.run(
        compose_config(
            [
                "teacher=tiny",
                f"teacher.model=tiny:{family}",
                "trainer=debug",
                "student.layers=2",
                "loss=diito",
                "mapping=explicit",
                heads.strip("'"),
            ]
        ),
        output_dir=tmp_path / "out",
    )
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()], filter_string="tags.`diito.role` = 'student'")
    mlflow.set_tracking_uri(client.tracking_uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/student")
    answers = model.predict(["a gripping, moving film", "dull and far too long"])
    assert set(answers["label"]) <= {"negative", "positive"} and len(answers) == 2
    analyze.main([run.info.run_id, "--pairs", "16", "--out", str(tmp_path / "map"), "--tracking-uri", client.tracking_uri])
    saved = json.loads((tmp_path / "map" / "iia_map.json").read_text())
    assert len(saved["iia"]) == 2 and len(saved["iia"][0]) == 4 and saved["pairs"] == 16
    assert list(saved["mapped_iia"]) == ["0 <-> 1", "1.heads[0:1] <-> 3.heads[1:2]"]


@pytest.mark.slow
def test_a_job_across_families(home, tmp_path):
    """A RoBERTa teacher distilled into a student built from another RoBERTa-architecture model (XLM-R),
    on attention heads and block outputs."""
    teacher = _checkpoint(tmp_path, "roberta")
    mapping = "mapping.entries=[{student:{layers:[1],attention_heads:[0,2]},teacher:{layers:[2,3],attention_heads:[0,2]}}]"
    result = job.run(
        compose_config(
            [
                "teacher=tiny",
                f"teacher.checkpoint={teacher}",
                "teacher.model=tiny:xlm-roberta",
                "student.init_from=pretrained",
                "student.layers=2",
                "trainer=debug",
                "tracking=none",
                "tracking.log_model=true",
                "loss=diito",
                "loss.cosine=0.5",
                "mapping=explicit",
                mapping,
            ]
        ),
        output_dir=tmp_path / "out",
    )
    assert 0.0 <= result <= 1.0
    student = load_finetuned(tmp_path / "out" / "student")
    assert student.config.model_type == "xlm-roberta" and student.config.num_hidden_layers == 2
