"""File names stay out of the store unless asked (`--keep-paths`; issue 11 item 15).

Non-anonymised exports name folders and files after patients. Without `--keep-paths` no byte of the
store names an input file; the manifest beside it, which stays local, keeps the paths, so that
`ich verify`, `ich quarantine` and every reader on the converting machine still see them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
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
from ichdata.labels import CLASSES
from ichdata.pathkeys import keys, local_paths, scrub_details
from ichdata.store import ICH_ATTR, is_ich_store, manifest_path, open_store, write_array
from ichdata.testing import stored_from_hu, write_ct_slice
from ichdata.verify import verify_store

PHI = ("DOE_JANE", "MRN12345")
NAMED = "DOE_JANE/DOE_JANE_19700101_MRN12345.dcm"
COPY = "DOE_JANE/DOE_JANE_copy_MRN12345.dcm"
NOTES = "DOE_JANE/MRN12345_notes.txt"


def _archive(root: Path) -> Path:
    """Three slices of one series in a folder named after the patient, an exact copy and a note."""
    rng = np.random.default_rng(15)
    for k, name in enumerate((NAMED, "DOE_JANE/DOE_JANE_19700101_MRN12345_2.dcm", "DOE_JANE/slice3.dcm")):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write_ct_slice(
            root / name,
            stored_from_hu(rng.normal(40.0, 20.0, (64, 64))),
            image_id=f"1.2.826.0.15.1.1.{k}",
            study_uid="1.2.826.0.15",
            series_uid="1.2.826.0.15.1",
            patient_id="MRN12345",
            image_position=(0.0, 0.0, 5.0 * k),
        )
    shutil.copy(root / NAMED, root / COPY)  # a duplicate: its detail names the stored file
    (root / NOTES).write_text("not DICOM")
    return root


def _names_in_store(store: Path) -> list[str]:
    """Every place under `store` that names the patient: raw file bytes, and decoded string arrays."""
    hits = [
        f"{f.relative_to(store)}: {m}"
        for f in sorted(store.rglob("*"))
        if f.is_file()
        for m in PHI
        if m.encode() in f.read_bytes()
    ]
    group = zarr.open_group(str(store), mode="r")
    for name, member in group.members(max_depth=None):
        if isinstance(member, zarr.Array) and member.dtype.kind in "OTU":
            values = [str(v) for v in np.asarray(member[...]).ravel()]
            hits += [f"{name}: {v}" for v in values if any(m in v for m in PHI)]
    return hits


def _stored_paths(store: Path) -> list[str]:
    """The `source_path` array as the store holds it (not as `open_store` shows it on this machine)."""
    return [str(v) for v in np.asarray(zarr.open_array(str(store / "source_path"), mode="r")[...])]


def _shared_copy(store: Path, dst: Path) -> Path:
    """The store as someone it was shared with has it: the folder, without the files beside it."""
    shutil.copytree(store, dst)
    return dst


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _archive(tmp_path_factory.mktemp("archive"))


def test_file_names_stay_out_of_the_store(
    archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "s.zarr"
    summary = convert(ConvertConfig(archive, store, shard_size=2), progress=False, client=None)
    assert (summary.n_slices, summary.quarantined) == (3, {"duplicate": 1, "not_dicom": 1})
    assert _names_in_store(store) == []
    assert verify_store(store).ok
    assert main(["verify", str(store)]) == 0
    assert capsys.readouterr().out.strip().endswith(": OK")

    # On this machine the manifest beside the store names the files: readers see the paths.
    s = open_store(store)
    assert NAMED in set(s.source_path)
    q = s.quarantine.set_index("path")
    assert q.at[NOTES, "reason"] == "not_dicom"
    assert q.at[COPY, "reason"] == "duplicate"
    assert NAMED in q.at[COPY, "detail"]
    assert main(["quarantine", str(store)]) == 0
    assert NOTES in capsys.readouterr().out

    # Shared without the manifest: each file is a key, the manifest's row; no detail names a file.
    shared = open_store(_shared_copy(store, tmp_path / "shared.zarr"))
    manifest = pd.read_parquet(manifest_path(store))
    keys = [*shared.source_path, *shared.quarantine["path"]]
    assert all(k.startswith("#") for k in keys), keys
    assert sorted(manifest["path"][[int(k[1:]) for k in keys]]) == sorted(manifest["path"])
    rows = manifest.set_index("path")["row"]
    for r, key in enumerate(shared.source_path):
        assert rows[manifest["path"][int(key[1:])]] == r
    assert not any(m in d for d in shared.quarantine["detail"] for m in PHI)

    # `ich verify` catches a file name written into a store that has none.
    named = np.asarray(open_store(store).source_path, dtype=str)
    write_array(zarr.open_group(str(store), mode="r+"), "source_path", named)
    problems = verify_store(store).problems
    assert problems == [
        f"source_path row {r} names a file, not its manifest row, in a store without --keep-paths"
        for r in range(3)
    ]


def test_keep_paths_keeps_them(archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "s.zarr"
    assert main(["convert", str(archive), str(store), "--keep-paths", "--shard-size", "2", "--quiet"]) == 0
    assert NAMED in _stored_paths(store)
    assert NAMED in set(open_store(_shared_copy(store, tmp_path / "shared.zarr")).source_path)
    assert main(["verify", str(store)]) == 0
    assert capsys.readouterr().out.strip().endswith(": OK")


def test_a_rerun_applies_its_own_choice_to_the_whole_store(archive: Path, tmp_path: Path) -> None:
    """`--keep-paths` is not part of the plan: a re-run rewrites the names, never the images."""
    store = tmp_path / "s.zarr"
    convert(ConvertConfig(archive, store, shard_size=2, keep_paths=True), progress=False, client=None)
    assert NAMED in _stored_paths(store)
    again = convert(ConvertConfig(archive, store), progress=False, client=None)
    assert (again.n_new, again.n_shards_written) == (0, 0)
    assert _names_in_store(store) == []
    assert verify_store(store).ok
    back = convert(ConvertConfig(archive, store, keep_paths=True), progress=False, client=None)
    assert (back.n_new, back.n_shards_written) == (0, 0)
    assert NAMED in _stored_paths(store)
    assert verify_store(store).ok


def test_details_name_files_by_key_and_read_back() -> None:
    """Paths with spaces, and a path that begins another, are found whole; other words stay."""
    manifest = pd.DataFrame(
        {
            "path": ["DOE JANE/a.dcm", "x.dcm", "x.dcm.bak"],
            "detail": ["", "", "image id 1 is already stored from DOE JANE/a.dcm, (x.dcm)"],
        }
    )
    shared = scrub_details(manifest, [manifest.at[2, "detail"], "x.dcm.bak: see x.dcm.bakery", ""])
    assert list(shared) == ["image id 1 is already stored from #0, (#1)", "#2: see x.dcm.bakery", ""]
    assert list(keys(manifest, ["x.dcm.bak", "DOE JANE/a.dcm"])) == ["#2", "#0"]
    with pytest.raises(ValueError, match=r"^y\.dcm: not in the manifest"):
        keys(manifest, ["x.dcm", "y.dcm"])


def test_keys_read_back_from_the_manifest_beside(tmp_path: Path) -> None:
    manifest = pd.DataFrame({"path": ["a.dcm", "b.txt"], "detail": ["", "not DICOM"]})
    manifest.to_parquet(tmp_path / "m.parquet")
    quarantine = pd.DataFrame({"path": ["#1", "#9"], "reason": ["not_dicom"] * 2, "detail": ["", "kept"]})
    paths, q = local_paths(tmp_path / "m.parquet", np.array(["#0", "#12", "a.dcm"]), quarantine)
    # A key of no manifest row, or no key, stays as it is (`ich verify` reports it).
    assert list(paths) == ["a.dcm", "#12", "a.dcm"]
    assert q.to_dict("list") == {
        "path": ["b.txt", "#9"],
        "reason": ["not_dicom"] * 2,
        "detail": ["not DICOM", "kept"],
    }
    same, q_same = local_paths(tmp_path / "absent.parquet", paths, quarantine)
    assert same is paths
    assert q_same is quarantine


# ------------------------------------------- the source folder's own name (issue 16 items 9 and 12)


@pytest.fixture(scope="module")
def named_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The export folder itself is named after the patient, and holds its label CSV."""
    root = _archive(tmp_path_factory.mktemp("exports") / "MRN12345_DOE_JANE_export")
    image_ids = [f"1.2.826.0.15.1.1.{k}" for k in range(3)]
    rows = [f"{i}_{c},{int(c == 'any')}" for i in image_ids for c in CLASSES]
    (root / "labels_DOE_JANE.csv").write_text("ID,Label\n" + "\n".join(rows) + "\n")
    return root


