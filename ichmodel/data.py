"""Stream a store into torch: study windows (or single slices) as uint8 tensors, split by patient.

`StudyDataset` yields one store series, or a contiguous window of it, per item (one contiguous read
of `images`); `SliceDataset` one slice. `collate_studies` pads windows into a `StudyBatch`;
`StudyBatchSampler` orders windows per `(seed, epoch)` and splits them across DDP ranks without
overlap; `make_loader` puts them together. `split_by_patient`, `write_split` and `read_split` make
and reapply the validation split by `series.patient_key` (slices of one patient are near-duplicates).
Images are read, and each shard checked against its recorded checksum, by `ichmodel.reader`.
The store's layout is `ichdata.store`'s contract.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from ichdata.atomic import write_text_atomic
from ichdata.errors import UserError
from ichdata.store import UNLABELLED, Store, open_store
from ichmodel.models import study_windows
from ichmodel.reader import ImageReader, resolve_reader

DEFAULT_MAX_LEN = 64


class StudyItem(TypedDict):
    """One study window as `StudyDataset` returns it (T slices of one series, in slice order)."""

    images: torch.Tensor  # uint8 (T, 3, S, S)
    labels: torch.Tensor  # uint8 (T, C), 255 = unlabelled
    mask: torch.Tensor  # bool (T,), all True
    image_id: list[str]  # T image ids
    series: int  # store series index
    start: int  # first slice of the window within its series
    weight: float  # 1.0; 0.0 for a filler window (see `StudyBatchSampler`)


class StudyBatch(TypedDict):
    """B study windows padded to the longest, T, as `collate_studies` returns them.

    Real slices come first in every row, as the models expect; padding is zeros with label 255.
    """

    images: torch.Tensor  # uint8 (B, T, 3, S, S)
    labels: torch.Tensor  # uint8 (B, T, C)
    mask: torch.Tensor  # bool (B, T): True on real slices
    lengths: torch.Tensor  # int64 (B,): real slices per row
    image_id: list[list[str]]  # per row, its real slices' ids
    series: torch.Tensor  # int64 (B,)
    start: torch.Tensor  # int64 (B,)
    weight: torch.Tensor  # float32 (B,)


def _as_store(store: Store | str | os.PathLike[str]) -> Store:
    return store if isinstance(store, Store) else open_store(store)


class StudyDataset(Dataset[StudyItem]):
    """Study windows of the store series `series` (all by default), one contiguous read each.

    A series longer than `max_len` is cut into near-equal windows (`ichmodel.models.study_windows`);
    `max_len=None` keeps every series whole. Map-style, so `DataLoader(ds, batch_size=None,
    shuffle=True, num_workers=2)` works as is: every window once per epoch, in random order, whatever
    the number of workers. An index may be `(window, weight)`, as `StudyBatchSampler` yields.

    Args:
        store: an opened store or its path.
        series: store series indices.
        max_len: the longest window, in slices.
        reader: the backend of `images`, see `resolve_reader`.
    """

    def __init__(
        self,
        store: Store | str | os.PathLike[str],
        series: Sequence[int] | np.ndarray | None = None,
        *,
        max_len: int | None = DEFAULT_MAX_LEN,
        reader: str = "auto",
    ) -> None:
        st = _as_store(store)
        if max_len is not None and max_len < 1:
            raise UserError(f"max_len {max_len}: must be at least 1")
        self.store_path = Path(st.path)
        self.max_len = max_len
        self.image_size = st.image_size
        self.classes = st.classes
        idx = np.arange(st.n_series) if series is None else np.asarray(series, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= st.n_series):
            raise IndexError(f"series index out of range: the store has {st.n_series} series")
        self.series = idx
        offsets = st.study_offsets
        rows: list[tuple[int, int, int]] = []
        for s in idx.tolist():
            n = int(offsets[s + 1] - offsets[s])
            rows.extend((s, a, b) for a, b in study_windows(n, max_len) if b > a)
        #: (n_windows, 3) int64: series, first and last+1 slice within the series
        self.windows = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
        self._offsets = offsets
        self._labels = st.labels
        self._image_id = st.image_id
        self._reader = ImageReader(self.store_path, resolve_reader(reader), st.n_slices)

    @property
    def reader(self) -> str:
        """The resolved reading backend (see `resolve_reader`)."""
        return self._reader.backend

    @property
    def n_slices(self) -> int:
        """Slices over all windows."""
        return int((self.windows[:, 2] - self.windows[:, 1]).sum())

    def window_lengths(self) -> np.ndarray:
        """Slices per window, (n_windows,)."""
        return self.windows[:, 2] - self.windows[:, 1]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int | tuple[int, float]) -> StudyItem:
        i, weight = index if isinstance(index, tuple) else (index, 1.0)
        s, a, b = (int(v) for v in self.windows[i])
        row = int(self._offsets[s])
        images = self._reader.read(row + a, row + b)
        return {
            "images": torch.from_numpy(np.ascontiguousarray(images)),
            "labels": torch.from_numpy(self._labels[row + a : row + b].copy()),
            "mask": torch.ones(b - a, dtype=torch.bool),
            "image_id": self._image_id[row + a : row + b].tolist(),
            "series": s,
            "start": a,
            "weight": float(weight),
        }


class SliceDataset(StudyDataset):
    """Single slices of the series `series`, for the CNN-only model: a `StudyDataset` with T = 1."""

    def __init__(
        self,
        store: Store | str | os.PathLike[str],
        series: Sequence[int] | np.ndarray | None = None,
        *,
        reader: str = "auto",
    ) -> None:
        super().__init__(store, series, max_len=1, reader=reader)


def _batch_tensor(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised tensor for the batch; in a DataLoader worker, directly in shared memory.

    This is what torch's `default_collate` does: the batch then crosses to the main process without
    the extra copy that moving an ordinary tensor into shared memory costs.
    """
    if get_worker_info() is None:
        return like.new_empty(shape)
    numel = math.prod(shape)
    storage = like._typed_storage()._new_shared(numel, device=like.device)
    return like.new(storage).resize_(shape)


