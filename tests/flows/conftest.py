"""Fixtures of the Prefect tests: a private PREFECT_HOME and one test API server.

The in-process Dask cluster, `dask_scheduler`, is the suite's (`tests/conftest.py`); `operator_scheduler`
names it as the operator's scheduler of the flow's runs.
Nothing here writes to ~/.prefect: PREFECT_HOME points into pytest's temporary folder for this process
and for every subprocess the tests start, and Prefect's anonymous telemetry is off (these machines have
no network; the server would log a failure to send it). Test modules import prefect and `flows.ingest`
inside their tests, after the session fixture below has set that up.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """PREFECT_HOME in a temporary folder, for this process (settings) and subprocesses (environment)."""
    home = tmp_path_factory.mktemp("prefect-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("PREFECT_HOME", str(home))
    mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    mp.delenv("PREFECT_API_URL", raising=False)
    mp.delenv("PREFECT_PROFILES_PATH", raising=False)
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )

    with temporary_settings(
        updates={PREFECT_HOME: str(home), PREFECT_SERVER_ANALYTICS_ENABLED: False},
        restore_defaults={PREFECT_API_URL},
    ):
        yield home
    mp.undo()


@pytest.fixture(scope="session")
def prefect_api(prefect_home: Path) -> Iterator[None]:
    """Prefect's test harness: a temporary API server with its own SQLite database, for the session.

    Starting it takes seconds, so it is shared.
    """
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def no_retry_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flow's tasks retry I/O errors after 5 and 30 s; tests retry at once."""
    import flows.ingest as ingest_module

    for name in ("scan_task", "plan_task", "convert_task", "finalize_task", "verify_task"):
        monkeypatch.setattr(
            ingest_module, name, getattr(ingest_module, name).with_options(retry_delay_seconds=0)
        )


@pytest.fixture
def operator_scheduler(dask_scheduler: str) -> Iterator[str]:
    """The suite's in-process cluster as the scheduler the operator chose for the flow's runs.

    Named in the dask config (`ich.scheduler`), as `ich serve --scheduler` names it for its runs; plain
    tcp, so the test says insecure explicitly (the runs reach an existing scheduler over TLS otherwise).
    """
    import dask

    with dask.config.set({"ich.scheduler": dask_scheduler, "ich.insecure-scheduler": True}):
        yield dask_scheduler