def test_the_source_folder_and_label_csv_names_stay_out_of_the_store(
    named_export: Path, tmp_path: Path
) -> None:
    """Issue 16 item 9: `provenance.source` and `plan.config.source` held SOURCE's path."""
    labels = named_export / "labels_DOE_JANE.csv"
    store = tmp_path / "s.zarr"
    summary = convert(
        ConvertConfig(named_export, store, labels=labels, shard_size=2), progress=False, client=None
    )
    assert summary.n_labelled == 3
    assert _names_in_store(store) == []
    attrs = open_store(store).attrs
    assert set(attrs["plan"]) == {"config", "plan_hash"}
    assert set(attrs["plan"]["config"]) == {
        "format_version",
        "render_version",
        "image_size",
        "shard_size",
        "source_id",
    }
    assert (attrs["provenance"]["source"], attrs["provenance"]["labels"]) == (None, None)
    # The same source is recognised by its keyed digest: an unchanged re-run writes nothing; another
    # source is refused.
    again = convert(ConvertConfig(named_export, store, labels=labels), progress=False, client=None)
    assert (again.n_new, again.n_shards_written) == (0, 0)
    other = tmp_path / "other"
    shutil.copytree(named_export, other)
    with pytest.raises(
        UserError, match=r"made from a different plan \(another SOURCE folder than this run's"
    ):
        convert(ConvertConfig(other, store), progress=False, client=None)
    # With --keep-paths the store names them.
    convert(ConvertConfig(named_export, store, labels=labels, keep_paths=True), progress=False, client=None)
    prov = open_store(store).attrs["provenance"]
    assert (prov["source"], prov["labels"]) == (str(named_export.resolve()), str(labels))


