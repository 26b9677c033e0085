"""The store contract: write → read is the identity, layout and attributes as DESIGN.md says."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from ichdata.errors import UserError
from ichdata.shardfile import read_shard
from ichdata.store import CLASSES, FORMAT_VERSION, open_store, write_store_from_arrays


def _series(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "study_uid": [f"1.2.{i}" for i in range(n)],
            "series_uid": [f"1.2.{i}.1" for i in range(n)],
            "patient_key": [f"ID_{i:04x}" for i in range(n)],
        }
    )


@settings(max_examples=15, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 7), min_size=1, max_size=5),
    shard_size=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_write_then_read_is_the_identity(tmp_path_factory, sizes, shard_size, seed) -> None:
    path = tmp_path_factory.mktemp("s") / "s.zarr"
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 2, (n, 6), dtype=np.uint8)
    labels[rng.random(n) < 0.3] = 255
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    ids = [f"ID_{k:05x}" for k in range(n)]
    s = write_store_from_arrays(
        path, images, labels, ids, offsets, _series(len(sizes)), shard_size=shard_size
    )
    again = open_store(path)
    for store in (s, again):
        assert store.n_slices == n
        assert store.n_series == len(sizes)
        assert np.array_equal(store.images[...], images)
        assert np.array_equal(store.labels, labels)
        assert list(store.image_id) == ids
        assert np.array_equal(store.study_offsets, offsets)
        assert store.series["n_slices"].tolist() == sizes
        for k in range(len(sizes)):
            assert np.array_equal(store.read_series(k), images[offsets[k] : offsets[k + 1]])
        assert store.shard_size == shard_size


def test_layout_and_attributes(tmp_path) -> None:
    path = tmp_path / "s.zarr"
    images = np.zeros((5, 3, 256, 256), np.uint8)
    write_store_from_arrays(
        path, images, np.zeros((5, 6), np.uint8), list("abcde"), [0, 2, 5], _series(2), shard_size=4
    )
    g = zarr.open_group(str(path), mode="r")
    img = zarr.open_array(str(path / "images"), mode="r")
    assert img.shape == (5, 3, 256, 256)
    assert img.dtype == np.uint8
    assert img.chunks == (1, 3, 256, 256)
    assert img.shards == (4, 3, 256, 256)
    assert zarr.open_array(str(path / "study_offsets"), mode="r").dtype == np.int64
    assert zarr.open_array(str(path / "labels"), mode="r").shape == (5, 6)
    a: dict[str, Any] = dict(g.attrs)
    assert a["classes"] == list(CLASSES)
    assert a["format_version"] == FORMAT_VERSION
    assert [w["name"] for w in a["windows"]] == ["brain", "subdural", "bone"]
    assert a["image_size"] == 256
    assert a["state"] == "complete"
    assert a["n_slices"] == 5
    assert a["n_series"] == 2


def test_read_series_ranges_and_errors(tmp_path) -> None:
    images = np.arange(6 * 3 * 8 * 8, dtype=np.uint32).astype(np.uint8).reshape(6, 3, 8, 8)
    s = write_store_from_arrays(
        tmp_path / "s.zarr", images, np.zeros((6, 6), np.uint8), list("abcdef"), [0, 4, 6], _series(2)
    )
    assert np.array_equal(s.read_series(0, 1, 3), images[1:3])
    assert np.array_equal(s.read_rows(3, 5), images[3:5])
    with pytest.raises(IndexError, match="series 0 has 4 slices"):
        s.read_series(0, 2, 5)
    with pytest.raises(IndexError, match="2 series"):
        s.read_series(2)


def test_an_unfinished_store_is_refused_unless_asked(tmp_path) -> None:
    path = tmp_path / "s.zarr"
    write_store_from_arrays(
        path, np.zeros((2, 3, 8, 8), np.uint8), np.zeros((2, 6), np.uint8), ["a", "b"], [0, 2], _series(1)
    )
    g = zarr.open_group(str(path), mode="r+")
    g.attrs["state"] = "converting"
    with pytest.raises(UserError, match="has not finished"):
        open_store(path)
    assert open_store(path, allow_incomplete=True).n_slices == 2
    with pytest.raises(UserError, match="not an ich store"):
        open_store(tmp_path)


def test_bad_arrays_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        write_store_from_arrays(
            tmp_path / "a",
            np.zeros((1, 3, 8, 8), np.int16),
            np.zeros((1, 6), np.uint8),
            ["a"],
            [0, 1],
            _series(1),
        )
    with pytest.raises(ValueError, match="study_offsets"):
        write_store_from_arrays(
            tmp_path / "b",
            np.zeros((2, 3, 8, 8), np.uint8),
            np.zeros((2, 6), np.uint8),
            ["a", "b"],
            [0, 1],
            _series(1),
        )


def test_shards_written_by_hand_are_byte_identical_to_zarrs(tmp_path) -> None:
    from ichdata.shardfile import write_images
    from ichdata.store import create_images

    rng = np.random.default_rng(1)
    block = rng.integers(0, 4, (11, 3, 16, 16), dtype=np.uint8) * 60  # compressible, not constant
    block[3] = 0  # an all-air slice: left out of the shard (reads back as the fill value), as zarr does
    mine = create_images(zarr.open_group(str(tmp_path / "a.zarr"), mode="w"), 11, 4, image_size=16)
    ref = create_images(zarr.open_group(str(tmp_path / "b.zarr"), mode="w"), 11, 4, image_size=16)
    for a in range(0, 11, 4):
        write_images(mine, a, block[a : a + 4])  # the last shard holds 3 rows: an edge shard
        with zarr.config.set({"array.write_empty_chunks": True}):
            ref[a : a + 4] = block[a : a + 4]
    for i in range(3):
        key = f"images/c/{i}/0/0/0"
        assert (tmp_path / "a.zarr" / key).read_bytes() == (tmp_path / "b.zarr" / key).read_bytes(), key
    assert np.array_equal(zarr.open_array(str(tmp_path / "a.zarr" / "images"), mode="r")[...], block)
    assert not list((tmp_path / "a.zarr").rglob("*.tmp"))
    # A write that does not fill a shard goes through zarr.
    write_images(mine, 4, block[:2])
    assert np.array_equal(mine[4:6], block[:2])
    assert np.array_equal(mine[6:8], block[6:8])


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 20), shard_size=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_read_shard_reads_what_zarr_reads(tmp_path_factory, n, shard_size, seed) -> None:
    """Every shard, whole or the last partial one, and any leading part of it, read from its file."""
    path = tmp_path_factory.mktemp("s") / "s.zarr"
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, 16, 16), dtype=np.uint8)
    images[rng.random(n) < 0.2] = 0  # an all-zero slice is an absent inner chunk
    s = write_store_from_arrays(
        path,
        images,
        np.zeros((n, 6), np.uint8),
        [f"i{k}" for k in range(n)],
        [0, n],
        _series(1),
        shard_size=shard_size,
    )
    for a in range(0, n, shard_size):
        b = min(a + shard_size, n)
        for stop in (a, a + 1, b):
            got = read_shard(s.images, a, min(stop, b))
            np.testing.assert_array_equal(got, np.asarray(s.images[a : min(stop, b)]))


def test_read_shard_on_damaged_files(tmp_path) -> None:
    """A missing file reads as zarr reads it (the fill value); a damaged index or frame raises."""
    images = np.random.default_rng(0).integers(1, 256, (6, 3, 16, 16), dtype=np.uint8)
    s = write_store_from_arrays(
        tmp_path / "s.zarr",
        images,
        np.zeros((6, 6), np.uint8),
        list("abcdef"),
        [0, 6],
        _series(1),
        shard_size=3,
    )
    shard = tmp_path / "s.zarr" / "images" / "c" / "1" / "0" / "0" / "0"
    good = shard.read_bytes()
    shard.unlink()
    np.testing.assert_array_equal(read_shard(s.images, 3, 6), np.asarray(s.images[3:6]))
    assert not read_shard(s.images, 3, 6).any()
    damaged_index = bytearray(good)
    damaged_index[-10] ^= 0xFF
    shard.write_bytes(bytes(damaged_index))
    with pytest.raises(ValueError, match="CRC-32C of the shard index"):
        read_shard(s.images, 3, 6)
    damaged_frame = bytearray(good)
    damaged_frame[8:40] = bytes(32)
    shard.write_bytes(bytes(damaged_frame))
    with pytest.raises(Exception):  # noqa: B017, PT011 (zstd's own error type and words)
        read_shard(s.images, 3, 6)
    with pytest.raises(Exception):  # noqa: B017, PT011 (zarr's own error type and words)
        np.asarray(s.images[3:6])


def test_every_array_carries_a_checksum_per_chunk(tmp_path) -> None:
    """A CRC-32C on every chunk (zarr's crc32c codec): each slice of `images`, each small array's chunks."""
    from zarr.codecs import Crc32cCodec, ShardingCodec

    from ichdata.store import ARRAYS

    path = tmp_path / "s.zarr"
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 16, 16), dtype=np.uint8)
    write_store_from_arrays(path, images, np.zeros((5, 6), np.uint8), list("abcde"), [0, 2, 5], _series(2))
    group = zarr.open_group(str(path), mode="r")
    for name in ARRAYS:
        codecs = group[name].metadata.codecs  # type: ignore[union-attr]
        if name == "images":
            assert isinstance(codecs[0], ShardingCodec)
            codecs = codecs[0].codecs
        assert isinstance(codecs[-1], Crc32cCodec), name


def test_a_missing_chunk_of_a_small_array_is_refused_not_read_as_zeros(tmp_path) -> None:
    """A chunk file that goes missing would read as the fill value: labels of 0, "no hemorrhage"."""
    path = tmp_path / "s.zarr"
    labels = np.ones((5, 6), np.uint8)
    write_store_from_arrays(
        path, np.ones((5, 3, 8, 8), np.uint8), labels, list("abcde"), [0, 2, 5], _series(2), shard_size=4
    )
    (path / "labels" / "c" / "0" / "0").unlink()
    with pytest.raises(
        UserError, match=r"array labels is damaged \(chunk c/0/0 is missing\); run `ich verify "
    ) as e:
        open_store(path)
    assert "\n" not in str(e.value)
