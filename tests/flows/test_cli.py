"""`ich serve`'s command line: mistakes are one-line errors, and the parser imports no Prefect."""

from __future__ import annotations

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
def test_serve_without_a_server_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ich: error: PREFECT_API_URL is not set")
    assert "prefect server start --host 127.0.0.1" in err
    assert err.count("\n") == 1


def test_serve_against_a_server_that_is_not_running_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/api"
    with temporary_settings(updates={PREFECT_API_URL: url}):
        assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ich: error: PREFECT_API_URL {url}: the Prefect API does not answer")
    assert err.count("\n") == 1


@pytest.mark.usefixtures("no_api_url")
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--interval", "600", "--source", "/landing"], "--interval needs --source and --store"),
        (
            ["--interval", "0", "--source", "/l", "--store", "/s.zarr"],
            "--interval is 0.0; expected a positive",
        ),
        (["--limit", "0"], "--limit is 0; expected at least 1"),
    ],
)
def test_serve_options_are_checked_before_serving(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


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
    argv = ["serve", "--source", "landing", "--store", "out/s.zarr", "--workers", "2", "--interval", "900"]
    assert main(argv) == 0
    assert calls == [
        (
            ("default",),
            {
                "parameters": {
                    "source": str(tmp_path / "landing"),
                    "store": str(tmp_path / "out/s.zarr"),
                    "workers": 2,
                },
                "interval_s": 900.0,
                "limit": 1,
            },
        )
    ]
