"""`ich verify` passes a good store and catches a corrupted shard and a missing row."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest
import zarr

from flows.cli import main
from ichdata.convert import ConvertConfig, convert
from ichdata.store import manifest_path, quarantine_csv_path, salt_path, write_array
from ichdata.verify import verify_store


@pytest.fixture(scope="module")
def good(tmp_path_factory, convert_inputs):
    root = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(2)
    for case in ("axial", "coronal", "nonsquare"):
        convert_inputs.write_case(root, case, rng, n=3)
    (root / "notes.txt").write_text("x")
    store = tmp_path_factory.mktemp("out") / "v.zarr"
    convert(ConvertConfig(root, store, shard_size=2), progress=False, client=None)
    return store


@pytest.fixture
def copy(good, tmp_path):
    dst = tmp_path / "v.zarr"
    shutil.copytree(good, dst)
    for side in (manifest_path, quarantine_csv_path, salt_path):
        shutil.copy(side(good), side(dst))
    return dst


def test_a_good_store_verifies(good, capsys) -> None:
    rep = verify_store(good)
    assert rep.ok, rep.problems
    assert rep.n_slices == 9
    assert rep.n_shards == 5
    assert rep.n_manifest_rows == 10
    assert main(["verify", str(good)]) == 0
    assert capsys.readouterr().out.strip().endswith(": OK")


def test_a_corrupted_shard_is_caught(copy, capsys) -> None:
    shard = copy / "images" / "c" / "2" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[100:140] = bytes(40)  # zero a few bytes inside the first compressed slice of shard 2
    shard.write_bytes(bytes(data))
    assert main(["verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "shard 2 (rows 4–5)" in out
    assert "shard 1 " not in out
    assert "shard 3 " not in out


def test_a_pixel_change_that_still_decodes_is_caught(copy) -> None:
    images = zarr.open_array(str(copy / "images"), mode="r+")
    block = np.asarray(images[6:8])
    block[1, 0, 10, 10] ^= 1
    images[6:8] = block
    rep = verify_store(copy)
    assert [p.split(":")[0] for p in rep.problems] == ["shard 3 (rows 6–7)"]


def test_a_missing_row_is_caught(copy, capsys) -> None:
    zarr.open_array(str(copy / "images"), mode="r+").resize((8, 3, 256, 256))
    assert main(["verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "images has 8 rows, image_id has 9" in out


def test_a_file_missing_from_the_quarantine_is_caught(copy) -> None:
    g = zarr.open_group(str(copy), mode="r+")
    for name in ("path", "reason", "detail"):
        write_array(g, f"quarantine/{name}", np.zeros(0, dtype=str))
    rep = verify_store(copy)
    assert "notes.txt: in the manifest but neither in images nor in the quarantine" in rep.problems


def test_a_store_written_from_arrays_verifies(tmp_path) -> None:
    import pandas as pd

    from ichdata.store import write_store_from_arrays

    images = np.random.default_rng(0).integers(0, 256, (5, 3, 16, 16), dtype=np.uint8)
    series = pd.DataFrame({"study_uid": ["s"], "series_uid": ["t"], "patient_key": ["ID_1"]})
    write_store_from_arrays(
        tmp_path / "a.zarr", images, np.zeros((5, 6), np.uint8), list("abcde"), [0, 5], series, shard_size=2
    )
    assert verify_store(tmp_path / "a.zarr").ok


def test_verify_without_a_cluster_reads_shards_on_every_core(good, monkeypatch) -> None:
    """`ich verify` without --workers re-reads the shards on a thread per usable core, not on one."""
    import ichdata.verify

    threads: set[str] = set()
    read = ichdata.verify._shard_checksums

    def spy(store: str, ranges: list[tuple[int, int, int]]) -> list[tuple[int, str]]:
        threads.add(threading.current_thread().name)
        time.sleep(0.05)  # long enough that one thread cannot take every part
        return read(store, ranges)

    monkeypatch.setattr(ichdata.verify, "usable_cpus", lambda: 2)
    monkeypatch.setattr(ichdata.verify, "_shard_checksums", spy)
    rep = verify_store(good)
    assert rep.ok, rep.problems
    assert rep.n_shards == 5
    assert len(threads) == 2
    assert threading.main_thread().name not in threads


def test_files_that_no_array_accounts_for_are_listed(copy, tmp_path, capsys) -> None:
    """Issue 16 item 3: stray shard files of a second writer passed as OK."""
    (copy / "notes.txt").write_text("a user's\n")
    past_the_end = copy / "images" / "c" / "5" / "0" / "0" / "0"  # 9 rows in shards of 2: shards 0-4
    past_the_end.parent.mkdir(parents=True)
    past_the_end.write_bytes(b"\x00" * 64)
    not_a_chunk = copy / "images" / "c" / "0" / "0" / "0" / "x" / "0"
    not_a_chunk.parent.mkdir()
    not_a_chunk.write_bytes(b"")
    leftover = copy / "labels" / "c" / "0" / ".0.77.88.tmp"
    leftover.write_bytes(b"half")
    (copy / "series" / "elsewhere").symlink_to(tmp_path)
    assert main(["verify", str(copy)]) == 1
    out = capsys.readouterr().out
    listed = [line.strip() for line in out.splitlines()[1:]]
    assert listed == [
        f"{copy}/images/c/0/0/0/x/0: not written by ich",
        f"{copy}/images/c/5/0/0/0: a chunk file outside its array's shape",
        f"{copy}/labels/c/0/.0.77.88.tmp: a temporary file a killed write left behind",
        f"{copy}/notes.txt: not written by ich",
        f"{copy}/series/elsewhere: not written by ich",
    ]
