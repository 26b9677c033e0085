"""Streaming the store: study windows, padding, sharding over workers and ranks, the patient split."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from ichdata.errors import UserError
from ichdata.store import Store
from ichmodel.data import (
    SliceDataset,
    StudyBatchSampler,
    StudyDataset,
    StudyItem,
    collate_studies,
    make_loader,
    read_split,
    split_by_patient,
    write_split,
)
from ichmodel.reader import ImageReader

#: slices per series of the `tiny_store` fixture (tests/ichmodel/conftest.py)
LENGTHS = (5, 9, 3, 12, 7, 4, 6, 8)


def test_items_are_whole_studies_read_from_the_store(tiny_store: Store) -> None:
    ds = StudyDataset(tiny_store, max_len=None, reader="zarr")
    assert len(ds) == len(LENGTHS)
    for s in range(len(LENGTHS)):
        item = ds[s]
        a, b = tiny_store.series_rows(s)
        assert item["images"].dtype == torch.uint8
        assert item["images"].shape == (LENGTHS[s], 3, 64, 64)
        assert np.array_equal(item["images"].numpy(), tiny_store.read_series(s))
        assert np.array_equal(item["labels"].numpy(), tiny_store.labels[a:b])
        assert item["image_id"] == tiny_store.image_id[a:b].tolist()
        assert item["mask"].all()
        assert (item["series"], item["start"], item["weight"]) == (s, 0, 1.0)


def test_long_studies_are_cut_into_windows(tiny_store: Store) -> None:
    ds = StudyDataset(tiny_store, series=[1, 3], max_len=4, reader="zarr")
    # 9 slices -> 3 + 3 + 3, 12 slices -> 4 + 4 + 4
    assert ds.windows.tolist() == [[1, 0, 3], [1, 3, 6], [1, 6, 9], [3, 0, 4], [3, 4, 8], [3, 8, 12]]
    item = ds[4]
    a, _ = tiny_store.series_rows(3)
    assert (item["series"], item["start"]) == (3, 4)
    assert np.array_equal(item["images"].numpy(), tiny_store.read_series(3, 4, 8))
    assert item["image_id"] == tiny_store.image_id[a + 4 : a + 8].tolist()
    assert ds.n_slices == 21


def test_slice_dataset_has_one_slice_per_item(tiny_store: Store) -> None:
    ds = SliceDataset(tiny_store, series=[0, 2], reader="zarr")
    assert len(ds) == LENGTHS[0] + LENGTHS[2]
    item = ds[6]  # second slice of series 2
    assert item["images"].shape == (1, 3, 64, 64)
    assert np.array_equal(item["images"].numpy(), tiny_store.read_series(2, 1, 2))


def test_collate_pads_with_a_mask() -> None:
    def item(n: int, s: int) -> StudyItem:
        return {
            "images": torch.full((n, 3, 4, 4), s + 1, dtype=torch.uint8),
            "labels": torch.ones(n, 6, dtype=torch.uint8),
            "mask": torch.ones(n, dtype=torch.bool),
            "image_id": [f"ID_{s}_{k}" for k in range(n)],
            "series": s,
            "start": 0,
            "weight": 1.0 if s else 0.0,
        }

    batch = collate_studies([item(2, 0), item(5, 1)])
    assert batch["images"].shape == (2, 5, 3, 4, 4)
    assert batch["mask"].tolist() == [[True, True, False, False, False], [True] * 5]
    assert batch["lengths"].tolist() == [2, 5]
    assert (batch["images"][0, 2:] == 0).all()
    assert (batch["labels"][0, 2:] == 255).all()
    assert (batch["images"][0, :2] == 1).all()
    assert batch["image_id"][0] == ["ID_0_0", "ID_0_1"]
    assert batch["weight"].tolist() == [0.0, 1.0]


@pytest.mark.parametrize("workers", [0, 2])
def test_plain_dataloader_with_shuffle(tiny_store: Store, workers: int) -> None:
    """`StudyDataset(store)` with defaults in a plain DataLoader: every study once, in random order.

    With workers, the default reader (`auto`) reads with tensorstore inside the forked workers.
    """
    ds = StudyDataset(tiny_store)
    loader = DataLoader(ds, batch_size=None, shuffle=True, num_workers=workers)
    torch.manual_seed(0)
    first = []
    for it in loader:
        s = int(it["series"])
        assert np.array_equal(it["images"].numpy(), tiny_store.read_series(s))
        first.append((s, int(it["start"])))
    torch.manual_seed(1)
    second = [(int(it["series"]), int(it["start"])) for it in loader]
    assert sorted(first) == [(s, 0) for s in range(len(LENGTHS))]
    assert sorted(second) == sorted(first)
    assert first != second


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # 3 workers on a 2-core CI box
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_loader_covers_every_slice_once_per_epoch(tiny_store: Store, workers: int) -> None:
    ds = StudyDataset(tiny_store, max_len=4, reader="zarr")
    sampler = StudyBatchSampler(len(ds), 3, seed=7)
    loader = make_loader(ds, sampler, workers=workers)
    orders = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        ids: list[str] = []
        order: list[tuple[int, int]] = []
        for batch in loader:
            for row, n in zip(batch["image_id"], batch["lengths"].tolist(), strict=True):
                assert len(row) == n
                ids.extend(row)
            order.extend(zip(batch["series"].tolist(), batch["start"].tolist(), strict=True))
            # a window's rows are its store rows, in slice order
            for k, (s, a) in enumerate(zip(batch["series"].tolist(), batch["start"].tolist(), strict=True)):
                n = int(batch["lengths"][k])
                expected = tiny_store.read_series(s, a, a + n)
                assert np.array_equal(batch["images"][k, :n].numpy(), expected)
        assert Counter(ids) == Counter(tiny_store.image_id.tolist())
        orders.append(order)
    assert orders[0] != orders[1]
    sampler.set_epoch(1)
    again = [(s, a) for b in loader for s, a in zip(b["series"].tolist(), b["start"].tolist(), strict=True)]
    assert again == orders[1]  # the order is a function of (seed, epoch)


def test_forkserver_workers_read_with_tensorstore_the_same_bytes(tiny_store: Store) -> None:
    """Tensorstore runs only in forkserver workers here: this pytest process must stay safe to fork."""
    ds = StudyDataset(tiny_store, max_len=5, reader="tensorstore")
    loader = make_loader(ds, StudyBatchSampler(len(ds), 2, seed=0), workers=2)
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    ids = []
    for batch in loader:
        for k, (s, a) in enumerate(zip(batch["series"].tolist(), batch["start"].tolist(), strict=True)):
            n = int(batch["lengths"][k])
            assert np.array_equal(batch["images"][k, :n].numpy(), tiny_store.read_series(s, a, a + n))
            ids.extend(batch["image_id"][k])
    assert sorted(ids) == sorted(tiny_store.image_id.tolist())
    with pytest.raises(UserError, match="reader 'png' is not one of auto, tensorstore, zarr"):
        StudyDataset(tiny_store, reader="png")


@pytest.mark.parametrize(("n", "batch", "world"), [(8, 3, 1), (8, 3, 2), (7, 2, 3), (2, 4, 3), (13, 1, 4)])
def test_ranks_read_disjoint_windows_and_together_all(n: int, batch: int, world: int) -> None:
    for epoch in range(3):
        per_rank = []
        for rank in range(world):
            s = StudyBatchSampler(n, batch, seed=1, rank=rank, world_size=world)
            s.set_epoch(epoch)
            batches = list(s)
            assert len(batches) == len(s)
            assert all(0 < len(b) <= batch for b in batches)
            per_rank.append([it for b in batches for it in b])
        assert len({len(r) for r in per_rank}) == 1  # the same number of steps on every rank
        real = [i for r in per_rank for i, w in r if w == 1.0]
        assert sorted(real) == list(range(n))  # every window exactly once
        assert all(w in (0.0, 1.0) for r in per_rank for _, w in r)
        assert sum(w == 0.0 for r in per_rank for _, w in r) == world * -(-n // world) - n


def test_split_is_by_patient_and_reusable(tmp_path: Path, tiny_store: Store) -> None:
    series = tiny_store.series
    split = split_by_patient(series, 0.25, seed=3)
    assert set(split.train_series) | set(split.val_series) == set(range(len(series)))
    train_patients = set(series["patient_key"].iloc[split.train_series])
    val_patients = set(series["patient_key"].iloc[split.val_series])
    assert val_patients == set(split.val_patients)
    assert not train_patients & val_patients
    assert val_patients  # something held out
    assert np.array_equal(split.val_series, split_by_patient(series, 0.25, seed=3).val_series)
    path = write_split(tmp_path / "split.json", split, series)
    doc = json.loads(path.read_text())
    assert doc["val_patients"] == sorted(val_patients)
    again = read_split(path, series)
    assert np.array_equal(again.val_series, split.val_series)
    assert np.array_equal(again.train_series, split.train_series)

    # a grown store: a new series of a held-out patient validates, one of a new patient trains
    grown = pd.concat(
        [
            series,
            pd.DataFrame(
                {
                    "study_uid": ["9.1", "9.2"],
                    "series_uid": ["9.1.1", "9.2.1"],
                    "patient_key": [sorted(val_patients)[0], "ID_new"],
                    "n_slices": [4, 4],
                }
            ),
        ],
        ignore_index=True,
    )
    g = read_split(path, grown)
    assert len(series) in set(g.val_series)
    assert len(series) + 1 in set(g.train_series)

    with pytest.raises(UserError, match=r"series are not in the store \(e\.g\. 1\.2\.3\.\d\.1\)"):
        read_split(path, series.iloc[1:])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="not a split written by `ich train`"):
        read_split(tmp_path / "bad.json", series)


def test_split_holds_out_about_the_fraction(store_factory: Callable[..., Store]) -> None:
    store = store_factory(lengths=[3] * 60, size=8, shard_size=64)
    split = split_by_patient(store.series, 0.2, seed=0)
    held = sum(store.series["n_slices"].iloc[split.val_series])
    assert 0.2 * 180 <= held <= 0.2 * 180 + 6  # whole patients: overshoot by at most one patient
    assert len(split_by_patient(store.series, 0.0).val_series) == 0
    with pytest.raises(UserError, match=r"validation fraction 1\.0"):
        split_by_patient(store.series, 1.0)


# --- damaged shards (issue 11, item 8) -----------------------------------------------------------


def _damage(store: Store, shard: int, how: str) -> None:
    """Delete shard `shard` of `images`, or flip one byte in its first zstd frame or in its index."""
    path = Path(store.path) / "images" / "c" / str(shard) / "0" / "0" / "0"
    if how == "deleted":
        path.unlink()
        return
    data = bytearray(path.read_bytes())
    at = 40 if how == "frame" else len(data) - 12  # the index (16 bytes per slice) then its CRC-32C
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("reader", "workers"), [("zarr", 0), ("auto", 2)])
@pytest.mark.parametrize("how", ["deleted", "frame", "index"])
def test_a_damaged_shard_stops_the_loader_with_one_line(
    tiny_store: Store, how: str, reader: str, workers: int
) -> None:
    """A deleted shard must not read as black images, a flipped byte must not train silently."""
    _damage(tiny_store, 1, how)
    ds = StudyDataset(tiny_store, max_len=None, reader=reader)
    loader = make_loader(ds, StudyBatchSampler(len(ds), 2, seed=0), workers=workers)
    with pytest.raises(UserError, match=r"shard 1 \(rows 8–15\) is damaged: .*`ich verify ") as caught:
        for _ in loader:
            pass
    message = str(caught.value)
    assert "\n" not in message
    assert str(tiny_store.path) in message
    if how == "deleted":
        assert "missing" in message


def _two_epochs(store: Store, images: np.ndarray | None = None) -> None:
    """Read every window of `store` twice (two epochs, one process), checking each against `images`.

    `images` defaults to the store's, read through zarr first.
    """
    images = np.asarray(store.images[...]) if images is None else images
    ds = StudyDataset(store, max_len=4, reader="zarr")
    sampler = StudyBatchSampler(len(ds), 3, seed=0)
    loader = make_loader(ds, sampler, workers=0)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for batch in loader:
            for k, (s, a) in enumerate(zip(batch["series"].tolist(), batch["start"].tolist(), strict=True)):
                n = int(batch["lengths"][k])
                row = int(store.study_offsets[s]) + a
                assert np.array_equal(batch["images"][k, :n].numpy(), images[row : row + n])


def test_the_first_epoch_decodes_only_what_it_uses(
    tiny_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each slice carries its CRC-32C: the first pass checks what it reads, with no whole-shard reads."""
    import ichdata.shardfile
    from ichmodel import reader

    images = np.asarray(tiny_store.images[...])  # before counting: zarr checks each CRC-32C too
    decoded: list[int] = []
    real = ichdata.shardfile._decode_shard

    def counting(path: Path, first: int, n: int, *args: Any, **kwargs: Any) -> np.ndarray:
        decoded.append(n - first)
        return real(path, first, n, *args, **kwargs)

    monkeypatch.setattr(ichdata.shardfile, "_decode_shard", counting)
    monkeypatch.setattr(reader, "shard_checksum", lambda block: pytest.fail("a whole shard was checked"))
    crc_of = google_crc32c.value
    slices_checked: list[int] = []

    def counting_crc(data: Any) -> int:
        if len(data) != 16 * tiny_store.shard_size:  # a slice's frame, not a shard's index
            slices_checked.append(len(data))
        return int(crc_of(data))

    monkeypatch.setattr(google_crc32c, "value", counting_crc)
    _two_epochs(tiny_store, images)
    assert sum(decoded) == 2 * tiny_store.n_slices  # every row decoded once per epoch, and no more
    assert len(slices_checked) == tiny_store.n_slices  # each slice's CRC-32C once in this process


