"""`ich predict` on a folder of new studies with a few broken files.

Every good image predicted, the broken ones listed with their reason, the per-study summary taken
over slices in slice order.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
import pytest

from flows.cli import main
from ichdata.store import Store, open_store
from ichdata.testing import stored_from_hu, write_ct_slice
from ichmodel.models import load_model, predict_study
from ichmodel.predict import study_summary, submission_frame

CLASSES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")


def _new_studies(src: Path) -> dict[str, list[str]]:
    """Two studies written in shuffled file order, plus broken files; returns study -> ids in slice order."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    head = ((yy - 32) ** 2 + (xx - 32) ** 2) < 26**2
    studies: dict[str, list[str]] = {}
    files = []
    for s, n in enumerate((5, 4)):
        study = f"1.2.826.0.1.{s}"
        ids = [f"ID_{s:02d}{k:07x}" for k in range(n)]
        studies[study] = ids
        for k, image_id in enumerate(ids):
            hu = np.where(head, 35.0, -1000.0) + rng.normal(0, 5, (64, 64))
            hu[20:28, 20:28] += 40 * (k == 2)
            files.append((image_id, study, k, hu))
    rng.shuffle(files)  # file order (and names) say nothing about slice order
    for j, (image_id, study, k, hu) in enumerate(files):
        write_ct_slice(
            src / f"file{j:03d}.dcm",
            stored_from_hu(hu),
            image_id=image_id,
            study_uid=study,
            series_uid=study + ".1",
            patient_id=f"PAT{study[-1]}",
            image_position=(0.0, 0.0, 5.0 * k),
        )
    (src / "notes.txt").write_text("not a DICOM file\n")
    write_ct_slice(
        src / "broken_nopixels.dcm",
        stored_from_hu(np.zeros((64, 64))),
        image_id="ID_nopix",
        study_uid="1.2.826.0.1.9",
        series_uid="1.2.826.0.1.9.1",
        patient_id="PAT9",
        image_position=(0, 0, 0),
        extra={"PixelData": None},
    )
    full = src / "broken_truncated.dcm"
    write_ct_slice(
        full,
        stored_from_hu(np.zeros((64, 64))),
        image_id="ID_trunc",
        study_uid="1.2.826.0.1.9",
        series_uid="1.2.826.0.1.9.1",
        patient_id="PAT9",
        image_position=(0, 0, 5),
    )
    full.write_bytes(full.read_bytes()[:-3000])
    return studies


@pytest.fixture(scope="module")
def predicted(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path
) -> tuple[Path, Path, Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("predict")
    src = root / "new"
    src.mkdir()
    studies = _new_studies(src)
    ckpt = tiny_checkpoint
    out = root / "out" / "predictions.csv"
    out.parent.mkdir()
    store = root / "kept.zarr"
    printed_out, printed_err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed_out), contextlib.redirect_stderr(printed_err):
        rc = main(
            [
                "predict",
                str(ckpt),
                str(src),
                "--out",
                str(out),
                "--store",
                str(store),
                "--workers",
                "1",
                "--quiet",
            ]
        )
    assert rc == 0
    assert "predicted 9 images of 2 studies" in printed_out.getvalue()
    assert "3 files set aside (no_pixel_data 1, not_dicom 1, truncated 1)" in printed_out.getvalue()
    assert "3 files were set aside and have no prediction" in printed_err.getvalue()
    return ckpt, out, store, studies


def test_every_good_image_has_six_rows_and_broken_files_are_listed(
    predicted: tuple[Path, Path, Path, dict[str, list[str]]],
) -> None:
    _, out, _, studies = predicted
    sub = pd.read_csv(out)
    assert list(sub.columns) == ["ID", "Label"]
    good = [i for ids in studies.values() for i in ids]
    expected = {f"{i}_{c}" for i in good for c in CLASSES}
    assert set(sub["ID"]) == expected
    assert len(sub) == 6 * len(good)
    assert sub["Label"].between(0, 1).all()
    aside = pd.read_csv(out.with_name("predictions.set_aside.csv"))
    assert dict(zip(aside["path"], aside["reason"], strict=True)) == {
        "notes.txt": "not_dicom",
        "broken_nopixels.dcm": "no_pixel_data",
        "broken_truncated.dcm": "truncated",
    }
    assert aside["detail"].str.len().gt(0).all()


