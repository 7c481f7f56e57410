"""Interventions: mapping presets, position sampling, and the fast path's exactness."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from diito import families
from diito.intervention import (
    EntrySpec,
    Interchange,
    InterchangeConfig,
    MappingConfig,
    Shape,
    Site,
    SiteSpec,
    block_list,
    build_mapping,
    counterfactual,
    mapping_table,
    pairing,
    preset,
    reference_counterfactual,
    sample_interchange,
    swap_count,
)
from diito.models import build_student
from diito.objective import DistillationObjective, LossConfig, causal_cosine_loss, intervention_diagnostics


# -- mapping presets -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "teacher, student, name, expected",
    [
        (12, 6, "full", [([0], [0, 1]), ([1], [2, 3]), ([2], [4, 5]), ([3], [6, 7]), ([4], [8, 9]), ([5], [10, 11])]),
        (12, 3, "full", [([0], [0, 1, 2, 3]), ([1], [4, 5, 6, 7]), ([2], [8, 9, 10, 11])]),
        (6, 3, "full", [([0], [0, 1]), ([1], [2, 3]), ([2], [4, 5])]),
        (6, 2, "full", [([0], [0, 1, 2]), ([1], [3, 4, 5])]),
        (12, 6, "middle", [([3], [6])]),
        (12, 3, "middle", [([1], [6])]),
        (6, 3, "middle", [([1], [3])]),
        (6, 2, "middle", [([1], [3])]),
        (12, 6, "late", [([3], [9]), ([4], [10])]),
        (12, 3, "late", [([0], [9]), ([1], [10])]),
        (6, 3, "late", [([0], [3]), ([1], [4])]),
        (6, 2, "late", [([0], [3]), ([1], [4])]),
        (12, 6, "full_original", [([0], [0, 1]), ([1], [2, 3]), ([2], [4, 5]), ([3], [6, 7]), ([4], [8, 9]), ([5], [10, 11])]),
        (6, 4, "full_original", [([0], [0]), ([1], [1]), ([2], [2]), ([3], [3])]),  # the top blocks are never aligned
        (6, 4, "full", [([0], [0]), ([1], [1, 2]), ([2], [3]), ([3], [4, 5])]),  # ours spreads them
        (12, 5, "full_original", [([0], [0, 1]), ([1], [2, 3]), ([2], [4, 5]), ([3], [6, 7]), ([4], [8, 9])]),
    ],
)
def test_mapping_presets(teacher, student, name, expected):
    assert preset(name, teacher, student) == expected
    entries = build_mapping(MappingConfig(name=name), Shape(teacher, 768, 12), Shape(student, 768, 12))
    assert [([s.layer for s in e.student], [t.layer for t in e.teacher]) for e in entries] == expected


def test_explicit_mapping_with_slices_is_checked():
    teacher, student = Shape(6, 384, 12), Shape(3, 384, 12)
    entries = build_mapping(
        MappingConfig(
            name="explicit",
            entries=[EntrySpec(student=SiteSpec(layers=[1], attention_heads=(0, 6)), teacher=SiteSpec(layers=[2, 3], dims=(0, 192)))],
        ),
        teacher,
        student,
    )
    assert entries[0].student[0] == Site(1, (0, 192), heads=(0, 6)) and entries[0].teacher == (Site(2, (0, 192)), Site(3, (0, 192)))
    assert "1.heads[0:6]" in mapping_table(entries) and "2[0:192], 3[0:192]" in mapping_table(entries)
    bad = [
        (SiteSpec(layers=[3]), SiteSpec(layers=[0]), "student.layers: 3 outside blocks 0..2"),
        (SiteSpec(layers=[0], dims=(0, 500)), SiteSpec(layers=[0], dims=(0, 500)), "dims: [0, 500] outside the hidden size 384"),
        (SiteSpec(layers=[0], attention_heads=(10, 13)), SiteSpec(layers=[0]), "attention_heads: [10, 13] outside the model's 12 heads"),
        (SiteSpec(layers=[0], dims=(0, 10)), SiteSpec(layers=[0], dims=(0, 20)), "differ in width"),
        (
            SiteSpec(layers=[0], dims=(0, 32), attention_heads=(0, 1)),
            SiteSpec(layers=[0], dims=(0, 32)),
            "give dims (a slice of the block output) or attention_heads, not both",
        ),
        # the old spelling sliced the block output in head-sized chunks: refused, naming what to write instead
        (
            SiteSpec(layers=[0], heads=(0, 6)),
            SiteSpec(layers=[0], dims=(0, 192)),
            (
                "student.heads: [0, 6] would slice the block output in head-sized chunks, which is not the heads' output; "
                "write dims: [0, 192] for that slice, or attention_heads: [0, 6] for the attention heads' own outputs"
            ),
        ),
    ]
    for s, t, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            build_mapping(MappingConfig(name="explicit", entries=[EntrySpec(student=s, teacher=t)]), teacher, student)


# -- positions -----------------------------------------------------------------------------------------
def test_swap_count():
    assert swap_count(10, 20, 0.3, 1, None) == 3
    assert swap_count(3, 20, 0.3, 0, None) == 0  # the original: nothing swapped in short inputs
    assert swap_count(3, 20, 0.3, 1, None) == 1
    assert swap_count(40, 50, 0.3, 1, 5) == 5
    assert swap_count(2, 2, 1.0, 1, None) == 2


@pytest.mark.parametrize("mode", ["random", "consecutive"])
def test_positions_counts_never_padding_and_reproducible(mode):
    lengths = torch.tensor([12, 3, 30, 7, 2, 25, 9, 16])
    x = sample_interchange(lengths, 0.3, mode, generator=torch.Generator().manual_seed(0))
    for b in range(len(lengths)):
        s = int(x.source[b])
        picked = x.pair == b
        n = swap_count(int(lengths[b]), int(lengths[s]), 0.3, 1, None)
        assert int(picked.sum()) == n
        bp, sp = x.base_pos[picked], x.source_pos[picked]
        assert (bp < lengths[b]).all() and (sp < lengths[s]).all() and (bp >= 0).all()
        assert len(set(bp.tolist())) == n and bool((bp.diff() > 0).all()) and bool((sp.diff() > 0).all())
        if mode == "consecutive":
            assert bool((bp.diff() == 1).all()) and bool((sp.diff() == 1).all())
    y = sample_interchange(lengths, 0.3, mode, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(vars(x).values(), vars(y).values()))


def test_derangement_and_plain_permutation():
    generator = torch.Generator().manual_seed(1)
    for _ in range(200):
        perm = pairing(5, True, generator)
        assert sorted(perm.tolist()) == list(range(5)) and bool((perm != torch.arange(5)).all())
    fixed = sum(bool((pairing(5, False, generator) == torch.arange(5)).any()) for _ in range(200))
    assert fixed > 50  # plain permutations (the original) often keep an example as its own source


# -- exactness ---------------------------------------------------------------------------------------------
# Every family, and the variants whose blocks run differently: DeBERTa-v2 with its convolution after
# block 0 (v2 xlarge), ModernBERT on its eager attention besides the default SDPA (both padded paths;
# its unpadded path needs flash-attn kernels, see test_modernbert_unpadded_attention_path).
VARIANTS = {name: (name, {}) for name in families.FAMILIES} | {
    "deberta-v2-conv": ("deberta-v2", {"conv_kernel_size": 3, "conv_act": "gelu"}),
    "modernbert-eager": ("modernbert", {"attn_implementation": "eager"}),
}


def _model(variant: str, hidden: int = 32, layers: int = 4, seed: int = 0, **settings):
    """A random model of the variant (4 heads, 3 classes), prepared for interventions, in eval mode (dropout off)."""
    family, extra = VARIANTS[variant]
    extra = dict(extra) | settings
    attention = extra.pop("attn_implementation", None)
    config = families.tiny_config(family, 100, {"pad": 0, "cls": 1, "sep": 2}, hidden=hidden, layers=layers, heads=4)
    config.update(extra | {"num_labels": 3})
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config, **({"attn_implementation": attention} if attention else {}))
    return families.prepare(model).eval()


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 4, 12, 7, 2, 12])
    ids = torch.randint(3, 100, (6, 12), generator=g)
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.randint(0, 3, (6,), generator=g)}


def _loss_and_grads(objective, student, teacher, batch, seed):
    student.zero_grad()
    torch.manual_seed(seed)
    total, terms = objective(student, teacher, batch)
    total.backward()
    return (
        total.detach(),
        {k: v.detach() for k, v in terms.items()},
        {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None},
    )


def _weighted_sum(config: LossConfig, terms) -> torch.Tensor:
    """alpha·KD + (1−alpha)·CE + gamma·DIITO + beta·patience + cosine·causal-cosine, written out."""
    return (
        config.alpha * terms["kd"]
        + (1 - config.alpha) * terms["ce"]
        + config.gamma * terms["diito"]
        + config.beta * terms["patience"]
        + config.cosine * terms["cosine"]
    )


MAPPINGS = {
    "full": MappingConfig(name="full"),
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
        entries=[  # the attention heads' own outputs; several blocks; mixed with block slices
            EntrySpec(student=SiteSpec(layers=[0], attention_heads=(1, 3)), teacher=SiteSpec(layers=[1, 2], attention_heads=(1, 3))),
            EntrySpec(student=SiteSpec(layers=[0, 1], attention_heads=(0, 4)), teacher=SiteSpec(layers=[0, 3], attention_heads=(0, 4))),
            EntrySpec(student=SiteSpec(layers=[1], attention_heads=(2, 4)), teacher=SiteSpec(layers=[2], dims=(0, 16))),
            EntrySpec(student=SiteSpec(layers=[0], dims=(16, 32)), teacher=SiteSpec(layers=[1, 3], attention_heads=(0, 2))),
        ],
    ),
}
SETTINGS = {  # besides the defaults: the original's reduction, no minimum swap, one span per input
    "default": {},
    "original": {"interchange_min_token": 0, "pairing": "permutation"},
    "consecutive": {"interchange_mode": "consecutive", "interchange_max_token": 3},
}


@pytest.mark.parametrize(
    "variant, mapping, settings",
    [
        *[(variant, mapping, "default") for variant in VARIANTS for mapping in MAPPINGS],
        *[
            (variant, mapping, settings)
            for variant in ("bert", "modernbert")
            for mapping in ("full", "heads")
            for settings in ("original", "consecutive")
        ],
    ],
)
def test_fast_path_matches_the_three_pass_reference(variant, mapping, settings):
    teacher = _model(variant, initializer_range=0.2)  # weights large enough that every swap moves what is above it
    student = build_student(teacher, [0, 2], copy_classifier=False).eval()  # dropout off
    entries = build_mapping(MAPPINGS[mapping], Shape.of(teacher.config), Shape.of(student.config))
    config = LossConfig(alpha=0.5, T=2.0, gamma=1.0, cosine=0.5, beta=0.3, kl_reduction="mean" if settings == "original" else "batchmean")
    interchange = InterchangeConfig(interchange_prop=0.4, **SETTINGS[settings])
    for entry in entries:  # every entry of the mapping, not one seeded draw
        results = [
            _loss_and_grads(
                DistillationObjective(config, [1], [entry], fast=fast, interchange=interchange), student, teacher, _batch(), seed=3
            )
            for fast in (True, False)
        ]
        (fast_total, fast_terms, fast_grads), (ref_total, ref_terms, ref_grads) = results
        assert {"kd", "ce", "patience", "diito", "cosine", "iia", "efficacy"} <= set(fast_terms)
        torch.testing.assert_close(fast_total, _weighted_sum(config, fast_terms), atol=1e-6, rtol=0)
        torch.testing.assert_close(fast_total, ref_total, atol=1e-5, rtol=0)
        for name in ref_terms:
            torch.testing.assert_close(fast_terms[name], ref_terms[name], atol=1e-5, rtol=0)
        assert fast_grads.keys() == ref_grads.keys() and len(fast_grads) == len(list(student.parameters()))
        for name in ref_grads:
            torch.testing.assert_close(fast_grads[name], ref_grads[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_counterfactual_changes_the_output(variant):
    """An intervention that wrote nothing would give the base run's logits."""
    model = _model(variant)
    batch = _batch()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        base = model(**inputs, output_hidden_states=True)
        x = sample_interchange(inputs["attention_mask"].sum(1), 0.5, generator=torch.Generator().manual_seed(0))
        for site in [*(Site(layer) for layer in range(4)), *(Site(layer, (0, 32), heads=(0, 4)) for layer in range(4))]:
            cf = counterfactual(model, inputs, base.hidden_states, x, (site,))
            changed = (cf.logits - base.logits).abs().amax(-1) > 1e-5
            assert changed.any() and set(changed.nonzero().flatten().tolist()) <= set(x.pair.tolist()), site
            untouched = torch.tensor([b for b in range(6) if b not in x.pair.tolist()], dtype=torch.long)
            torch.testing.assert_close(cf.logits[untouched], base.logits[untouched])


