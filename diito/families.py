"""The one model-family table: what differs between the encoder families a teacher or student can be.

Every other module asks this table, by the config's ``model_type``, where a model's blocks live, what
a block returns, where its attention heads' outputs are, what a student must carry beside its block
list, and which tiny random model stands in for the family in tests and smoke runs. A family outside
the table is refused before any compute (:func:`check`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Family:
    blocks: str  # the block list, from the base model
    heads_output: str  # in a block: the attention output projection, whose input is the heads' outputs (concatenated per head)
    returns_tuple: bool = False  # a block returns (hidden states, ...) rather than the hidden states
    per_block_config: tuple[str, ...] = ()  # config lists with one entry per block: a student keeps its blocks' entries
    after_first_block: str | None = None  # a module, from the base model, that the encoder applies to block 0's output
    final_norm: bool = False  # a norm after the last block (its hidden_states[-1] would be the norm's output)
    first_block_only_first: str | None = None  # why block 0 can only be a student's first block, and no other block can
    tiny: dict[str, Any] = field(default_factory=dict)  # the tiny random model's config, besides the common sizes


_BERT_LIKE = {"blocks": "encoder.layer", "heads_output": "attention.output.dense"}
# RoBERTa-architecture models: one segment (no token types) and position ids counted from the padding id.
_ROBERTA_TINY = {"type_vocab_size": 1, "max_position_embeddings": 514}

FAMILIES: dict[str, Family] = {
    "bert": Family(**_BERT_LIKE),
    "roberta": Family(**_BERT_LIKE, tiny=_ROBERTA_TINY),
    "xlm-roberta": Family(**_BERT_LIKE, tiny=_ROBERTA_TINY),
    "camembert": Family(**_BERT_LIKE, tiny=_ROBERTA_TINY),
    "electra": Family(**_BERT_LIKE, tiny={"embedding_size": 32}),
    "distilbert": Family(blocks="transformer.layer", heads_output="attention.out_lin", tiny={"hidden_dim": 64}),
    # DeBERTa-v2/v3: relative position embeddings (encoder.rel_embeddings) shared by every block, so a
    # student keeps them whole; v2 xlarge/xxlarge apply a convolution to block 0's output (kept, after
    # the student's first block). The tiny model is configured as DeBERTa-v3.
    "deberta-v2": Family(
        blocks="encoder.layer",
        heads_output="attention.output.dense",
        returns_tuple=True,
        after_first_block="encoder.conv",
        tiny={
            "relative_attention": True,
            "position_buckets": 8,
            "norm_rel_ebd": "layer_norm",
            "share_att_key": True,
            "pos_att_type": ["p2c", "c2p"],
            "position_biased_input": False,
            "type_vocab_size": 0,
            "max_relative_positions": -1,
        },
    ),
    # ModernBERT: each block is global or local (sliding-window) attention (config.layer_types), rotary
    # positions per attention type, and a final norm after the last block. Block 0 has no attention
    # norm (the embeddings' norm precedes it) and every other block has one.
    "modernbert": Family(
        blocks="layers",
        heads_output="attn.Wo",
        per_block_config=("layer_types",),
        final_norm=True,
        first_block_only_first="ModernBERT's block 0 has no attention norm and every other block has one, so the "
        "student's first block must be the teacher's block 0, and no later one",
        tiny={"local_attention": 4, "classifier_pooling": "mean", "max_position_embeddings": 512},
    ),
    # MPNet: a relative attention bias computed once in the encoder and shared by every block.
    "mpnet": Family(blocks="encoder.layer", heads_output="attention.attn.o", returns_tuple=True, tiny={"max_position_embeddings": 514}),
}


def family_of(config) -> Family:
    """The family of a model (or config); ValueError naming the supported ones otherwise."""
    model_type = getattr(config, "config", config).model_type
    if model_type not in FAMILIES:
        raise ValueError(f"model family {model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
    return FAMILIES[model_type]


def _module(root: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        root = getattr(root, part, None)
    return root


def block_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """``(parent module, attribute name, blocks)`` of a supported model."""
    *path, name = family_of(model).blocks.split(".")
    parent = model.base_model
    for part in path:
        parent = getattr(parent, part)
    return parent, name, getattr(parent, name)


def block_prefix(model: nn.Module) -> str:
    """The state-dict prefix of the blocks (``bert.encoder.layer.``): block i's keys start with it and ``i.``."""
    return f"{model.base_model_prefix}.{family_of(model).blocks}."


def heads_output(block: nn.Module, model: nn.Module) -> nn.Module:
    """The module whose input, in ``block``, is the attention heads' outputs."""
    return _module(block, family_of(model).heads_output)


def after_first_block(model: nn.Module) -> nn.Module | None:
    """The module the encoder applies to block 0's output, when the model has one."""
    path = family_of(model).after_first_block
    return _module(model.base_model, path) if path else None


def prepare(model: nn.Module) -> nn.Module:
    """Make ``hidden_states[i + 1]`` block i's own output for every block: Hugging Face otherwise puts
    the final norm's output last (ModernBERT). Changes nothing else the model computes; a model of
    another family passes unchanged."""
    family = FAMILIES.get(model.config.model_type)
    if family is not None and family.final_norm:
        model.config.tie_last_hidden_states = False
    return model


def check_prepared(model: nn.Module) -> None:
    if family_of(model).final_norm and getattr(model.config, "tie_last_hidden_states", None) is not False:
        raise ValueError(
            f"a {model.config.model_type} model's hidden_states end with its final norm's output, not the last block's: "
            "call diito.families.prepare(model) before its base run"
        )


def student_config(config, blocks: list[int]):
    """The config of a student built from the teacher blocks ``blocks`` (in order): its depth, and each
    per-block setting taken from the block it copies (ModernBERT's global or local attention)."""
    student = config.__class__.from_dict(config.to_dict())
    student.num_hidden_layers = len(blocks)
    for name in family_of(config).per_block_config:
        setattr(student, name, [getattr(config, name)[b] for b in blocks])
    return student


def check_blocks(config, blocks: list[int], key: str) -> None:
    """A student can be built from ``blocks`` of this model; ValueError naming ``key`` otherwise."""
    family = FAMILIES.get(config.model_type)  # another family is refused as such where it matters
    why = family and family.first_block_only_first
    if why and (blocks[0] != 0 or 0 in blocks[1:]):
        raise ValueError(f"{key}: {blocks} cannot build a {config.model_type} student: {why}")


def tiny_config(model_type: str, vocab_size: int, special: dict[str, int], hidden: int = 32, layers: int = 4, heads: int = 2):
    """A tiny random model of the family (by default hidden 32, 4 blocks, 2 heads), reading the token
    ids of a borrowed tokenizer (``special``: pad, cls, sep ids)."""
    from transformers import AutoConfig

    family = FAMILIES[model_type]
    sizes = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": 2 * hidden,
        "max_position_embeddings": 512,
    }
    ids = {
        "pad_token_id": special["pad"],
        "cls_token_id": special["cls"],
        "sep_token_id": special["sep"],
        "bos_token_id": special["cls"],
        "eos_token_id": special["sep"],
    }
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, **{**sizes, **ids, **family.tiny})
