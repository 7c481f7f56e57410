import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, DistilBertConfig, RobertaConfig, XLNetConfig

from diito.intervention import block_list
from diito.models import build_student, load_pretrained, max_positions, select_blocks


def block_modules(model):
    return block_list(model)[2]


def test_select_blocks_strategies():
    assert select_blocks("first_k", 12, 6) == [0, 1, 2, 3, 4, 5]
    assert select_blocks("skip", 12, 6) == [0, 2, 4, 7, 9, 11]  # DistilBERT's choice
    assert select_blocks("skip", 6, 3) == [0, 3, 5]
    assert select_blocks("skip", 12, 1) == [0]
    assert select_blocks("first_k", 12, 3, blocks=[0, 2, 4]) == [0, 2, 4]
    with pytest.raises(ValueError, match="student.blocks"):
        select_blocks("first_k", 6, 3, blocks=[0, 7, 2])
    with pytest.raises(ValueError, match="3 blocks given for a 2-layer"):
        select_blocks("first_k", 6, 2, blocks=[0, 1, 2])
    for blocks in ([2, 0, 1], [0, 0, 1]):  # a student block would follow a different teacher block than it was trained after
        with pytest.raises(ValueError, match=rf"student.blocks: \[{blocks[0]}, {blocks[1]}, 1\] is not in increasing order"):
            select_blocks("first_k", 6, 3, blocks=blocks)


def test_max_positions_leaves_out_robertas_padding_offset():
    assert max_positions(BertConfig(max_position_embeddings=512)) == (512, "max_position_embeddings 512")
    assert max_positions(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == (
        512,
        "max_position_embeddings 514, less 2 for roberta's padding offset",
    )
    assert max_positions(XLNetConfig()) is None  # relative positions: no limit in the config


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("copy_classifier", [True, False])
def test_student_copies_the_chosen_teacher_blocks(copy_classifier):
    teacher = load_pretrained("tiny", num_labels=3, seed=0)
    student = build_student(teacher, [1, 3], copy_classifier=copy_classifier)
    assert student.config.num_hidden_layers == 2
    assert _same(block_modules(student)[0], block_modules(teacher)[1])
    assert _same(block_modules(student)[1], block_modules(teacher)[3])
    assert not _same(block_modules(student)[0], block_modules(teacher)[0])
    assert _same(student.bert.embeddings, teacher.bert.embeddings)
    assert _same(student.bert.pooler, teacher.bert.pooler)
    assert _same(student.classifier, teacher.classifier) == copy_classifier


def test_student_from_distilbert_family():
    config = DistilBertConfig(vocab_size=100, dim=16, n_layers=4, n_heads=2, hidden_dim=32, num_labels=2)
    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_config(config)
    student = build_student(teacher, [0, 2, 3], copy_classifier=True)
    assert student.config.n_layers == 3
    assert _same(block_modules(student)[1], block_modules(teacher)[2])
    assert _same(student.pre_classifier, teacher.pre_classifier)
    ids = torch.tensor([[1, 5, 7, 2]])
    assert student(input_ids=ids).logits.shape == (1, 2)
