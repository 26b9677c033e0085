"""Evaluation metrics: the RSNA weighted log loss and the paper's Tables I and II.

ROC curves, ROC AUC and confusion counts come from `sklearn.metrics`; this module adds the RSNA
weighting, input checks (labels 0/1 only: drop unlabelled rows, 255 in the store, first), NaN instead
of an exception where a metric is undefined, and the JSON-ready `summarize` that the report shows.
Arrays are (N, C) with columns in `ichdata.labels.CLASSES` order (`any` last), or (N,) for the binary
helpers. A prediction is positive when `p >= threshold`. Sensitivity and specificity follow their
textbook definitions (the paper's Table II appears to swap them). Overall figures (Table I) pool the
N×C label/prediction pairs into one binary problem (micro average); per-class figures use one column.
The F1-maximising threshold is chosen on the data it is reported on, so it is optimistic: pick an
operating point with it on a validation split, not as a test-set figure.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn import metrics as skm
from sklearn.exceptions import UndefinedMetricWarning

__all__ = [
    "EPS",
    "RSNA_WEIGHTS",
    "Counts",
    "best_f1_threshold",
    "class_log_loss",
    "confusion_counts",
    "roc_auc",
    "roc_curve",
    "summarize",
    "weighted_log_loss",
]

#: Class weights of the RSNA metric in `CLASSES` order: 1 for each subtype, 2 for `any` (last).
RSNA_WEIGHTS: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 2.0)
#: Probabilities are clipped to [EPS, 1 - EPS] before taking logs, so one confident mistake costs
#: -log(EPS) instead of infinity.
EPS = 1e-7


def _labels(y_true: ArrayLike, ndim: tuple[int, ...] = (1, 2)) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim not in ndim:
        raise ValueError(f"labels must have {' or '.join(map(str, ndim))} dimensions, got shape {y.shape}")
    bad = (y != 0) & (y != 1)
    if bad.any():
        raise ValueError(
            f"labels must be 0 or 1, found {np.unique(y[bad])[:5].tolist()} "
            "(drop unlabelled rows, 255 in the store, before computing metrics)"
        )
    return y.astype(bool)


def _probs(y_prob: ArrayLike, shape: tuple[int, ...]) -> np.ndarray:
    p = np.asarray(y_prob, dtype=np.float64)
    if p.shape != shape:
        raise ValueError(f"probabilities have shape {p.shape}, labels {shape}; expected the same")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("probabilities must be finite and within [0, 1]")
    return p


def class_log_loss(y_true: ArrayLike, y_prob: ArrayLike, eps: float = EPS) -> np.ndarray:
    """Mean binary cross-entropy of each column.

    Args:
        y_true: 0/1 labels, (N, C) or (N,).
        y_prob: probabilities of the same shape, clipped to `[eps, 1 - eps]`.
        eps: the clipping margin.

    Returns:
        The losses, shape (C,) (a 0-d array for (N,) input).
    """
    y = _labels(y_true)
    p = np.clip(_probs(y_prob, y.shape), eps, 1.0 - eps)
    if y.shape[0] == 0:
        raise ValueError("no images to evaluate")
    return -np.mean(np.where(y, np.log(p), np.log1p(-p)), axis=0)


def weighted_log_loss(
    y_true: ArrayLike, y_prob: ArrayLike, weights: Sequence[float] = RSNA_WEIGHTS, eps: float = EPS
) -> float:
    """The RSNA 2019 metric: per-class mean binary log loss, then the weighted mean over classes.

    Every image carries all C labels, so this equals Kaggle's per-image form (the weighted mean over
    classes of each image, averaged over images).

    Args:
        y_true: 0/1 labels, (N, C) with C = len(weights).
        y_prob: probabilities, (N, C).
        weights: class weights (2 for `any`, 1 for each subtype by default).
        eps: probabilities are clipped to `[eps, 1 - eps]`.

    Returns:
        `sum(w_c L_c) / sum(w_c)`, where `L_c` is the mean log loss of class c.
    """
    w = np.asarray(weights, dtype=np.float64)
    y = np.asarray(y_true)
    if y.ndim != 2 or y.shape[1] != w.size:
        raise ValueError(f"labels have shape {y.shape}; expected (N, {w.size}) to match the weights")
    losses = class_log_loss(y, y_prob, eps)
    return float(np.sum(w * losses) / np.sum(w))


def roc_curve(
    y_true: ArrayLike, y_score: ArrayLike, drop_intermediate: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points of a binary problem, from (0, 0) at threshold +inf to (1, 1): `sklearn.metrics.roc_curve`.

    Point i is the rate of negatives / positives with `score >= thresholds[i]`. With
    `drop_intermediate` the points on straight segments are left out (the curve and its area are
    unchanged, and the pooled labels of a large split plot as a few thousand points).

    Returns:
        `(fpr, tpr, thresholds)`; without positives (negatives) every tpr (fpr) is NaN.
    """
    y = _labels(y_true, ndim=(1,))
    score = _probs(y_score, y.shape)
    with warnings.catch_warnings():
        # A class without positives in a held-out split is legitimate: its NaN rates say so.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        fpr, tpr, thresholds = skm.roc_curve(y, score, drop_intermediate=drop_intermediate)
    return fpr.astype(np.float64), tpr.astype(np.float64), thresholds


