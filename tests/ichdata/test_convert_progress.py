"""The conversion's progress bars as a person sees them: slices, their rate and the time left; none with --quiet."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flows.cli import main


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-study synthetic archive (small slices)."""
    from ichdata.testing import write_archive

    return write_archive(
        tmp_path_factory.mktemp("progress") / "a", studies=2, seed=31, image_size=64, workers=1
    ).path


def test_the_convert_bar_counts_slices_with_rate_and_time_left(
    archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ichdata.store import open_store

    assert main(["convert", str(archive), str(tmp_path / "s.zarr"), "--workers", "1", "--progress"]) == 0
    n = open_store(tmp_path / "s.zarr").n_slices
    err = capsys.readouterr().err
    # tqdm's last frame of the bar: 100%, n/n slices, elapsed<left, the rate in slices per second.
    assert re.search(rf"convert: 100%.*\| {n}/{n} \[\d\d:\d\d<\d\d:\d\d, +[\d.]+ ?slice/s\]", err), err


def test_quiet_draws_no_bar(archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(archive), str(tmp_path / "s.zarr"), "--workers", "1", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "slice" in captured.out  # the summary line only