def collate_studies(items: Sequence[StudyItem]) -> StudyBatch:
    """Pad windows to the longest: images with zeros, labels with 255, and add `mask` and `lengths`."""
    if not items:
        raise ValueError("empty batch")
    lengths = [int(it["images"].shape[0]) for it in items]
    t = max(lengths)
    first = items[0]["images"]
    images = _batch_tensor(first, (len(items), t, *first.shape[1:]))
    labels = torch.full((len(items), t, items[0]["labels"].shape[1]), UNLABELLED, dtype=torch.uint8)
    mask = torch.zeros(len(items), t, dtype=torch.bool)
    for k, (it, n) in enumerate(zip(items, lengths, strict=True)):
        images[k, :n] = it["images"]
        images[k, n:] = 0
        labels[k, :n] = it["labels"]
        mask[k, :n] = True
    return {
        "images": images,
        "labels": labels,
        "mask": mask,
        "lengths": torch.tensor(lengths, dtype=torch.int64),
        "image_id": [it["image_id"] for it in items],
        "series": torch.tensor([it["series"] for it in items], dtype=torch.int64),
        "start": torch.tensor([it["start"] for it in items], dtype=torch.int64),
        "weight": torch.tensor([it["weight"] for it in items], dtype=torch.float32),
    }


class StudyBatchSampler(Sampler[list[tuple[int, float]]]):
    """Batches of `(window index, weight)` for one DDP rank.

    The order is a function of `(seed, epoch)` only (call `set_epoch` before each epoch), so a
    resumed run replays it. Every rank gets the same number of batches (DDP needs equal step counts):
    the ranks that come up one window short get a filler window with weight 0, which the loss
    ignores. Across all ranks every window is seen with weight 1 exactly once per epoch.
    """

    def __init__(
        self,
        n_windows: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"batch size {batch_size}: must be at least 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.n_windows = n_windows
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields."""
        self.epoch = epoch

    @property
    def per_rank(self) -> int:
        """Windows per rank and epoch, fillers included."""
        return -(-self.n_windows // self.world_size)

    def __len__(self) -> int:
        return -(-self.per_rank // self.batch_size)

    def rank_indices(self) -> list[tuple[int, float]]:
        """This rank's (window, weight) list for the current epoch, fillers (weight 0) last."""
        if self.n_windows == 0:
            return []
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)
        else:
            order = np.arange(self.n_windows)
        mine = order[self.rank :: self.world_size].tolist()
        items = [(i, 1.0) for i in mine]
        filler = mine[0] if mine else int(order[0])
        items += [(filler, 0.0)] * (self.per_rank - len(mine))
        return items

    def __iter__(self) -> Iterator[list[tuple[int, float]]]:
        items = self.rank_indices()
        for a in range(0, len(items), self.batch_size):
            yield items[a : a + self.batch_size]


