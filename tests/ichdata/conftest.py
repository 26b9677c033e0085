"""Fixtures of the `ichdata` tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest


@pytest.fixture(scope="session")
def convert_inputs(helper_loader: Callable[[Path], ModuleType]) -> ModuleType:
    """`convert_inputs.py` (DICOM inputs and a reference renderer for the conversion tests), loaded by path."""
    return helper_loader(Path(__file__).with_name("convert_inputs.py"))


def _assert_same_content(got: Path, want: Path) -> None:
    """The stores at `got` and `want` hold the same slices, ids, order, positions and series."""
    from ichdata.store import open_store

    a, b = open_store(got), open_store(want)
    pairs = {
        "images": (a.images[: a.n_slices], b.images[: b.n_slices]),
        "image_id": (a.image_id, b.image_id),
        "study_offsets": (a.study_offsets, b.study_offsets),
        "slice_position": (a.slice_position, b.slice_position),
        "study_uid": (a.series["study_uid"], b.series["study_uid"]),
        "series_uid": (a.series["series_uid"], b.series["series_uid"]),
    }
    for name, (x, y) in pairs.items():
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


@pytest.fixture(scope="session")
def assert_same_content() -> Callable[[Path, Path], None]:
    """`assert_same_content(got, want)`: two stores hold the same content (e.g. pulled vs from files)."""
    return _assert_same_content
