"""Interchange interventions, described as data and run cheaply.

A *site* is a vector at each token position of one transformer block (0-indexed, never the
embeddings), or a slice of it: the block's output, or its attention heads' outputs (the heads' context
vectors, concatenated, before the attention output projection; pyvene's head-level components). A
*mapping entry* aligns student sites with teacher sites; one entry is drawn per step. An
*interchange* says which example of the batch is each example's source and which token positions are
swapped.

The counterfactual run overwrites, at each site, the base run's vector at the chosen base positions
with the source's at the matched source positions. Two facts make it cheap: the source batch is a
permutation of the base batch, so the source activations are the base run's activations, permuted;
and below the first intervened block the counterfactual run equals the base run, so only the blocks
from there up are recomputed. :func:`reference_counterfactual` is the straightforward three-pass
version (as the original code), kept to prove the fast one exact. What differs between model
families is in :mod:`diito.families`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from diito.console import columns
from diito.families import after_first_block, block_list, check_prepared, family_of, heads_output  # block_list: also for callers


# -- sites and mappings ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Site:
    layer: int
    dims: tuple[int, int] | None = None  # [start, stop) of the vector; None: all of it
    heads: tuple[int, int] | None = None  # attention heads [start, stop): the vector is their outputs, not the block output

    @property
    def index(self) -> slice:
        return slice(*self.dims) if self.dims else slice(None)

    def __str__(self) -> str:
        if self.heads:
            return f"{self.layer}.heads[{self.heads[0]}:{self.heads[1]}]"
        return f"{self.layer}" + (f"[{self.dims[0]}:{self.dims[1]}]" if self.dims else "")


@dataclass(frozen=True)
class MappingEntry:
    student: tuple[Site, ...]
    teacher: tuple[Site, ...]


class SiteSpec(BaseModel):
    """One side of an explicit mapping entry: blocks, and optionally a slice of their output
    (``dims: [start, stop]``), or instead attention heads' own outputs (``attention_heads: [start, stop]``).
    ``heads`` is the old spelling of a block-output slice in head-sized chunks: refused, naming both."""

    model_config = ConfigDict(extra="forbid")
    layers: list[int]
    dims: tuple[int, int] | None = None
    attention_heads: tuple[int, int] | None = None
    heads: tuple[int, int] | None = None


class EntrySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    student: SiteSpec
    teacher: SiteSpec


class MappingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["full", "full_original", "middle", "late", "explicit"] = "full"
    entries: list[EntrySpec] | None = None


@dataclass(frozen=True)
class Shape:
    """What a mapping must fit: a model's depth, width and heads."""

    layers: int
    hidden: int
    heads: int
    head_size: int | None = None  # of one head's output; None: hidden // heads

    @property
    def head_width(self) -> int:
        return self.head_size or self.hidden // self.heads

    @classmethod
    def of(cls, config) -> Shape:
        return cls(
            int(config.num_hidden_layers),
            int(config.hidden_size),
            int(config.num_attention_heads),
            getattr(config, "attention_head_size", None),
        )