class _StudyLoader(DataLoader[StudyItem]):
    """A DataLoader whose workers' `UserError`s reach the caller as the one line they were raised with.

    torch re-raises a worker's exception in the main process with the worker's whole traceback in
    its message; a `UserError` (a damaged shard) must stay one line for the CLI.
    """

    def __iter__(self) -> Iterator[StudyBatch]:  # type: ignore[override]
        try:
            yield from super().__iter__()
        except UserError as exc:
            text = str(exc)
            if "\nOriginal Traceback" not in text:
                raise
            # the worker's traceback ends with "<module>.<ExceptionClass>: <the original message>"
            raise UserError(text.rstrip().rsplit("\n", 1)[-1].partition(": ")[2]) from exc


def _keep_freed_memory(worker_id: int) -> None:
    """In a DataLoader worker: keep freed blocks of a few MB in the heap instead of returning them.

    A worker allocates a study window (up to ~12 MB) per item and frees it once the batch is
    collated; glibc serves blocks that large with `mmap` and unmaps them on `free`, so each window's
    pages were faulted in and zeroed again, which cost a worker about a tenth of its CPU time
    (`bench/loader.py --first-pass`). A worker only reads, so it can keep them (glibc's `mallopt`;
    elsewhere nothing changes).
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    mallopt(m_mmap_threshold, 32 << 20)  # above a window of 64 slices of 3×256×256 (12.6 MB)
    mallopt(m_trim_threshold, 64 << 20)


def make_loader(
    dataset: StudyDataset,
    batch_sampler: StudyBatchSampler,
    *,
    workers: int = 2,
    pin_memory: bool = False,
    prefetch: int = 4,
) -> DataLoader[StudyItem]:
    """A DataLoader of `StudyBatch`es, with persistent workers.

    With `reader="auto"` the main process never runs tensorstore, so workers are forked (fast to
    start, no pickling of the label arrays); with `reader="tensorstore"` they start from a
    `forkserver`. A damaged shard stops the iteration with a one-line `UserError`. Workers keep the
    memory of the windows they free for the next ones (`_keep_freed_memory`).
    """
    kwargs: dict[str, object] = {}
    if workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=prefetch, worker_init_fn=_keep_freed_memory)
        if dataset.reader == "tensorstore":  # this process may run tensorstore: never fork it
            kwargs["multiprocessing_context"] = "forkserver"
    return _StudyLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate_studies,
        num_workers=workers,
        pin_memory=pin_memory,
        **kwargs,  # type: ignore[arg-type]
    )


# --- cached features: the sequence stage of two-stage training ------------------------------------


class FeatureStudies:
    """Study windows of cached per-slice features, batched from memory (`ich train --features`).

    The features (N, D) and labels (N, C) of every store row sit on `device` (the GPU when there is
    one) and a batch is gathered there from the rows of its windows: no DataLoader, no image read.
    The windows are `StudyDataset`'s (each series cut at `max_len`), so the split, the sampler and the
    loss apply unchanged. `batch(..., epoch=e)` applies the 1st place's sequence augmentation when
    asked: `crop` makes each window a random run of that many consecutive slices of it, `reverse`
    reverses its slice order with probability 1/2; the draws are a function of (seed, epoch, window),
    so a resumed run draws what an uninterrupted one did.
    """

    def __init__(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        study_offsets: np.ndarray,
        series: Sequence[int] | np.ndarray,
        *,
        max_len: int | None = DEFAULT_MAX_LEN,
        crop: int | None = None,
        reverse: bool = False,
        seed: int = 0,
    ) -> None:
        self.features = features
        self.labels = labels
        self.offsets = np.asarray(study_offsets, dtype=np.int64)
        rows: list[tuple[int, int, int]] = []
        for s in np.asarray(series, dtype=np.int64).tolist():
            n = int(self.offsets[s + 1] - self.offsets[s])
            rows.extend((s, a, b) for a, b in study_windows(n, max_len) if b > a)
        #: (n_windows, 3) int64: series, first and last+1 slice within the series
        self.windows = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
        self.crop = crop
        self.reverse = reverse
        self.seed = seed
        self._draws: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.windows)

    def _uniform(self, epoch: int) -> np.ndarray:
        """(n_windows, 2) uniform draws of `epoch`: the crop's start and the reversal of each window."""
        if self._draws is None or self._draws[0] != epoch:
            self._draws = (epoch, np.random.default_rng([self.seed, epoch, 1]).random((len(self.windows), 2)))
        return self._draws[1]

    def batch(self, items: Sequence[tuple[int, float]], epoch: int | None = None) -> dict[str, Any]:
        """The windows `items` ((window, weight) pairs) as a batch; augmented when `epoch` is given.

        `features` (B, T, D) and `labels` (B, T, C) on the features' device, zeros and 255 on padding;
        `mask` (B, T) on the CPU; `lengths`, `series`, `start` (first slice within its series) and
        `weight` as `collate_studies` gives them.
        """
        u = self._uniform(epoch) if epoch is not None and (self.crop or self.reverse) else None
        parts: list[np.ndarray] = []
        series, starts = [], []
        for w, _ in items:
            s, a, b = (int(v) for v in self.windows[w])
            if u is not None and self.crop and b - a > self.crop:
                a += int(u[w, 0] * (b - a - self.crop + 1))
                b = a + self.crop
            r = np.arange(self.offsets[s] + a, self.offsets[s] + b)
            if u is not None and self.reverse and u[w, 1] < 0.5:
                r = r[::-1]
            parts.append(r)
            series.append(s)
            starts.append(a)
        lengths = [len(r) for r in parts]
        t = max(lengths)
        idx = np.zeros((len(parts), t), dtype=np.int64)
        mask = np.zeros((len(parts), t), dtype=bool)
        for k, r in enumerate(parts):
            idx[k, : len(r)] = r
            mask[k, : len(r)] = True
        device = self.features.device
        where = torch.from_numpy(idx).to(device, non_blocking=True)
        on_device = torch.from_numpy(mask).to(device, non_blocking=True)
        labels = self.labels[where]
        labels[~on_device] = UNLABELLED
        return {
            "features": self.features[where] * on_device[..., None],
            "labels": labels,
            "mask": torch.from_numpy(mask),
            "lengths": torch.tensor(lengths, dtype=torch.int64),
            "series": torch.tensor(series, dtype=torch.int64),
            "start": torch.tensor(starts, dtype=torch.int64),
            "weight": torch.tensor([float(wt) for _, wt in items], dtype=torch.float32),
        }


