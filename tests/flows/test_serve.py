"""What a user does, end to end: a Prefect server on 127.0.0.1, `ich serve`, `prefect deployment run`.

Then the same deployment from `prefect.yaml` through a process work pool. Every process a test starts
gets its own process group and is stopped at the end (SIGTERM, then SIGKILL after a grace period: a
Prefect worker or runner may take seconds to act on SIGTERM). Nothing listens beyond 127.0.0.1, and
PREFECT_HOME is a temporary folder.
"""

from __future__ import annotations

import base64
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

    def _headers(self, auth: bool) -> dict[str, str]:
        if not auth:
            return {}
        token = base64.b64encode(self.env["PREFECT_API_AUTH_STRING"].encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def get(self, path: str) -> Any:
        req = urllib.request.Request(f"{self.api}{path}", headers=self._headers(True))
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict[str, Any], *, auth: bool = True) -> Any:
        req = urllib.request.Request(
            f"{self.api}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **self._headers(auth)},
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


def _readme_recipe() -> str:
    """The shell block of the README's Prefect recipe (section "2. Ingest with Prefect")."""
    section = (REPO / "README.md").read_text().split("### 2. Ingest with Prefect", 1)[1]
    return section.split("```bash\n", 1)[1].split("\n```", 1)[0]


def _readme_settings(home: Path) -> dict[str, str]:
    """Run the README recipe's one-time step with `home` as HOME; the settings it exports.

    Issue 16 item 13: the recipe ran `prefect config set`, which changes the user's default profile.
    """
    recipe = _readme_recipe()
    assert "prefect config set" not in recipe
    once = recipe.split("\n\n", 1)[0]
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    subprocess.run(["bash", "-euc", once], env={**env, "HOME": str(home)}, check=True, timeout=60)
    written = home / ".config" / "ich" / "prefect.env"
    assert [p.relative_to(home) for p in sorted(home.rglob("*"))] == [
        Path(".config"),
        Path(".config/ich"),
        written.relative_to(home),
    ]  # nothing else: no ~/.prefect profile touched
    assert written.stat().st_mode & 0o777 == 0o600  # the auth string is the user's alone
    settings = dict(
        line.removeprefix("export ").split("=", 1) for line in written.read_text().splitlines() if line
    )
    assert settings["PREFECT_SERVER_API_AUTH_STRING"] == settings["PREFECT_API_AUTH_STRING"]
    assert len(settings["PREFECT_API_AUTH_STRING"]) > 20
    # Every terminal of the recipe starts from those settings.
    steps = [line for line in recipe.split("\n\n", 1)[1].splitlines() if not line.startswith(" ")]
    assert steps
    assert all(line.startswith(". ~/.config/ich/prefect.env && ") for line in steps), steps
    return settings


def test_the_readme_recipe_keeps_its_prefect_settings_to_itself(tmp_path: Path) -> None:
    """The one-time step writes one private settings file and touches no Prefect profile.

    The `prefect_server` fixture starts the server from those settings.
    """
    settings = _readme_settings(tmp_path / "home")
    assert settings["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    assert settings["PREFECT_HOME"] == str(tmp_path / "home" / ".config" / "ich" / "prefect")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    """The README's recipe: `prefect server start --host 127.0.0.1` with authentication, a temporary PREFECT_HOME.

    The server takes PREFECT_SERVER_API_AUTH_STRING; every client (the CLI, `ich serve`, workers and the
    runs they start) PREFECT_API_AUTH_STRING, in their environment.
    """
    tmp = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    settings = _readme_settings(tmp / "user-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp / "home"),
        PREFECT_SERVER_API_AUTH_STRING=settings["PREFECT_SERVER_API_AUTH_STRING"],
        PREFECT_API_AUTH_STRING=settings["PREFECT_API_AUTH_STRING"],
        PREFECT_API_URL=settings["PREFECT_API_URL"].replace(":4200/", f":{port}/"),
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
        with pytest.raises(urllib.error.HTTPError, match="401"):  # without the auth string: nothing
            session.post("/flow_runs/filter", {"limit": 1}, auth=False)
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
    serve = session.start("serve", _executable("ich"), "serve", "--allow-root", str(tmp_path))
    session.wait_for(
        "deployment ingest/default",
        lambda: session.get("/deployments/name/ingest/default")["name"] == "default",
        serve,
        "serve",
    )
    session.wait_for(
        "deployment pull/default",
        lambda: session.get("/deployments/name/pull/default")["entrypoint"] == "flows.pull.pull_flow",
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
    # SIGTERM ends `ich serve` as it ends every command (issue 16 item 10).
    assert serve.returncode == 143, session.log("serve")
    assert session.log("serve").rstrip().endswith("ich: terminated")
    print(f"deployment run of {n_slices} slices took {elapsed:.1f} s")


def _final_state(
    session: Session, run_id: str, proc: subprocess.Popen[Any], name: str, timeout: float = 120
) -> dict[str, Any]:
    """The flow run `run_id` once it has reached a final state."""
    final: dict[str, Any] = {}

    def done() -> bool:
        final.update(session.get(f"/flow_runs/{run_id}"))
        return final["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")

    session.wait_for(f"flow run {run_id} to end", done, proc, name, timeout)
    return final


def test_a_run_cannot_choose_the_scheduler_nor_use_paths_outside_the_allowed_roots(
    prefect_server: Session, tmp_path: Path, stranger: Any
) -> None:
    """Issue 16 item 5: what anyone who reaches the Prefect API could do with a run's parameters.

    `-p scheduler=` named a scheduler of the attacker's (the client unpickles what it sends: code ran as
    the serving user); `-p labels=/etc/shadow` put the file's first line into the run's state;
    `-p source=/etc` put file names and bytes into an artifact. Each run is refused, the attacker's
    scheduler never hears from us, and nothing of the files outside the allowed roots reaches Prefect.
    """
    session = prefect_server
    allowed = tmp_path / "allowed"
    folder, _, _ = _archive(allowed)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = "root:SECRET-9c1e:19000:0:99999:7:::"
    (outside / "shadow").write_text(secret + "\n")
    (outside / "notes").mkdir()
    (outside / "notes" / "patient-Jane-Doe.txt").write_text(secret * 10)
    (allowed / "escape").symlink_to(outside)
    store = allowed / "s.zarr"
    attacker = stranger  # an attacker's 'Dask scheduler'
    serve = session.start("serve-roots", _executable("ich"), "serve", "--allow-root", str(allowed))
    try:
        session.wait_for(
            "deployment ingest/default",
            lambda: session.get("/deployments/name/ingest/default")["name"] == "default",
            serve,
            "serve-roots",
        )
        # Straight through the API, as an attacker would (the CLI itself refuses a parameter the
        # deployment does not have): the run is created, and fails on the flow's own signature.
        deployment = session.get("/deployments/name/ingest/default")
        made = session.post(
            f"/deployments/{deployment['id']}/create_flow_run",
            {"parameters": {"source": str(folder), "store": str(store), "scheduler": attacker.address}},
        )
        final = _final_state(session, made["id"], serve, "serve-roots")
        assert final["state_type"] in ("FAILED", "CRASHED"), final  # the flow has no such parameter

        attempts = {
            "labels": [f"source={folder}", f"store={store}", f"labels={outside / 'shadow'}"],
            "source": [f"source={allowed / 'escape' / 'notes'}", f"store={store}"],  # a link out
            "store": [f"source={folder}", f"store={allowed / '..' / 'outside' / 'x.zarr'}"],
        }
        for what, params in attempts.items():
            run = session.run(
                _executable("prefect"), "deployment", "run", "ingest/default",
                *(a for p in params for a in ("-p", p)), "--watch", "--watch-timeout", "120",
                timeout=180,
            )  # fmt: skip
            said = run.stdout + run.stderr
            assert "Failed" in said, f"{what}: {said}\n--- serve log:\n{session.log('serve-roots')}"
            assert "SECRET" not in said
            state = _flow_runs(session)[0]
            assert state["state_type"] == "FAILED", (what, state)
            message = str(state["state"]["message"])
            assert f"parameter {what}: " in message, (what, message)
            assert "SECRET" not in message
            found = session.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [state["id"]]}}})
            # The run's own artifacts (not Prefect's record of where the failed state is kept).
            assert [a for a in found if a["type"] is not None] == [], (what, found)
        assert attacker.accepted == 0
        assert not store.exists()
        assert sorted(p.name for p in outside.iterdir()) == ["notes", "shadow"]
        logs = session.post("/logs/filter", {"limit": 200})
        assert not [log for log in logs if "SECRET" in log["message"] or "Jane-Doe" in log["message"]]
    finally:
        _stop(serve)


def test_serve_refuses_to_serve_without_an_allowed_root(prefect_server: Session) -> None:
    done = prefect_server.run(_executable("ich"), "serve")
    assert done.returncode == 2
    assert done.stderr.startswith("ich: error: --allow-root: none given; name the folders the runs may")
    assert done.stderr.count("\n") == 1


def test_prefect_yaml_deploys_to_a_process_work_pool(prefect_server: Session, tmp_path: Path) -> None:
    session = prefect_server
    folder, csv, n_slices = _archive(tmp_path)
    store = tmp_path / "pool.zarr"
    made = session.run(_executable("prefect"), "work-pool", "create", "ich-process", "--type", "process")
    assert made.returncode == 0, made.stdout + made.stderr
    env_deploy = {"ICH_LANDING": str(folder), "ICH_STORE": str(store), "ICH_ALLOWED_ROOTS": str(tmp_path)}
    session.env.update(env_deploy)
    try:
        deployed = session.run(
            _executable("prefect"), "--no-prompt", "deploy", "--all", cwd=REPO, timeout=120
        )
    finally:  # the deployment keeps what it needs; the next tests' processes must not inherit them
        for name in env_deploy:
            del session.env[name]
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    dep = session.get("/deployments/name/ingest/default")
    assert dep["work_pool_name"] == "ich-process"
    assert dep["entrypoint"] == "flows.ingest.ingest"
    trained = session.get("/deployments/name/train/default")
    assert (trained["entrypoint"], trained["work_pool_name"]) == ("flows.train.train", "ich-process")
    assert trained["job_variables"]["env"]["ICH_ALLOWED_ROOTS"] == str(tmp_path)
    assert dep["schedules"][0]["active"] is False
    assert dep["schedules"][0]["parameters"] == {"source": str(folder), "store": str(store)}
    assert dep["job_variables"]["env"]["ICH_ALLOWED_ROOTS"] == str(tmp_path)

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
import dask
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
    # The operator's scheduler of the runs (plain tcp: said insecure explicitly).
    with dask.config.set({"ich.scheduler": cluster.scheduler_address, "ich.insecure-scheduler": True}):
        print(ingest(source=source, store=store, shard_size=8))
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
