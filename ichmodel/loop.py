"""The epoch loop: one training epoch and one validation pass, on one rank.

The loss is the RSNA weighted log loss (`ichmodel.losses`), normalised over the whole optimizer step
(all micro-batches of an accumulation group, all ranks), so `P` ranks × `B` × `accum` trains like one
batch of `P·B·accum` windows. Augmentation runs on the device (`ichmodel.augment`), bf16 autocast on
GPU. A batch holds images, or the cached features of `ich features` (`inputs` says which the network
reads).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ichmodel.augment import AugmentConfig, augment, to_float
from ichmodel.losses import entry_weights, rsna_from_sums, val_loss_sums, weighted_bce_sums
from ichmodel.models import SequenceClassifier, SliceClassifier, real_index
from ichmodel.runtime import Dist, all_reduce

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from tqdm import tqdm

#: A collated batch of `ichmodel.data.collate_studies` (images, labels, mask, weight, series, ...), or
#: of `ichmodel.data.FeatureStudies` (features instead of images).
Batch = dict[str, Any]
#: A study window a rank trained on: (series, first row, end row) within the series.
Window = tuple[int, int, int]


def autocast(device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA, nothing on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: Batch, device: torch.device) -> Batch:
    """A copy of `batch` whose tensors the model reads are on `device` (the rest stay on the CPU)."""
    out = dict(batch)
    for k in ("images", "features", "labels", "mask", "weight"):
        if k in batch:
            out[k] = batch[k].to(device, non_blocking=True)
    return out


def inputs(batch: Batch) -> torch.Tensor:
    """What the network reads from a batch on the device, without augmentation.

    Cached features (B, T, D) as float (the sequence stage on `ichmodel.data.FeatureStudies`), else
    the images as float in [0, 1].
    """
    if "features" in batch:
        return batch["features"].float()
    return to_float(batch["images"])


def prepare_images(
    batch: Batch, mask: torch.Tensor, aug: AugmentConfig | None, gen: torch.Generator
) -> torch.Tensor:
    """uint8 (B, T, 3, S, S) on the device -> float (B, T, 3, S, S); only real slices are augmented.

    `mask` is the loader's CPU copy, so that picking the real slices needs no GPU synchronisation.
    """
    images = batch["images"]
    if aug is None:
        return to_float(images)
    b, t = mask.shape
    idx = real_index(mask, images.device)
    group = torch.div(idx, t, rounding_mode="floor")
    valid = augment(images.flatten(0, 1).index_select(0, idx), group, aug, gen, n_groups=b)
    x = valid.new_zeros((b * t, *valid.shape[1:]))
    return x.index_copy_(0, idx, valid).view(b, t, *valid.shape[1:])


def _groups(it: Iterator[Batch], n: int, wait: list[float]) -> Iterator[list[Batch]]:
    """Group consecutive batches by `n` (the accumulation group), timing the waits on the loader."""
    group: list[Batch] = []
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        wait[0] += time.perf_counter() - t0
        group.append(batch)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group


@dataclass
class Training:
    """What the epoch loop works on; `step` counts optimizer steps taken."""

    model: SliceClassifier | SequenceClassifier  # the plain module (what checkpoints hold)
    net: nn.Module  # what runs forward: the model (its head alone on cached features), or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # the augmentation's random stream
    augment: AugmentConfig | None
    device: torch.device
    dist: Dist
    accum: int
    freeze_backbone: bool
    step: int = 0


@dataclass(frozen=True)
class EpochStats:
    """One training epoch on this rank (the loss and slice count are over all ranks)."""

    train_loss: float
    train_slices: int
    wait_s: float
    seen: tuple[Window, ...]


def _seen_windows(batch: Batch) -> Iterator[Window]:
    real = batch["weight"] > 0  # filler windows (weight 0) are not trained on
    for sv, st, ln, r in zip(batch["series"], batch["start"], batch["lengths"], real, strict=True):
        if r:
            yield int(sv), int(st), int(st + ln)


def _accumulate(t: Training, group: list[Batch], sums: torch.Tensor, seen: list[Window]) -> int:
    """Forward and backward over one accumulation group; adds (loss, weight) to `sums`; returns slices."""
    d = t.dist
    # normalise by the weight of the whole optimizer step, over micro-batches and ranks
    total = torch.zeros((), dtype=torch.float32)
    for batch in group:
        total += entry_weights(batch["labels"], batch["mask"], batch["weight"]).sum()
    total = all_reduce(total.to(t.device), d).clamp_min(1e-12)
    n_slices = 0
    for k, batch in enumerate(group):
        b = to_device(batch, t.device)
        sync = k == len(group) - 1 or d.world == 1
        no_sync = getattr(t.net, "no_sync", None)
        with contextlib.nullcontext() if sync or no_sync is None else no_sync():
            x = inputs(b) if "features" in b else prepare_images(b, batch["mask"], t.augment, t.generator)
            with autocast(t.device):
                logits = t.net(x, batch["mask"])
            s, w = weighted_bce_sums(logits, b["labels"], b["mask"], b["weight"])
            (s / total * d.world).backward()
        sums[0] += s.detach().double()
        sums[1] += w.detach().double()
        n_slices += int(batch["lengths"].sum())
        seen.extend(_seen_windows(batch))
    return n_slices


def train_epoch(t: Training, loader: Iterable[Batch], bar: tqdm[Any] | None) -> EpochStats:
    """One pass over `loader` (the sampler's epoch must be set), an optimizer step per group."""
    t.net.train()
    if t.freeze_backbone:
        t.model.encoder.eval()  # batch-norm statistics stay the initial backbone's
    wait = [0.0]
    sums = torch.zeros(2, dtype=torch.float64, device=t.device)
    seen: list[Window] = []
    n_slices = 0
    for group in _groups(iter(loader), t.accum, wait):
        n_slices += _accumulate(t, group, sums, seen)
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
        t.scheduler.step()
        t.step += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    all_reduce(sums, t.dist)
    counted = all_reduce(torch.tensor(float(n_slices), dtype=torch.float64, device=t.device), t.dist)
    return EpochStats(
        train_loss=float(sums[0] / sums[1].clamp_min(1e-12)),
        train_slices=int(counted.item()),
        wait_s=wait[0],
        seen=tuple(seen),
    )


@torch.no_grad()
def validate(
    net: nn.Module, loader: Iterable[Batch], device: torch.device, d: Dist
) -> tuple[float, list[float]]:
    """The RSNA weighted log loss over all ranks' validation windows, and the per-class losses."""
    net.eval()
    n_classes = 6
    sums = torch.zeros(n_classes, dtype=torch.float64, device=device)
    counts = torch.zeros(n_classes, dtype=torch.float64, device=device)
    for batch in loader:
        b = to_device(batch, device)
        with autocast(device):
            logits = net(inputs(b), batch["mask"])
        s, c = val_loss_sums(logits, b["labels"], b["mask"], b["weight"])
        sums += s
        counts += c
    all_reduce(sums, d)
    all_reduce(counts, d)
    per_class = (sums / counts.clamp_min(1)).tolist()
    per_class = [v if c > 0 else float("nan") for v, c in zip(per_class, counts.tolist(), strict=True)]
    return rsna_from_sums(sums, counts), per_class


__all__ = [
    "Batch",
    "EpochStats",
    "Training",
    "Window",
    "autocast",
    "inputs",
    "prepare_images",
    "to_device",
    "train_epoch",
    "validate",
]
