"""Shared fixtures of the ichmodel tests: a tiny store written with `write_store_from_arrays`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ichdata.store import UNLABELLED, Store, write_store_from_arrays

#: slices per series of the default tiny store (patients own two series each: p0 = s0 + s1, ...)
LENGTHS: tuple[int, ...] = (5, 9, 3, 12, 7, 4, 6, 8)


def make_store(
    path: Path,
    lengths: Sequence[int] = LENGTHS,
    *,
    size: int = 64,
    seed: int = 0,
    unlabelled_series: Sequence[int] = (),
    shard_size: int = 8,
) -> Store:
    """Random uint8 slices with random labels; `any` = max of the subtypes; series i of patient i // 2."""
    rng = np.random.default_rng(seed)
    n = int(sum(lengths))
    images = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    sub = (rng.random((n, 5)) < 0.3).astype(np.uint8)
    labels = np.concatenate([sub, sub.max(axis=1, keepdims=True)], axis=1)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    for s in unlabelled_series:
        labels[offsets[s] : offsets[s + 1]] = UNLABELLED
    series = pd.DataFrame(
        {
            "study_uid": [f"1.2.3.{i}" for i in range(len(lengths))],
            "series_uid": [f"1.2.3.{i}.1" for i in range(len(lengths))],
            "patient_key": [f"ID_p{i // 2}" for i in range(len(lengths))],
        }
    )
    ids = [f"ID_{i:09x}" for i in range(n)]
    return write_store_from_arrays(path, images, labels, ids, offsets, series, shard_size=shard_size)


@pytest.fixture
def store_factory(tmp_path: Path) -> Callable[..., Store]:
    """`store_factory(name="s.zarr", **make_store kwargs)` -> a new tiny store under tmp_path."""

    def factory(name: str = "store.zarr", **kwargs: object) -> Store:
        return make_store(tmp_path / name, **kwargs)  # type: ignore[arg-type]

    return factory


@pytest.fixture
def tiny_store(store_factory: Callable[..., Store]) -> Store:
    return store_factory()


@pytest.fixture(scope="module")
def module_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """The default tiny store, shared by the tests of one module that only read it."""
    return make_store(tmp_path_factory.mktemp("store") / "store.zarr")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained xception_gru checkpoint on timm's `test_efficientnet` (seeded): small and CPU-fast."""
    import torch

    from ichmodel.checkpoint import save_checkpoint
    from ichmodel.models import create_model

    torch.manual_seed(0)
    kwargs = {"name": "xception_gru", "backbone": "test_efficientnet", "rnn_hidden": 16, "rnn_layers": 1}
    model = create_model("xception_gru", backbone="test_efficientnet", rnn_hidden=16, rnn_layers=1)
    path = tmp_path_factory.mktemp("checkpoint") / "best.pt"
    classes = ["epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"]
    save_checkpoint(
        {
            "model": kwargs,
            "state_dict": model.state_dict(),
            "classes": classes,
            "max_len": 3,
            "epoch": 1,
            "val_loss": 0.6,
        },
        path,
    )
    return path
