"""What a user does, end to end: a Prefect server on 127.0.0.1, `ich serve`, `prefect deployment run`.

Then the same deployment from `prefect.yaml` through a process work pool. Every process a test starts
gets its own process group and is stopped at the end (SIGTERM, then SIGKILL after a grace period: a
Prefect worker or runner may take seconds to act on SIGTERM). Nothing listens beyond 127.0.0.1, and
PREFECT_HOME is a temporary folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GRACE_S = 12.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _executable(name: str) -> str:
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        assert found, f"{name} is not installed next to {sys.executable}"
        return found
    return str(path)


def _stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM the process group, SIGKILL it after GRACE_S, and reap the process."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(GRACE_S)
    with contextlib.suppress(ProcessLookupError):  # what the leader left behind (flow-run subprocess, Dask)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


@dataclass
class Session:
    """A Prefect server of our own and the processes started against it."""

    tmp: Path
    port: int
    env: dict[str, str]
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self, name: str, *argv: str, cwd: Path | None = None) -> subprocess.Popen[Any]:
        with open(self.tmp / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                argv,
                env=self.env,
                cwd=cwd or self.tmp,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-4000:]

    def run(
        self, *argv: str, timeout: float = 60, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            env=self.env,
            cwd=cwd or self.tmp,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.api}{path}", timeout=5) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict[str, Any]) -> Any:
        req = urllib.request.Request(
            f"{self.api}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def wait_for(
        self, what: str, ok: Any, proc: subprocess.Popen[Any], name: str, timeout: float = 90
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"{name} exited ({proc.returncode}) before {what}:\n{self.log(name)}")
            try:
                if ok():
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.3)
        pytest.fail(f"no {what} after {timeout} s:\n{self.log(name)}")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    """`prefect server start --host 127.0.0.1` on a free port, with a temporary PREFECT_HOME."""
    tmp = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp / "home"),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",  # the UI is the same server; not needed by the test
        PYTHONUNBUFFERED="1",
    )
    session = Session(tmp, port, env)
    server = session.start(
        "server", _executable("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)
    )
    try:
        session.wait_for("a healthy API", lambda: session.get("/health") is True, server, "server")
        yield session
    finally:
        for proc in reversed(session.procs):
            _stop(proc)
        assert all(p.poll() is not None for p in session.procs)


def _listening_addresses(procs: list[subprocess.Popen[Any]]) -> set[str]:
    import psutil

    found: set[str] = set()
    for proc in procs:
        if proc.poll() is not None:
            continue
        try:
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in tree:
            try:
                conns = p.net_connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            found |= {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}
    return found


def _archive(root: Path) -> tuple[Path, Path, int]:
    from ichdata.testing import write_archive

    s = write_archive(root / "archive", studies=2, seed=21, image_size=64)
    csv = root / "labels.csv"
    shutil.move(s.labels_csv, csv)
    return s.path, csv, s.n_slices


def _check_store(store: Path, csv: Path, n_slices: int) -> None:
    from ichdata.labels import read_labels
    from ichdata.store import open_store

    s = open_store(store)
    assert s.n_slices == n_slices
    assert s.complete
    labels = read_labels(csv)
    np.testing.assert_array_equal(s.labels, labels.loc[list(s.image_id)].to_numpy())


def _flow_runs(session: Session) -> list[dict[str, Any]]:
    return session.post("/flow_runs/filter", {"sort": "EXPECTED_START_TIME_DESC", "limit": 10})


def test_serve_and_deployment_run(prefect_server: Session, tmp_path: Path) -> None:
    session = prefect_server
    folder, csv, n_slices = _archive(tmp_path)
    store = tmp_path / "rsna.zarr"
    serve = session.start("serve", _executable("ich"), "serve")
    session.wait_for(
        "deployment ingest/default",
        lambda: session.get("/deployments/name/ingest/default")["name"] == "default",
        serve,
        "serve",
    )
    # the training flow is served beside it, from its module path
    session.wait_for(
        "deployment train/default",
        lambda: session.get("/deployments/name/train/default")["entrypoint"] == "flows.train.train",
        serve,
        "serve",
    )

    t0 = time.monotonic()
    run = session.run(
        _executable("prefect"), "deployment", "run", "ingest/default",
        "-p", f"source={folder}", "-p", f"store={store}", "-p", f"labels={csv}", "-p", "workers=1",
        "--watch", "--watch-timeout", "240",
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n--- serve log:\n{session.log('serve')}"
    assert "Completed" in run.stdout
    elapsed = time.monotonic() - t0

    runs = _flow_runs(session)
    assert runs[0]["state_type"] == "COMPLETED"
    assert runs[0]["parameters"]["store"] == str(store)
    _check_store(store, csv, n_slices)
    artifacts = session.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [runs[0]["id"]]}}})
    assert {a["key"] for a in artifacts} >= {"ingest-summary-rsna-zarr", "ingest-quarantine-rsna-zarr"}
    # The conversion's summary is in the run's logs (no line per shard: `flows.ingest._ShardProgress`).
    logs = session.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [runs[0]["id"]]}}, "limit": 200})
    assert any(log["message"].startswith("convert: ") for log in logs)

    assert _listening_addresses(session.procs) <= {"127.0.0.1"}
    _stop(serve)
    assert serve.poll() is not None
    print(f"deployment run of {n_slices} slices took {elapsed:.1f} s")


def test_prefect_yaml_deploys_to_a_process_work_pool(prefect_server: Session, tmp_path: Path) -> None:
    session = prefect_server
    folder, csv, n_slices = _archive(tmp_path)
    store = tmp_path / "pool.zarr"
    made = session.run(_executable("prefect"), "work-pool", "create", "ich-process", "--type", "process")
    assert made.returncode == 0, made.stdout + made.stderr
    env_deploy = {"ICH_LANDING": str(folder), "ICH_STORE": str(store)}
    session.env.update(env_deploy)
    deployed = session.run(_executable("prefect"), "--no-prompt", "deploy", "--all", cwd=REPO, timeout=120)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    dep = session.get("/deployments/name/ingest/default")
    assert dep["work_pool_name"] == "ich-process"
    assert dep["entrypoint"] == "flows.ingest.ingest"
    trained = session.get("/deployments/name/train/default")
    assert (trained["entrypoint"], trained["work_pool_name"]) == ("flows.train.train", "ich-process")
    assert dep["schedules"][0]["active"] is False
    assert dep["schedules"][0]["parameters"] == {"source": str(folder), "store": str(store)}

    created = session.run(
        _executable("prefect"), "deployment", "run", "ingest/default",
        "-p", f"source={folder}", "-p", f"store={store}", "-p", f"labels={csv}", "-p", "workers=1",
    )  # fmt: skip
    assert created.returncode == 0, created.stdout + created.stderr
    worker = session.start(
        "worker",
        _executable("prefect"),
        "worker",
        "start",
        "--pool",
        "ich-process",
        "--run-once",
        cwd=tmp_path,
    )
    try:
        worker.wait(240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not finish its run in 240 s:\n{session.log('worker')}")
    runs = _flow_runs(session)
    assert runs[0]["state_type"] == "COMPLETED", session.log("worker")
    _check_store(store, csv, n_slices)


_KILLED_RUN = """
import os, signal, sys
from distributed import LocalCluster
import ichdata.shards
from flows.ingest import ingest