def test_a_store_of_an_earlier_release_checks_each_shard_once_per_process(
    store_factory: Callable[..., Store], monkeypatch: pytest.MonkeyPatch, earlier_release_codecs: None
) -> None:
    """Without per-slice checksums, each shard is read whole once and checked against its done-marker."""
    from ichmodel import reader

    store = store_factory("old.zarr")
    assert not reader.inner_checksum(store.images)
    calls: list[int] = []
    real = reader.shard_checksum

    def counting(block: np.ndarray) -> str:
        calls.append(len(block))
        return real(block)

    monkeypatch.setattr(reader, "shard_checksum", counting)
    _two_epochs(store)
    assert sorted(calls) == [6] + [8] * 6  # 54 rows in shards of 8: each of the 7 checked once
    _damage(store, 1, "frame")
    with pytest.raises(UserError, match=r"shard 1 \(rows 8–15\) is damaged"):
        ImageReader(store.path, "zarr", store.n_slices).read(8, 12)


def test_a_store_that_an_append_is_growing_stays_readable(tiny_store: Store) -> None:
    """An append rewrites the last partial shard with new rows (and their checksum) before committing."""
    import zarr

    from ichdata.shardfile import shard_checksum, write_images

    images = zarr.open_array(str(tiny_store.path / "images"), mode="r+")
    markers = zarr.open_array(str(tiny_store.path / "conversion" / "shard_done"), mode="r+")
    old = np.asarray(images[48:54])
    images.resize((60, *images.shape[1:]))
    markers.resize((8,))
    block = np.concatenate([old, np.full((2, *old.shape[1:]), 7, dtype=np.uint8)])
    write_images(images, 48, block)
    markers[6] = f"append:{shard_checksum(block)}"
    ds = StudyDataset(tiny_store, series=[7], max_len=None, reader="zarr")  # rows 46-53: shards 5 and 6
    assert np.array_equal(ds[0]["images"].numpy(), np.asarray(images[46:54]))
    assert np.array_equal(ds[0]["images"][2:].numpy(), old)


