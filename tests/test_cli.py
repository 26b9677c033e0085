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


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(SOURCE, STORE): a one-study synthetic archive and its store, converted in this process."""
    from ichdata.convert import ConvertConfig, convert
    from ichdata.testing import write_archive

    root = tmp_path_factory.mktemp("small")
    archive = write_archive(root / "src", studies=1, seed=3, image_size=64)
    store = root / "st.zarr"
    convert(ConvertConfig(archive.path, store, shard_size=8), progress=False, client=None)
    return archive.path, store


def _copy_store(store: Path, dst: Path) -> Path:
    import shutil

    from ichdata.store import manifest_path, quarantine_csv_path, salt_path

    shutil.copytree(store, dst)
    for side in (manifest_path, quarantine_csv_path, salt_path):
        shutil.copy(side(store), side(dst))
    return dst


# (file to damage, relative to the copied store's folder, with its bytes; the commands that must say so)
_DAMAGE = {
    "store metadata": ("st.zarr/zarr.json", b"{not json", ("verify", "quarantine", "train", "convert")),
    "array metadata": (
        "st.zarr/labels/zarr.json",
        b'{"zarr_format": 3, "node_type": "array"}',
        ("verify", "quarantine", "train", "convert"),
    ),
    "images metadata": ("st.zarr/images/zarr.json", b"\xff\xfe", ("verify", "train", "convert")),
    "done-markers metadata": (
        "st.zarr/conversion/shard_done/zarr.json",
        b"[]",
        ("verify", "train", "convert"),
    ),
    "manifest": ("st.zarr.manifest.parquet", b"PAR1 not parquet", ("verify", "quarantine", "convert")),
    "salt": ("st.zarr.salt", b"not hex\n", ("convert",)),
    "short salt": ("st.zarr.salt", b"abcd\n", ("convert",)),
}


@pytest.mark.parametrize("case", list(_DAMAGE))
def test_a_damaged_store_file_is_one_line_naming_it_in_every_command(
    case: str, small_store: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 16 item 12: each of these was a traceback."""
    source, good = small_store
    store = _copy_store(good, tmp_path / "st.zarr")
    rel, data, commands = _DAMAGE[case]
    damaged = tmp_path / rel
    damaged.write_bytes(data)
    argv = {
        "verify": ["verify", str(store)],
        "quarantine": ["quarantine", str(store)],
        "train": ["train", str(store), "--out", str(tmp_path / "run"), "--device", "cpu", "--quiet"],
        "convert": ["convert", str(source), str(store), "--quiet"],
    }
    for command in commands:
        assert main(argv[command]) == 2, command
        captured = capsys.readouterr()
        err = captured.err
        assert err.startswith(f"ich: error: {damaged}: damaged ("), (command, err)
        assert len(err.strip().splitlines()) == 1, (command, err)
        assert "restore it from a backup" in err
        assert data.decode(errors="replace").strip() not in err  # never the file's contents
    assert damaged.read_bytes() == data  # nothing rewrote it
