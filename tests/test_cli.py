"""The `ich` command line: lazy stages, one-line user errors, and a lean conversion image."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flows.cli import main

# Runs Python with torch, torchvision, timm and prefect made unimportable, as on a conversion image
# that installed `ich` without extras.
_LEAN = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = {"torch", "torchvision", "timm", "prefect"}
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, _Block())
    from flows.cli import main
    try:
        code = main(sys.argv[1:])
    except SystemExit as exc:  # argparse's --help
        code = exc.code
    loaded = sorted(m for m in BLOCKED if m in sys.modules)
    print("LOADED", loaded)
    sys.exit(code)
    """
)


def _lean(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _LEAN, *argv], capture_output=True, text=True, timeout=300, check=False
    )


def test_help_lists_every_stage_without_importing_heavy_stages() -> None:
    result = _lean("--help")
    assert result.returncode == 0, result.stderr
    for command in (
        "synth",
        "preview",
        "convert",
        "verify",
        "quarantine",
        "serve",
        "train",
        "evaluate",
        "predict",
        "demo",
    ):
        assert command in result.stdout
    assert "LOADED []" in result.stdout


@pytest.mark.slow
def test_convert_runs_without_torch_or_prefect(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    assert main(["synth", str(archive), "--studies", "2", "--seed", "3", "--image-size", "64"]) == 0
    result = _lean(
        "convert",
        str(archive),
        str(tmp_path / "store.zarr"),
        "--workers",
        "1",
        "--labels",
        str(archive / "stage_2_train.csv"),
    )
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout
    import zarr

    images = zarr.open_array(tmp_path / "store.zarr" / "images", mode="r")
    labels = zarr.open_array(tmp_path / "store.zarr" / "labels", mode="r")
    assert images.shape[1:] == (3, 256, 256)
    assert images.shape[0] == labels.shape[0] > 0


def test_user_mistakes_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere.dcm"
    assert main(["preview", str(missing), "--out", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ich: error: ")
    assert str(missing.name) in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err

    assert main(["convert", str(tmp_path / "no-such-folder"), str(tmp_path / "s.zarr")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ich: error: ")
    assert "no-such-folder" in err
    assert len(err.strip().splitlines()) == 1


# `ich convert` paused once its local cluster is up: the worker pids go to the file named by argv[1].
_PAUSED_CONVERT = textwrap.dedent(
    """
    import sys, threading
    import ichdata.convert
    from ichdata.cluster import resolve_client
    from flows.cli import main

    def paused(plan, client, on_shard_done=None, **kwargs):
        started = resolve_client(client)
        pids = started.run(__import__("os").getpid)
        with open(sys.argv[1], "w") as f:
            f.write(" ".join(str(p) for p in pids.values()))
        threading.Event().wait()

    ichdata.convert.convert_shards = paused
    sys.exit(main(sys.argv[2:]))
    """
)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "to_group", "line", "status"),
    [
        (signal.SIGINT, True, "ich: interrupted", 130),  # Ctrl-C: the terminal signals the whole group
        (signal.SIGTERM, False, "ich: terminated", 143),  # kill PID
        (signal.SIGTERM, True, "ich: terminated", 143),  # scancel of the allocation: every process
    ],
)
def test_a_signal_stops_a_conversion_in_one_line_and_closes_its_cluster(
    tmp_path: Path, signum: int, to_group: bool, line: str, status: int
) -> None:
    """Issue 16 item 10: SIGTERM is handled as Ctrl-C, at a known point (the cluster up, no shard written)."""
    archive = tmp_path / "archive"
    assert main(["synth", str(archive), "--studies", "1", "--seed", "3", "--image-size", "64"]) == 0
    ready = tmp_path / "workers"
    proc = subprocess.Popen(
        [sys.executable, "-c", _PAUSED_CONVERT, str(ready), "convert", str(archive), str(tmp_path / "s.zarr"),
         "--workers", "2", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (ready.is_file() and ready.read_text()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the cluster did not start"
            time.sleep(0.1)
        workers = [int(p) for p in ready.read_text().split()]
        assert len(workers) == 2
        assert all(_alive(p) for p in workers)
        if to_group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert (proc.returncode, err) == (status, line + "\n"), err
    assert out == ""
    assert not [p for p in workers if _alive(p)]
