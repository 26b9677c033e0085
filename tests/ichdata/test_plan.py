"""The plan: store order, shard keys, duplicates, patient keys, labels, and refusing another plan's store."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ichdata.errors import UserError
from ichdata.order import slice_order
from ichdata.plan import patient_key, plan
from ichdata.reasons import Reason
from ichdata.scan import Manifest, table_from_records
from ichdata.store import CLASSES, manifest_path, salt_path


def _slice(
    path: str, iid: str, series: str, pos: float, patient: str = "ID_00aa", inst: int | None = None
) -> dict:
    return {
        "path": path,
        "size": 1000,
        "mtime_ns": 5,
        "reason": "",
        "detail": "",
        "image_id": iid,
        "study_uid": f"st.{series}",
        "series_uid": series,
        "patient_id": patient,
        "slice_position": pos,
        "instance_number": inst,
        "rows": 512,
        "cols": 512,
    }


def _manifest(tmp_path: Path, records: list[dict]) -> Manifest:
    return Manifest(tmp_path / "src", table_from_records(records))


def _records() -> list[dict]:
    recs = [
        _slice(f"b/{k}", f"ID_b{k}", "2.b", float(-k)) for k in range(5)
    ]  # file order = reverse slice order
    recs += [_slice(f"a/{k}", f"ID_a{k}", "1.a", 2.0 * k, patient="MRN 123") for k in range(4)]
    recs.append(
        {"path": "z.txt", "size": 3, "mtime_ns": 5, "reason": "not_dicom", "detail": "no DICOM preamble"}
    )
    return recs


def test_store_order_series_contiguous_by_position(tmp_path) -> None:
    p = plan(_manifest(tmp_path, _records()), tmp_path / "s.zarr", shard_size=4)
    assert p.rows["image_id"].tolist() == [f"ID_a{k}" for k in range(4)] + [
        f"ID_b{k}" for k in (4, 3, 2, 1, 0)
    ]
    assert p.series["series_uid"].tolist() == ["1.a", "2.b"]
    assert p.study_offsets.tolist() == [0, 4, 9]
    assert p.n_shards == 3
    assert [p.shard_rows(i) for i in range(3)] == [(0, 4), (4, 8), (8, 9)]
    assert p.quarantine[["path", "reason"]].values.tolist() == [["z.txt", "not_dicom"]]
    assert (p.labels == 255).all()


def test_shard_keys_are_stable_and_follow_content(tmp_path) -> None:
    recs = _records()
    p1 = plan(_manifest(tmp_path, recs), tmp_path / "s.zarr", shard_size=4)
    p2 = plan(_manifest(tmp_path, list(reversed(recs))), tmp_path / "s.zarr", shard_size=4)
    assert [p1.shard_key(i) for i in range(3)] == [p2.shard_key(i) for i in range(3)]
    assert p1.plan_hash == p2.plan_hash
    recs[-2] = {**recs[-2], "mtime_ns": 6}  # ID_a3 changed on disk: only its shard's key changes
    p3 = plan(_manifest(tmp_path, recs), tmp_path / "s.zarr", shard_size=4)
    assert [p1.shard_key(i) == p3.shard_key(i) for i in range(3)] == [False, True, True]
    # Dropping a row at pixel time changes the keys from its shard on, not before.
    p4 = p1.without(pd.DataFrame({"path": ["b/2"], "reason": ["undecodable"], "detail": ["bad RLE"]}))
    assert p4.n_slices == 8
    assert p4.study_offsets.tolist() == [0, 4, 8]
    assert p4.shard_key(0) == p1.shard_key(0)
    assert p4.shard_key(1) != p1.shard_key(1)
    assert p4.quarantine.set_index("path").at["b/2", "reason"] == "undecodable"


def test_duplicates_keep_the_first_file_and_name_it(tmp_path) -> None:
    recs = [*_records(), _slice("a/0-copy", "ID_a0", "1.a", 0.0), _slice("0-early", "ID_b1", "2.b", -1.0)]
    p = plan(_manifest(tmp_path, recs), tmp_path / "s.zarr")
    q = p.quarantine.set_index("path")
    assert q.at["a/0-copy", "reason"] == Reason.DUPLICATE
    assert q.at["a/0-copy", "detail"].endswith("stored from a/0")
    assert q.at["b/1", "reason"] == Reason.DUPLICATE
    assert q.at["b/1", "detail"].endswith("stored from 0-early")
    assert p.n_slices == 9
    assert p.n_slices + len(p.quarantine) == len(recs)


def test_patient_keys_pseudonymise_non_rsna_ids(tmp_path) -> None:
    p = plan(_manifest(tmp_path, _records()), tmp_path / "s.zarr")
    keys = dict(zip(p.series["series_uid"], p.series["patient_key"], strict=True))
    assert keys["2.b"] == "ID_00aa"
    salt = bytes.fromhex(salt_path(tmp_path / "s.zarr").read_text())
    assert keys["1.a"] == patient_key("MRN 123", salt)
    # A salted BLAKE2b digest, nothing of the raw id (its digits may occur in the hex by chance, so
    # the check is on the form: "P" and 16 hex digits can never spell "MRN 123").
    assert re.fullmatch(r"P[0-9a-f]{16}", keys["1.a"])
    assert patient_key("MRN 123", salt) != patient_key("MRN 124", salt)
    assert patient_key("MRN 123", salt) != patient_key("MRN 123", b"another salt....")


def test_labels_join_by_image_id(tmp_path) -> None:
    table = pd.DataFrame(
        [[0, 1, 0, 0, 0, 1], [1, 0, 0, 0, 0, 1]],
        index=pd.Index(["ID_a2", "ID_b4"], name="image_id"),
        columns=CLASSES,
    ).astype(np.uint8)
    p = plan(_manifest(tmp_path, _records()), tmp_path / "s.zarr", labels=table)
    ids = p.rows["image_id"].tolist()
    assert p.labels[ids.index("ID_a2")].tolist() == [0, 1, 0, 0, 0, 1]
    assert p.labels[ids.index("ID_b4")].tolist() == [1, 0, 0, 0, 0, 1]
    assert (np.delete(p.labels, [ids.index("ID_a2"), ids.index("ID_b4")], axis=0) == 255).all()


def test_another_plans_store_is_refused(tmp_path) -> None:
    from ichdata.convert import convert_shards
    from ichdata.finalize import finalize

    src = tmp_path / "src"
    src.mkdir()
    m = _manifest(tmp_path, [_records()[-1]])  # nothing to render: only a set-aside file
    finalize(convert_shards(plan(m, tmp_path / "s.zarr", shard_size=4)))
    assert manifest_path(tmp_path / "s.zarr").is_file()
    with pytest.raises(UserError, match=r"different plan .*shard size 4.*shard size 8.*--overwrite"):
        plan(m, tmp_path / "s.zarr", shard_size=8)
    assert plan(m, tmp_path / "s.zarr").shard_size == 4  # no --shard-size: the store's
    assert plan(m, tmp_path / "s.zarr", shard_size=8, overwrite=True).shard_size == 8
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an ich store"):
        plan(m, tmp_path / "other")


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 2),
            st.sampled_from([0.0, 1.5, 1.5, -3.0, 2.25]),
            st.one_of(st.none(), st.integers(1, 3)),
        ),
        min_size=1,
        max_size=14,
    )
)
def test_order_within_each_series_is_slice_order(tmp_path_factory, slices) -> None:
    """The plan sorts all series at once; it must agree with `ichdata.order.slice_order` on each."""
    tmp = tmp_path_factory.mktemp("o")
    recs = [
        _slice(f"f{k:02d}", f"ID_{(k * 7919) % 101:03d}_{k}", f"s{series}", pos, inst=inst)
        for k, (series, pos, inst) in enumerate(slices)
    ]
    p = plan(_manifest(tmp, recs), tmp / "s.zarr")
    for s_uid in sorted({r["series_uid"] for r in recs}):
        mine = [r for r in recs if r["series_uid"] == s_uid]
        want = slice_order(
            [r["slice_position"] for r in mine],
            [r["instance_number"] for r in mine],
            [r["image_id"] for r in mine],
        )
        got = p.rows.loc[p.rows["path"].isin([r["path"] for r in mine]), "path"].tolist()
        assert got == [mine[i]["path"] for i in want]
