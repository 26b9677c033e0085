"""Fixtures of the synthetic-data tests."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest


def _read(path: Path, **kwargs: Any) -> pydicom.Dataset:
    # RSNA's `ID_` UIDs are invalid UIDs: pydicom warns when it converts them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ds = pydicom.dcmread(path, **kwargs)
        for elem in ds.iterall():
            _ = elem.value
        for elem in ds.file_meta:
            _ = elem.value
        return ds


@pytest.fixture
def read_dicom() -> Callable[..., pydicom.Dataset]:
    """`pydicom.dcmread` with every value converted, without the warnings RSNA's `ID_` UIDs raise."""
    return _read
