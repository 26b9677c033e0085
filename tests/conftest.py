"""Suite-wide settings and fixtures: `gpu` tests skip cleanly on machines without CUDA (CI has none).

One in-process Dask cluster for the tests that need a cluster but not worker processes; `full_disk`,
a disk that fills up when a given file is written.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

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


def load_helper(path: Path) -> ModuleType:
    """A helper module of the tests (`tests/slurm.py`, `tests/ichdata/convert_inputs.py`), loaded by path.

    The suite runs with `--import-mode=importlib`, which puts no test folder on `sys.path`.
    """
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"ich_tests_{path.stem}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def helper_loader() -> Callable[[Path], ModuleType]:
    """`load_helper`, for the conftest files of subfolders (which cannot import this one)."""
    return load_helper


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
    helpers: Any = load_helper(Path(__file__).with_name("slurm.py"))
    reason = helpers.slurm_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with helpers.single_node_slurm() as running:
        yield running


_LOCK_HOLDER = """
import sys, time
from pathlib import Path
from ichdata.lock import store_lock

store, command, ready, release = sys.argv[1:5]
with store_lock(store, command=command):
    Path(ready).write_text("held")
    while not Path(release).exists():  # paused here, holding the lock, until the test says
        time.sleep(0.01)
"""


class LockHolder:
    """Another process that holds a store's lock (`ichdata.lock`) until `release()` or `kill()`."""

    def __init__(self, store: Path, command: str, folder: Path) -> None:
        import subprocess
        import sys
        import time
        import uuid

        tag = uuid.uuid4().hex[:8]
        self.ready, self.release_file = folder / f"held-{tag}", folder / f"release-{tag}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _LOCK_HOLDER,
                str(store),
                command,
                str(self.ready),
                str(self.release_file),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"the lock holder did not take the lock: {self.proc.communicate()[1]}")
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def release(self) -> None:
        """Let it leave its `store_lock` block normally, and wait for it."""
        self.release_file.touch()
        self.proc.communicate(timeout=60)

    def kill(self) -> None:
        """SIGKILL: it leaves its lock file behind. Not reaped (a zombie) until `reap()`."""
        import os
        import signal

        os.kill(self.proc.pid, signal.SIGKILL)

    def reap(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            self.proc.communicate(timeout=60)


@pytest.fixture
def lock_holder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., LockHolder]]:
    """Start a process that takes the lock of a store and waits, paused, holding it.

    `lock_holder(store, command="test holder")` returns once the other process holds the lock.
    """
    folder = tmp_path_factory.mktemp("lock-holders")
    started: list[LockHolder] = []

    def start(store: Path, command: str = "test holder") -> LockHolder:
        holder = LockHolder(Path(store), command, folder)
        started.append(holder)
        return holder

    yield start
    for holder in started:
        holder.reap()


class _FileOnAFullDisk:
    """A file that was created but whose first write fails as on a full disk (ENOSPC, no file name)."""

    def __init__(self, file: io.IOBase) -> None:
        self._file = file

    def write(self, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self) -> _FileOnAFullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def __getattr__(self, name: str) -> object:
        return getattr(self._file, name)


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """`full_disk(name)`: from then on, writing a file called `name` fails as on a full disk.

    Also its temporary twin (`.name.<pid>.<thread>.tmp`, `ichdata.atomic`): the file is created and
    the first write raises OSError(ENOSPC), whoever opens it (pathlib, pandas, matplotlib, PIL).
    """
    real_open = io.open
    names: set[str] = set()

    def full(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        f = real_open(file, mode, *args, **kwargs)  # type: ignore[call-overload]
        if isinstance(file, str | os.PathLike) and any(c in mode for c in "wax+"):
            base = os.path.basename(os.fspath(file))
            if base in names or any(base.startswith(f".{n}.") and base.endswith(".tmp") for n in names):
                return _FileOnAFullDisk(f)
        return f

    def fill_at(name: str) -> None:
        names.add(name)
        monkeypatch.setattr(builtins, "open", full)
        monkeypatch.setattr(io, "open", full)

    return fill_at


@pytest.fixture
def earlier_release_codecs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stores written while the test runs get the codecs of ich before per-chunk checksums.

    zstd alone on every array (no `crc32c`): what a store of the current release holds on disk, for
    the tests that such stores still open, train and verify, and that a re-run adds the checksums.
    """
    from zarr.codecs import ZstdCodec

    import ichdata.store

    monkeypatch.setattr(ichdata.store, "compressors", lambda level=1: [ZstdCodec(level=level)])


@pytest.fixture(scope="session")
def orthanc() -> Iterator[object]:
    """A real Orthanc with DICOMweb in a network namespace of its own (`tests/orthanc.py`), or a skip.

    One per session, emptied by the tests that need it empty (`Orthanc.clear`).
    """
    helpers: Any = load_helper(Path(__file__).with_name("orthanc.py"))
    reason = helpers.orthanc_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with helpers.running_orthanc() as running:
        yield running


class Stranger:
    """A TCP listener on loopback that accepts and counts connections: a stranger's "Dask scheduler".

    A test points a command or a run at it and checks `accepted` stayed 0: nothing was sent its way.
    """

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.accepted = 0
        self.stopped = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.stopped = True
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def stranger() -> Iterator[Stranger]:
    """A `Stranger` listening for the test's length."""
    listener = Stranger()
    try:
        yield listener
    finally:
        listener.close()
