"""`ich verify` passes a good store and catches a corrupted shard and a missing row."""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import zarr

from flows.cli import main
from ichdata.config import ConvertConfig
from ichdata.convert import convert
from ichdata.errors import UserError
from ichdata.store import (
    CLASSES,
    array,
    manifest_path,
    open_store,
    quarantine_csv_path,
    salt_path,
    write_array,
)
from ichdata.verify import verify_store


@pytest.fixture(scope="module")
def good_inputs(tmp_path_factory, convert_inputs) -> tuple[Path, Path]:
    """A source folder (three series, a text file) and a label CSV for its images."""
    root = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(2)
    written = [
        w
        for case in ("axial", "coronal", "nonsquare")
        for w in convert_inputs.write_case(root, case, rng, n=3)
    ]
    (root / "notes.txt").write_text("x")
    out = tmp_path_factory.mktemp("out")
    labels = out / "labels.csv"
    rows = [
        (f"{w.image_id}_{c}", int(v))
        for w in written
        for c, v in zip(CLASSES, rng.integers(0, 2, 6), strict=True)
    ]
    pd.DataFrame(rows, columns=["ID", "Label"]).to_csv(labels, index=False)
    return root, labels


@pytest.fixture(scope="module")
def good(tmp_path_factory, good_inputs):
    root, labels = good_inputs
    store = tmp_path_factory.mktemp("out") / "v.zarr"
    convert(ConvertConfig(root, store, labels=labels, shard_size=2), progress=False, client=None)
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
    from ichdata.store import write_store_from_arrays

    images = np.random.default_rng(0).integers(0, 256, (5, 3, 16, 16), dtype=np.uint8)
    series = pd.DataFrame({"study_uid": ["s"], "series_uid": ["t"], "patient_key": ["ID_1"]})
    write_store_from_arrays(
        tmp_path / "a.zarr", images, np.zeros((5, 6), np.uint8), list("abcde"), [0, 5], series, shard_size=2
    )
    assert verify_store(tmp_path / "a.zarr").ok


def test_verify_takes_the_conversions_cluster_options_checked_alike(good, capsys) -> None:
    """Issue 16 item 14: `ich verify` has `ich convert`'s cluster options (`ClusterConfig`)."""
    assert main(["verify", str(good), "--jobs", "2"]) == 2
    assert capsys.readouterr().err == (
        "ich: error: --jobs: only with --cluster slurm (Dask workers as SLURM jobs)\n"
    )
    assert main(["verify", str(good), "--insecure-scheduler"]) == 2
    assert capsys.readouterr().err == (
        "ich: error: --insecure-scheduler: only with --scheduler or --scheduler-file (an existing cluster)\n"
    )


@pytest.mark.slow
def test_verify_with_workers_rereads_on_a_local_cluster(good, capsys, monkeypatch) -> None:
    """`ich verify --workers 1`: the shards are re-read by a local cluster's worker, not by threads here."""
    import ichdata.verify

    def no_threads(*args: object) -> None:
        raise AssertionError("re-read in this process")

    monkeypatch.setattr(ichdata.verify, "ThreadPoolExecutor", no_threads)
    assert main(["verify", str(good), "--workers", "1"]) == 0
    assert capsys.readouterr().out.strip().endswith(": OK")


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


# --- checksums of the small arrays, and what verify checks beyond them (issue 16, item 8) ---------------


def _silent_flip(chunk: Path, still_valid: Callable[[bytes, bytes], bool]) -> None:
    """Flip the first bit of `chunk`'s zstd frame whose frame still decodes, to other values `still_valid`.

    The damage a store of the earlier format takes without a word: zstd frames carry no checksum of
    their own, and the values read back look plausible (RSNA: one bit relabelled 675 of 720 cells).
    The chunk's trailing CRC-32C, if its array has one, is kept as it was.
    """
    from numcodecs.zstd import Zstd
    from zarr.codecs import Crc32cCodec

    array_folder = chunk.parent
    while not (array_folder / "zarr.json").is_file():
        array_folder = array_folder.parent
    codecs = zarr.open_array(str(array_folder), mode="r").metadata.codecs  # type: ignore[union-attr]
    trailer = 4 if isinstance(codecs[-1], Crc32cCodec) else 0
    data = chunk.read_bytes()
    frame, crc = data[: len(data) - trailer], data[len(data) - trailer :]
    good = Zstd().decode(frame)
    for at in range(len(frame)):
        for bit in range(8):
            flipped = bytearray(frame)
            flipped[at] ^= 1 << bit
            try:
                out = bytes(Zstd().decode(bytes(flipped)))
            except Exception:
                continue
            if len(out) == len(good) and out != good and still_valid(bytes(good), out):
                chunk.write_bytes(bytes(flipped) + crc)
                return
    raise AssertionError(f"{chunk}: no bit flip that still decodes")


def _labels_still_valid(good: bytes, out: bytes) -> bool:
    return set(out) <= {0, 1, 255}


def _positions_still_valid(good: bytes, out: bytes) -> bool:
    was, now = np.frombuffer(good, np.float64), np.frombuffer(out, np.float64)
    return bool(np.isfinite(now).all() and np.allclose(was, now, atol=1e-3))