def test_predictions_equal_the_model_on_the_converted_store(
    predicted: tuple[Path, Path, Path, dict[str, list[str]]],
) -> None:
    ckpt, out, store, studies = predicted
    st = open_store(store)
    model, info = load_model(ckpt)
    sub = pd.read_csv(out).set_index("ID")["Label"]
    for s in range(st.n_series):
        a, b = st.series_rows(s)
        ids = list(st.image_id[a:b])
        assert ids == studies[st.series["study_uid"].iloc[s]]  # slice order, not file order
        probs = predict_study(model, st.read_series(s), max_len=info["max_len"])
        got = np.array([[sub[f"{i}_{c}"] for c in CLASSES] for i in ids])
        np.testing.assert_allclose(got, probs, rtol=1e-5, atol=1e-6)


def test_study_summary_is_the_max_over_slices(
    predicted: tuple[Path, Path, Path, dict[str, list[str]]],
) -> None:
    _, out, _, studies = predicted
    summary = pd.read_csv(out.with_name("predictions.studies.csv"))
    sub = pd.read_csv(out).set_index("ID")["Label"]
    assert list(summary["study_uid"]) == list(studies)
    for _, row in summary.iterrows():
        ids = studies[row["study_uid"]]
        assert row["n_slices"] == len(ids)
        for c in CLASSES:
            p = np.array([sub[f"{i}_{c}"] for i in ids])
            assert row[f"p_{c}"] == pytest.approx(p.max(), rel=1e-5)
            # the slice named is one that reaches the maximum (ties possible after CSV rounding)
            k = row[f"{c}_slice_index"]
            assert row[f"{c}_slice"] == ids[k]
            assert p[k] == pytest.approx(p.max(), rel=1e-5)
        assert row["top_slices"].split(";")[0].split(":")[0] == row["any_slice"]


def test_cli_errors_name_the_missing_thing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"  # (--out may not lie inside SOURCE)
    src.mkdir()
    assert main(["predict", str(tmp_path / "none.pt"), str(src), "--out", str(tmp_path / "p.csv")]) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "none.pt"), str(tmp_path / "nope"), "--out", "p.csv"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_submission_and_summary_from_arrays() -> None:
    df = submission_frame(["ID_a", "ID_b"], np.arange(12).reshape(2, 6) / 12, CLASSES)
    assert df["ID"].tolist()[:7] == [f"ID_a_{c}" for c in CLASSES] + ["ID_b_epidural"]
    assert df["Label"].iloc[6] == pytest.approx(6 / 12)  # ID_b_epidural

    class _Store:
        classes = CLASSES
        study_offsets = np.array([0, 3, 5])
        series = pd.DataFrame({"study_uid": ["s1", "s2"], "series_uid": ["s1.1", "s2.1"]})
        image_id = np.array([f"ID_{k}" for k in range(5)])

    probs = np.zeros((5, 6))
    probs[:, 5] = [0.1, 0.7, 0.6, 0.2, 0.3]
    s = study_summary(cast(Store, _Store()), np.arange(5), probs, threshold=0.5)
    assert s["p_any"].tolist() == [0.7, 0.3]
    assert s["n_slices_any"].tolist() == [2, 0]
    assert s["first_slice_any"].iloc[0] == 1
    assert s["last_slice_any"].iloc[0] == 2
    assert pd.isna(s["first_slice_any"].iloc[1])
    assert s["top_slices"].iloc[0] == "ID_1:0.700;ID_2:0.600;ID_0:0.100"