def preset(name: str, teacher_layers: int, student_layers: int) -> list[list[int] | tuple[list[int], list[int]]]:
    """The (student blocks, teacher blocks) pairs of a named mapping (whole hidden vectors).

    full: student block s <-> teacher blocks [s*L_T/L_S, (s+1)*L_T/L_S) (12->6: 0<->[0,1] ... 5<->[10,11]),
    which spreads the teacher's blocks over the student's when the depths do not divide;
    full_original: the original's c = L_T // L_S, student block s <-> teacher blocks [s*c, s*c + c)
    (the top L_T - c*L_S teacher blocks are never aligned: 6 -> 4 gives 0<->0 ... 3<->3);
    middle: the middle blocks; late: two late student blocks <-> the last-but-one teacher blocks.
    """
    t, s = teacher_layers, student_layers
    if name == "full":
        return [([i], list(range(i * t // s, (i + 1) * t // s))) for i in range(s)]
    if name == "full_original":
        c = t // s
        return [([i], list(range(i * c, i * c + c))) for i in range(s)]
    if name == "middle":
        return [([s // 2], [t // 2])]
    if name == "late":
        first = max(0, s - 3)
        pairs = [([first + i], [t - 3 + i]) for i in range(2)]
        return [(st, te) for st, te in pairs if st[0] < s and te[0] >= 0]
    raise ValueError(f"mapping.name: unknown preset {name!r}")


def _sites(spec: SiteSpec, shape: Shape, where: str) -> tuple[Site, ...]:
    width = shape.head_width
    if spec.heads:
        a, b = spec.heads
        raise ValueError(
            f"{where}.heads: [{a}, {b}] would slice the block output in head-sized chunks, which is not the heads' "
            f"output; write dims: [{a * width}, {b * width}] for that slice, or attention_heads: [{a}, {b}] for the "
            "attention heads' own outputs"
        )
    if spec.dims and spec.attention_heads:
        raise ValueError(f"{where}: give dims (a slice of the block output) or attention_heads, not both")
    dims, heads = spec.dims, spec.attention_heads
    if heads:
        if not 0 <= heads[0] < heads[1] <= shape.heads:
            raise ValueError(f"{where}.attention_heads: {list(heads)} outside the model's {shape.heads} heads")
        dims = (heads[0] * width, heads[1] * width)
    elif dims and not 0 <= dims[0] < dims[1] <= shape.hidden:
        raise ValueError(f"{where}.dims: {list(dims)} outside the hidden size {shape.hidden}")
    if not spec.layers:
        raise ValueError(f"{where}.layers: empty")
    for layer in spec.layers:
        if not 0 <= layer < shape.layers:
            raise ValueError(f"{where}.layers: {layer} outside blocks 0..{shape.layers - 1}")
    return tuple(Site(layer, dims, heads) for layer in sorted(set(spec.layers)))


def build_mapping(config: MappingConfig, teacher: Shape, student: Shape) -> list[MappingEntry]:
    """The mapping for this teacher/student pair, checked: layers in range, slices inside the
    hidden size, and the same number of swapped dimensions on both sides."""
    if config.name == "explicit":
        if not config.entries:
            raise ValueError("mapping.entries: an explicit mapping needs at least one entry")
        specs = config.entries
    else:
        specs = [
            EntrySpec(student=SiteSpec(layers=s), teacher=SiteSpec(layers=t))
            for s, t in preset(config.name, teacher.layers, student.layers)
        ]
    entries = []
    for i, spec in enumerate(specs):
        entry = MappingEntry(
            _sites(spec.student, student, f"mapping.entries[{i}].student"), _sites(spec.teacher, teacher, f"mapping.entries[{i}].teacher")
        )
        widths = {_width(site, shape) for sites, shape in ((entry.student, student), (entry.teacher, teacher)) for site in sites}
        if len(widths) != 1:
            raise ValueError(f"mapping.entries[{i}]: student and teacher slices differ in width {sorted(widths)}")
        entries.append(entry)
    return entries


def _width(site: Site, shape: Shape) -> int:
    return site.dims[1] - site.dims[0] if site.dims else shape.hidden


def mapping_table(entries: list[MappingEntry]) -> str:
    """The mapping as a small table, printed once at the start of a run."""
    rows = [["entry", "student blocks", "teacher blocks"]]
    rows += [[str(i), ", ".join(map(str, e.student)), ", ".join(map(str, e.teacher))] for i, e in enumerate(entries)]
    return "\n".join(columns(rows))


# -- pairs and positions -------------------------------------------------------------------------------
class InterchangeConfig(BaseModel):
    """How each step's pairs and swapped positions are drawn, and how the interventions are run and
    measured: the ``intervention`` settings (``intervention.interchange_prop`` ...), which act only
    when a loss term needs the counterfactual pair. The settings keep the original's names."""

    model_config = ConfigDict(extra="forbid")
    interchange_prop: float = Field(0.3, ge=0.0, le=1.0)
    interchange_mode: Literal["random", "consecutive"] = "random"
    interchange_max_token: int | None = Field(None, ge=1)
    interchange_min_token: int = Field(1, ge=0)
    pairing: Literal["derangement", "permutation"] = "derangement"
    eval_pairs: int = Field(256, ge=0)  # fixed validation pairs on which interventions are measured at each evaluation
    separate_passes: bool = False  # the student's source and counterfactual runs as passes of their own (fresh dropout), as the original


@dataclass(frozen=True)
class Interchange:
    """Pair b takes its source from example ``source[b]``; swapped position k is
    ``(pair[k], base_pos[k]) <- (source[pair[k]], source_pos[k])``."""

    source: Tensor
    pair: Tensor
    base_pos: Tensor
    source_pos: Tensor

    def to(self, device: torch.device) -> Interchange:
        return Interchange(*(t.to(device) for t in (self.source, self.pair, self.base_pos, self.source_pos)))


def pairing(batch_size: int, derangement: bool, generator: torch.Generator | None = None) -> Tensor:
    """A random permutation; a derangement (no example its own source) unless there is one example."""
    while True:
        perm = torch.randperm(batch_size, generator=generator)
        if not derangement or batch_size < 2 or bool((perm != torch.arange(batch_size)).all()):
            return perm


def swap_count(base_len: int, source_len: int, prop: float, min_token: int, max_token: int | None) -> int:
    """floor(prop * min(lengths)), at least ``min_token`` (0 reproduces the original, which swaps
    nothing in inputs of 3 tokens or fewer at prop 0.3), at most ``max_token``, never more than fit."""
    shorter = min(base_len, source_len)
    n = max(math.floor(prop * shorter), min_token)
    if max_token is not None:
        n = min(n, max_token)
    return min(n, shorter)


def sample_interchange(
    lengths: Tensor,
    prop: float,
    mode: Literal["random", "consecutive"] = "random",
    min_token: int = 1,
    max_token: int | None = None,
    derangement: bool = True,
    generator: torch.Generator | None = None,
) -> Interchange:
    """Pairs and positions for one batch; positions are always inside an example's real tokens
    (``lengths`` counts them, [CLS] and [SEP] included), never padding."""
    lengths = lengths.tolist()
    source = pairing(len(lengths), derangement, generator)
    pair, base_pos, source_pos = [], [], []
    for b, s in enumerate(source.tolist()):
        n = swap_count(lengths[b], lengths[s], prop, min_token, max_token)
        if n == 0:
            continue
        if mode == "random":
            bp = torch.randperm(lengths[b], generator=generator)[:n].sort().values
            sp = torch.randperm(lengths[s], generator=generator)[:n].sort().values
        else:
            b0 = int(torch.randint(lengths[b] - n + 1, (1,), generator=generator))
            s0 = int(torch.randint(lengths[s] - n + 1, (1,), generator=generator))
            bp, sp = torch.arange(b0, b0 + n), torch.arange(s0, s0 + n)
        pair.append(torch.full((n,), b))
        base_pos.append(bp)
        source_pos.append(sp)
    empty = torch.zeros(0, dtype=torch.long)
    cat = lambda parts: torch.cat(parts) if parts else empty  # noqa: E731
    return Interchange(source, cat(pair), cat(base_pos), cat(source_pos))


@dataclass(frozen=True)
class Intervention:
    """What interventions a run makes: a checked mapping and how interchanges are drawn."""

    mapping: list[MappingEntry]
    config: InterchangeConfig

    def draw(self, attention_mask: Tensor, generator: torch.Generator | None = None) -> tuple[MappingEntry, Interchange]:
        """One step's mapping entry (uniformly) and its pairs and positions, drawn on the CPU and
        moved once to the batch's device."""
        entry = self.mapping[int(torch.randint(len(self.mapping), (1,), generator=generator))]
        c = self.config
        x = sample_interchange(
            attention_mask.sum(1).cpu(),
            c.interchange_prop,
            c.interchange_mode,
            c.interchange_min_token,
            c.interchange_max_token,
            c.pairing == "derangement",
            generator,
        )
        return entry, x.to(attention_mask.device)


# -- counterfactual runs ------------------------------------------------------------------------------------
@dataclass
class Counterfactual:
    logits: Tensor
    last_hidden: Tensor  # output of the last block: for the causal cosine loss


def write(base: Tensor, source: Tensor, source_rows: Tensor, x: Interchange, site: Site) -> Tensor:
    """``base`` with the swapped positions (in the site's slice) taken from ``source[source_rows]``;
    out of place, so gradients flow into both."""
    out = base.clone()
    out[x.pair, x.base_pos, site.index] = source[source_rows, x.source_pos, site.index]
    return out


def _hidden(out):
    """The hidden states in what a block (or the module after it) returns: a tensor or a tuple's first."""
    return out[0] if isinstance(out, tuple) else out


def _with_hidden(out, hidden: Tensor):
    return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


def _output_module(model: nn.Module, layer: int) -> nn.Module:
    """The module whose output is block ``layer``'s output as the model's hidden_states give it: the
    block, or for block 0 the module the encoder applies after it (DeBERTa-v2's convolution)."""
    after = after_first_block(model) if layer == 0 else None
    return after if after is not None else block_list(model)[2][layer]


def _on_output(module: nn.Module, f: Callable[[Tensor], Tensor | None]):
    """``f`` sees (and, returning a tensor, replaces) the hidden states ``module`` returns."""

    def hook(module, args, out):
        new = f(_hidden(out))
        return None if new is None else _with_hidden(out, new)

    return module.register_forward_hook(hook)


def _on_heads(block: nn.Module, model: nn.Module, f: Callable[[Tensor], Tensor | None]):
    """``f`` sees (and, returning a tensor, replaces) the attention heads' outputs in ``block``: the
    input of its attention output projection."""

    def hook(module, args):
        new = f(args[0])
        return None if new is None else (new, *args[1:])

    return heads_output(block, model).register_forward_pre_hook(hook)


def _return(value, *args, **kwargs):
    return value


@contextlib.contextmanager
def _blocks_below(model: nn.Module, stop: int, hidden_states: tuple[Tensor, ...]) -> Iterator[None]:
    """Blocks ``0..stop-1`` compute nothing and return their base-run outputs (``hidden_states``), so
    block ``stop`` and those above run on the base run's activations. The model's own loop, masks and
    per-block settings (ModernBERT's attention types, DeBERTa's first-block convolution) are untouched,
    except that a convolution after a skipped block 0 is skipped too: its output is hidden_states[1]."""
    blocks = block_list(model)[2]
    returns_tuple = family_of(model).returns_tuple
    after = after_first_block(model) if stop > 0 else None
    for i in range(stop):
        out = hidden_states[i + 1]
        blocks[i].forward = functools.partial(_return, (out, None) if returns_tuple else out)
    if after is not None:
        after.forward = functools.partial(_return, hidden_states[1])
    try:
        yield
    finally:
        for i in range(stop):
            del blocks[i].forward
        if after is not None:
            del after.forward


@contextlib.contextmanager
def _removed(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _last_block_output(model: nn.Module, last: list[Tensor]):
    return block_list(model)[2][-1].register_forward_hook(lambda m, args, out: last.append(_hidden(out)))


def counterfactual(
    model: nn.Module, inputs: dict[str, Tensor], hidden_states: tuple[Tensor, ...], x: Interchange, sites: tuple[Site, ...]
) -> Counterfactual:
    """The fast counterfactual run from the base run's ``hidden_states`` (embeddings first, then
    every block's output): only the blocks from the first site up are computed. A block-output site's
    source is the base run's block output; an attention-heads site's source is the heads' outputs of
    its block run on the base run's input to it."""
    check_prepared(model)
    rows = x.source[x.pair]
    blocks = block_list(model)[2]
    first = sites[0]
    handles = []
    for site in sites:
        if site.heads is None:
            handles.append(
                _on_output(
                    _output_module(model, site.layer), lambda out, site=site: write(out, hidden_states[site.layer + 1], rows, x, site)
                )
            )
        elif site is first:  # the block runs on the base run's input: its own heads' outputs are the sources
            handles.append(_on_heads(blocks[site.layer], model, lambda heads, site=site: write(heads, heads, rows, x, site)))
        else:
            handles += _heads_from_base_input(model, site, hidden_states[site.layer], rows, x)
    last: list[Tensor] = []
    handles.append(_last_block_output(model, last))
    with _removed(handles), _blocks_below(model, first.layer + (first.heads is None), hidden_states):
        logits = model(**inputs).logits
    return Counterfactual(logits, last[-1])


def _heads_from_base_input(model: nn.Module, site: Site, base_input: Tensor, rows: Tensor, x: Interchange) -> list:
    """Hooks for an attention-heads site above the first site: just before its block runs, the block
    runs once more on the base run's input to it (the same masks and position encodings) to give the
    sources' heads' outputs, which the block's own run then takes at the swapped positions."""
    block = block_list(model)[2][site.layer]
    clean: list[Tensor] = []

    def before_block(module, args, kwargs):
        if not clean:
            clean.append(None)  # marks the inner run
            module(base_input, *args[1:], **kwargs)

    def on_heads(heads: Tensor) -> Tensor | None:
        if len(clean) == 1:  # the inner run: keep its heads' outputs, change nothing
            clean.append(heads)
            return None
        return write(heads, clean[1], rows, x, site)

    return [block.register_forward_pre_hook(before_block, with_kwargs=True), _on_heads(block, model, on_heads)]


def reference_counterfactual(model: nn.Module, inputs: dict[str, Tensor], x: Interchange, sites: tuple[Site, ...]) -> Counterfactual:
    """The original's way: run the source batch, then the base batch with the source's vectors
    written in at every site (the base run itself is the caller's). Three full passes in all."""
    source_inputs = {k: v[x.source] for k, v in inputs.items()}
    captured: dict[Site, Tensor] = {}
    blocks = block_list(model)[2]

    def hook(site: Site, f: Callable[[Tensor], Tensor | None]):
        if site.heads is None:
            return _on_output(_output_module(model, site.layer), f)
        return _on_heads(blocks[site.layer], model, f)

    with _removed([hook(s, functools.partial(captured.__setitem__, s)) for s in sites]):
        model(**source_inputs)
    last: list[Tensor] = []
    writes = [hook(s, lambda value, s=s: write(value, captured[s], x.pair, x, s)) for s in sites]
    with _removed([*writes, _last_block_output(model, last)]):
        logits = model(**inputs).logits
    return Counterfactual(logits, last[-1])
