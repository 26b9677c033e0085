"""The `ich` command line: lazy stages, one-line user errors, and a lean conversion image."""

from __future__ import annotations

import subprocess
import sys
import textwrap
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
        "features",
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
