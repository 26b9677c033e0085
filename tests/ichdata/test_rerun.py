"""A re-run that finds nothing new (the daily ingest of an unchanged landing folder) does no work."""

from __future__ import annotations

from pathlib import Path

import pytest

import ichdata.convert
import ichdata.finalize
import ichdata.scan
import ichdata.shards
from ichdata.config import ClusterConfig, ConvertConfig
from ichdata.convert import convert
from ichdata.testing import write_archive


@pytest.mark.slow
def test_a_rerun_with_nothing_new_starts_no_cluster_and_reads_no_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, store = tmp_path / "src", tmp_path / "s.zarr"
    write_archive(src, studies=2, seed=1, image_size=64, workers=1)
    first = convert(ConvertConfig(src, store, shard_size=8, cluster=ClusterConfig(workers=1)), progress=False)
    assert first.n_new > 0

    def no_cluster(config: ClusterConfig) -> None:
        raise AssertionError("a re-run with nothing new started a cluster")

    def no_markers(group: object) -> list[str]:
        raise AssertionError("a re-run with nothing new read the done-markers")

    def no_walk(path: object) -> int:
        raise AssertionError("a re-run with nothing new walked the store for its size")

    manifest_reads: list[object] = []
    real_read = ichdata.scan.Manifest.read.__func__  # type: ignore[attr-defined]

    def counted_read(cls: type, *args: object) -> object:
        manifest_reads.append(args[0])
        return real_read(cls, *args)

    monkeypatch.setattr(ichdata.convert, "cluster_client", no_cluster)
    monkeypatch.setattr(ichdata.shards, "read_markers", no_markers)
    monkeypatch.setattr(ichdata.finalize, "_du", no_walk)
    monkeypatch.setattr(ichdata.scan.Manifest, "read", classmethod(counted_read))
    again = convert(ConvertConfig(src, store, cluster=ClusterConfig(workers=1)), progress=False)
    assert again.n_new == 0
    assert again.n_slices == first.n_slices
    assert again.store_bytes == first.store_bytes > 0  # as the commit recorded it
    assert len(manifest_reads) == 1  # the scan's read, handed to the plan

    # A new study is work again: the cluster starts and the study is appended.
    monkeypatch.undo()
    write_archive(tmp_path / "more", studies=3, seed=2, image_size=64, workers=1)
    added = sorted((tmp_path / "more").glob("*.dcm"))[-5:]
    for f in added:
        f.rename(src / f"late_{f.name}")
    third = convert(ConvertConfig(src, store, cluster=ClusterConfig(workers=1)), progress=False)
    assert third.n_slices == first.n_slices + 5