class FeatureLoader:
    """`FeatureStudies` batches in a `StudyBatchSampler`'s order: what a DataLoader of windows yields.

    `augment` applies the dataset's crop and reversal, drawn for the sampler's current epoch.
    """

    def __init__(self, dataset: FeatureStudies, sampler: StudyBatchSampler, *, augment: bool) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.augment = augment

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.sampler.epoch if self.augment else None
        for items in self.sampler:
            yield self.dataset.batch(items, epoch)


# --- the split by patient --------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """Which store series train and which validate, and the patients behind them.

    A fold run (`split_folds`) also holds `test_patients` out altogether: neither trained nor
    validated on, they are the patients no fold model has seen.
    """

    train_series: np.ndarray
    val_series: np.ndarray
    val_patients: tuple[str, ...]
    seed: int | None = None
    val_fraction: float | None = None
    test_patients: tuple[str, ...] = ()
    fold: int | None = None
    folds: int | None = None


def split_by_patient(series: pd.DataFrame, val_fraction: float = 0.1, seed: int = 0) -> Split:
    """Hold out whole patients (`series.patient_key`) until about `val_fraction` of the slices.

    Patients are drawn in a random order from `seed`; at least one patient is held out and at least
    one left for training whenever there are two or more.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"validation fraction {val_fraction}: expected a number in [0, 1)")
    per_patient = series.groupby("patient_key", sort=True)["n_slices"].sum()
    patients = per_patient.index.to_numpy()
    order = np.random.default_rng(seed).permutation(len(patients))
    target = val_fraction * float(per_patient.sum())
    chosen: list[str] = []
    total = 0.0
    if val_fraction > 0 and len(patients) >= 2:
        for k in order:
            if total >= target or len(chosen) == len(patients) - 1:
                break
            chosen.append(str(patients[k]))
            total += float(per_patient.iloc[k])
    return _split_from_patients(series, chosen, seed=seed, val_fraction=val_fraction)