def roc_auc(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """Exact ROC AUC of a binary problem (ties count one half): `sklearn.metrics.roc_auc_score`.

    Returns:
        The area, or NaN without positives or without negatives.
    """
    y = _labels(y_true, ndim=(1,))
    score = _probs(y_score, y.shape)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        return math.nan
    return float(skm.roc_auc_score(y, score))


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


@dataclass(frozen=True)
class Counts:
    """A binary confusion matrix and the paper's threshold metrics derived from it (NaN when undefined)."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def accuracy(self) -> float:
        """(TP + TN) / all."""
        return _ratio(self.tp + self.tn, self.tp + self.tn + self.fp + self.fn)

    @property
    def precision(self) -> float:
        """TP / (TP + FP)."""
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def sensitivity(self) -> float:
        """TP / (TP + FN): the share of true hemorrhages that the model flags (recall)."""
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        """TN / (TN + FP): the share of slices without that hemorrhage that the model clears."""
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def f1(self) -> float:
        """2 TP / (2 TP + FP + FN); 0 rather than undefined when there are positives but none found."""
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.fp + other.fp, self.tn + other.tn, self.fn + other.fn)

    def as_dict(self) -> dict[str, float]:
        """Counts and metrics, as `summarize` reports them."""
        return {
            "accuracy": self.accuracy,
            "precision": self.precision,
            "sensitivity": self.sensitivity,
            "specificity": self.specificity,
            "f1": self.f1,
            "tp": self.tp,
            "fp": self.fp,
            "tn": self.tn,
            "fn": self.fn,
        }


def confusion_counts(y_true: ArrayLike, y_prob: ArrayLike, threshold: float = 0.5) -> Counts:
    """Confusion counts of `y_prob >= threshold` against `y_true`, pooled over all entries."""
    y = _labels(y_true)
    pred = _probs(y_prob, y.shape) >= threshold
    if y.size == 0:
        return Counts(0, 0, 0, 0)
    tn, fp, fn, tp = skm.confusion_matrix(y.ravel(), pred.ravel(), labels=[False, True]).ravel()
    return Counts(tp=int(tp), fp=int(fp), tn=int(tn), fn=int(fn))


def best_f1_threshold(y_true: ArrayLike, y_score: ArrayLike) -> tuple[float, float]:
    """The threshold maximising F1 of `score >= threshold` over the distinct scores.

    Ties go to the highest threshold (fewest positives).

    Returns:
        `(threshold, f1)`; `(nan, nan)` without positives (F1 is undefined).
    """
    y = _labels(y_true, ndim=(1,))
    score = _probs(y_score, y.shape)
    if not y.any():
        return math.nan, math.nan
    _, fps, fns, tps, thresholds = skm.confusion_matrix_at_thresholds(y, score)
    f1 = 2 * tps / (2 * tps + fps + fns)  # thresholds descend: argmax takes the highest of ties
    i = int(np.argmax(f1))
    return float(thresholds[i]), float(f1[i])


def _class_summary(
    name: str, yc: np.ndarray, pc: np.ndarray, log_loss: float, threshold: float, notes: list[str]
) -> tuple[dict[str, Any], Counts]:
    """Table II's entry of one class, and its counts at its F1-maximising threshold; appends notes."""
    n, n_pos = yc.shape[0], int(yc.sum())
    counts = confusion_counts(yc, pc, threshold)
    t_best, _ = best_f1_threshold(yc, pc)
    best: dict[str, Any]
    if math.isnan(t_best):
        best = {"threshold": math.nan, "f1": math.nan}
        best_counts = confusion_counts(yc, pc, 1.0 + 1e-9)  # predict nothing
    else:
        best_counts = confusion_counts(yc, pc, t_best)
        best = {"threshold": t_best, **best_counts.as_dict()}
    if n_pos == 0:
        notes.append(
            f"{name}: no positive images among {n}, so ROC AUC, sensitivity and the "
            "F1-maximising threshold are undefined (NaN)"
        )
    elif n_pos == n:
        notes.append(f"{name}: every image is positive, so ROC AUC and specificity are undefined (NaN)")
    if counts.tp + counts.fp == 0 and n_pos > 0:
        notes.append(f"{name}: nothing predicted positive at threshold {threshold:g}, precision undefined")
    entry = {
        "log_loss": log_loss,
        "roc_auc": roc_auc(yc, pc),
        **counts.as_dict(),
        "n_positive": n_pos,
        "prevalence": n_pos / n,
        "best_f1": best,
    }
    return entry, best_counts


def summarize(
    y_true: ArrayLike,
    y_prob: ArrayLike,
    classes: Sequence[str] | None = None,
    threshold: float = 0.5,
    weights: Sequence[float] = RSNA_WEIGHTS,
    eps: float = EPS,
) -> dict[str, Any]:
    """Everything the report shows for one model, as a JSON-ready dict (NaN where undefined).

    Args:
        y_true: 0/1 labels, (N, C).
        y_prob: probabilities, (N, C).
        classes: the column names; `ichdata.labels.CLASSES` by default.
        threshold: a label is predicted positive when its probability is at least this.
        weights: the class weights of the weighted log loss.
        eps: the log loss's clipping margin.

    Returns:
        `n_images`, `threshold`, `eps`, `weighted_log_loss`; `overall` (Table I: `log_loss` = the
        weighted log loss, micro-averaged `roc_auc` and threshold metrics with counts); `per_class`
        (Table II: per class `log_loss`, `roc_auc`, threshold metrics, `n_positive`, `prevalence` and
        `best_f1`, the F1-maximising threshold with the metrics at it); `overall_best_f1` (micro
        metrics with each class at its own best threshold); `notes` (why any value is NaN).
    """
    if classes is None:
        from ichdata.labels import CLASSES

        classes = CLASSES
    y = _labels(y_true, ndim=(2,))
    p = _probs(y_prob, y.shape)
    if y.shape[1] != len(classes):
        raise ValueError(f"labels have {y.shape[1]} columns, expected {len(classes)} ({', '.join(classes)})")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be within [0, 1], got {threshold}")
    losses = class_log_loss(y, p, eps)
    wll = weighted_log_loss(y, p, weights, eps)
    notes: list[str] = []
    per_class: dict[str, dict[str, Any]] = {}
    best_counts = Counts(0, 0, 0, 0)
    for c, name in enumerate(classes):
        per_class[name], counts = _class_summary(name, y[:, c], p[:, c], float(losses[c]), threshold, notes)
        best_counts = best_counts + counts
    overall = {
        "log_loss": wll,
        "roc_auc": roc_auc(y.ravel(), p.ravel()),
        **confusion_counts(y, p, threshold).as_dict(),
    }
    return {
        "n_images": int(y.shape[0]),
        "threshold": float(threshold),
        "eps": float(eps),
        "weighted_log_loss": wll,
        "overall": overall,
        "per_class": per_class,
        "overall_best_f1": best_counts.as_dict(),
        "notes": notes,
    }
