"""The SLURM routes: `ich convert --cluster slurm`, `ichdata.slurm.slurm_cluster`, `convert.sbatch`.

The `slurm` tests run against a real single-node SLURM (the `slurm` fixture, `tests/slurm.py`); the
others check what needs no scheduler (the options' mistakes, the walltime margin).
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dask
import dask_jobqueue  # noqa: F401  (its config defaults must exist before any dask.config.set)
import numpy as np
import pytest

from flows.cli import main
from ichdata.errors import UserError
from ichdata.slurm import _lifetime_s, slurm_cluster

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "examples" / "slurm" / "convert.sbatch"
BIN = Path(sys.executable).parent  # the venv's `python` and `ich`


@pytest.fixture
def site(slurm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The settings a site would put in `jobqueue.yaml`, for this one-node SLURM.

    Loopback, the shared temp and log dirs under `tmp_path`; jobs are submitted from `tmp_path`.
    """
    monkeypatch.chdir(tmp_path)
    with dask.config.set(slurm.site_settings(tmp_path)):
        yield tmp_path


def _squeue(*args: str) -> list[str]:
    """`squeue` lines as `jobid state`, for the given selection."""
    out = subprocess.run(
        ["squeue", "--noheader", "--format=%A %T", *args], capture_output=True, text=True, check=True
    ).stdout
    return out.splitlines()


def _worker_processes(marker: str) -> list[int]:
    """Live (not zombie) processes whose command line names `marker` (this run's credentials dir)."""
    pids = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes()
            state = (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker.encode() in cmdline and state != "Z":
            pids.append(int(pid_dir.name))
    return pids


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.5)


def _first_bytes(address: str, cert: Path | None = None, key: Path | None = None) -> bytes:
    """What the scheduler sends a TLS peer presenting `cert` (or none) before the peer says anything.

    The peer does not check the scheduler's certificate: only the scheduler's refusal is tested.
    """
    host, port = address.removeprefix("tls://").rsplit(":", 1)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if cert is not None:
        context.load_cert_chain(cert, key)
    try:
        with socket.create_connection((host, int(port)), timeout=10) as raw, context.wrap_socket(raw) as tls:
            return tls.recv(16)
    except (ssl.SSLError, ConnectionError):
        return b""


@pytest.mark.parametrize(
    ("walltime", "lifetime"),
    [
        ("30", 1800 - 180),  # minutes; a tenth as margin
        ("10:00", 600 - 60),  # MM:SS; the one-minute floor
        ("00:10:00", 600 - 60),  # HH:MM:SS
        ("1-00", 86400 - 8640),  # D-HH
        ("2-01:00:00", 176400 - 17640),  # D-HH:MM:SS
        ("01:00", 30),  # one minute: never less than half of it
        (None, None),  # no limit
        ("UNLIMITED", None),
    ],
)
def test_worker_lifetime_leaves_a_margin_before_the_walltime(
    walltime: str | None, lifetime: int | None
) -> None:
    assert _lifetime_s(walltime) == lifetime


def test_walltime_not_in_slurm_form_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"walltime '2h'"):
        _lifetime_s("2h")


@pytest.mark.parametrize("missing", ["cores", "memory"])
def test_cores_and_memory_come_from_the_arguments_or_the_site(missing: str) -> None:
    given = {"cores": 1, "memory": "1GB"}
    del given[missing]
    with (
        dask.config.set({f"jobqueue.slurm.{missing}": None}),
        pytest.raises(UserError, match=rf"--{missing} or set jobqueue.slurm.{missing}"),
        slurm_cluster(1, **given),  # type: ignore[arg-type]
    ):
        pass


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--jobs", "2"], "--jobs: only with --cluster slurm"),
        (["--memory", "4GB"], "--memory: only with --cluster slurm"),
        (
            ["--cluster", "slurm", "--scheduler", "tcp://127.0.0.1:1"],
            "--cluster slurm and --scheduler: give one",
        ),
        (
            ["--cluster", "slurm", "--scheduler-file", "s.json"],
            "--cluster slurm and --scheduler-file: give one",
        ),
        (["--cluster", "slurm", "--workers", "2"], "--workers 2 and --cluster slurm: each SLURM job runs"),
        (["--cluster", "slurm", "--jobs", "0"], "--jobs 0: expected at least 1"),
    ],
)
def test_cluster_option_mistakes_are_one_line_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    (tmp_path / "src").mkdir()
    store = tmp_path / "out.zarr"
    assert main(["convert", str(tmp_path / "src"), str(store), "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ich: error: {message}")
    assert err.count("\n") == 1
    assert not store.exists()


def test_cluster_slurm_without_slurm_commands_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "src").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, squeue or scancel there
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out.zarr"), "--cluster", "slurm"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "ich: error: --cluster slurm: sbatch, squeue, scancel not found on PATH; run where SLURM's "
        "commands are (a login node), or without --cluster slurm\n"
    )