# --- a store that cannot train (issue 11, item 9) ------------------------------------------------


def test_check_trainable_refuses_unlabelled_splits(store_factory: Callable[..., Store]) -> None:
    from ichmodel.data import check_trainable

    unlabelled = store_factory("unlabelled.zarr", unlabelled_series=range(len(LENGTHS)))
    split = split_by_patient(unlabelled.series, 0.25, seed=3)
    with pytest.raises(UserError, match=r"the training split has no labelled slice") as caught:
        check_trainable(unlabelled, split)
    assert "\n" not in str(caught.value)
    assert "--labels" in str(caught.value)

    # labels only on the training side: the validation loss would be undefined
    store = store_factory("half.zarr")
    split = split_by_patient(store.series, 0.25, seed=3)
    val_only = store_factory("val_unlabelled.zarr", unlabelled_series=split.val_series.tolist())
    with pytest.raises(UserError, match=r"the validation split has no labelled slice"):
        check_trainable(val_only, split)
    # no validation split at all (--val-fraction 0) is a choice, not an error
    assert check_trainable(val_only, split_by_patient(val_only.series, 0.0)) == []
    assert check_trainable(store, split) == []


def test_check_trainable_names_classes_without_a_positive(store_factory: Callable[..., Store]) -> None:
    from ichmodel.data import check_trainable

    store = store_factory()
    split = split_by_patient(store.series, 0.25, seed=3)
    rows = np.concatenate([np.arange(*store.series_rows(int(s))) for s in split.train_series])
    store.labels[rows, 0] = 0  # no epidural in training
    store.labels[rows, 2] = 0  # nor intraventricular
    warnings = check_trainable(store, split)
    assert len(warnings) == 1
    assert "\n" not in warnings[0]
    assert "epidural, intraventricular" in warnings[0]
    assert f"{len(rows)} labelled training slices" in warnings[0]


