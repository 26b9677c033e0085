"""Metric functions against hand-computed values and against scikit-learn's metrics called directly."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from ichmodel.metrics import (
    Counts,
    best_f1_threshold,
    class_log_loss,
    confusion_counts,
    roc_auc,
    roc_curve,
    summarize,
    weighted_log_loss,
)

CLASSES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")


def _random_labels(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Six correlated labels (`any` = OR of the subtypes) and noisy, tied, informative probabilities."""
    rng = np.random.default_rng(seed)
    sub = rng.random((n, 5)) < np.array([0.05, 0.15, 0.1, 0.12, 0.2])
    y = np.c_[sub, sub.any(axis=1)].astype(np.uint8)
    p = np.round(0.35 * y + rng.random(y.shape) * 0.65, 2)  # ties, as quantised network outputs have
    p = np.clip(p, 0.005, 0.995)  # away from the clipping eps, so sklearn's own clipping agrees
    return y, p


# --- weighted log loss -------------------------------------------------------------------------


def test_weighted_log_loss_hand_computed() -> None:
    y = np.array([[0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 1]])
    p = np.array([[0.1] * 6, [0.8, 0.1, 0.1, 0.1, 0.1, 0.9]])
    epidural = (-math.log(0.9) - math.log(0.8)) / 2
    others = -math.log(0.9)  # every other class: both images predicted right with 0.9
    expected = (epidural + 4 * others + 2 * others) / 7
    assert weighted_log_loss(y, p) == pytest.approx(expected, rel=1e-12)
    assert class_log_loss(y, p) == pytest.approx([epidural, *[others] * 5], rel=1e-12)


def test_weighted_log_loss_of_a_coin_is_log_2() -> None:
    y = np.array([[1, 0, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0]])
    assert weighted_log_loss(y, np.full(y.shape, 0.5)) == pytest.approx(math.log(2), rel=1e-12)


def test_weighted_log_loss_weights_any_twice() -> None:
    y = np.zeros((1, 6), dtype=np.uint8)
    p = np.zeros((1, 6))
    p[0, 5] = 0.5  # only `any` is wrong
    assert weighted_log_loss(y, p) == pytest.approx(2 * math.log(2) / 7, rel=1e-6)
    p = np.zeros((1, 6))
    p[0, 0] = 0.5  # only epidural is wrong
    assert weighted_log_loss(y, p) == pytest.approx(math.log(2) / 7, rel=1e-6)


def test_weighted_log_loss_clips_certain_mistakes() -> None:
    y = np.array([[1, 0, 0, 0, 0, 0]])
    p = np.zeros((1, 6))
    assert weighted_log_loss(y, p) == pytest.approx(-math.log(1e-7) / 7, rel=1e-6)
    assert weighted_log_loss(y, p, eps=1e-15) == pytest.approx(-math.log(1e-15) / 7, rel=1e-6)


def test_weighted_log_loss_equals_sklearn_and_kaggle_per_image_form() -> None:
    y, p = _random_labels()
    w = np.array([1, 1, 1, 1, 1, 2.0])
    per_class = [skm.log_loss(y[:, c], p[:, c], labels=[0, 1]) for c in range(6)]
    assert weighted_log_loss(y, p) == pytest.approx(np.dot(w, per_class) / 7, rel=1e-10)
    # Kaggle's per-image form: weighted mean over classes, then the mean over images.
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert weighted_log_loss(y, p) == pytest.approx(np.mean(bce @ w / w.sum()), rel=1e-10)


def test_unlabelled_rows_and_bad_shapes_are_refused() -> None:
    y = np.array([[0, 0, 0, 0, 0, 255]])
    with pytest.raises(ValueError, match=r"labels must be 0 or 1, found \[255\]"):
        weighted_log_loss(y, np.zeros((1, 6)))
    with pytest.raises(ValueError, match=r"shape \(1, 5\)"):
        weighted_log_loss(np.zeros((1, 5)), np.zeros((1, 5)))
    with pytest.raises(ValueError, match="within"):
        weighted_log_loss(np.zeros((1, 6)), np.full((1, 6), 1.5))


