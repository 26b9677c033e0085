"""Training input: whole studies from the store vs one PNG per slice, both through a 2-worker DataLoader.

    .venv/bin/python bench/loader.py [--studies 60] [--repeat 3] [--store STORE]
    .venv/bin/python bench/loader.py --first-pass [--studies 200] [--repeat 3]

The same slices (bytes-identical: the PNGs are written from the store's own uint8 arrays with
`cv2.imwrite` and checked after `cv2.imread`) are delivered as torch uint8 tensors by:

- png: a per-slice Dataset that `cv2.imread`s one PNG file per slice (the folder-of-PNGs setup
  most RSNA solutions trained from), `DataLoader(batch_size=32, shuffle=True, num_workers=2)`;
- store: `ichmodel.data.StudyDataset` (whole study windows of up to 64 slices, one contiguous read
  each) through `make_loader(workers=2)`, reader `auto` (the store's shards decoded straight from
  their files, each slice's CRC-32C checked once per process), batches of 4 windows, as `ich train`
  reads for the sequence models;
- store-tensorstore: the same with tensorstore as the reader (each slice's CRC-32C checked on every
  read; the default for stores of earlier releases, without those checksums);
- slices: `SliceDataset` (one slice per item, the CNN-only model's input), reader `auto`, batch 32.

Slices/s are counted from the second batch on (worker start-up excluded), over whole epochs; the
variants alternate `--repeat` times and the median is reported, with the png/store ratio of every
round so the noise of a shared machine shows. Round 1 of the store variants includes each worker's
one-time checks of what it reads (`ichmodel.reader`); later rounds are the steady state.
Files are read from the page cache in both cases (written just before); a cold cache favours the
store further (contiguous reads inside a few large shard files against one file open per slice).

`--first-pass` measures what checking the store costs the first epoch: the same synthetic slices
written twice, with per-slice CRC-32C (this release) and without (the store format of earlier
releases, whose shards the reader checks whole the first time a worker reads them); per round, a
fresh `make_loader(StudyDataset)` with 2 workers reads four epochs, each measured from every
worker's first batch on (a worker's start-up, tensorstore's import included, is not the check's
cost): the CPU time of all processes per slice (what the reading costs), and slices/s (which on a
shared machine also depends on the share of the cores each reader's threads get). The first epoch is
compared with epochs 3-4 (in epoch 2 a worker still meets shards it has not read: the earlier
format's checks are not over). Then the CPU time of epoch 1 and epoch 2 in one process, per reader
backend and format.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cv2
import numpy as np
import torch
from _synthetic import synthetic_store
from torch.utils.data import DataLoader, Dataset

from ichdata.store import Store, open_store
from ichmodel.data import SliceDataset, StudyBatchSampler, StudyDataset, make_loader
from ichmodel.reader import ImageReader


class PngSlices(Dataset):
    """One PNG per slice, read with cv2.imread -> uint8 (3, S, S) tensor."""

    def __init__(self, files: list[str]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = cv2.imread(self.files[i], cv2.IMREAD_COLOR)
        if img is None:
            raise OSError(f"{self.files[i]}: cv2 cannot read it")
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def write_pngs(store: Store, series: np.ndarray, out: Path) -> list[str]:
    """The slices of `series` as `<image_id>.png`, same pixels (cv2 keeps the channel order both ways)."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for s in series.tolist():
        a, _ = store.series_rows(s)
        for k, img in enumerate(store.read_series(s)):
            path = out / f"{store.image_id[a + k]}.png"
            cv2.imwrite(str(path), np.ascontiguousarray(img.transpose(1, 2, 0)))
            files.append(str(path))
    return files


def _count(batch: Any) -> int:
    return int(batch["lengths"].sum()) if isinstance(batch, dict) else int(batch.shape[0])