def split_folds(
    series: pd.DataFrame, folds: int, fold: int, val_fraction: float = 0.1, seed: int = 0
) -> Split:
    """Fold `fold` of `folds` patient-grouped folds, for out-of-fold features (`ich train --folds K --fold i`).

    The patients `split_by_patient(series, val_fraction, seed)` would hold out are test patients of
    every fold run: no fold model trains or validates on them, and a sequence model trained on the
    out-of-fold features with the same `seed` and `val_fraction` validates on them. The other
    patients are dealt into `folds` folds of about equal slices (largest patient first, each to the
    fold with the fewest slices so far; ties in an order drawn from `seed`): fold `fold` validates
    this run, the rest train it. The K runs with the same arguments hold out disjoint folds.
    """
    if folds < 2:
        raise UserError(f"--folds {folds}: expected at least 2")
    if not 0 <= fold < folds:
        raise UserError(f"--fold {fold}: expected 0 to {folds - 1} (one of the {folds} folds)")
    test = split_by_patient(series, val_fraction, seed).val_patients
    per_patient = series.groupby("patient_key", sort=True)["n_slices"].sum()
    per_patient = per_patient[~per_patient.index.isin(set(test))]
    if len(per_patient) < folds:
        raise UserError(
            f"--folds {folds}: only {len(per_patient)} patients are left for the folds "
            f"after {len(test)} test patients are held out"
        )
    tie = np.random.default_rng([seed, folds]).permutation(len(per_patient))
    order = sorted(range(len(per_patient)), key=lambda k: (-int(per_patient.iloc[k]), int(tie[k])))
    totals = [0] * folds
    mine: list[str] = []
    for k in order:
        f = min(range(folds), key=lambda j: (totals[j], j))
        totals[f] += int(per_patient.iloc[k])
        if f == fold:
            mine.append(str(per_patient.index[k]))
    return _split_from_patients(
        series, mine, seed=seed, val_fraction=val_fraction, test_patients=test, fold=fold, folds=folds
    )


def _split_from_patients(
    series: pd.DataFrame,
    val_patients: Sequence[str],
    *,
    seed: int | None,
    val_fraction: float | None,
    test_patients: Sequence[str] = (),
    fold: int | None = None,
    folds: int | None = None,
) -> Split:
    is_val = series["patient_key"].isin(set(val_patients)).to_numpy()
    is_test = series["patient_key"].isin(set(test_patients)).to_numpy()
    return Split(
        train_series=np.flatnonzero(~is_val & ~is_test).astype(np.int64),
        val_series=np.flatnonzero(is_val).astype(np.int64),
        val_patients=tuple(sorted(val_patients)),
        seed=seed,
        val_fraction=val_fraction,
        test_patients=tuple(sorted(test_patients)),
        fold=fold,
        folds=folds,
    )


