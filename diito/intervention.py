"""Interchange interventions, described as data and run cheaply.

A *site* is a block output (0-indexed transformer block, never the embeddings) and optionally a
slice of its hidden dimensions (attention heads are a slice too). A *mapping entry* aligns student
sites with teacher sites; one entry is drawn per step. An *interchange* says which example of the
batch is each example's source and which token positions are swapped.

The counterfactual run overwrites, at each site, the base run's block output at the chosen base
positions with the source's block output at the matched source positions. Two facts make it cheap:
the source batch is a permutation of the base batch, so the source activations are the base run's
activations, permuted; and below the first intervened block the counterfactual run equals the base
run, so only the blocks above it are recomputed. :func:`reference_counterfactual` is the
straightforward three-pass version (as the original code), kept to prove the fast one exact.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

# The one place model families differ: where the list of transformer blocks lives in the base model.
# Every listed family's block takes the hidden states first and returns the new hidden states.
BLOCK_LISTS = {
    "bert": "encoder.layer",
    "roberta": "encoder.layer",
    "electra": "encoder.layer",
    "distilbert": "transformer.layer",
}


def block_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """``(parent module, attribute name, blocks)`` of a supported model."""
    family = model.config.model_type
    if family not in BLOCK_LISTS:
        raise ValueError(f"interventions support {', '.join(BLOCK_LISTS)} models, not {family!r}")
    *path, name = BLOCK_LISTS[family].split(".")
    parent = model.base_model
    for part in path:
        parent = getattr(parent, part)
    return parent, name, getattr(parent, name)


# -- sites and mappings ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Site:
    layer: int
    dims: tuple[int, int] | None = None  # [start, stop) of the hidden vector; None: all of it

    @property
    def index(self) -> slice:
        return slice(*self.dims) if self.dims else slice(None)

    def __str__(self) -> str:
        return f"{self.layer}" + (f"[{self.dims[0]}:{self.dims[1]}]" if self.dims else "")


@dataclass(frozen=True)
class MappingEntry:
    student: tuple[Site, ...]
    teacher: tuple[Site, ...]


class SiteSpec(BaseModel):
    """One side of an explicit mapping entry: blocks, and optionally a slice of hidden dimensions
    (``dims: [start, stop]``) or of attention heads (``heads: [start, stop]``)."""

    model_config = ConfigDict(extra="forbid")
    layers: list[int]
    dims: tuple[int, int] | None = None
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

    @classmethod
    def of(cls, config) -> Shape:
        return cls(int(config.num_hidden_layers), int(config.hidden_size), int(config.num_attention_heads))


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
    if spec.dims and spec.heads:
        raise ValueError(f"{where}: give dims or heads, not both")
    dims = spec.dims
    if spec.heads:
        width = shape.hidden // shape.heads
        if not 0 <= spec.heads[0] < spec.heads[1] <= shape.heads:
            raise ValueError(f"{where}.heads: {list(spec.heads)} outside the model's {shape.heads} heads")
        dims = (spec.heads[0] * width, spec.heads[1] * width)
    if dims and not 0 <= dims[0] < dims[1] <= shape.hidden:
        raise ValueError(f"{where}.dims: {list(dims)} outside the hidden size {shape.hidden}")
    if not spec.layers:
        raise ValueError(f"{where}.layers: empty")
    for layer in spec.layers:
        if not 0 <= layer < shape.layers:
            raise ValueError(f"{where}.layers: {layer} outside blocks 0..{shape.layers - 1}")
    return tuple(Site(layer, dims) for layer in sorted(set(spec.layers)))


def build_mapping(config: MappingConfig, teacher: Shape, student: Shape) -> list[MappingEntry]:
    """The mapping for this teacher/student pair, checked: layers in range, slices inside the
    hidden size, and the same number of swapped dimensions on both sides."""
    if config.name == "explicit":
        if not config.entries:
            raise ValueError("mapping.entries: an explicit mapping needs at least one entry")
        specs = config.entries
    else:
        specs = [EntrySpec(student=SiteSpec(layers=s), teacher=SiteSpec(layers=t))
                 for s, t in preset(config.name, teacher.layers, student.layers)]
    entries = []
    for i, spec in enumerate(specs):
        entry = MappingEntry(_sites(spec.student, student, f"mapping.entries[{i}].student"),
                             _sites(spec.teacher, teacher, f"mapping.entries[{i}].teacher"))
        widths = {_width(site, shape) for sites, shape in ((entry.student, student), (entry.teacher, teacher)) for site in sites}
        if len(widths) != 1:
            raise ValueError(f"mapping.entries[{i}]: student and teacher slices differ in width {sorted(widths)}")
        entries.append(entry)
    return entries


def _width(site: Site, shape: Shape) -> int:
    return site.dims[1] - site.dims[0] if site.dims else shape.hidden


def mapping_table(entries: list[MappingEntry]) -> str:
    """The mapping as a small table, printed once at the start of a run."""
    rows = [("entry", "student blocks", "teacher blocks")]
    rows += [(str(i), ", ".join(map(str, e.student)), ", ".join(map(str, e.teacher))) for i, e in enumerate(entries)]
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


# -- pairs and positions -------------------------------------------------------------------------------
class InterchangeConfig(BaseModel):
    """How each step's pairs and swapped positions are drawn. The settings keep the original's names
    and are set on the command line as ``loss.interchange_prop`` and so on."""

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
    lengths: Tensor, prop: float, mode: Literal["random", "consecutive"] = "random", min_token: int = 1,
    max_token: int | None = None, derangement: bool = True, generator: torch.Generator | None = None,
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
        x = sample_interchange(attention_mask.sum(1).cpu(), c.interchange_prop, c.interchange_mode, c.interchange_min_token,
                               c.interchange_max_token, c.pairing == "derangement", generator)
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


class _Start(nn.Module):
    """Stands in for the blocks up to the first intervened one: returns their (intervened) output."""

    def __init__(self, hidden: Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs) -> Tensor:
        return self.hidden


@contextlib.contextmanager
def _blocks_after(model: nn.Module, block: int, hidden: Tensor) -> Iterator[None]:
    """Run the model as if its blocks up to ``block`` had produced ``hidden``: only the blocks
    above are computed (the model's own attention mask and head are used as they are)."""
    parent, name, blocks = block_list(model)
    setattr(parent, name, nn.ModuleList([_Start(hidden), *blocks[block + 1:]]))
    try:
        yield
    finally:
        setattr(parent, name, blocks)


@contextlib.contextmanager
def _hooks(blocks: nn.ModuleList, writes: dict[int, Callable[[Tensor], Tensor]], last: list[Tensor]) -> Iterator[None]:
    """Forward hooks that apply ``writes[layer]`` to block outputs and keep the last block's output."""
    handles = [blocks[layer].register_forward_hook(lambda m, a, out, f=f: f(out)) for layer, f in writes.items()]
    handles.append(blocks[-1].register_forward_hook(lambda m, a, out: last.append(out)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def counterfactual(model: nn.Module, inputs: dict[str, Tensor], hidden_states: tuple[Tensor, ...],
                   x: Interchange, sites: tuple[Site, ...]) -> Counterfactual:
    """The fast counterfactual run from the base run's ``hidden_states`` (embeddings first)."""
    rows = x.source[x.pair]
    first, *later = sites
    start = write(hidden_states[first.layer + 1], hidden_states[first.layer + 1], rows, x, first)
    writes = {site.layer: (lambda out, site=site: write(out, hidden_states[site.layer + 1], rows, x, site)) for site in later}
    last: list[Tensor] = []
    blocks = block_list(model)[2]
    with _hooks(blocks, writes, last), _blocks_after(model, first.layer, start):
        logits = model(**inputs).logits
    return Counterfactual(logits, last[-1] if last else start)


def reference_counterfactual(model: nn.Module, inputs: dict[str, Tensor], x: Interchange,
                             sites: tuple[Site, ...]) -> Counterfactual:
    """The original's way: run the source batch, then the base batch with the source's block outputs
    written in at every site (the base run itself is the caller's). Three full passes in all."""
    source_inputs = {k: v[x.source] for k, v in inputs.items()}
    captured: dict[int, Tensor] = {}
    _, _, blocks = block_list(model)
    handles = [blocks[s.layer].register_forward_hook(lambda m, a, out, layer=s.layer: captured.__setitem__(layer, out)) for s in sites]
    try:
        model(**source_inputs)
    finally:
        for h in handles:
            h.remove()
    writes = {s.layer: (lambda out, s=s: write(out, captured[s.layer], x.pair, x, s)) for s in sites}
    last: list[Tensor] = []
    with _hooks(blocks, writes, last):
        logits = model(**inputs).logits
    return Counterfactual(logits, last[-1])
