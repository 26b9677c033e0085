"""The suite's own configuration holds up in the process the suite really runs in.

The flow and Dask tests leave Prefect's worker threads and distributed's IO loop running in this
process, and they call the global `random` on their own schedule. Hypothesis treats a change of
that state while it draws an example as a deprecated use of `random`, which `filterwarnings=error`
turns into a flaky failure of whichever property test happens to be drawing (CI failed that way
once). This test recreates the situation deterministically: it fails unless pyproject.toml
ignores that specific warning.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator

import hypothesis.extra.numpy as hnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.fixture
def busy_random_thread() -> Iterator[None]:
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            random.random()

    thread = threading.Thread(target=spin, name="foreign-random-user", daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join()


def test_property_tests_survive_a_foreign_thread_using_random(busy_random_thread: None) -> None:
    @settings(max_examples=200, deadline=None, database=None)
    @given(image=hnp.arrays("float64", st.tuples(st.integers(1, 24), st.integers(1, 24))))
    def draws(image: object) -> None:
        assert image is not None

    draws()