def _output_hook(module, row: int, q: int, value: torch.Tensor):
    """A plain forward hook: ``value`` into the module's output at (row, q), whether it returns a tensor or a tuple."""

    def hook(m, args, out):
        hidden = (out[0] if isinstance(out, tuple) else out).clone()
        hidden[row, q] = value
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    return module.register_forward_hook(hook)


@pytest.mark.parametrize("variant", ["bert", "distilbert", "deberta-v2", "modernbert", "mpnet"])
@pytest.mark.parametrize("layer, q", [(0, 2), (2, 2), (3, 0)])  # after the last block only [CLS] (position 0) matters to a CLS head
def test_counterfactual_against_a_hand_written_hook(variant, layer, q):
    """One pair, one position: base row 0 takes source row 3's block output at position 5 into its position q."""
    model = _model(variant)
    inputs = {k: v for k, v in _batch().items() if k != "labels"}
    source = torch.tensor([3, 0, 1, 2, 5, 4])
    x = Interchange(source, pair=torch.tensor([0]), base_pos=torch.tensor([q]), source_pos=torch.tensor([5]))
    block = block_list(model)[2][layer]
    with torch.no_grad():
        base = model(**inputs, output_hidden_states=True)
        plain = _output_hook(block, 0, q, base.hidden_states[layer + 1][3, 5])
        try:
            expected = model(**inputs).logits
        finally:
            plain.remove()
        got = counterfactual(model, inputs, base.hidden_states, x, (Site(layer),)).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert (got[0] - base.logits[0]).abs().max() > 1e-5  # the swap reached the output
    torch.testing.assert_close(got[1:], base.logits[1:], atol=1e-6, rtol=0)