def test_the_reader_hands_out_copies_of_the_shards_it_keeps(store_factory: Callable[..., Store]) -> None:
    """The reader keeps the shards it just checked for the next series: what it returns is the caller's."""
    from ichmodel.reader import ImageReader

    store = store_factory(shard_size=8)
    reader = ImageReader(store.path, "zarr", store.n_slices)
    first = reader.read(2, 7)
    expected = np.asarray(store.images[2:7])
    np.testing.assert_array_equal(first, expected)
    first[:] = 0  # a caller writing into its batch (augmentation in place)
    np.testing.assert_array_equal(reader.read(2, 7), expected)
    np.testing.assert_array_equal(reader.read(9, 20), np.asarray(store.images[9:20]))  # across shards


def test_patient_folds_partition_the_patients_a_split_trains_on(store_factory: Callable[..., Store]) -> None:
    from ichmodel.data import split_by_patient, split_folds

    store = store_factory(lengths=tuple(range(3, 23)))  # 20 series of 10 patients
    test = split_by_patient(store.series, 0.2, seed=3).val_patients
    folds = [split_folds(store.series, 3, i, 0.2, seed=3) for i in range(3)]
    patients = set(store.series["patient_key"])
    held = [set(f.val_patients) for f in folds]
    assert all(f.test_patients == test for f in folds)
    assert not held[0] & held[1]
    assert not held[1] & held[2]
    assert not held[0] & held[2]
    assert set.union(*held) == patients - set(test)
    keys = store.series["patient_key"].to_numpy()
    for f in folds:  # a fold run trains on the other folds only, never on test patients
        assert set(keys[f.train_series]) == patients - set(test) - set(f.val_patients)
        assert set(keys[f.val_series]) == set(f.val_patients)
    sizes = [int(store.series["n_slices"].to_numpy()[f.val_series].sum()) for f in folds]
    assert max(sizes) - min(sizes) <= 22  # balanced to within about one patient
    with pytest.raises(UserError, match="--fold 3: expected 0 to 2"):
        split_folds(store.series, 3, 3)


