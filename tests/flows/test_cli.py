"""`ich serve`'s command line: mistakes are one-line errors, and the parser imports no Prefect."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flows.cli import main


@pytest.fixture
def no_api_url() -> Iterator[None]:
    """No PREFECT_API_URL, whatever the session's test server set (so `serve` can never start serving)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield


@pytest.mark.usefixtures("no_api_url")
def test_serve_without_a_server_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["serve", "--allow-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ich: error: PREFECT_API_URL is not set")
    assert "prefect server start --host 127.0.0.1" in err
    assert err.count("\n") == 1


def test_serve_against_a_server_that_is_not_running_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/api"
    with temporary_settings(updates={PREFECT_API_URL: url}):
        assert main(["serve", "--allow-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ich: error: PREFECT_API_URL {url}: the Prefect API does not answer")
    assert err.count("\n") == 1


@pytest.mark.usefixtures("no_api_url")
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--interval", "600", "--source", "ROOT/landing"], "--interval needs --source and --store"),
        (
            ["--interval", "0", "--source", "ROOT/l", "--store", "ROOT/s.zarr"],
            "--interval is 0.0; expected a positive",
        ),
        (["--limit", "0"], "--limit is 0; expected at least 1"),
        (
            ["--source", "/elsewhere"],
            "parameter source: /elsewhere is not inside a folder this deployment may use",
        ),
        (["--store", "ROOT"], "parameter store: ROOT is not inside a folder this deployment may use"),
        (["--scheduler", "tcp://127.0.0.1:1"], "--scheduler tcp://127.0.0.1:1 does not speak TLS"),
        (["--insecure-scheduler"], "--insecure-scheduler: only with --scheduler or --scheduler-file"),
    ],
)
def test_serve_options_are_checked_before_serving(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    root = str(tmp_path.resolve())
    argv = [a.replace("ROOT", root) for a in argv]
    assert main(["serve", "--allow-root", root, *argv]) == 2
    err = capsys.readouterr().err
    assert message.replace("ROOT", root) in err
    assert err.count("\n") == 1


@pytest.mark.usefixtures("no_api_url")
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--oversubscribe"], "--oversubscribe: not for served runs"),
        (["--jobs", "2"], "--jobs: only with --cluster slurm (Dask workers as SLURM jobs)"),
        (["--cluster", "slurm", "--workers", "2"], "--workers 2 and --cluster slurm: each SLURM job runs"),
    ],
)
def test_serve_refuses_cluster_options_that_mean_nothing_for_its_runs(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Issue 16 item 14: `ich serve` takes `ich convert`'s cluster options (`ClusterConfig`), checked alike."""
    assert main(["serve", "--allow-root", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ich: error: {message}")
    assert err.count("\n") == 1


def test_serve_passes_the_runs_cluster_options_as_their_defaults(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`ich serve --cluster slurm --jobs 3 --queue short`: the runs' defaults, `--cluster` as `cluster`."""
    import flows.deploy

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(flows.deploy, "serve", lambda *a, **kw: calls.append(kw["parameters"]))
    # `--cluster slurm` needs SLURM's client commands on PATH; nothing runs them here.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sbatch", "squeue", "scancel"):
        (bin_dir / name).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    argv = ["serve", "--allow-root", str(tmp_path), "--cluster", "slurm", "--jobs", "3", "--queue", "short"]
    assert main(argv) == 143
    assert calls == [{"cluster": "slurm", "jobs": 3, "queue": "short"}]


@pytest.mark.usefixtures("no_api_url")
def test_serve_needs_an_allowed_root_that_exists(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Issue 16 item 5: without a root, a served deployment would act on any path anyone names."""
    assert main(["serve"]) == 2
    assert capsys.readouterr().err == (
        "ich: error: --allow-root: none given; name the folders the runs may read and write, e.g. "
        "`ich serve --allow-root /data --allow-root /scratch`: anyone who reaches the Prefect API can "
        "start a run, and a run's paths outside them are refused\n"
    )
    assert main(["serve", "--allow-root", str(tmp_path / "absent")]) == 2
    assert capsys.readouterr().err == f"ich: error: --allow-root {tmp_path / 'absent'}: no such folder\n"


def test_the_parser_imports_no_prefect() -> None:
    code = (
        "import sys; from flows.cli import build_parser; "
        "p = build_parser('serve'); p.parse_args(['serve', '--name', 'x']); "
        "print(sorted(m for m in ('prefect', 'dask', 'distributed', 'zarr') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_serve_passes_absolute_default_parameters_and_the_schedule(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import flows.deploy

    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(flows.deploy, "serve", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "scratch").symlink_to(tmp_path / "data")
    argv = [
        "serve", "--allow-root", "data", "--allow-root", "scratch", "--source", "data/landing",
        "--store", "scratch/s.zarr", "--workers", "2", "--interval", "900",
        "--allow-archive", "https://PACS.example.org/dicom-web/",
    ]  # fmt: skip
    assert main(argv) == 143  # serving ends only on a signal (here: the stand-in returned)
    data = tmp_path.resolve() / "data"
    assert calls == [
        (
            ("default",),
            {
                "parameters": {
                    "source": str(data / "landing"),
                    "store": str(data / "s.zarr"),
                    "workers": 2,
                },
                "interval_s": 900.0,
                "limit": 1,
                # What the runs' subprocesses inherit: the roots, resolved, and the archives.
                "env": {
                    "ICH_ALLOWED_ROOTS": f"{data}{os.pathsep}{data}",
                    "ICH_ALLOWED_ARCHIVES": "https://pacs.example.org/dicom-web",
                },
            },
        )
    ]


def test_serve_hands_the_operators_scheduler_to_the_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`ich serve --scheduler`: the runs' environment names it to the dask config (`flows.deploy.run_scheduler`)."""
    import dask

    import flows.deploy

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(flows.deploy, "serve", lambda *a, **kw: calls.append(kw["env"]))
    argv = [
        "serve",
        "--allow-root",
        str(tmp_path),
        "--scheduler",
        "tcp://10.0.0.1:8786",
        "--insecure-scheduler",
    ]
    assert main(argv) == 143
    [env] = calls
    assert env["DASK_ICH__SCHEDULER"] == "tcp://10.0.0.1:8786"
    assert env["DASK_ICH__INSECURE_SCHEDULER"] == "True"
    # What a run's fresh process makes of that environment.
    config = dask.config.collect(paths=[], env=env)
    with dask.config.set(config):
        assert flows.deploy.run_scheduler() == ("tcp://10.0.0.1:8786", None, True)