HEADS_OUTPUT = {  # written out per family, apart from the family table: the attention output projection of a block
    "bert": lambda block: block.attention.output.dense,
    "distilbert": lambda block: block.attention.out_lin,
    "deberta-v2": lambda block: block.attention.output.dense,
    "modernbert": lambda block: block.attn.Wo,
    "mpnet": lambda block: block.attention.attn.o,
}


@pytest.mark.parametrize("variant", list(HEADS_OUTPUT))
@pytest.mark.parametrize("layer, q", [(0, 2), (2, 2), (3, 0)])
def test_heads_site_against_a_hand_written_hook(variant, layer, q):
    """One pair, one position, heads 1 and 2 (of 4, 8 wide each): base row 0 takes source row 3's heads'
    outputs at position 5 (from a plain run with a capturing hook) into its position q, dims 8:24 of
    the input of the attention output projection."""
    model = _model(variant, initializer_range=0.5)  # large weights: a swap in one position reaches the output
    inputs = {k: v for k, v in _batch().items() if k != "labels"}
    x = Interchange(torch.tensor([3, 0, 1, 2, 5, 4]), pair=torch.tensor([0]), base_pos=torch.tensor([q]), source_pos=torch.tensor([5]))
    projection = HEADS_OUTPUT[variant](block_list(model)[2][layer])
    heads = []
    with torch.no_grad():
        keep = projection.register_forward_pre_hook(lambda m, args: heads.append(args[0]))
        try:
            base = model(**inputs, output_hidden_states=True)
        finally:
            keep.remove()

        def swap(m, args):
            new = args[0].clone()
            new[0, q, 8:24] = heads[0][3, 5, 8:24]
            return (new,)

        plain = projection.register_forward_pre_hook(swap)
        try:
            expected = model(**inputs).logits
        finally:
            plain.remove()
        got = counterfactual(model, inputs, base.hidden_states, x, (Site(layer, (8, 24), heads=(1, 3)),)).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert (got[0] - base.logits[0]).abs().max() > 1e-5
    torch.testing.assert_close(got[1:], base.logits[1:], atol=1e-6, rtol=0)