def test_store_option_never_replaces_what_predict_did_not_make(
    predicted: tuple[Path, Path, Path, dict[str, list[str]]],
    tmp_path: Path,
    tiny_store: Store,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt, _, store, _ = predicted
    src = store.parent / "new"
    base = ["predict", str(ckpt), str(src), "--out", str(tmp_path / "p.csv"), "--workers", "1", "--quiet"]

    # a labelled training store is refused and left as it was
    labels = tiny_store.labels[:].copy()
    assert main([*base, "--store", str(tiny_store.path)]) == 2
    err = capsys.readouterr().err
    assert str(tiny_store.path) in err
    assert len(err.strip().splitlines()) == 1
    kept = open_store(tiny_store.path)
    assert kept.n_slices == tiny_store.n_slices
    np.testing.assert_array_equal(kept.labels[:], labels)

    # a plain file too
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\n")
    assert main([*base, "--store", str(notes)]) == 2
    assert str(notes) in capsys.readouterr().err
    assert notes.read_text() == "keep me\n"

    # a store predict converted from this same folder is replaced
    assert main([*base, "--store", str(store)]) == 0
    assert open_store(store).n_slices == 9


def test_csv_cells_from_the_input_never_run_as_spreadsheet_formulas(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """Issue 11 item 16: ids and UIDs come from the input files; a formula in one stays text."""
    from ichdata.store import write_store_from_arrays
    from ichmodel.predict import predict_store

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 3, 64, 64), dtype=np.uint8)
    labels = np.full((4, 6), 255, dtype=np.uint8)
    ids = ['=HYPERLINK("http://x","y")', "ID_b", "+1", "ID_d"]
    series = pd.DataFrame(
        {"study_uid": ["@SUM(A1)", "2.2"], "series_uid": ["1.1", "2.2.1"], "patient_key": ["p", "q"]}
    )
    store = write_store_from_arrays(
        tmp_path / "s.zarr", images, labels, ids, np.array([0, 2, 4], dtype=np.int64), series, shard_size=4
    )
    out = tmp_path / "pred.csv"
    predict_store(tiny_checkpoint, store.path, out, device="cpu", progress=False)
    for path in tmp_path.glob("pred*.csv"):
        for row in pd.read_csv(path, dtype=str, keep_default_na=False).itertuples(index=False):
            for cell in row:
                assert not str(cell).startswith(("=", "+", "@")), (path.name, cell)
    ids_written = pd.read_csv(out, dtype=str)["ID"].tolist()
    assert ids_written[0] == """'=HYPERLINK("http://x","y")_epidural"""


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_outputs_that_are_inputs_or_inside_a_store_are_refused_before_any_work(
    predicted: tuple[Path, Path, Path, dict[str, list[str]]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 16 items 4 and 12: each was refused only after the conversion, if at all.

    `--out` on a source DICOM overwrote it; `--out` a folder and `--store` inside another store's
    array were tracebacks after the whole conversion.
    """
    ckpt, _, store, _ = predicted
    src = store.parent / "new"
    a_dicom = sorted(src.glob("file*.dcm"))[0]
    fresh = tmp_path / "fresh.zarr"
    cases = {
        "a source file": (["--out", str(a_dicom)], f"--out {a_dicom}: is SOURCE {src} or inside it"),
        "the checkpoint": (["--out", str(ckpt)], f"--out {ckpt}: is CHECKPOINT {ckpt} or inside it"),
        "a folder": (["--out", str(tmp_path)], f"--out {tmp_path}: a folder; expected the path of the file"),
        "inside a store": (
            ["--out", str(store / "p.csv")],
            f"--out {store / 'p.csv'}: inside the ich store {store}",
        ),
        "a store's file": (
            ["--out", f"{fresh}.manifest.parquet", "--store", str(fresh)],
            f"--out {fresh}.manifest.parquet: inside --store {fresh} or beside it as one of its files",
        ),
        "a store in a store's array": (
            ["--out", str(tmp_path / "p.csv"), "--store", str(store / "images" / "x.zarr")],
            f"--store {store / 'images' / 'x.zarr'}: inside the ich store {store}",
        ),
        "the checkpoint inside the store": (
            ["--out", str(tmp_path / "p.csv"), "--store", str(tmp_path / "runs")],
            f"CHECKPOINT {tmp_path / 'runs' / 'best.pt'}: inside --store {tmp_path / 'runs'}",
        ),
        "a missing folder of --out": (
            ["--out", str(tmp_path / "typo" / "p.csv")],
            f"the folder {tmp_path / 'typo'} does not exist; create it, or pass --parents",
        ),
        "a missing folder of --store": (
            ["--out", str(tmp_path / "p.csv"), "--store", str(tmp_path / "typo" / "s.zarr")],
            f"the folder {tmp_path / 'typo'} does not exist; create it, or pass --parents",
        ),
    }
    (tmp_path / "runs").mkdir()
    in_store = tmp_path / "runs" / "best.pt"
    in_store.write_bytes(ckpt.read_bytes())
    before = _files(store.parent), _files(tmp_path)
    for case, (args, expected) in cases.items():
        model = in_store if case == "the checkpoint inside the store" else ckpt
        assert main(["predict", str(model), str(src), "--workers", "1", "--quiet", *args]) == 2, case
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, (case, err)
        assert expected in err, (case, err)
    assert (_files(store.parent), _files(tmp_path)) == before
    assert not (tmp_path / "typo").exists()


def test_the_conversions_cluster_options_are_checked_before_the_checkpoint_loads(
    predicted: tuple[Path, Path, Path, dict[str, list[str]]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 16 item 14: `ich predict` takes `ich convert`'s cluster options (`ClusterConfig`), checked first."""
    _, _, store, _ = predicted
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    out = tmp_path / "p.csv"
    assert (
        main(["predict", str(junk), str(store.parent / "new"), "--out", str(out), "--jobs", "2", "--quiet"])
        == 2
    )
    assert capsys.readouterr().err == (
        "ich: error: --jobs: only with --cluster slurm (Dask workers as SLURM jobs)\n"
    )
    assert not out.exists()


def test_a_kept_store_holding_a_users_file_is_not_replaced(
    predicted: tuple[Path, Path, Path, dict[str, list[str]]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 16 item 4: `ich predict --store` onto its own earlier store deleted a user's file in it."""
    ckpt, _, store, _ = predicted
    src = store.parent / "new"
    notes = store / "reading-notes.txt"
    notes.write_text("keep me\n")
    try:
        before = _files(store)
        args = ["predict", str(ckpt), str(src), "--out", str(tmp_path / "p.csv"), "--store", str(store)]
        assert main([*args, "--workers", "1", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"--store {store}: holds reading-notes.txt, which ich did not write" in err
        assert len(err.strip().splitlines()) == 1
        assert _files(store) == before
    finally:
        notes.unlink()


def test_a_kept_store_another_process_writes_is_refused(
    predicted: tuple[Path, Path, Path, dict[str, list[str]]],
    tmp_path: Path,
    lock_holder,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt, _, store, _ = predicted
    src = store.parent / "new"
    holder = lock_holder(store, "ich convert")
    before = _files(store)
    args = ["predict", str(ckpt), str(src), "--out", str(tmp_path / "p.csv"), "--store", str(store)]
    assert main([*args, "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{store}: locked by ich convert (pid {holder.pid} on " in err
    assert _files(store) == before
    assert not (tmp_path / "p.csv").exists()
    holder.release()


def test_parents_creates_the_folders_of_out_and_store(
    predicted: tuple[Path, Path, Path, dict[str, list[str]]], tmp_path: Path
) -> None:
    ckpt, _, store, _ = predicted
    src = store.parent / "new"
    out = tmp_path / "a" / "b" / "p.csv"
    kept = tmp_path / "c" / "d" / "s.zarr"
    args = ["predict", str(ckpt), str(src), "--out", str(out), "--store", str(kept), "--parents"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main([*args, "--workers", "1", "--quiet"]) == 0
    assert len(pd.read_csv(out)) == 9 * 6
    assert open_store(kept).n_slices == 9