# --- ROC -----------------------------------------------------------------------------------------


def test_roc_auc_hand_computed_with_and_without_ties() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # pairs (pos, neg): (0.5, 0.5) tie = 1/2, (0.5, 0.2) = 1, (0.9, 0.5) = 1, (0.9, 0.2) = 1 -> 3.5 / 4
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)
    assert roc_auc([0, 1, 0, 1], [0.3] * 4) == pytest.approx(0.5)
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == pytest.approx(0.0)


def test_roc_auc_undefined_without_positives_is_nan() -> None:
    assert math.isnan(roc_auc([0, 0, 0], [0.1, 0.5, 0.9]))
    assert math.isnan(roc_auc([1, 1], [0.1, 0.5]))
    fpr, tpr, _ = roc_curve([0, 0, 0], [0.1, 0.5, 0.9])
    assert np.isnan(tpr).all()
    assert fpr[0] == 0.0
    assert fpr[-1] == 1.0


def test_roc_auc_equals_sklearn_per_class_and_micro() -> None:
    y, p = _random_labels()
    for c in range(6):
        assert roc_auc(y[:, c], p[:, c]) == pytest.approx(skm.roc_auc_score(y[:, c], p[:, c]), abs=1e-12)
    micro = skm.roc_auc_score(y, p, average="micro")
    assert roc_auc(y.ravel(), p.ravel()) == pytest.approx(micro, abs=1e-12)


@pytest.mark.parametrize("drop", [False, True])
def test_roc_curve_equals_sklearn(drop: bool) -> None:
    y, p = _random_labels(seed=3)
    fpr, tpr, thr = roc_curve(y[:, 4], p[:, 4], drop_intermediate=drop)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(y[:, 4], p[:, 4], drop_intermediate=drop)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
    assert thr[0] == np.inf
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(y[:, 4], p[:, 4]), abs=1e-12)


# --- threshold metrics -------------------------------------------------------------------------


def test_counts_hand_computed() -> None:
    y = [1, 1, 1, 0, 0, 0, 0, 0]
    p = [0.9, 0.5, 0.2, 0.7, 0.1, 0.1, 0.4, 0.49]
    c = confusion_counts(y, p)  # positive iff p >= 0.5
    assert c == Counts(tp=2, fp=1, tn=4, fn=1)
    assert c.accuracy == pytest.approx(6 / 8)
    assert c.precision == pytest.approx(2 / 3)
    assert c.sensitivity == pytest.approx(2 / 3)
    assert c.specificity == pytest.approx(4 / 5)
    assert c.f1 == pytest.approx(2 / 3)
    assert confusion_counts(y, p, threshold=0.45) == Counts(tp=2, fp=2, tn=3, fn=1)


def test_undefined_ratios_are_nan_and_f1_zero_when_nothing_found() -> None:
    c = Counts(tp=0, fp=0, tn=5, fn=2)
    assert math.isnan(c.precision)
    assert c.sensitivity == 0.0
    assert c.f1 == 0.0
    assert math.isnan(Counts(0, 0, 5, 0).f1)
    assert math.isnan(Counts(0, 0, 5, 0).sensitivity)
    assert math.isnan(Counts(3, 0, 0, 0).specificity)


def test_threshold_metrics_equal_sklearn() -> None:
    y, p = _random_labels(seed=1)
    for c in range(6):
        yc, pred = y[:, c], (p[:, c] >= 0.5).astype(int)
        m = confusion_counts(yc, p[:, c])
        assert m.accuracy == pytest.approx(skm.accuracy_score(yc, pred))
        assert m.precision == pytest.approx(skm.precision_score(yc, pred))
        assert m.sensitivity == pytest.approx(skm.recall_score(yc, pred))
        assert m.specificity == pytest.approx(skm.recall_score(yc, pred, pos_label=0))
        assert m.f1 == pytest.approx(skm.f1_score(yc, pred))
    # micro over the six labels (Table I) = sklearn's micro average of the multilabel problem
    pred = (p >= 0.5).astype(int)
    m = confusion_counts(y, p)
    assert m.precision == pytest.approx(skm.precision_score(y, pred, average="micro"))
    assert m.sensitivity == pytest.approx(skm.recall_score(y, pred, average="micro"))
    assert m.f1 == pytest.approx(skm.f1_score(y, pred, average="micro"))
    assert m.accuracy == pytest.approx(skm.accuracy_score(y.ravel(), pred.ravel()))