@pytest.mark.parametrize(
    ("name", "key", "still_valid"),
    [("labels", "c/0/0", _labels_still_valid), ("slice_position", "c/0", _positions_still_valid)],
)
def test_a_flipped_bit_in_a_small_array_is_caught_and_a_rerun_rewrites_it(
    copy: Path,
    good_inputs: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    key: str,
    still_valid: Any,
) -> None:
    _silent_flip(copy / name / key, still_valid)
    assert main(["verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert f"array {name}: chunk {key} fails its CRC-32C checksum" in out
    with pytest.raises(UserError) as caught:
        open_store(copy)
    assert "\n" not in str(caught.value)
    assert f"array {name} is damaged" in str(caught.value)
    assert "ich verify" in str(caught.value)
    # Training stops before any work, in one line.
    assert main(["train", str(copy), "--out", str(tmp_path / "run"), "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ich: error: ")
    assert "\n" not in err
    assert f"array {name} is damaged" in err
    # `ich convert` with the same arguments rewrites the small arrays from the manifest.
    root, labels = good_inputs
    convert(ConvertConfig(root, copy, labels=labels, shard_size=2), progress=False, client=None)
    rep = verify_store(copy)
    assert rep.ok, rep.problems


def test_a_damaged_done_marker_is_caught(copy: Path) -> None:
    marker = copy / "conversion" / "shard_done" / "c" / "1"
    data = bytearray(marker.read_bytes())
    data[len(data) // 2] ^= 0x10
    marker.write_bytes(bytes(data))
    rep = verify_store(copy)
    assert [p for p in rep.problems if "done-marker" in p] == [
        "shard 1: its done-marker (conversion/shard_done) is damaged (ValueError)"
    ]


def test_labels_that_disagree_with_the_manifest_are_caught(copy: Path) -> None:
    """Valid values, valid checksums, the wrong story: the manifest (the commit record) says otherwise."""
    g = zarr.open_group(str(copy), mode="r+")
    labels = np.asarray(array(g, "labels")[...])
    labels[3] = np.where(labels[3] == 1, 0, 1)
    write_array(g, "labels", labels)
    rep = verify_store(copy)
    assert len(rep.problems) == 1
    assert re.fullmatch(r"row 3 \(ID_\w+\): labels \[.*\] differ from the manifest's \[.*\]", rep.problems[0])


def test_windows_other_than_ours_are_caught(copy: Path) -> None:
    g = zarr.open_group(str(copy), mode="r+")
    windows = list(g.attrs["windows"])  # type: ignore[arg-type]
    windows[0] = {"name": "brain", "level": 40, "width": 120}
    g.attrs["windows"] = windows
    rep = verify_store(copy)
    assert rep.problems == [
        f"attribute windows is {windows}, expected this ich's brain 40/80, subdural 80/200, bone 600/2800"
    ]


def test_the_salt_beside_the_store_is_checked(copy: Path) -> None:
    """Present (the store has salted patient keys), well-formed, and the salt the keys were made with."""
    salt = salt_path(copy)
    assert verify_store(copy).ok
    original = salt.read_text()
    salt.write_text("00" * 16 + "\n")  # another salt: series appended with it would get other keys
    assert verify_store(copy).problems == [
        f"{salt}: not the salt this store's patient keys were made with (the store's salt_check attribute "
        "differs): put the store's own salt file back"
    ]
    salt.write_text("not hex\n")
    assert verify_store(copy).problems == [
        f"{salt}: not a salt `ich convert` wrote (32 hexadecimal digits expected)"
    ]
    salt.unlink()
    (problem,) = verify_store(copy).problems
    assert problem.startswith(f"{salt}: missing; the store's patient keys were made with it")
    salt.write_text(original)
    g = zarr.open_group(str(copy), mode="r+")
    keys = np.asarray(array(g, "series/patient_key")[...], dtype=object).astype(str)
    keys[0] = "Doe^Jane"
    write_array(g, "series/patient_key", keys)
    problems = verify_store(copy).problems
    assert "series 0: patient key is neither an RSNA id nor a salted key (P + 16 hex digits)" in problems
    assert any(p.endswith("has another patient key than the manifest records for it") for p in problems)


def test_a_store_of_an_earlier_release_verifies_with_notes_until_a_rerun_adds_checksums(
    tmp_path: Path, convert_inputs: Any, monkeypatch: pytest.MonkeyPatch, earlier_release_codecs: None
) -> None:
    root = tmp_path / "src"
    convert_inputs.write_case(root, "axial", np.random.default_rng(2), n=3)
    store = tmp_path / "old.zarr"
    config = ConvertConfig(root, store, shard_size=2)
    convert(config, progress=False, client=None)  # written as the earlier release writes
    rep = verify_store(store)
    assert rep.ok, rep.problems
    assert rep.notes[0].startswith("arrays labels, image_id, study_offsets, ")
    assert "carry no checksum (written by an earlier ich)" in rep.notes[0]
    assert rep.notes[1].startswith("images: its slices carry no checksum of their own")
    assert "note: arrays labels, image_id" in str(rep)
    assert open_store(store).n_slices == 3  # it opens and trains as before

    monkeypatch.undo()  # this release
    convert(config, progress=False, client=None)  # nothing new: the commit rewrites the small arrays
    rep = verify_store(store)
    assert rep.ok, rep.problems
    assert len(rep.notes) == 1
    assert rep.notes[0].startswith("images:")  # the shards stay as written; --overwrite re-converts them
    g = zarr.open_group(str(store), mode="r")
    assert g.attrs["salt_check"]
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    convert(config, progress=False, client=None)  # and now a re-run writes nothing
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()} == before
