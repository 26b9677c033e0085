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
from typing import TypedDict

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


# --- the split by patient --------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """Which store series train and which validate, and the patients behind them."""

    train_series: np.ndarray
    val_series: np.ndarray
    val_patients: tuple[str, ...]
    seed: int | None = None
    val_fraction: float | None = None


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


def _split_from_patients(
    series: pd.DataFrame, val_patients: Sequence[str], *, seed: int | None, val_fraction: float | None
) -> Split:
    is_val = series["patient_key"].isin(set(val_patients)).to_numpy()
    return Split(
        train_series=np.flatnonzero(~is_val).astype(np.int64),
        val_series=np.flatnonzero(is_val).astype(np.int64),
        val_patients=tuple(sorted(val_patients)),
        seed=seed,
        val_fraction=val_fraction,
    )


def write_split(path: str | os.PathLike[str], split: Split, series: pd.DataFrame) -> Path:
    """Write the split as JSON: held-out patient keys (what defines it) and the series UIDs of each side."""
    out = Path(path)
    doc = {
        "by": "patient_key",
        "seed": split.seed,
        "val_fraction": split.val_fraction,
        "val_patients": list(split.val_patients),
        "train_series": series["series_uid"].to_numpy()[split.train_series].tolist(),
        "val_series": series["series_uid"].to_numpy()[split.val_series].tolist(),
    }
    write_text_atomic(out, json.dumps(doc, indent=1) + "\n")
    return out


def read_split(path: str | os.PathLike[str], series: pd.DataFrame) -> Split:
    """Re-apply a split file to a store's series: a series validates iff its patient is held out.

    Series added to the store since the split was written follow their patient, so a split stays
    patient-disjoint on a grown store; a series the file lists that the store lacks is an error.
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
        val_patients = [str(k) for k in doc["val_patients"]]
    except FileNotFoundError as exc:
        raise UserError(f"split file {p}: no such file") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"split file {p}: not a split written by `ich train` ({exc})") from exc
    known = set(series["series_uid"].tolist())
    missing = [u for u in doc.get("train_series", []) + doc.get("val_series", []) if u not in known]
    if missing:
        raise UserError(
            f"split file {p}: {len(missing)} series are not in the store (e.g. {missing[0]}); "
            "expected a split made for this store or an earlier state of it"
        )
    return _split_from_patients(
        series, val_patients, seed=doc.get("seed"), val_fraction=doc.get("val_fraction")
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
    "write_split",
]
