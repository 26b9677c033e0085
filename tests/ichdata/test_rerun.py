"""A re-run that finds nothing new (the daily ingest of an unchanged landing folder) does no work."""

from __future__ import annotations

from pathlib import Path

import pytest

import ichdata.convert
from ichdata.convert import ConvertConfig, convert
from ichdata.testing import write_archive


@pytest.mark.slow
def test_a_rerun_with_nothing_new_starts_no_cluster_and_reads_no_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, store = tmp_path / "src", tmp_path / "s.zarr"
    write_archive(src, studies=2, seed=1, image_size=64, workers=1)
    first = convert(ConvertConfig(src, store, workers=1, shard_size=8), progress=False)
    assert first.n_new > 0

    def no_cluster(config: ConvertConfig) -> None:
        raise AssertionError("a re-run with nothing new started a cluster")

    def no_markers(group: object) -> list[str]:
        raise AssertionError("a re-run with nothing new read the done-markers")

    monkeypatch.setattr(ichdata.convert, "cluster_client", no_cluster)
    monkeypatch.setattr(ichdata.convert, "read_markers", no_markers)
    again = convert(ConvertConfig(src, store, workers=1), progress=False)
    assert again.n_new == 0
    assert again.n_slices == first.n_slices

    # A new study is work again: the cluster starts and the study is appended.
    monkeypatch.undo()
    write_archive(tmp_path / "more", studies=3, seed=2, image_size=64, workers=1)
    added = sorted((tmp_path / "more").glob("*.dcm"))[-5:]
    for f in added:
        f.rename(src / f"late_{f.name}")
    third = convert(ConvertConfig(src, store, workers=1), progress=False)
    assert third.n_slices == first.n_slices + 5
