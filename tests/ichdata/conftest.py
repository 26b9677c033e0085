"""Fixtures of the `ichdata` tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest


@pytest.fixture(scope="session")
def convert_inputs() -> ModuleType:
    """`convert_inputs.py` (DICOM inputs and a reference renderer for the conversion tests), loaded by path.

    The suite runs with `--import-mode=importlib`, which puts no test folder on `sys.path`.
    """
    path = Path(__file__).with_name("convert_inputs.py")
    spec = importlib.util.spec_from_file_location("ichdata_tests_convert_inputs", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
