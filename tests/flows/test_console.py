"""What `ich` prints: non-ASCII names under `LC_ALL=C PYTHONUTF8=0`, and a reader that stops early.

Each test runs the installed `ich` console script in a subprocess, as a user's shell does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main

ICH = str(Path(sys.executable).with_name("ich"))


def _c_locale() -> dict[str, str]:
    """The environment of a shell with the C locale and Python's UTF-8 mode off."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "LANG", "LANGUAGE")}
    return {**env, "LC_ALL": "C", "PYTHONUTF8": "0"}


def _ich(cwd: Path, *argv: str, status: int = 0) -> str:
    """Run `ich argv` in the C locale; its stdout (as UTF-8), after checking its status and stderr."""
    result = subprocess.run(
        [ICH, *argv], cwd=cwd, env=_c_locale(), capture_output=True, timeout=600, check=False
    )
    err = result.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, err
    assert result.returncode == status, err
    if status:
        assert err.startswith("ich: error: "), err
        assert len(err.strip().splitlines()) == 1, err
        return err
    return result.stdout.decode("utf-8")


@pytest.mark.slow
def test_every_command_prints_and_writes_non_ascii_names_in_the_c_locale(tmp_path: Path) -> None:
    from ichmodel.config import TrainConfig
    from ichmodel.train import train

    archive = tmp_path / "sÿnth"
    assert main(["synth", str(archive), "--studies", "4", "--seed", "1", "--image-size", "64"]) == 0
    (archive / "jünk.dcm").write_bytes(b"not a DICOM file")
    preview = tmp_path / "prévu"
    preview.mkdir()
    shutil.copy(next(archive.glob("ID_*.dcm")), preview / "é.dcm")

    out = _ich(
        tmp_path, "convert", "sÿnth", "störe.zarr", "--labels", "sÿnth/stage_2_train.csv", "--keep-paths"
    )
    assert "störe.zarr: wrote" in out
    assert "not_dicom" in _ich(tmp_path, "quarantine", "störe.zarr")
    _ich(tmp_path, "quarantine", "störe.zarr", "--out", "qü.csv")
    assert (tmp_path / "qü.csv").is_file()
    assert ": OK" in _ich(tmp_path, "verify", "störe.zarr")
    assert "wrote prévu/é.png" in _ich(tmp_path, "preview", "prévu/é.dcm", "--out", "prévu/é.png")
    assert "SOURCE nöpe: no such folder" in _ich(tmp_path, "convert", "nöpe", "störe.zarr", status=2)

    settings = {
        "backbone": "test_efficientnet",
        "epochs": 1,
        "workers": 0,
        "device": "cpu",
        "progress": False,
    }
    settings |= {"batch_size": 2, "rnn_hidden": 8, "rnn_layers": 1, "max_len": 6, "val_fraction": 0.5}
    train(TrainConfig(store=str(tmp_path / "störe.zarr"), out=str(tmp_path / "rün"), **settings))  # type: ignore[arg-type]
    assert "rün: weighted log loss" in _ich(
        tmp_path, "evaluate", "rün", "--store", "störe.zarr", "--out", "répört"
    )
    assert "| rün |" in (tmp_path / "répört" / "report.md").read_text(encoding="utf-8")
    assert (tmp_path / "répört" / "predictions_rün.csv").is_file()
    out = _ich(tmp_path, "predict", "rün/best.pt", "sÿnth", "--out", "prédictions.csv", "--quiet")
    assert "-> prédictions.csv" in out
    assert (tmp_path / "prédictions.studies.csv").is_file()


@pytest.fixture(scope="module")
def long_quarantine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store whose quarantine table is far longer than a pipe's buffer (3,000 rows)."""
    root = tmp_path_factory.mktemp("pipe")
    archive = root / "archive"
    assert main(["synth", str(archive), "--studies", "1", "--seed", "2", "--image-size", "64"]) == 0
    for i in range(3000):
        (archive / f"junk_{i:04d}.dcm").write_bytes(b"x")
    assert main(["convert", str(archive), str(root / "store.zarr"), "--workers", "1", "--quiet"]) == 0
    return root / "store.zarr"


@pytest.mark.parametrize(
    ("argv", "after_lines", "unbuffered"),
    [
        # `| head -1`: the pipe breaks while pandas writes the table
        pytest.param("quarantine", 1, False, id="head-1"),
        pytest.param("quarantine", 0, True, id="closed-at-once-unbuffered"),
        # one line, held in the buffer until the interpreter's last flush
        pytest.param("verify", 0, False, id="closed-at-exit"),
    ],
)
def test_a_reader_that_stops_early_ends_the_command_quietly(
    long_quarantine: Path, argv: str, after_lines: int, unbuffered: bool
) -> None:
    """`ich quarantine STORE | head -1`: no traceback, at print time or at exit; status 141 (SIGPIPE's)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    with subprocess.Popen(
        [ICH, argv, str(long_quarantine)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**env, "PYTHONUNBUFFERED": "1"} if unbuffered else env,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        for _ in range(after_lines):
            assert proc.stdout.readline()
        proc.stdout.close()  # what `head` does once it has its lines
        err = proc.stderr.read().decode()
        status = proc.wait(timeout=300)
    assert err == ""
    assert status == 141
