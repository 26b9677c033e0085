"""Suite-wide settings and fixtures: `gpu` tests skip cleanly on machines without CUDA (CI has none).

One in-process Dask cluster for the tests that need a cluster but not worker processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ModuleNotFoundError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items or _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def dask_scheduler() -> Iterator[str]:
    """The address of an in-process Dask cluster (tcp on 127.0.0.1, one worker of two threads).

    Shared by the session: passed to the flows as `scheduler=` (a LocalCluster of processes per flow
    run would cost seconds each) and to `ichdata`'s tests that need tasks on a cluster; worker threads
    see the tests' monkeypatches of `ichdata.shards`.
    """
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=False,
        protocol="tcp",
        host="127.0.0.1",
        # No dashboard, and the scheduler's plain HTTP endpoint on a free loopback port: its default,
        # 8787, may be taken by another cluster, which distributed reports with a UserWarning.
        dashboard_address=None,
        scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
    ) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="session")
def slurm() -> Iterator[object]:
    """A single-node SLURM for the session (`tests/slurm.py`, loaded by path), or a skip saying why not.

    `SLURM_CONF` points the client commands at it while the session runs.
    """
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("ich_tests_slurm", Path(__file__).with_name("slurm.py"))
    assert spec is not None
    assert spec.loader is not None
    helpers = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = helpers  # dataclasses look their module up there
    spec.loader.exec_module(helpers)
    reason = helpers.slurm_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with helpers.single_node_slurm() as running:
        yield running


def _load_helpers(name: str) -> object:
    """A helper module of the tests (`tests/NAME.py`), loaded by path like `slurm.py`."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(f"ich_tests_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def orthanc() -> Iterator[object]:
    """A real Orthanc with DICOMweb in a network namespace of its own (`tests/orthanc.py`), or a skip.

    One per session, emptied by the tests that need it empty (`Orthanc.clear`).
    """
    helpers = _load_helpers("orthanc")
    reason = helpers.orthanc_unavailable()  # type: ignore[attr-defined]
    if reason is not None:
        pytest.skip(reason)
    with helpers.running_orthanc() as running:  # type: ignore[attr-defined]
        yield running
