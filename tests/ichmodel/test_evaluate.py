"""`ich evaluate` and the report: held-out patients only, metrics equal to a recomputation, pictures."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from flows.cli import main
from ichdata.store import open_store, write_store_from_arrays
from ichmodel.checkpoint import save_checkpoint
from ichmodel.data import read_split, split_by_patient, write_split
from ichmodel.evaluate import evaluate_runs
from ichmodel.metrics import summarize, weighted_log_loss
from ichmodel.models import create_model, load_model, predict_study
from ichmodel.report import MissedSlice, markdown_report, plot_false_negatives, plot_roc

CLASSES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")
BACKBONE = "test_efficientnet"
SIZE = 32


def _tiny_store(path: Path, n_patients: int = 8, seed: int = 0) -> None:
    """Patients with one series of 3-7 slices of a bright blob; labels follow the blob."""
    rng = np.random.default_rng(seed)
    images, labels, ids, offsets, series = [], [], [], [0], []
    k = 0
    for pt in range(n_patients):
        n = int(rng.integers(3, 8))
        for t in range(n):
            img = rng.integers(0, 40, (3, SIZE, SIZE), dtype=np.uint8)
            lab = np.zeros(6, np.uint8)
            if pt % 2 and 0 < t < n - 1:
                img[:, 8:20, 8:20] = 220
                lab[[4, 5]] = 1
                if t == 1:
                    lab[3] = 1
            images.append(img)
            labels.append(lab)
            ids.append(f"ID_{k:09x}")
            k += 1
        offsets.append(offsets[-1] + n)
        series.append({"study_uid": f"1.2.{pt}", "series_uid": f"1.2.{pt}.1", "patient_key": f"ID_p{pt:03d}"})
    lab = np.stack(labels)
    lab[1] = 255  # one unlabelled slice (of patient 0)
    write_store_from_arrays(path, np.stack(images), lab, ids, offsets, pd.DataFrame(series), shard_size=16)


def _run_dir(path: Path, store: Path, model_name: str, seed: int = 0, max_len: int | None = 4) -> Path:
    """A run directory as `ich train` leaves it: split.json and best.pt (random weights)."""
    path.mkdir(parents=True)
    st = open_store(store)
    write_split(path / "split.json", split_by_patient(st.series, val_fraction=0.4, seed=seed), st.series)
    torch.manual_seed(seed)
    kwargs = {"name": model_name, "backbone": BACKBONE, "rnn_hidden": 16, "rnn_layers": 1}
    model = create_model(model_name, backbone=BACKBONE, rnn_hidden=16, rnn_layers=1)
    save_checkpoint(
        {
            "format": "ich-checkpoint",
            "model": kwargs,
            "state_dict": model.state_dict(),
            "classes": list(CLASSES),
            "max_len": max_len,
            "image_size": SIZE,
            "epoch": 3,
            "val_loss": 0.5,
        },
        path / "best.pt",
    )
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("eval")
    store = root / "store.zarr"
    _tiny_store(store)
    a = _run_dir(root / "cnn", store, "xception")
    b = _run_dir(root / "gru", store, "xception_gru")
    return store, a, b


def test_evaluate_scores_held_out_patients_and_writes_the_report(
    runs: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    store, a, b = runs
    out = tmp_path / "report"
    evaluated, paths = evaluate_runs([a, b], store, out, progress=False, log=None)

    st = open_store(store)
    split = read_split(a / "split.json", st.series)
    held_rows = np.concatenate([np.arange(*st.series_rows(int(s))) for s in split.val_series])
    assert 0 < len(held_rows) < st.n_slices
    for r in evaluated:
        # exactly the held-out slices, in series then slice order
        np.testing.assert_array_equal(r.rows, held_rows)
        # recompute independently with the model's own helper
        model, info = load_model(r.checkpoint)
        probs = np.concatenate(
            [predict_study(model, st.read_series(int(s)), max_len=info["max_len"]) for s in split.val_series]
        )
        np.testing.assert_allclose(r.probs, probs, atol=1e-6)
        keep = ~(st.labels[held_rows] == 255).any(axis=1)
        expected = weighted_log_loss(st.labels[held_rows][keep], probs[keep])
        assert r.summary["weighted_log_loss"] == pytest.approx(expected, rel=1e-5)

    metrics = json.loads(paths["metrics"].read_text())
    assert list(metrics["runs"]) == ["cnn", "gru"]
    assert metrics["same_held_out_patients"] is True
    cnn = metrics["runs"]["cnn"]
    assert cnn["model"] == "xception"
    assert metrics["runs"]["gru"]["model"] == "xception_gru"
    assert cnn["held-out slices"] == len(held_rows)
    assert cnn["held-out patients"] == len(split.val_patients)
    n_unlabelled = int((st.labels[held_rows] == 255).any(axis=1).sum())
    assert cnn["unlabelled (not scored)"] == n_unlabelled
    assert cnn["metrics"]["n_images"] == len(held_rows) - n_unlabelled
    assert cnn["metrics"]["weighted_log_loss"] == pytest.approx(evaluated[0].summary["weighted_log_loss"])
    # epidural never occurs: its AUC is undefined -> null in JSON, with a note
    assert cnn["metrics"]["per_class"]["epidural"]["roc_auc"] is None
    assert any("epidural: no positive images" in n for n in cnn["metrics"]["notes"])

    report = paths["report"].read_text()
    assert "| Loss | " in report
    assert "### cnn" in report
    assert "### gru" in report
    assert "![ROC curves" in report
    assert "(roc.png)" in report
    assert "(false_negatives.png)" in report
    wll = f"{evaluated[0].summary['weighted_log_loss']:.4f}"
    assert wll in report

    import matplotlib.image as mpimg

    for key in ("roc", "false_negatives"):
        img = mpimg.imread(paths[key])
        assert img.ndim == 3
        assert img.shape[0] > 200
        assert img.shape[1] > 400
    pred = pd.read_csv(paths["predictions_cnn"])
    assert len(pred) == len(held_rows)
    assert list(pred["image_id"]) == list(st.image_id[held_rows])
    np.testing.assert_allclose(pred["p_any"], evaluated[0].probs[:, 5], atol=1e-6)


def test_cli_evaluate_and_its_errors(
    runs: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, a, _ = runs
    out = tmp_path / "r"
    assert (
        main(["evaluate", str(a), "--store", str(store), "--out", str(out), "--quiet", "--threshold", "0.3"])
        == 0
    )
    assert "cnn: weighted log loss" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["threshold"] == 0.3
    assert (out / "report.md").read_text().count("≥ 0.3") == 1

    assert main(["evaluate", str(tmp_path / "nope"), "--store", str(store), "--out", str(out)]) == 2
    assert "no such directory" in capsys.readouterr().err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert main(["evaluate", str(empty), "--store", str(store), "--out", str(out)]) == 2
    assert "no best.pt" in capsys.readouterr().err
    assert main(["evaluate", str(a), "--store", str(store), "--out", str(out), "--threshold", "2"]) == 2
    assert "--threshold 2" in capsys.readouterr().err


def test_evaluate_refuses_a_deleted_shard_rather_than_scoring_black_images(
    runs: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing shard reads as zarr's fill value: evaluation must read through the checked reader."""
    import shutil

    store, a, _ = runs
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(store, damaged)
    (damaged / "images" / "c" / "1" / "0" / "0" / "0").unlink()  # rows 16-31
    assert main(["evaluate", str(a), "--store", str(damaged), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "shard 1 (rows 16–31) is damaged" in err
    assert not (tmp_path / "r" / "metrics.json").exists()


# --- report pictures and tables -----------------------------------------------------------------


def _two_models(n: int = 300) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = (rng.random((n, 6)) < 0.2).astype(np.uint8)
    y[:, 5] = y[:, :5].max(axis=1)
    good = np.clip(0.5 * y + 0.5 * rng.random(y.shape), 0, 1)
    bad = np.clip(0.2 * y + 0.8 * rng.random(y.shape), 0, 1)
    return y, good, bad


def test_markdown_report_bolds_the_better_run_and_orders_any_first() -> None:
    y, good, bad = _two_models()
    s = {"bad": summarize(y, bad, CLASSES), "good": summarize(y, good, CLASSES)}
    text = markdown_report(s, CLASSES)
    loss_row = next(line for line in text.splitlines() if line.startswith("| Loss |"))
    cells = [c.strip() for c in loss_row.strip("|").split("|")]
    assert cells[1] == f"{s['bad']['weighted_log_loss']:.4f}"
    assert cells[2] == f"**{s['good']['weighted_log_loss']:.4f}**"
    header = next(line for line in text.splitlines() if line.startswith("|  | any |"))
    assert header.split("|")[2:4] == [" any ", " epidural "]
    y0 = y.copy()
    y0[:, 0] = 0
    text = markdown_report({"m": summarize(y0, good, CLASSES)}, CLASSES)
    assert "n/a" in text
    assert "- m: epidural: no positive images" in text
    assert "**" not in text.split("## Overall")[1].split("##")[0]  # one run: nothing to bold


def test_roc_and_false_negative_pictures(tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    y, good, bad = _two_models()
    y[:, 0] = 0  # a class without positives gets an empty panel, not a crash
    p = plot_roc({"a": (y, good), "b": (y, bad)}, tmp_path / "roc.png", CLASSES)
    assert mpimg.imread(p).shape[:2] == (int(2 * 4.2 * 110), int(4 * 4.2 * 110))
    img = np.zeros((3, 16, 16), np.uint8)
    missed = [MissedSlice("a", f"ID_{i}", img, y[0], good[0]) for i in range(3)]
    q = plot_false_negatives(missed, tmp_path / "fn.png", CLASSES, window="subdural")
    assert mpimg.imread(q).shape[0] > 100
    assert mpimg.imread(plot_false_negatives([], tmp_path / "none.png", CLASSES)).shape[0] > 100
    with pytest.raises(ValueError, match="window must be"):
        plot_false_negatives(missed, tmp_path / "x.png", CLASSES, window="lung")
    assert math.isfinite(summarize(y, good, CLASSES)["overall"]["roc_auc"])


@pytest.mark.parametrize(
    "name", ["predictions_cnn.csv", "roc.png", "false_negatives.png", "report.md", "metrics.json"]
)
def test_a_full_disk_is_one_line_naming_the_file_and_keeps_the_earlier_report(
    runs: tuple[Path, Path, Path],
    tmp_path: Path,
    full_disk: Callable[[str], None],
    capsys: pytest.CaptureFixture[str],
    name: str,
) -> None:
    store, a, _ = runs
    out = tmp_path / "report"
    argv = ["evaluate", str(a), "--store", str(store), "--out", str(out), "--quiet"]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    full_disk(name)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ich: error: ")
    assert len(err.strip().splitlines()) == 1
    assert f"{out / name}: no space left on device; free some space, then run the same command again" in err
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no temporary file left behind
    assert (out / name).read_bytes() == before[name]  # the earlier file, whole