source, store, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
real = ichdata.shards.convert_shard

def convert_shard_or_die(store, index, *args):
    if index == kill_at:  # SIGKILL this run's process group: the flow, its driver and its Dask workers
        os.killpg(0, signal.SIGKILL)
    return real(store, index, *args)

ichdata.shards.convert_shard = convert_shard_or_die
with LocalCluster(
    n_workers=1, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1",
    dashboard_address=None, scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
) as cluster:
    print(ingest(source=source, store=store, scheduler=cluster.scheduler_address, shard_size=8))
"""


def test_a_killed_run_leaves_a_resumable_store(prefect_server: Session, tmp_path: Path) -> None:
    """SIGKILL a flow run mid-conversion (at its third shard).

    The next run skips the shards written before the kill and ends with the same store as an uninterrupted
    run.
    """
    import zarr

    from ichdata.errors import UserError
    from ichdata.store import open_store

    session = prefect_server
    folder, _, n_slices = _archive(tmp_path)
    script = tmp_path / "run_flow.py"
    script.write_text(_KILLED_RUN)

    def run(store: Path, kill_at: int) -> subprocess.CompletedProcess[str]:
        argv = (sys.executable, str(script), str(folder), str(store), str(kill_at))
        return subprocess.run(
            argv, env=session.env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
            start_new_session=True, check=False,
        )  # fmt: skip

    killed = tmp_path / "killed.zarr"
    first = run(killed, kill_at=2)
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    with pytest.raises(UserError, match="has not finished"):
        open_store(killed)
    shard_done = zarr.open_array(str(killed / "conversion" / "shard_done"), mode="r")
    markers = [str(m) for m in np.asarray(shard_done[...])]
    assert [bool(m) for m in markers[:3]] == [True, True, False]

    resumed = run(killed, kill_at=-1)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    clean = tmp_path / "clean.zarr"
    assert run(clean, kill_at=-1).returncode == 0
    a, b = open_store(killed), open_store(clean)
    assert a.n_slices == b.n_slices == n_slices
    assert list(a.image_id) == list(b.image_id)
    np.testing.assert_array_equal(np.asarray(a.images[: a.n_slices]), np.asarray(b.images[: b.n_slices]))
    assert a.attrs["plan"]["plan_hash"] == b.attrs["plan"]["plan_hash"]
    assert "2 already done" in resumed.stderr + resumed.stdout  # the convert task's summary line
