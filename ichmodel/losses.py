"""The RSNA weighted log loss in torch: the training loss and the validation metric.

Weights are `ichmodel.metrics.RSNA_WEIGHTS` (2 for `any`, 1 per subtype). Entries that do not count
are masked out of numerator and denominator alike: padding slices (`mask` False), unlabelled
slices (label 255) and filler windows (`weight` 0, see `ichmodel.data.StudyBatchSampler`). Both
functions return sums rather than means so that callers can normalise over a whole accumulation
group, or reduce over DDP ranks, before dividing: the mean over all counted entries is then exactly
the loss of one big batch. With every slice labelled, `val_loss_sums` divided out equals
`ichmodel.metrics.weighted_log_loss` on the same probabilities (same clipping to [1e-7, 1 - 1e-7]);
the training loss works on logits (`binary_cross_entropy_with_logits`, numerically stable, unclipped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ichdata.store import UNLABELLED
from ichmodel.metrics import EPS, RSNA_WEIGHTS


def entry_weights(labels: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B, T, C) float32 weight of each label entry: class weight × labelled × real slice × real window."""
    class_w = torch.tensor(RSNA_WEIGHTS, dtype=torch.float32, device=labels.device)
    counted = (labels != UNLABELLED) & mask[..., None]
    return counted.float() * class_w * weight.to(torch.float32)[:, None, None]


def weighted_bce_sums(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ w·BCE, Σ w) over a batch: logits (B, T, C), labels uint8 (B, T, C), mask (B, T), weight (B,)."""
    w = entry_weights(labels, mask, weight)
    target = (labels == 1).to(torch.float32)
    bce = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    return (bce * w).sum(), w.sum()


def val_loss_sums(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class (Σ BCE, count) in float64, probabilities clipped like `metrics.weighted_log_loss`.

    Returns two (C,) tensors; the RSNA metric is `Σ_c w_c sum_c / Σ_c w_c count_c`.
    """
    counted = ((labels != UNLABELLED) & mask[..., None] & (weight[:, None, None] > 0)).to(torch.float64)
    p = torch.sigmoid(logits.double()).clamp(EPS, 1 - EPS)
    y = (labels == 1).to(torch.float64)
    bce = -(y * torch.log(p) + (1 - y) * torch.log1p(-p))
    return (bce * counted).sum(dim=(0, 1)), counted.sum(dim=(0, 1))


def rsna_from_sums(loss_sum: torch.Tensor, count: torch.Tensor) -> float:
    """The weighted log loss from per-class sums (NaN when nothing was counted)."""
    w = torch.tensor(RSNA_WEIGHTS, dtype=torch.float64, device=loss_sum.device)
    den = float((w * count).sum())
    return float((w * loss_sum).sum()) / den if den > 0 else float("nan")


__all__ = ["entry_weights", "rsna_from_sums", "val_loss_sums", "weighted_bce_sums"]
