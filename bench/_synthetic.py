"""A synthetic store for the benchmarks: head-CT-like windowed slices, written with the store's own writer.

Slices are rendered by `ichdata.windows.window_hu` from a simple HU phantom (air, a noisy skull
ring, noisy brain), so they compress with zstd about like real CT windows (~3×) and decode at a
realistic cost. `distinct` slices are rendered and reused in random order to keep set-up short.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ichdata.store import Store, write_store_from_arrays
from ichdata.windows import window_hu


def phantom_slices(n: int, size: int = 256, seed: int = 0) -> np.ndarray:
    """`n` distinct uint8 (3, size, size) slices of a head-like phantom."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    out = np.empty((n, 3, size, size), np.uint8)
    for i in range(n):
        a, b = 0.72 + 0.08 * np.sin(i / 7), 0.86 + 0.04 * np.cos(i / 5)
        r = (xx / a) ** 2 + (yy / b) ** 2
        hu = np.full((size, size), -1000.0, np.float32)
        skull, brain = r < 1.0, r < 0.84
        hu[skull] = 900 + rng.normal(0, 120, skull.sum())
        hu[brain] = 32 + rng.normal(0, 7, brain.sum())
        if i % 3 == 0:  # a bleed now and then
            cx, cy = rng.uniform(-0.3, 0.3, 2)
            hu[((xx - cx) ** 2 + (yy - cy) ** 2 < 0.01) & brain] = 70
        out[i] = window_hu(hu, size)
    return out


def synthetic_store(
    path: str | os.PathLike[str],
    n_studies: int,
    *,
    min_len: int = 24,
    max_len: int = 48,
    size: int = 256,
    distinct: int = 200,
    seed: int = 0,
    shard_size: int = 128,
) -> Store:
    """A complete store of `n_studies` single-series studies (one patient each) of min_len..max_len slices."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, n_studies)
    n = int(lengths.sum())
    base = phantom_slices(min(distinct, n), size, seed)
    images = base[rng.integers(0, len(base), n)]
    labels = (rng.random((n, 6)) < 0.1).astype(np.uint8)
    labels[:, 5] = labels[:, :5].max(axis=1)
    offsets = np.r_[0, np.cumsum(lengths)]
    series = pd.DataFrame(
        {
            "study_uid": [f"2.25.{i}" for i in range(n_studies)],
            "series_uid": [f"2.25.{i}.1" for i in range(n_studies)],
            "patient_key": [f"ID_bench{i:05d}" for i in range(n_studies)],
        }
    )
    ids = [f"ID_{i:09x}" for i in range(n)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_store_from_arrays(path, images, labels, ids, offsets, series, shard_size=shard_size)


def random_cnn_run(
    run_dir: str | os.PathLike[str], store: Store, backbone: str, val_fraction: float = 0.2
) -> Path:
    """A run directory holding a randomly initialised `xception` CNN as `best.pt`, and a patient split.

    For benchmarks whose speed does not depend on the weights (extraction, the sequence stage): the
    split is the one `ich train --val-fraction` would make, as if the CNN had trained on it.
    """
    import torch

    from ichmodel.checkpoint import save_checkpoint
    from ichmodel.data import split_by_patient, write_split
    from ichmodel.models import create_model

    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = create_model("xception", backbone=backbone, num_classes=len(store.classes))
    tree = {
        "model": {"name": "xception", "backbone": backbone, "num_classes": len(store.classes)},
        "state_dict": model.state_dict(),
        "classes": list(store.classes),
        "image_size": store.image_size,
        "config": {"val_fraction": val_fraction, "seed": 0},
    }
    save_checkpoint(tree, run / "best.pt")
    write_split(run / "split.json", split_by_patient(store.series, val_fraction, 0), store.series)
    return run / "best.pt"
