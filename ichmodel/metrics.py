"""Evaluation metrics: the RSNA weighted log loss and the paper's Tables I and II, in plain NumPy.

Every function takes `y_true` — 0/1 labels — and `y_prob` — predicted probabilities in [0, 1] —
as arrays of shape (N, C) with the columns in `ichdata.labels.CLASSES` order (five subtypes, then
`any`), or (N,) for the binary helpers. Unlabelled rows (`UNLABELLED` = 255 in the store) must be
dropped by the caller; a value other than 0 or 1 raises `ValueError`.

Definitions (textbook; the paper's Table II appears to swap sensitivity and specificity, we do not):

- **weighted log loss** (the RSNA 2019 competition metric): for each class c the mean binary
  cross-entropy over the N images, `L_c = -mean(y log p + (1 - y) log(1 - p))`, then the weighted
  mean over classes `sum(w_c L_c) / sum(w_c)` with weight 2 for `any` and 1 for each subtype.
  Because every image carries all six labels this equals the per-image weighted mean averaged over
  images (Kaggle's formulation). Probabilities are clipped to `[eps, 1 - eps]`, `eps = 1e-7`, so one
  confident mistake costs at most `-log(1e-7) ≈ 16.1` instead of infinity.
- A prediction is **positive** when `p >= threshold` (0.5 unless told otherwise).
- accuracy `(TP + TN) / (TP + TN + FP + FN)`; precision `TP / (TP + FP)`; sensitivity (recall)
  `TP / (TP + FN)`; specificity `TN / (TN + FP)`; F1 `2 TP / (2 TP + FP + FN)` (the harmonic mean of
  precision and sensitivity, defined as 0 rather than undefined when there are positives but none
  predicted).
- **ROC AUC**: the exact area under the ROC curve, i.e. the Mann–Whitney probability that a random
  positive scores above a random negative, ties counting one half (average ranks).
- **Overall** metrics (Table I) are micro-averaged: the N×C label/prediction pairs pooled into one
  binary problem (counts summed over classes; one ROC curve over all pairs, like scikit-learn's
  `average="micro"`). **Per class** metrics (Table II) use one column each.
- A metric whose denominator is zero (AUC or sensitivity of a class without positives, precision
  with nothing predicted positive, …) is NaN, and `summarize` adds a note that says why: a held-out
  split of a rare class (epidural is 0.4 % of RSNA) can legitimately have no positives.

The **F1-maximising threshold** of a class is searched over its distinct predicted probabilities.
Chosen on the same data it is reported on, it is optimistic: use it to pick an operating point on a
validation split, not as a test-set figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

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
#: Probabilities are clipped to [EPS, 1 - EPS] before taking logs.
EPS = 1e-7


def _labels(y_true: Any, ndim: tuple[int, ...] = (1, 2)) -> np.ndarray:
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


def _probs(y_prob: Any, shape: tuple[int, ...]) -> np.ndarray:
    p = np.asarray(y_prob, dtype=np.float64)
    if p.shape != shape:
        raise ValueError(f"probabilities have shape {p.shape}, labels {shape}; expected the same")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("probabilities must be finite and within [0, 1]")
    return p


def class_log_loss(y_true: Any, y_prob: Any, eps: float = EPS) -> np.ndarray:
    """Mean binary cross-entropy of each column, shape (C,) (or a 0-d array for (N,) input)."""
    y = _labels(y_true)
    p = np.clip(_probs(y_prob, y.shape), eps, 1.0 - eps)
    if y.shape[0] == 0:
        raise ValueError("no images to evaluate")
    return -np.mean(np.where(y, np.log(p), np.log1p(-p)), axis=0)


def weighted_log_loss(
    y_true: Any, y_prob: Any, weights: Sequence[float] = RSNA_WEIGHTS, eps: float = EPS
) -> float:
    """The RSNA 2019 metric: per-class mean binary log loss, then the weighted mean over classes.

    `y_true`, `y_prob`: (N, C) with C = len(weights) (the six RSNA classes, `any` last, by default).
    """
    w = np.asarray(weights, dtype=np.float64)
    y = np.asarray(y_true)
    if y.ndim != 2 or y.shape[1] != w.size:
        raise ValueError(f"labels have shape {y.shape}; expected (N, {w.size}) to match the weights")
    losses = class_log_loss(y, y_prob, eps)
    return float(np.sum(w * losses) / np.sum(w))


def _sorted_cumulative(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thresholds (distinct scores, descending) and the TP / FP counts of `score >= threshold`."""
    order = np.argsort(-score, kind="stable")
    s, t = score[order], y[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(t, dtype=np.int64)[last_of_run]
    fps = (last_of_run + 1) - tps
    return s[last_of_run], tps, fps


def roc_curve(
    y_true: Any, y_score: Any, drop_intermediate: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points `(fpr, tpr, thresholds)` of a binary problem, from (0, 0) at threshold +inf to (1, 1).

    Point i is the rate of negatives / positives with `score >= thresholds[i]`. With
    `drop_intermediate` the points on straight segments are left out (the curve and its area are
    unchanged; 4.5 M pooled RSNA labels plot as a few thousand points). A class with no positives
    (or no negatives) has an undefined tpr (fpr): those entries are NaN.
    """
    y = _labels(y_true, ndim=(1,))
    score = _probs(y_score, y.shape)
    thresholds, tps, fps = _sorted_cumulative(y, score)
    if drop_intermediate and tps.size > 2:
        # scikit-learn's rule, so the points match its roc_curve: keep where the slope changes
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        tps, fps, thresholds = tps[keep], fps[keep], thresholds[keep]
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    thresholds = np.r_[np.inf, thresholds]
    n_pos, n_neg = tps[-1], fps[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tps / n_pos if n_pos else np.full(tps.shape, np.nan)
        fpr = fps / n_neg if n_neg else np.full(fps.shape, np.nan)
    return fpr.astype(np.float64), tpr.astype(np.float64), thresholds


def roc_auc(y_true: Any, y_score: Any) -> float:
    """Exact ROC AUC of a binary problem (ties count one half); NaN without positives or negatives."""
    y = _labels(y_true, ndim=(1,))
    score = _probs(y_score, y.shape)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    # Average rank (1-based) of each distinct score: the mid-point of the ranks its ties occupy.
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = float(np.sum(average_rank[inverse][y]))
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


@dataclass(frozen=True)
class Counts:
    """A binary confusion matrix and the paper's threshold metrics derived from it."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def accuracy(self) -> float:
        return _ratio(self.tp + self.tn, self.tp + self.tn + self.fp + self.fn)

    @property
    def precision(self) -> float:
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


def confusion_counts(y_true: Any, y_prob: Any, threshold: float = 0.5) -> Counts:
    """Confusion counts of `y_prob >= threshold` against `y_true`, pooled over all entries."""
    y = _labels(y_true)
    pred = _probs(y_prob, y.shape) >= threshold
    tp = int(np.count_nonzero(pred & y))
    fp = int(np.count_nonzero(pred & ~y))
    fn = int(np.count_nonzero(~pred & y))
    return Counts(tp=tp, fp=fp, tn=int(y.size) - tp - fp - fn, fn=fn)


def best_f1_threshold(y_true: Any, y_score: Any) -> tuple[float, float]:
    """`(threshold, f1)` maximising F1 of `score >= threshold` over the distinct scores.

    Ties go to the highest threshold (fewest positives). Without positives F1 is undefined and
    `(nan, nan)` is returned.
    """
    y = _labels(y_true, ndim=(1,))
    score = _probs(y_score, y.shape)
    n_pos = int(y.sum())
    if n_pos == 0:
        return math.nan, math.nan
    thresholds, tps, fps = _sorted_cumulative(y, score)
    f1 = 2 * tps / (2 * tps + fps + (n_pos - tps))
    i = int(np.argmax(f1))
    return float(thresholds[i]), float(f1[i])


def summarize(
    y_true: Any,
    y_prob: Any,
    classes: Sequence[str] | None = None,
    threshold: float = 0.5,
    weights: Sequence[float] = RSNA_WEIGHTS,
    eps: float = EPS,
) -> dict[str, Any]:
    """Everything the report shows for one model, as a JSON-ready dict (NaN where undefined).

    Keys: `n_images`, `threshold`, `eps`, `weighted_log_loss`; `overall` (Table I: `log_loss`
    = the weighted log loss, micro-averaged `roc_auc` and threshold metrics with counts);
    `per_class` (Table II: per class `log_loss`, `roc_auc`, threshold metrics, `n_positive`,
    `prevalence`, and `best_f1` = the F1-maximising threshold with the metrics at it);
    `overall_best_f1` (micro metrics with each class at its own best threshold); `notes` (why any
    value is NaN). `classes` defaults to `ichdata.labels.CLASSES`.
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
        yc, pc = y[:, c], p[:, c]
        n_pos = int(yc.sum())
        counts = confusion_counts(yc, pc, threshold)
        t_best, _ = best_f1_threshold(yc, pc)
        if math.isnan(t_best):
            best = {"threshold": math.nan, "f1": math.nan}
            best_counts = best_counts + confusion_counts(yc, pc, 1.0 + 1e-9)  # predict nothing
        else:
            bc = confusion_counts(yc, pc, t_best)
            best_counts = best_counts + bc
            best = {"threshold": t_best, **bc.as_dict()}
        per_class[name] = {
            "log_loss": float(losses[c]),
            "roc_auc": roc_auc(yc, pc),
            **counts.as_dict(),
            "n_positive": n_pos,
            "prevalence": n_pos / y.shape[0],
            "best_f1": best,
        }
        if n_pos == 0:
            notes.append(
                f"{name}: no positive images among {y.shape[0]}, so ROC AUC, sensitivity and the "
                "F1-maximising threshold are undefined (NaN)"
            )
        elif n_pos == y.shape[0]:
            notes.append(f"{name}: every image is positive, so ROC AUC and specificity are undefined (NaN)")
        if counts.tp + counts.fp == 0 and n_pos > 0:
            notes.append(
                f"{name}: nothing predicted positive at threshold {threshold:g}, precision undefined"
            )

    overall_counts = confusion_counts(y, p, threshold)
    overall = {
        "log_loss": wll,
        "roc_auc": roc_auc(y.ravel(), p.ravel()),
        **overall_counts.as_dict(),
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
