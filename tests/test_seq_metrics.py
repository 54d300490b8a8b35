"""Sequence-task metrics against hand-worked values and scikit-learn."""

import numpy as np
import pytest
from sklearn.metrics import f1_score

from jaxnets.seq import metrics as M


def test_accuracy_and_macro_f1_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 4, 200))
    p[p == 3] = 2  # class 3 never predicted: F1 = 0 for it
    assert M.accuracy(y, p) == pytest.approx(np.mean(y == p))
    assert M.macro_f1(y, p, 4) == pytest.approx(
        f1_score(y, p, average="macro", labels=[0, 1, 2, 3], zero_division=0)
    )
    cm = M.confusion_matrix(y, p, 4)
    assert cm.sum() == 200 and cm[:, 3].sum() == 0


def test_edit_distance_known_values():
    assert M.edit_distance("kitten", "sitting") == 3
    assert M.edit_distance(("HH", "AH"), ()) == 2
    assert M.edit_distance((), ()) == 0
    assert M.edit_distance(("K", "AE", "T"), ("K", "AA", "T", "S")) == 2


def test_error_rates_multiple_references():
    hyps = [("R", "EH", "D"), ("K", "AE", "T"), ("D", "AO")]
    refs = [
        [("R", "IY", "D"), ("R", "EH", "D")],  # matches the second: right
        [("K", "AE", "T", "S")],  # one deletion: wrong, 1 error over 4
        [("D", "AO", "G"), ("D", "AA", "G", "Z")],  # closest is the first: 1 over 3
    ]
    r = M.error_rates(hyps, refs)
    assert r["wer"] == pytest.approx(2 / 3)
    assert r["per"] == pytest.approx((0 + 1 + 1) / (3 + 4 + 3))
    with pytest.raises(ValueError, match="references: expected 3 items"):
        M.error_rates(hyps, refs[:2])


def test_segmentation_f1():
    true = [np.array([1, 0, 0, 1, 0, 1, 0])]  # abc|de|fg
    pred = [np.array([1, 0, 0, 1, 1, 0, 0])]  # abc|d|efg
    b = M.boundary_f1(true, pred)
    # starts after position 0: true {3, 5}, predicted {3, 4}
    assert (b["precision"], b["recall"]) == (0.5, 0.5)
    w = M.word_f1(true, pred)
    # words true {(0,3),(3,5),(5,7)}, predicted {(0,3),(3,4),(4,7)}: one right
    assert w["precision"] == pytest.approx(1 / 3) and w["recall"] == pytest.approx(1 / 3)
    assert M.word_f1(true, true)["f1"] == 1.0
    # a prediction without any start still has its first word
    assert M.word_f1([np.array([1, 0])], [np.array([0, 0])])["f1"] == 1.0