def epoch_rate(loader: Any, sampler: StudyBatchSampler | None, epoch: int) -> float:
    """Slices/s over one epoch, from the second batch on."""
    if sampler is not None:
        sampler.set_epoch(epoch)
    it = iter(loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    for batch in it:
        n += _count(batch)
    return n / (time.perf_counter() - t0)


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process and its children so far (DataLoader workers alive)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in (me, *me.children(recursive=True)):
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def epoch_cost(loader: Any, sampler: StudyBatchSampler, epoch: int, skip: int) -> tuple[float, float]:
    """(slices/s, CPU µs per slice of every process) over one epoch, from batch `skip` on.

    The CPU time is what the reading costs whatever else runs on the machine; the wall time on a
    shared machine also depends on the share of the cores a process's threads get.
    """
    sampler.set_epoch(epoch)
    it = iter(loader)
    for _ in range(skip):
        next(it)
    n, t0, c0 = 0, time.perf_counter(), _cpu_s()
    for batch in it:
        n += _count(batch)
    return n / (time.perf_counter() - t0), (_cpu_s() - c0) / n * 1e6


def check_cost(store: Store, dataset: StudyDataset) -> dict[str, tuple[float, float]]:
    """CPU time of reading every window in one process, epoch 1 against epoch 2, per backend.

    Epoch 1 checks each shard of a store of the earlier format whole, once; epoch 2 does not. The
    backend's own start-up (tensorstore's import and thread pools) is paid before the timing, by a
    reader of its own. Returns (epoch 1, epoch 2) CPU seconds per backend.
    """
    offsets = store.study_offsets
    ranges = [(int(offsets[s]) + a, int(offsets[s]) + b) for s, a, b in dataset.windows.tolist()]
    order = np.random.default_rng(0).permutation(len(ranges))
    out: dict[str, tuple[float, float]] = {}
    for backend in ("zarr", "tensorstore"):
        ImageReader(store.path, backend, store.n_slices).read(0, 1)
        reader = ImageReader(store.path, backend, store.n_slices)
        times = []
        for _ in range(2):
            t0 = time.process_time()
            for i in order:
                reader.read(*ranges[i])
            times.append(time.process_time() - t0)
        out[backend] = (times[0], times[1])
        print(
            f"{backend} reader, one process: epoch 1 {times[0] / times[1]:.2f}× "
            f"the CPU time of epoch 2 ({dataset.n_slices / times[1]:.0f} slices/CPU-s)"
        )
    return out


def _earlier_release_store(path: Path, studies: int, shard_size: int) -> Store:
    """`synthetic_store` with the codecs of the releases before per-slice checksums (zstd alone)."""
    from unittest import mock

    from zarr.codecs import ZstdCodec

    with mock.patch("ichdata.store.compressors", lambda level=1: [ZstdCodec(level=level)]):
        return synthetic_store(path, studies, shard_size=shard_size)


def first_pass(root: Path, studies: int, repeat: int, workers: int) -> None:
    """The first epoch's cost against the later ones', per store format (see the module docstring)."""
    stores = {
        "per-slice CRC-32C (this release)": synthetic_store(root / "new.zarr", studies, shard_size=64),
        "earlier format (shards checked whole)": _earlier_release_store(root / "old.zarr", studies, 64),
    }
    n = stores["per-slice CRC-32C (this release)"].n_slices
    print(f"{n} slices in {studies} studies, shards of 64; {workers} workers; load {os.getloadavg()[0]:.1f}")
    runs: dict[str, list[tuple[float, float, float, float]]] = {k: [] for k in stores}
    for r in range(repeat):
        for name, store in stores.items():
            ds = StudyDataset(store.path)
            sampler = StudyBatchSampler(len(ds), 4, seed=r)
            loader = make_loader(ds, sampler, workers=workers)
            (rate1, cpu1), _, *later = (epoch_cost(loader, sampler, e, max(1, workers)) for e in range(4))
            rate = statistics.fmean(x for x, _ in later)
            cpu = statistics.fmean(c for _, c in later)
            runs[name].append((rate1, rate, cpu1, cpu))
            print(
                f"round {r + 1}, {name}: epoch 1 {rate1:.0f} slices/s, {cpu1:.0f} CPU µs/slice; epochs 3-4 "
                f"{rate:.0f} slices/s, {cpu:.0f} CPU µs/slice; load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            del loader
    print()
    print(
        "| store format (2 workers, reader `auto`) | epoch 1 CPU µs/slice | epochs 3-4 CPU µs/slice "
        "| epoch 1 ÷ later (CPU) | epoch 1 slices/s | epochs 3-4 slices/s | epoch 1 ÷ later (wall) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, rows in runs.items():
        r1, r2, c1, c2 = (statistics.median(x[k] for x in rows) for k in range(4))
        cpu_ratio = statistics.median(x[2] / x[3] for x in rows)
        wall_ratio = statistics.median(x[1] / x[0] for x in rows)
        print(
            f"| {name} | {c1:.0f} | {c2:.0f} | {cpu_ratio:.2f}× | {r1:.0f} | {r2:.0f} | {wall_ratio:.2f}× |"
        )
    # Last: it runs tensorstore in this process, after which nothing here may fork a worker.
    cpu: dict[str, dict[str, tuple[float, float]]] = {}
    for name, store in stores.items():
        print(f"{name}:")
        cpu[name] = check_cost(store, StudyDataset(store.path))
    print()
    print("| store format, one process | reader | epoch 1 µs/slice | epoch 2 µs/slice | epoch 1 ÷ epoch 2 |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, by_backend in cpu.items():
        for backend, (t1, t2) in by_backend.items():
            print(f"| {name} | {backend} | {t1 / n * 1e6:.0f} | {t2 / n * 1e6:.0f} | {t1 / t2:.2f}× |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=None, help="measure this store instead of a synthetic one")
    p.add_argument("--studies", type=int, default=None, help="synthetic studies (24-48 slices each)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-slices", type=int, default=3000, help="use at most this many slices of --store")
    p.add_argument("--first-pass", action="store_true", help="the first epoch's cost against a later one's")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory(prefix="ich-loader-bench-")
    root = Path(tmp.name)
    if args.first_pass:
        first_pass(root, args.studies or 200, args.repeat, args.workers)
        tmp.cleanup()
        return 0
    args.studies = args.studies or 60
    if args.store is None:
        store = synthetic_store(root / "bench.zarr", args.studies)
    else:
        store = open_store(args.store)
    offsets = store.study_offsets
    n_series = min(store.n_series, max(1, int(np.searchsorted(offsets, args.max_slices, side="right")) - 1))
    series = np.arange(n_series)
    n_slices = int(offsets[n_series])
    files = write_pngs(store, series, root / "png")
    png_bytes = sum(os.path.getsize(f) for f in files)
    # same pixels: a few PNGs read back equal the store's slices
    for k in (0, len(files) // 2, len(files) - 1):
        back = PngSlices(files)[k].numpy()
        s = int(np.searchsorted(offsets, k, side="right")) - 1
        assert np.array_equal(back, store.read_series(s, k - int(offsets[s]), k - int(offsets[s]) + 1)[0])

    w = args.workers
    png = DataLoader(PngSlices(files), batch_size=32, shuffle=True, num_workers=w, persistent_workers=True)
    studies = StudyDataset(store.path, series)
    study_sampler = StudyBatchSampler(len(studies), 4, seed=0)
    ts_ds = StudyDataset(store.path, series, reader="tensorstore")
    ts_sampler = StudyBatchSampler(len(ts_ds), 4, seed=0)
    slices = SliceDataset(store.path, series)
    slice_sampler = StudyBatchSampler(len(slices), 32, seed=0)
    variants: dict[str, tuple[Any, StudyBatchSampler | None]] = {
        "png": (png, None),
        "store": (make_loader(studies, study_sampler, workers=w), study_sampler),
        "store-tensorstore": (make_loader(ts_ds, ts_sampler, workers=w), ts_sampler),
        "slices": (make_loader(slices, slice_sampler, workers=w), slice_sampler),
    }
    print(
        f"{n_slices} slices in {len(series)} studies; PNG {png_bytes / n_slices / 1e3:.0f} kB/slice; "
        f"{w} workers; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.repeat):
        for name, (loader, sampler) in variants.items():
            rates[name].append(epoch_rate(loader, sampler, r))
        print(
            f"round {r + 1}: "
            + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items())
            + f" slices/s; store/png {rates['store'][-1] / rates['png'][-1]:.2f}×",
            flush=True,
        )
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratios = [s / q for s, q in zip(rates["store"], rates["png"], strict=True)]
    print()
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print("| loader (2 workers) | slices/s (median) | vs PNG |")
    print("| --- | ---: | ---: |")
    labels = {
        "png": "one PNG per slice, cv2.imread, batch 32",
        "store": "store, whole studies, default reader (`auto`)",
        "store-tensorstore": "store, whole studies, tensorstore",
        "slices": "store, single slices (CNN-only), default reader",
    }
    for name in variants:
        print(f"| {labels[name]} | {med[name]:.0f} | {med[name] / med['png']:.2f}× |")
    print(f"store/png per round: {', '.join(f'{x:.2f}×' for x in ratios)}")
    # Last: it runs tensorstore in this process, after which nothing here may fork a worker.
    check_cost(store, studies)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