def write_split(path: str | os.PathLike[str], split: Split, series: pd.DataFrame) -> Path:
    """Write the split as JSON: held-out patient keys (what defines it) and the series UIDs of each side.

    A fold run's file also names its fold (`fold`, `folds`) and the test patients no fold run sees.
    """
    out = Path(path)
    doc: dict[str, object] = {
        "by": "patient_key",
        "seed": split.seed,
        "val_fraction": split.val_fraction,
        "val_patients": list(split.val_patients),
        "train_series": series["series_uid"].to_numpy()[split.train_series].tolist(),
        "val_series": series["series_uid"].to_numpy()[split.val_series].tolist(),
    }
    if split.folds is not None:
        doc.update(fold=split.fold, folds=split.folds, test_patients=list(split.test_patients))
    write_text_atomic(out, json.dumps(doc, indent=1) + "\n")
    return out


def split_document(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON of a split file `ich train` wrote, checked for the keys every split has.

    Raises:
        UserError: no such file, or not a split file.
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
        doc["val_patients"] = [str(k) for k in doc["val_patients"]]
        doc["test_patients"] = [str(k) for k in doc.get("test_patients", [])]
    except FileNotFoundError as exc:
        raise UserError(f"split file {p}: no such file") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"split file {p}: not a split written by `ich train` ({exc})") from exc
    return dict(doc)


def read_split(path: str | os.PathLike[str], series: pd.DataFrame) -> Split:
    """Re-apply a split file to a store's series: a series validates iff its patient is held out.

    Series added to the store since the split was written follow their patient, so a split stays
    patient-disjoint on a grown store; a series the file lists that the store lacks is an error.
    """
    p = Path(path)
    doc = split_document(p)
    known = set(series["series_uid"].tolist())
    missing = [u for u in doc.get("train_series", []) + doc.get("val_series", []) if u not in known]
    if missing:
        raise UserError(
            f"split file {p}: {len(missing)} series are not in the store (e.g. {missing[0]}); "
            "expected a split made for this store or an earlier state of it"
        )
    return _split_from_patients(
        series,
        doc["val_patients"],
        seed=doc.get("seed"),
        val_fraction=doc.get("val_fraction"),
        test_patients=doc["test_patients"],
        fold=doc.get("fold"),
        folds=doc.get("folds"),
    )


def _rows(store: Store, series: np.ndarray) -> np.ndarray:
    """Store rows of `series`, in order."""
    offsets = store.study_offsets
    parts = [np.arange(offsets[s], offsets[s + 1]) for s in series.tolist()]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def check_trainable(store: Store, split: Split) -> list[str]:
    """Refuse a split that cannot train, before any work; name the classes training cannot learn.

    A slice is labelled when any of its labels is not 255 (the loss counts those entries). An empty
    validation split (no patient held out) is a choice and passes.

    Returns:
        Warning lines, one per problem that does not stop training: the classes without a positive
        slice among the labelled training slices.

    Raises:
        UserError: the training split, or a non-empty validation split, has no labelled slice.
    """
    train = store.labels[_rows(store, split.train_series)]
    train = train[(train != UNLABELLED).any(axis=1)]
    hint = "convert it with a label CSV (`ich convert SOURCE STORE --labels CSV`)"
    if not len(train):
        raise UserError(
            f"{store.path}: the training split has no labelled slice (every label is 255); {hint} to train"
        )
    if len(split.val_series):
        val = store.labels[_rows(store, split.val_series)]
        if not (val != UNLABELLED).any():
            raise UserError(
                f"{store.path}: the validation split has no labelled slice (every label of its "
                f"{len(split.val_patients)} held-out patient(s) is 255), so the validation loss is "
                f"undefined; hold out labelled patients or {hint}"
            )
    missing = [name for c, name in enumerate(store.classes) if not (train[:, c] == 1).any()]
    if not missing:
        return []
    return [
        f"warning: no positive slice of {', '.join(missing)} among the {len(train)} labelled training slices: "
        "the model cannot learn to detect them"
    ]


__all__ = [
    "DEFAULT_MAX_LEN",
    "FeatureLoader",
    "FeatureStudies",
    "SliceDataset",
    "Split",
    "StudyBatch",
    "StudyBatchSampler",
    "StudyDataset",
    "StudyItem",
    "check_trainable",
    "collate_studies",
    "make_loader",
    "read_split",
    "split_by_patient",
    "split_document",
    "split_folds",
    "write_split",
]