def test_diagnostics_and_causal_cosine_by_hand():
    student_cf = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])  # classes 0, 1, 0, 1
    teacher_cf = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])  # classes 0, 0, 0, 1
    teacher_base = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])  # classes 1, 0, 0, 0
    got = intervention_diagnostics(student_cf, teacher_cf, teacher_base)
    assert got["iia"].item() == pytest.approx(3 / 4)  # rows 0, 2, 3 agree
    assert got["efficacy"].item() == pytest.approx(2 / 4)  # rows 0 and 3 changed the teacher's class
    s = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [5.0, 5.0]]])
    t = torch.tensor([[[0.0, 1.0], [2.0, 2.0], [-1.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding: not counted
    assert causal_cosine_loss(s, t, mask).item() == pytest.approx(((1 - 0.0) + (1 - 1.0)) / 2)


@pytest.mark.parametrize(
    "teacher_variant, student_variant",
    [
        *[(variant, variant) for variant in VARIANTS],
        ("roberta", "xlm-roberta"),
        ("modernbert", "deberta-v2"),
        ("bert", "mpnet"),  # pairs across families (one tokenizer)
    ],
)
def test_fast_path_exact_when_teacher_and_student_differ_in_width_and_depth(teacher_variant, student_variant):
    teacher = _model(teacher_variant, hidden=32, layers=4, initializer_range=0.2)
    student = _model(student_variant, hidden=16, layers=2, seed=1, initializer_range=0.2)
    mapping = MappingConfig(
        name="explicit",
        entries=[
            EntrySpec(student=SiteSpec(layers=[0]), teacher=SiteSpec(layers=[1], dims=(0, 16))),
            EntrySpec(student=SiteSpec(layers=[1], dims=(8, 16)), teacher=SiteSpec(layers=[2, 3], attention_heads=(2, 3))),
            EntrySpec(student=SiteSpec(layers=[0, 1], attention_heads=(1, 3)), teacher=SiteSpec(layers=[3], attention_heads=(0, 1))),
        ],
    )
    entries = build_mapping(mapping, Shape.of(teacher.config), Shape.of(student.config))
    config, interchange = LossConfig(alpha=0.5, gamma=1.0), InterchangeConfig(interchange_prop=0.5)
    for entry in entries:
        (ft, _, fg), (rt, _, rg) = [
            _loss_and_grads(DistillationObjective(config, [], [entry], fast=f, interchange=interchange), student, teacher, _batch(1), 1)
            for f in (True, False)
        ]
        torch.testing.assert_close(ft, rt, atol=1e-5, rtol=0)
        assert fg.keys() == rg.keys() and len(fg) == len(list(student.parameters()))
        for name in rg:
            torch.testing.assert_close(fg[name], rg[name], atol=1e-5, rtol=0, msg=name)


def test_separate_passes_run_the_original_three_passes_in_training_only():
    """The original's way (a source pass and a counterfactual pass of their own, with fresh dropout)
    in train mode; in eval mode both ways are one computation, so the fast one is used."""
    teacher = _model("bert")
    student = build_student(teacher, [0, 2], copy_classifier=False)
    entries = build_mapping(MAPPINGS["full"], Shape.of(teacher.config), Shape.of(student.config))
    passes = []
    student.bert.embeddings.register_forward_hook(lambda *args: passes.append(1))
    results = {}
    for separate in (False, True):
        objective = DistillationObjective(LossConfig(gamma=1.0), [], entries[:1], interchange=InterchangeConfig(separate_passes=separate))
        for mode in ("train", "eval"):
            getattr(student, mode)()
            passes.clear()
            torch.manual_seed(5)
            results[separate, mode] = objective(student, teacher, _batch())[1]["diito"]
            assert len(passes) == (3 if separate and mode == "train" else 2), (separate, mode)  # base + source + counterfactual
    assert results[True, "eval"] == results[False, "eval"]
    assert results[True, "train"] != results[False, "train"]  # fresh dropout masks for the source and counterfactual


@pytest.mark.parametrize("variant", VARIANTS)
def test_interventions_against_independent_answers(variant):
    """Swapping every position of equal-length inputs makes the counterfactual the source's own run;
    swapping none leaves the base run."""
    model = _model(variant)
    ids = torch.randint(3, 100, (5, 9), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        base = model(**inputs, output_hidden_states=True)
        everything = sample_interchange(torch.full((5,), 9), 1.0, generator=torch.Generator().manual_seed(2))
        assert len(everything.pair) == 5 * 9
        nothing = sample_interchange(torch.full((5,), 9), 0.0, min_token=0, generator=torch.Generator().manual_seed(2))
        assert len(nothing.pair) == 0
        for layer in range(4):
            got = counterfactual(model, inputs, base.hidden_states, everything, (Site(layer),)).logits
            torch.testing.assert_close(got, base.logits[everything.source], atol=1e-5, rtol=0)
            torch.testing.assert_close(
                counterfactual(model, inputs, base.hidden_states, nothing, (Site(layer),)).logits, base.logits, atol=1e-6, rtol=0
            )


@pytest.mark.parametrize("variant", VARIANTS)
def test_counterfactuals_read_real_tokens_only(variant):
    """Swapped positions lie inside each example's attention mask, and more padding changes no
    counterfactual: padding never reaches a real token (ModernBERT's padded paths included)."""
    model = _model(variant)
    batch = {k: v for k, v in _batch().items() if k != "labels"}
    wider = {k: torch.nn.functional.pad(v, (0, 5)) for k, v in batch.items()}  # 5 more padding positions
    x = sample_interchange(batch["attention_mask"].sum(1), 0.5, generator=torch.Generator().manual_seed(0))
    assert bool(batch["attention_mask"][x.pair, x.base_pos].all()) and bool(batch["attention_mask"][x.source[x.pair], x.source_pos].all())
    with torch.no_grad():
        for site in (Site(1), Site(2, (0, 16), heads=(0, 2))):
            got = [counterfactual(model, b, model(**b, output_hidden_states=True).hidden_states, x, (site,)).logits for b in (batch, wider)]
            torch.testing.assert_close(got[1], got[0], atol=1e-5, rtol=0)


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
    reason="ModernBERT's unpadded attention path needs CUDA and the flash-attn kernels",
)
def test_modernbert_unpadded_attention_path():
    """flash_attention_2 drops the padding inside attention: the counterfactual on it matches the
    three-pass one, and the padded path's (bf16, so to bf16's precision)."""
    batch = {k: v.cuda() for k, v in _batch().items() if k != "labels"}
    x = sample_interchange(batch["attention_mask"].sum(1).cpu(), 0.5, generator=torch.Generator().manual_seed(0)).to(torch.device("cuda"))
    assert bool(batch["attention_mask"][x.pair, x.base_pos].all()) and bool(batch["attention_mask"][x.source[x.pair], x.source_pos].all())
    logits = {}
    for attention in ("flash_attention_2", "sdpa"):
        model = _model("modernbert", attn_implementation=attention).to("cuda", torch.bfloat16)
        with torch.no_grad():
            base = model(**batch, output_hidden_states=True)
            for site in (Site(1), Site(2, (0, 16), heads=(0, 2))):
                fast = counterfactual(model, batch, base.hidden_states, x, (site,)).logits.float()
                torch.testing.assert_close(fast, reference_counterfactual(model, batch, x, (site,)).logits.float(), atol=2e-2, rtol=0)
                logits[attention, site] = fast
    for site in (Site(1), Site(2, (0, 16), heads=(0, 2))):
        torch.testing.assert_close(logits["flash_attention_2", site], logits["sdpa", site], atol=5e-2, rtol=0)