def test_feature_windows_crop_and_reverse_per_epoch(tiny_store: Store) -> None:
    from ichmodel.data import FeatureLoader, FeatureStudies

    n = tiny_store.n_slices
    feats = torch.arange(n, dtype=torch.float16)[:, None].repeat(1, 4)  # row r holds r
    labels = torch.from_numpy(tiny_store.labels)
    ds = FeatureStudies(
        feats, labels, tiny_store.study_offsets, [1, 3], max_len=None, crop=4, reverse=True, seed=1
    )
    offsets = tiny_store.study_offsets
    items = [(0, 1.0), (1, 1.0)]
    plain = ds.batch(items)  # no epoch: whole windows, in order
    assert plain["lengths"].tolist() == [9, 12]
    assert plain["features"][0, :9, 0].tolist() == list(range(offsets[1], offsets[2]))
    assert (plain["labels"][0, 9:] == 255).all()
    assert (plain["features"][0, 9:] == 0).all()
    seen = set()
    for epoch in range(8):
        b = ds.batch(items, epoch)
        assert b["lengths"].tolist() == [4, 4]  # runs of 4 consecutive slices of each study
        for k, s in enumerate((1, 3)):
            rows = b["features"][k, :4, 0].tolist()
            step = rows[1] - rows[0]
            assert step in (1, -1)
            assert all(b2 - a2 == step for a2, b2 in itertools.pairwise(rows))
            assert offsets[s] <= min(rows)
            assert max(rows) < offsets[s + 1]
            np.testing.assert_array_equal(
                b["labels"][k, :4].numpy(), tiny_store.labels[np.asarray(rows, int)]
            )
            seen.add((s, step))
        assert torch.equal(ds.batch(items, epoch)["features"], b["features"])  # a function of the epoch
    assert seen == {(1, 1), (1, -1), (3, 1), (3, -1)}  # reversed about half the time
    sampler = StudyBatchSampler(len(ds), 1, seed=0)
    assert sum(int(x["lengths"].sum()) for x in FeatureLoader(ds, sampler, augment=True)) == 8