def test_at_least_one_job() -> None:
    with pytest.raises(UserError, match="--jobs 0"), slurm_cluster(0, cores=1, memory="1GB"):
        pass


@pytest.mark.parametrize("unset", ["SOURCE", "STORE", "LABELS"])
def test_sbatch_script_names_what_is_missing(tmp_path: Path, unset: str) -> None:
    env = {**os.environ, "SOURCE": "a", "STORE": "b", "LABELS": "c"}
    del env[unset]
    result = subprocess.run(["bash", str(SBATCH)], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    assert f"convert.sbatch: {unset} not set" in result.stderr
    assert "sbatch --export=ALL,SOURCE=" in result.stderr


@pytest.mark.usefixtures("site")
@pytest.mark.slurm
@pytest.mark.slow
def test_two_jobs_run_tasks_behind_tls_and_leave_nothing(tmp_path: Path) -> None:
    with slurm_cluster(2, cores=1, memory="1GB", walltime="00:10:00") as client:
        client.wait_for_workers(2, timeout=120)
        credentials = Path(str(client.security.tls_ca_file)).parent
        assert credentials.parent == tmp_path
        assert credentials.stat().st_mode & 0o777 == 0o700
        jobs = _squeue()
        assert len(jobs) == 2
        assert all(line.endswith("RUNNING") for line in jobs)
        workers = client.scheduler_info()["workers"]
        assert all(address.startswith("tls://127.0.0.1:") for address in workers)
        assert [w["nthreads"] for w in workers.values()] == [1, 1]
        # Each worker runs in its own SLURM job, one of those squeue lists.
        job_ids = client.run(lambda: os.environ["SLURM_JOB_ID"])
        assert sorted(job_ids.values()) == sorted(line.split()[0] for line in jobs)
        assert client.gather(client.map(lambda x: x * x, range(20))) == [x * x for x in range(20)]

        # Strangers are refused during the handshake: without a certificate, and with a certificate
        # of their own; the run's own certificate is served.
        from distributed.security import Security

        stranger = Security.temporary()
        (tmp_path / "stranger.pem").write_text(str(stranger.tls_client_cert))
        (tmp_path / "stranger.key").write_text(str(stranger.tls_client_key))
        address = str(client.scheduler_info()["address"])
        assert _first_bytes(address) == b""
        assert _first_bytes(address, tmp_path / "stranger.pem", tmp_path / "stranger.key") == b""
        own = Path(str(client.security.tls_client_cert)), Path(str(client.security.tls_client_key))
        assert _first_bytes(address, *own) != b""
        from distributed import Client

        with pytest.raises((OSError, TimeoutError)):
            Client(address, security=stranger, timeout=5)
    assert _squeue() == []
    assert _worker_processes(str(credentials)) == []
    assert not credentials.exists()


@pytest.mark.usefixtures("site")
@pytest.mark.slurm
@pytest.mark.slow
def test_a_cancelled_job_is_replaced() -> None:
    with slurm_cluster(2, cores=1, memory="1GB", walltime="00:10:00") as client:
        client.wait_for_workers(2, timeout=120)
        first = sorted(line.split()[0] for line in _squeue())
        subprocess.run(["scancel", first[0]], check=True)
        # A replacement is submitted once the scheduler gives the lost worker up.
        _wait(lambda: len(client.scheduler_info()["workers"]) == 1, 60, "the cancelled job's worker gone")
        _wait(lambda: len(client.scheduler_info()["workers"]) == 2, 120, "a replacement worker")
        now = sorted(line.split()[0] for line in _squeue("--states=RUNNING"))
        assert len(now) == 2
        assert first[0] not in now
        assert first[1] in now
        assert client.gather(client.map(lambda x: x + 1, range(10))) == list(range(1, 11))
    assert _squeue() == []


@pytest.mark.usefixtures("site")
@pytest.mark.slurm
@pytest.mark.slow
def test_interrupt_cancels_the_jobs() -> None:
    seen: list[Path] = []

    def interrupted_run() -> None:
        with slurm_cluster(2, cores=1, memory="1GB") as client:
            client.wait_for_workers(2, timeout=120)
            seen.append(Path(str(client.security.tls_ca_file)).parent)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted_run()
    [credentials] = seen
    assert _squeue() == []
    assert _worker_processes(str(credentials)) == []
    assert not credentials.exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_sbatch_script_gives_the_store_of_a_direct_conversion(slurm: object, tmp_path: Path) -> None:
    import zarr

    from ichdata.testing import write_archive

    source = tmp_path / "archive"
    write_archive(source, studies=2, seed=5, image_size=64)
    labels = source / "stage_2_train.csv"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    direct = tmp_path / "direct.zarr"
    subprocess.run(
        [str(BIN / "ich"), "convert", str(source), str(direct), "--labels", str(labels), "--workers", "2"],
        env=env, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    batch = tmp_path / "batch.zarr"
    submitted = subprocess.run(
        [
            "sbatch", "-W", "--cpus-per-task=2", "--mem-per-cpu=1G", f"--output={tmp_path / 'job.out'}",
            f"--export=ALL,SOURCE={source},STORE={batch},LABELS={labels}", str(SBATCH),
        ],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert submitted.returncode == 0, f"{submitted.stderr}\n{log}"
    want = dict(zarr.open_group(direct, mode="r").arrays())
    got = dict(zarr.open_group(batch, mode="r").arrays())
    assert sorted(got) == sorted(want)
    assert {"images", "labels", "image_id", "study_offsets"} <= set(want)
    for name, array in want.items():
        np.testing.assert_array_equal(got[name][...], array[...], err_msg=name)
    assert _squeue() == []


# ------------------------------------------------------------------ ich convert --cluster slurm


def _archive(root: Path, studies: int, seed: int) -> tuple[Path, Path]:
    """A small synthetic archive and its label CSV."""
    from ichdata.testing import write_archive

    summary = write_archive(root / "archive", studies=studies, seed=seed, image_size=64, workers=1)
    return summary.path, summary.labels_csv


def _assert_same_arrays(got: Path, want: Path) -> None:
    """Every array of the two stores, read as plain zarr, holds the same values."""
    import zarr

    want_arrays = dict(zarr.open_group(want, mode="r").arrays())
    got_arrays = dict(zarr.open_group(got, mode="r").arrays())
    assert sorted(got_arrays) == sorted(want_arrays)
    assert {"images", "labels", "image_id", "study_offsets"} <= set(want_arrays)
    for name, array in want_arrays.items():
        np.testing.assert_array_equal(got_arrays[name][...], array[...], err_msg=name)


def _assert_nothing_left(site: Path) -> None:
    """No job in squeue, no worker process of the run, no credentials left under the shared temp dir."""
    assert _squeue() == []
    assert _worker_processes(str(site / ".ich-dask-tls-")) == []
    assert list(site.glob(".ich-dask-tls-*")) == []


_SLURM_ARGS = [
    "--cluster",
    "slurm",
    "--jobs",
    "2",
    "--cores",
    "1",
    "--memory",
    "1GB",
    "--walltime",
    "00:10:00",
]


@pytest.mark.slurm
@pytest.mark.slow
def test_convert_on_slurm_jobs_gives_the_store_of_a_local_cluster(site: Path) -> None:
    source, labels = _archive(site, studies=4, seed=21)
    local, slurm = site / "local.zarr", site / "slurm.zarr"
    common = ["--labels", str(labels), "--shard-size", "4", "--quiet"]
    assert main(["convert", str(source), str(local), "--workers", "2", *common]) == 0
    assert main(["convert", str(source), str(slurm), *_SLURM_ARGS, *common]) == 0
    _assert_same_arrays(slurm, local)
    _assert_nothing_left(site)


def _slow_shards(delay_s: float) -> Callable[..., object]:
    """A stand-in for `ichdata.shards.convert_shard` that takes `delay_s` longer per shard.

    A closure, so that Dask ships it to the SLURM workers by value (cloudpickle).
    """
    import ichdata.shards

    real = ichdata.shards.convert_shard

    def slow(*args: Any) -> object:
        import time as worker_time

        worker_time.sleep(delay_s)
        return real(*args)

    return slow


@pytest.mark.slurm
@pytest.mark.slow
def test_a_worker_job_cancelled_mid_run_still_gives_the_identical_store(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import ichdata.shards
    from ichdata.config import ClusterConfig, ConvertConfig
    from ichdata.convert import convert

    source, labels = _archive(site, studies=3, seed=22)
    local = site / "local.zarr"
    assert (
        main(["convert", str(source), str(local), "--labels", str(labels), "--shard-size", "4", "--quiet"])
        == 0
    )

    store = site / "slurm.zarr"
    config = ConvertConfig(
        source=source, store=store, labels=labels, shard_size=4,
        cluster=ClusterConfig(kind="slurm", jobs=2, cores=1, memory="1GB", walltime="00:10:00"),
    )  # fmt: skip
    monkeypatch.setattr(ichdata.shards, "convert_shard", _slow_shards(0.5))
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            convert(config, progress=False)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        # Once shards are landing, cancel one of the two worker jobs.
        _wait(
            lambda: sum(f.is_file() for f in (store / "images" / "c").rglob("*")) >= 4 or bool(outcome),
            180,
            "shards",
        )
        jobs = sorted(line.split()[0] for line in _squeue("--states=RUNNING"))
        assert len(jobs) == 2, jobs
        assert not outcome, f"the run ended before a job could be cancelled: {outcome}"
        subprocess.run(["scancel", jobs[0]], check=True)
    finally:
        thread.join(300)
    assert not thread.is_alive()
    assert outcome == [None], outcome
    _assert_same_arrays(store, local)
    _assert_nothing_left(site)


def test_shards_whose_workers_all_died_are_one_line_saying_how_to_resume(tmp_path: Path) -> None:
    from distributed import KilledWorker

    from ichdata.convert import _shard_failed
    from ichdata.plan import plan
    from ichdata.scan import scan

    source, _ = _archive(tmp_path, studies=1, seed=23)
    p = plan(scan(source), tmp_path / "s.zarr", shard_size=4)
    killed = KilledWorker("ich-shard-0", "tls://127.0.0.1:1", 3)  # type: ignore[arg-type]
    error = _shard_failed(p, [0, 1], killed)
    assert isinstance(error, UserError)
    message = str(error)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 's.zarr'}: a task of 2 shards, 0–1 (rows 0–7, 8 slices: ID_")
    assert "every worker that ran it died" in message
    assert message.endswith("re-run the same command to resume")


@pytest.mark.slurm
@pytest.mark.slow
def test_a_worker_job_slurm_refuses_is_one_line_before_any_work(site: Path) -> None:
    refused = r"^--cluster slurm: SLURM refuses the worker job: .*[Pp]artition"
    with (
        pytest.raises(UserError, match=refused),
        slurm_cluster(1, queue="no-such-partition", cores=1, memory="1GB"),
    ):
        pass
    _assert_nothing_left(site)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "line", "status"),
    [(signal.SIGINT, "ich: interrupted", 130), (signal.SIGTERM, "ich: terminated", 143)],
)
def test_a_signal_while_waiting_for_workers_cancels_the_jobs_and_removes_the_credentials(
    slurm: Any, tmp_path: Path, signum: int, line: str, status: int
) -> None:
    """Issue 16 item 10: `scancel`/`kill` (SIGTERM) and Ctrl-C of `ich convert --cluster slurm`.

    The known point: the worker job is in the queue, held there (`--begin` an hour from now), so the run
    waits for its first worker. Without a site `shared-temp-directory` the run's credentials go under
    HOME (a folder of the test's here), which must hold nothing of the run afterwards.
    """
    source, _ = _archive(tmp_path, studies=1, seed=24)
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **slurm.env(),
        "HOME": str(home),
        "DASK_JOBQUEUE__SLURM__INTERFACE": "lo",
        "DASK_JOBQUEUE__SLURM__LOG_DIRECTORY": str(tmp_path / "logs"),
        "DASK_JOBQUEUE__SLURM__JOB_EXTRA_DIRECTIVES": '["--begin=now+3600"]',
    }
    env.pop("DASK_JOBQUEUE__SLURM__SHARED_TEMP_DIRECTORY", None)
    proc = subprocess.Popen(
        [str(BIN / "ich"), "convert", str(source), str(tmp_path / "s.zarr"), "--cluster", "slurm",
         "--cores", "1", "--memory", "1GB", "--quiet"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait(lambda: bool(_squeue("--states=PENDING")) or proc.poll() is not None, 120, "a queued job")
        assert proc.poll() is None, proc.communicate()
        credentials = list(home.glob(".ich-dask-tls-*"))
        assert len(credentials) == 1
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, err) == (status, line + "\n"), err
    assert out == ""
    assert _squeue() == []
    assert not credentials[0].exists()
    assert not (tmp_path / "s.zarr.lock").exists()
    left = [p for where in (home, tmp_path, Path(tempfile.gettempdir())) for p in where.glob(".*dask*")]
    assert left == []