def test_a_store_that_holds_its_source_path_is_extended_by_the_same_command(
    named_export: Path, tmp_path: Path
) -> None:
    """A store of the release before `source_id` (the path in its attributes) is no 'different plan'.

    Its attributes are rewritten as that release wrote them; the next run of the same command writes
    no shard (the shard keys are those it made) and leaves no path in the store.
    """
    store = tmp_path / "s.zarr"
    convert(ConvertConfig(named_export, store, shard_size=2), progress=False, client=None)
    group = zarr.open_group(str(store), mode="r+")
    attrs: dict[str, Any] = dict(group.attrs)
    config = {
        "format_version": attrs["format_version"],
        "render_version": 1,
        "image_size": 256,
        "shard_size": 2,
        "source": os.path.realpath(named_export),
    }
    config_hash = hashlib.blake2b(json.dumps(config, sort_keys=True).encode(), digest_size=16).hexdigest()
    attrs["plan"] = {"config": config, "config_hash": config_hash, "plan_hash": attrs["plan"]["plan_hash"]}
    attrs["provenance"] = {**attrs["provenance"], "source": str(named_export)}
    del attrs[ICH_ATTR]  # older still: before the attribute namespace, told by the plan's `source`
    group.attrs.put(attrs)
    assert _names_in_store(store) != []
    assert is_ich_store(store)

    again = convert(ConvertConfig(named_export, store), progress=False, client=None)
    assert (again.n_new, again.n_shards_written) == (0, 0)
    assert _names_in_store(store) == []
    assert "source_id" in open_store(store).attrs["plan"]["config"]
    assert verify_store(store).ok
    assert is_ich_store(store)  # told by the namespace now, since its plan holds no `source`


_LOCALES = {"C": {"LC_ALL": "C", "PYTHONUTF8": "0"}, "C.UTF-8": {"LC_ALL": "C.UTF-8"}}


@pytest.mark.slow
@pytest.mark.parametrize("first", sorted(_LOCALES))
def test_a_non_ascii_source_is_the_same_source_in_every_locale(tmp_path: Path, first: str) -> None:
    """Issue 16 item 12: the same non-ASCII SOURCE under `LC_ALL=C PYTHONUTF8=0` and a UTF-8 locale.

    The path's text differed between the two, so the store was 'made from a different plan' in the other.
    """
    source = _archive(tmp_path / "Müller_Jürgen")
    store = tmp_path / "s.zarr"
    then = next(name for name in _LOCALES if name != first)
    for name, expect in ((first, "wrote 3 slices"), (then, "wrote 0 slices")):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONUTF8"))}
        done = subprocess.run(
            [sys.executable, "-m", "flows.cli", "convert", os.fsencode(source), os.fsencode(store), "--quiet"],
            env={**env, **_LOCALES[name]}, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert done.returncode == 0, f"{name}: {done.stderr}"
        assert f"{expect} (3 in store" in done.stdout, f"{name}: {done.stdout}"


def test_a_file_that_vanishes_mid_run_is_set_aside_without_its_path_in_the_store(tmp_path: Path) -> None:
    """Issue 16 item 9: the detail of a file removed between the scan and its shard named it."""
    from ichdata.convert import convert_shards, plan_conversion, scan_source
    from ichdata.finalize import finalize

    source = _archive(tmp_path / "DOE_JANE_export")
    store = tmp_path / "s.zarr"
    config = ConvertConfig(source, store, shard_size=2)
    p = plan_conversion(config, scan_source(config))
    gone = source / NAMED
    gone.unlink()  # after the scan, before its shard
    finalize(convert_shards(p), config=config)

    assert _names_in_store(store) == []
    shared = zarr.open_array(str(store / "quarantine" / "detail"), mode="r")
    details = [str(d) for d in np.asarray(shared[...])]
    assert not [d for d in details if str(source) in d or "DOE_JANE" in d or "MRN12345" in d], details
    s = open_store(store)
    assert s.n_slices == 2
    q = s.quarantine.set_index("path")
    assert q.at[NAMED, "reason"] == "undecodable"
    assert q.at[NAMED, "detail"] == "FileNotFoundError: No such file or directory"