def test_best_f1_threshold_hand_computed() -> None:
    # thresholds 0.9: F1 2/4, 0.7: 2/5, 0.6: 4/6, 0.3: 6/7 (best), 0.2: 6/8
    t, f1 = best_f1_threshold([1, 1, 0, 0, 1], [0.9, 0.6, 0.7, 0.2, 0.3])
    assert t == pytest.approx(0.3)
    assert f1 == pytest.approx(6 / 7)
    assert all(map(math.isnan, best_f1_threshold([0, 0], [0.2, 0.4])))


def test_best_f1_threshold_is_the_max_over_sklearn_curve() -> None:
    y, p = _random_labels(seed=2)
    prec, rec, _ = skm.precision_recall_curve(y[:, 1], p[:, 1])
    with np.errstate(invalid="ignore"):
        sk_best = np.nanmax(2 * prec * rec / (prec + rec))
    t, f1 = best_f1_threshold(y[:, 1], p[:, 1])
    assert f1 == pytest.approx(sk_best)
    assert confusion_counts(y[:, 1], p[:, 1], t).f1 == pytest.approx(f1)


# --- summarize -----------------------------------------------------------------------------------


def test_summarize_tables_and_notes() -> None:
    y, p = _random_labels(n=300, seed=4)
    y[:, 0] = 0  # a held-out split without epidural
    s = summarize(y, p, classes=CLASSES, threshold=0.5)
    assert s["n_images"] == 300
    assert s["weighted_log_loss"] == pytest.approx(weighted_log_loss(y, p))
    assert s["overall"]["log_loss"] == s["weighted_log_loss"]
    assert s["overall"]["roc_auc"] == pytest.approx(skm.roc_auc_score(y.ravel(), p.ravel()))
    assert s["overall"]["tp"] + s["overall"]["fp"] + s["overall"]["tn"] + s["overall"]["fn"] == 300 * 6
    assert list(s["per_class"]) == list(CLASSES)
    sub = s["per_class"]["subdural"]
    assert sub["sensitivity"] == pytest.approx(skm.recall_score(y[:, 4], p[:, 4] >= 0.5))
    assert sub["n_positive"] == int(y[:, 4].sum())
    assert sub["best_f1"]["f1"] >= sub["f1"]
    epi = s["per_class"]["epidural"]
    assert math.isnan(epi["roc_auc"])
    assert math.isnan(epi["best_f1"]["threshold"])
    assert any(n.startswith("epidural: no positive images among 300") for n in s["notes"])
    # overall at per-class best thresholds pools the per-class best counts
    tp = sum(s["per_class"][c]["best_f1"].get("tp", 0) for c in CLASSES)
    assert s["overall_best_f1"]["tp"] == tp
    assert s["overall_best_f1"]["tn"] >= 300  # epidural: nothing predicted, all negatives right


def test_summarize_threshold_changes_threshold_metrics_only() -> None:
    y, p = _random_labels(n=200, seed=5)
    a = summarize(y, p, classes=CLASSES, threshold=0.5)
    b = summarize(y, p, classes=CLASSES, threshold=0.8)
    assert a["weighted_log_loss"] == b["weighted_log_loss"]
    assert a["overall"]["roc_auc"] == b["overall"]["roc_auc"]
    assert b["overall"]["sensitivity"] < a["overall"]["sensitivity"]
    assert b["overall"]["specificity"] > a["overall"]["specificity"]
    with pytest.raises(ValueError, match="threshold"):
        summarize(y, p, classes=CLASSES, threshold=1.5)


def test_summarize_defaults_to_the_rsna_classes() -> None:
    from ichdata.labels import CLASSES as LABEL_CLASSES

    y, p = _random_labels(n=50, seed=6)
    s = summarize(y, p)
    assert tuple(s["per_class"]) == LABEL_CLASSES == CLASSES
