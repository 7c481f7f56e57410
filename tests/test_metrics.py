"""Metrics against hand-computed values, and GLUE submission file contents."""

import math

import pytest

from diito.metrics import METRICS, compute_metrics, write_glue_predictions

# gold/pred: TP=3 (0, 3, 6), FN=1 (2), FP=2 (4, 5), TN=2 (1, 7)
GOLD = [1, 0, 1, 1, 0, 0, 1, 0]
PRED = [1, 0, 0, 1, 1, 1, 1, 0]


def test_classification_metrics_match_hand_computation():
    got = compute_metrics(["accuracy", "f1", "matthews"], PRED, GOLD)
    assert got["accuracy"] == pytest.approx(5 / 8)
    # precision 3/5, recall 3/4 -> F1 = 2 * 0.6 * 0.75 / 1.35
    assert got["f1"] == pytest.approx(2 / 3)
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (6 - 2) / sqrt(5*4*4*3)
    assert got["matthews"] == pytest.approx(4 / math.sqrt(240))
    assert all(isinstance(v, float) for v in got.values())


def test_regression_metrics_match_hand_computation():
    # Pearson: dx = [-1.5, -.5, .5, 1.5], dy = [-3, -1, 0, 4] -> 11 / sqrt(5 * 26)
    assert compute_metrics(["pearson"], [1, 2, 3, 4], [2, 4, 5, 9])["pearson"] == pytest.approx(11 / math.sqrt(130))
    # Spearman: rank differences [0, -1, 1, 0] -> 1 - 6 * 2 / (4 * (16 - 1))
    assert compute_metrics(["spearman"], [1, 2, 3, 4], [1, 3, 2, 4])["spearman"] == pytest.approx(0.8)


def test_unknown_metric_lists_known_ones():
    with pytest.raises(ValueError, match="known metrics: accuracy, f1, matthews, pearson, spearman"):
        compute_metrics(["accuracy", "bleu"], PRED, GOLD)
    assert set(METRICS) == {"accuracy", "f1", "matthews", "pearson", "spearman"}


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(["accuracy"], [0, 1], [0, 1, 1])


def test_submission_with_label_names(tmp_path):
    path = write_glue_predictions(tmp_path / "sub" / "RTE.tsv", ["0", "1", "2"], [1, 0, 1], label_names=["entailment", "not_entailment"])
    assert path.read_text() == "index\tprediction\n0\tnot_entailment\n1\tentailment\n2\tnot_entailment\n"


def test_submission_with_class_ids(tmp_path):
    path = write_glue_predictions(tmp_path / "SST-2.tsv", ["7", "8"], [1, 0])
    assert path.read_text() == "index\tprediction\n7\t1\n8\t0\n"


def test_regression_submission_is_clipped(tmp_path):
    path = tmp_path / "a" / "b" / "STS-B.tsv"
    write_glue_predictions(path, ["0", "1", "2"], [-0.5, 2.25, 7.0], regression=True)
    assert path.read_text() == "index\tprediction\n0\t0.000\n1\t2.250\n2\t5.000\n"


def test_submission_length_mismatch(tmp_path):
    with pytest.raises(ValueError, match="2 ids but 3 predictions"):
        write_glue_predictions(tmp_path / "x.tsv", ["0", "1"], [0, 1, 1])
