"""Two-stage training: `ich features` (the group, resume, append, no-op), `ich train --features`, folds.

One tiny store and one CNN run (a tiny timm backbone, one CPU epoch) are shared by the module; each
test makes its own features groups and stores beside them.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pytest
import torch

from flows.cli import main
from ichdata.errors import UserError
from ichdata.features import file_sha256, open_features
from ichdata.store import Store, open_store, write_store_from_arrays
from ichmodel.config import TrainConfig
from ichmodel.data import split_by_patient
from ichmodel.extract import FeaturesConfig, embed, extract_features
from ichmodel.models import SequenceClassifier, SliceClassifier, load_model
from ichmodel.rundir import LOG_COLUMNS, read_log
from ichmodel.train import train

BACKBONE = "test_efficientnet"
#: slices per series; patients own two series each (p0 = s0 + s1, ...)
LENGTHS = (5, 9, 3, 12, 7, 4, 6, 8)
SHARD = 8


def _write_store(path: Path, n_series: int = len(LENGTHS), seed: int = 0) -> Store:
    """The first `n_series` series of one fixed set of slices: a smaller store is an earlier state of a larger one."""
    rng = np.random.default_rng(seed)
    n_all = sum(LENGTHS)
    images = rng.integers(0, 256, (n_all, 3, 64, 64), dtype=np.uint8)
    sub = (rng.random((n_all, 5)) < 0.3).astype(np.uint8)
    labels = np.concatenate([sub, sub.max(axis=1, keepdims=True)], axis=1)
    offsets = np.r_[0, np.cumsum(LENGTHS[:n_series])].astype(np.int64)
    n = int(offsets[-1])
    series = pd.DataFrame(
        {
            "study_uid": [f"1.2.3.{seed}.{i}" for i in range(n_series)],
            "series_uid": [f"1.2.3.{seed}.{i}.1" for i in range(n_series)],
            "patient_key": [f"ID_p{i // 2}" for i in range(n_series)],
        }
    )
    ids = [f"ID_{seed}{i:08x}" for i in range(n)]
    return write_store_from_arrays(
        path, images[:n], labels[:n], ids, offsets, series, shard_size=SHARD, overwrite=True
    )


def _train_config(store: Path, out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "model": "xception",
        "backbone": BACKBONE,
        "epochs": 1,
        "batch_size": 16,
        "max_len": 6,
        "workers": 0,
        "val_fraction": 0.25,
        "progress": False,
        "device": "cpu",
    }
    base.update(kw)
    return TrainConfig(store=str(store), out=str(out), **base)


def _gru(store: Path, out: Path, features: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "model": "xception_gru",
        "backbone": None,
        "features": str(features),
        "batch_size": 2,
        "rnn_hidden": 8,
        "rnn_layers": 1,
    }
    base.update(kw)
    return _train_config(store, out, **base)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A store and a CNN run on it (`cnn/best.pt`, `cnn/split.json`)."""
    root = tmp_path_factory.mktemp("features")
    store = _write_store(root / "store.zarr")
    train(_train_config(store.path, root / "cnn"))
    return {"root": root, "store": store.path, "cnn": root / "cnn"}


def _extract(checkpoints: list[Path], store: Path, out: Path, **kw: Any) -> Any:
    return extract_features(
        FeaturesConfig(
            checkpoints=checkpoints, store=store, out=out, workers=0, device="cpu", progress=False, **kw
        )
    )


def _expected(checkpoint: Path, images: np.ndarray, tta: tuple[str, ...] = ("none",)) -> np.ndarray:
    model, _ = load_model(checkpoint)
    return embed(cast(Any, model).encoder, torch.from_numpy(images), tta).numpy()


# --- the group ---------------------------------------------------------------------------------------


def test_features_read_with_plain_zarr_have_the_store_rows_and_their_provenance(
    base: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import zarr

    out = tmp_path / "f.zarr"
    argv = ["features", str(base["cnn"]), str(base["store"]), "--out", str(out), "--tta", "none", "hflip"]
    assert main([*argv, "--device", "cpu", "--workers", "0", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "in-sample features from one checkpoint" in printed
    store = open_store(base["store"])

    group = zarr.open_group(str(out), mode="r")
    feats = np.asarray(zarr.open_array(str(out / "features"), mode="r")[...])
    assert feats.dtype == np.float16
    assert feats.shape[0] == store.n_slices == group.attrs["n_slices"]
    attrs: dict[str, Any] = dict(group.attrs)
    ckpt = attrs["checkpoints"]
    assert len(ckpt) == 1
    assert ckpt[0]["sha256"] == file_sha256(base["cnn"] / "best.pt")
    assert (ckpt[0]["path"], ckpt[0]["model"], ckpt[0]["backbone"]) == (
        str(base["cnn"] / "best.pt"),
        "xception",
        BACKBONE,
    )
    assert attrs["tta"] == ["none", "hflip"]
    assert attrs["store"]["path"] == str(base["store"])
    assert attrs["store"]["n_slices"] == store.n_slices
    assert attrs["normalisation"]["scale"] == "uint8 / 255"
    assert len(attrs["normalisation"]["mean"]) == 3
    assert (np.asarray(zarr.open_array(str(out / "checkpoint"), mode="r")[...]) == 0).all()
    # in-sample: the rows of series the CNN trained on, as its split file lists them
    split = json.loads((base["cnn"] / "split.json").read_text())
    series_of_row = np.repeat(np.arange(store.n_series), np.diff(store.study_offsets))
    trained = np.isin(store.series["series_uid"].to_numpy()[series_of_row], split["train_series"])
    np.testing.assert_array_equal(np.asarray(zarr.open_array(str(out / "in_sample"), mode="r")[...]), trained)

    # row i is the embedding of store row i: the mean over the TTA variants
    images = store.read_rows(0, store.n_slices)
    want = _expected(base["cnn"] / "best.pt", images, ("none", "hflip"))
    np.testing.assert_allclose(feats.astype(np.float32), want, rtol=2e-3, atol=2e-3)
    # ... and tensorstore reads the same array (in a process of its own: tensorstore's threads make
    # this one unsafe to fork, and later tests fork DataLoader workers)
    code = (
        "import sys, numpy as np, tensorstore as ts; "
        "spec = {'driver': 'zarr3', 'kvstore': {'driver': 'file', 'path': sys.argv[1]}}; "
        "np.save(sys.argv[2], ts.open(spec).result().read().result())"
    )
    subprocess.run([sys.executable, "-c", code, str(out / "features"), str(tmp_path / "ts.npy")], check=True)
    np.testing.assert_array_equal(np.load(tmp_path / "ts.npy"), feats)

    assert main(["verify", str(out)]) == 0
    assert ": OK" in capsys.readouterr().out


def test_verify_and_training_name_a_damaged_shard(
    base: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "f.zarr"
    _extract([base["cnn"]], base["store"], out)
    shard = out / "features" / "c" / "2" / "0"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF  # a flipped byte inside the first zstd frame
    shard.write_bytes(bytes(data))
    assert main(["verify", str(out)]) == 1
    assert "shard 2 (rows 16–23)" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"shard 2 \(rows 16–23\).*run `ich verify"):
        open_features(out).read_all()


# --- resumable, incremental, idempotent ----------------------------------------------------------------

_KILLED = """
import os, signal, sys
import ichdata.features
from flows.cli import main

real, calls = ichdata.features._mark, []

def mark_or_die(group, index, marker):
    calls.append(index)
    if len(calls) == 3:  # shard 2's file is written, its marker is not
        os.kill(os.getpid(), signal.SIGKILL)
    real(group, index, marker)

ichdata.features._mark = mark_or_die
sys.exit(main(sys.argv[1:]))
"""


def _files(group: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(group)): p.read_bytes()
        for p in sorted((group / "features").rglob("*"))
        if p.is_file()
    }


def test_kill_9_during_features_then_rerun_gives_the_same_bytes(
    base: dict[str, Path], tmp_path: Path
) -> None:
    clean, killed = tmp_path / "clean.zarr", tmp_path / "killed.zarr"
    _extract([base["cnn"]], base["store"], clean)
    argv = ["features", str(base["cnn"] / "best.pt"), str(base["store"]), "--out", str(killed)]
    argv += ["--device", "cpu", "--workers", "0", "--quiet"]
    proc = subprocess.run([sys.executable, "-c", _KILLED, *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    with pytest.raises(UserError, match="has not finished; run it again"):
        open_features(killed)

    summary = _extract([base["cnn"] / "best.pt"], base["store"], killed)
    assert summary.n_shards_skipped == 2  # the two marked shards
    assert summary.n_computed == open_store(base["store"]).n_slices - 2 * SHARD
    assert _files(killed) == _files(clean)  # every shard file byte for byte
    assert open_features(killed).attrs["store"] == open_features(clean).attrs["store"]


def test_appended_studies_compute_only_the_new_rows_and_nothing_new_computes_nothing(
    base: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ichmodel.extract

    store_path = tmp_path / "grows.zarr"
    early = _write_store(store_path, n_series=5)  # 36 rows: the last shard is half full
    out = tmp_path / "f.zarr"
    _extract([base["cnn"]], store_path, out)
    before = open_features(out).read_all()

    computed: list[int] = []
    real = ichmodel.extract.embed

    def counting(encoder: Any, images: torch.Tensor, tta: Any = ("none",)) -> torch.Tensor:
        computed.append(len(images))
        return real(encoder, images, tta)

    monkeypatch.setattr(ichmodel.extract, "embed", counting)
    grown = _write_store(store_path)  # the same 36 rows, then 3 more series
    n_new = grown.n_slices - early.n_slices
    summary = _extract([base["cnn"]], store_path, out)
    assert sum(computed) == summary.n_computed == n_new
    after = open_features(out)
    assert after.n_slices == grown.n_slices
    feats = after.read_all()
    np.testing.assert_array_equal(feats[: early.n_slices], before)  # old rows kept, bit for bit
    want = _expected(base["cnn"] / "best.pt", grown.read_rows(early.n_slices, grown.n_slices))
    np.testing.assert_allclose(feats[early.n_slices :].astype(np.float32), want, rtol=2e-3, atol=2e-3)

    computed.clear()
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = _extract([base["cnn"]], store_path, out)
    assert computed == []
    assert again.n_computed == again.n_shards_written == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes  # nothing written


def test_features_refuse_what_they_would_overwrite(base: dict[str, Path], tmp_path: Path) -> None:
    precious = tmp_path / "results"
    precious.mkdir()
    (precious / "table.csv").write_text("keep me\n")
    with pytest.raises(UserError, match="exists and is not a features group"):
        _extract([base["cnn"]], base["store"], precious, overwrite=True)
    assert (precious / "table.csv").read_text() == "keep me\n"
    with pytest.raises(UserError, match="lies inside the STORE"):
        _extract([base["cnn"]], base["store"], base["store"] / "features.zarr")
    out = tmp_path / "f.zarr"
    _extract([base["cnn"]], base["store"], out)
    with pytest.raises(UserError, match=r"made from other checkpoints or TTA.*--overwrite"):
        _extract([base["cnn"]], base["store"], out, tta=["hflip"])
    assert _extract([base["cnn"]], base["store"], out, tta=["hflip"], overwrite=True).n_computed > 0


def test_features_hold_the_lock_and_overwrite_only_what_ich_wrote(
    base: dict[str, Path],
    tmp_path: Path,
    lock_holder: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 16 items 3 and 4 for a features group: one writer, and a user's file is never deleted."""
    out = tmp_path / "f.zarr"
    _extract([base["cnn"]], base["store"], out)
    before = _files(out)

    # another `ich features` (here: a process paused holding the lock) writes FEATURES: refused, untouched
    holder = lock_holder(out, "ich features")
    argv = ["features", str(base["cnn"] / "best.pt"), str(base["store"]), "--out", str(out)]
    assert main([*argv, "--tta", "none", "hflip", "--overwrite", "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"ich features (pid {holder.pid} on " in err, err
    assert _files(out) == before
    holder.release()

    # a file of the user's inside the group: named by --overwrite and by verify, and kept
    (out / "notes.txt").write_text("keep me\n")
    with pytest.raises(UserError, match=r"holds notes.txt, which ich did not write"):
        _extract([base["cnn"]], base["store"], out, tta=["hflip"], overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me\n"
    assert main(["verify", str(out)]) == 1
    assert f"{out / 'notes.txt'}: not written by ich" in capsys.readouterr().out
    (out / "notes.txt").unlink()
    assert main(["verify", str(out)]) == 0

    # a foreign Zarr group whose attributes look like ours is not a features group
    foreign = tmp_path / "foreign.zarr"
    foreign.mkdir()
    (foreign / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"features_format": 1}})
    )
    with pytest.raises(UserError, match="exists and is not a features group"):
        _extract([base["cnn"]], base["store"], foreign, overwrite=True)
    assert (foreign / "zarr.json").is_file()


# --- the sequence stage ---------------------------------------------------------------------------------


def test_composed_checkpoint_equals_the_head_on_fresh_features(base: dict[str, Path], tmp_path: Path) -> None:
    from ichmodel.evaluate import evaluate_runs
    from ichmodel.predict import predict_store

    features = tmp_path / "f.zarr"
    _extract([base["cnn"]], base["store"], features)
    split = str(base["cnn"] / "split.json")
    result = train(_gru(base["store"], tmp_path / "gru", features, split=split, neighbour_diff=True))
    row = result.history[0]
    assert list(row)[: len(LOG_COLUMNS)] == list(LOG_COLUMNS)
    assert row["train_slices_per_s"] > 0
    store = open_store(base["store"])
    loaded, info = load_model(result.best_checkpoint)
    composed = cast(SequenceClassifier, loaded)
    assert info["model"]["neighbour_diff"] is True
    cnn = cast(SliceClassifier, load_model(base["cnn"] / "best.pt")[0])
    for k, v in cnn.state_dict().items():  # the CNN is the features' own, unchanged
        if k.startswith("encoder."):
            assert torch.equal(composed.state_dict()[k], v), k
    with torch.no_grad():
        for s in range(store.n_series):
            images = torch.from_numpy(store.read_series(s))
            mask = torch.ones(1, len(images), dtype=torch.bool)
            whole = composed(images.float().div(255)[None], mask)
            fresh = embed(cnn.encoder, images)  # float32, no TTA
            two_stage = composed.forward_head(fresh[None], mask)
            torch.testing.assert_close(two_stage, whole, atol=1e-4, rtol=0)

    # an ordinary checkpoint: evaluate and predict take it as it is
    runs, paths = evaluate_runs(
        [tmp_path / "gru"], base["store"], tmp_path / "report", progress=False, log=None
    )
    assert np.isfinite(runs[0].summary["weighted_log_loss"])
    assert "two-stage: sequence model on cached in-sample features" in paths["report"].read_text()
    predicted = predict_store(result.best_checkpoint, base["store"], tmp_path / "p.csv", progress=False)
    assert predicted.n_images == store.n_slices


def test_resume_on_features_equals_uninterrupted_training(base: dict[str, Path], tmp_path: Path) -> None:
    features = tmp_path / "f.zarr"
    _extract([base["cnn"]], base["store"], features)
    threads = torch.get_num_threads()
    kw: dict[str, Any] = {
        "epochs": 3,
        "seq_crop": 4,
        "seq_reverse": True,
        "split": str(base["cnn"] / "split.json"),
    }
    train(_gru(base["store"], tmp_path / "full", features, **kw))
    train(_gru(base["store"], tmp_path / "part", features, stop_after=1, **kw))
    train(_gru(base["store"], tmp_path / "part", features, resume=True, **kw))
    from ichmodel.checkpoint import read_checkpoint

    full, part = (
        read_checkpoint(tmp_path / "full" / "last.pt"),
        read_checkpoint(tmp_path / "part" / "last.pt"),
    )
    assert (full["epoch"], full["step"]) == (part["epoch"], part["step"])
    for k, v in full["state_dict"].items():
        assert torch.equal(v, part["state_dict"][k]), k
    assert torch.get_num_threads() == threads  # the sequence stage's one CPU thread is given back
    assert [r["val_loss"] for r in read_log(tmp_path / "full" / "log.csv")] == [
        r["val_loss"] for r in read_log(tmp_path / "part" / "log.csv")
    ]


_DDP_SCRIPT = """
import json, os, sys
from ichmodel.config import TrainConfig
from ichmodel.train import train

config = TrainConfig(**json.loads(sys.argv[1]))
result = train(config)
out = {"seen": [list(map(list, e)) for e in result.seen_windows], "history": list(result.history)}
with open(os.path.join(config.out, f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(out, f)
"""


def test_two_process_ddp_on_features(base: dict[str, Path], tmp_path: Path) -> None:
    """torchrun, 2 processes, gloo: every window once per epoch across ranks, one validation loss."""
    import dataclasses

    from ichmodel.data import FeatureStudies, read_split

    features = tmp_path / "f.zarr"
    _extract([base["cnn"]], base["store"], features)
    out = tmp_path / "ddp"
    config = _gru(base["store"], out, features, epochs=2, max_len=4, split=str(base["cnn"] / "split.json"))
    script = tmp_path / "ddp_train.py"
    script.write_text(_DDP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    proc = subprocess.run(
        [*cmd, json.dumps(dataclasses.asdict(config))], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    store = open_store(base["store"])
    split = read_split(out / "split.json", store.series)
    windows = FeatureStudies(
        torch.zeros(1, 1), torch.zeros(1, 6), store.study_offsets, split.train_series, max_len=4
    )
    expected = sorted(map(tuple, windows.windows.tolist()))
    for epoch in range(2):
        seen = [tuple(w) for r in ranks for w in r["seen"][epoch]]
        assert sorted(seen) == expected  # every window once, across ranks
        assert ranks[0]["history"][epoch]["val_loss"] == ranks[1]["history"][epoch]["val_loss"]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2


def test_train_refuses_features_that_do_not_belong_before_any_epoch(
    base: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ichdata.features import commit, create_features, write_shard

    features = tmp_path / "f.zarr"
    _extract([base["cnn"]], base["store"], features)
    other = _write_store(tmp_path / "other.zarr", seed=1)
    grows = tmp_path / "grows.zarr"
    _write_store(grows, n_series=6)
    behind = tmp_path / "behind.zarr"
    _extract([base["cnn"]], grows, behind)
    _write_store(grows)  # two more series since
    # a group whose vectors are narrower than the CNN it names
    narrow = tmp_path / "narrow.zarr"
    attrs = dict(open_features(features).attrs)
    n = attrs["n_slices"]
    g = create_features(narrow, n, 7, SHARD)
    for i, a in enumerate(range(0, n, SHARD)):
        write_shard(g, i, np.zeros((min(SHARD, n - a), 7), np.float16), "k")
    commit(
        g, checkpoint=np.zeros(n), in_sample=np.zeros(n), trained_on=np.zeros(n), attrs={**attrs, "dim": 7}
    )

    # features of a CNN whose checkpoint changed since
    moved = tmp_path / "cnn_copy"
    moved.mkdir()
    for f in ("best.pt", "split.json"):
        (moved / f).write_bytes((base["cnn"] / f).read_bytes())
    stale = tmp_path / "stale.zarr"
    _extract([moved], base["store"], stale)
    (moved / "best.pt").write_bytes((moved / "best.pt").read_bytes()[:-10])

    split = ["--split", str(base["cnn"] / "split.json")]
    cnn_val = json.loads((base["cnn"] / "split.json").read_text())["val_patients"]
    series = open_store(base["store"]).series
    seed = next(  # a seed whose split holds out a patient the CNN trained on
        k for k in range(1, 50) if not set(split_by_patient(series, 0.25, k).val_patients) <= set(cnn_val)
    )
    cases = [
        (other.path, features, [], "made from another store"),
        (grows, behind, [], "rows were appended since); run `ich features` again"),
        (base["store"], narrow, [], "7 features per slice, but the model on backbone"),
        (
            base["store"],
            features,
            ["--backbone", "test_resnet"],
            "not the --backbone 'test_resnet' asked for",
        ),
        (base["store"], features, ["--model", "xception"], "classifies single slices"),
        (base["store"], stale, [], "changed since the features were made; run `ich features` again"),
        (base["store"], features, ["--seed", str(seed)], "validation slices are of series the features' CNN"),
    ]
    for k, (store, feats, extra, message) in enumerate(cases):
        out = tmp_path / f"run{k}"
        argv = ["train", str(store), "--out", str(out), "--features", str(feats), "--epochs", "1"]
        argv += [
            "--device",
            "cpu",
            "--workers",
            "0",
            "--quiet",
            "--rnn-hidden",
            "8",
            "--val-fraction",
            "0.25",
        ]
        argv += [] if "--seed" in extra else split
        assert main([*argv, *extra]) == 2, message
        err = capsys.readouterr().err
        assert err.startswith("ich: error: "), err
        assert message in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert not (out / "log.csv").exists()
        assert not (out / "last.pt").exists()


# --- out-of-fold features --------------------------------------------------------------------------------


def test_fold_runs_give_out_of_fold_features_and_compose_as_their_mean(
    base: dict[str, Path], tmp_path: Path
) -> None:
    store = open_store(base["store"])
    runs = [tmp_path / f"fold{i}" for i in range(2)]
    for i, run in enumerate(runs):
        train(_train_config(base["store"], run, folds=2, fold=i))
    splits = [json.loads((r / "split.json").read_text()) for r in runs]
    assert splits[0]["test_patients"] == splits[1]["test_patients"]
    assert not set(splits[0]["val_patients"]) & set(splits[1]["val_patients"])
    assert not set(splits[0]["test_patients"]) & set(splits[0]["val_patients"] + splits[1]["val_patients"])

    features = tmp_path / "oof.zarr"
    summary = _extract(runs, base["store"], features)
    assert summary.route == "out-of-fold"
    f = open_features(features)
    assert [c["fold"] for c in f.attrs["checkpoints"]] == [0, 1]
    patient = store.series["patient_key"].to_numpy()[
        np.repeat(np.arange(store.n_series), np.diff(store.study_offsets))
    ]
    want_from = np.where(
        np.isin(patient, splits[0]["val_patients"]),
        0,
        np.where(np.isin(patient, splits[1]["val_patients"]), 1, -1),
    )
    np.testing.assert_array_equal(f.checkpoint, want_from)
    assert (f.checkpoint == -1).any()
    assert not f.in_sample.any()  # every row from a model that did not train on it
    np.testing.assert_array_equal(f.trained_on, f.checkpoint >= 0)  # the test patients: no fold saw them
    feats = f.read_all().astype(np.float32)
    images = store.read_rows(0, store.n_slices)
    per_fold = [_expected(r / "best.pt", images) for r in runs]
    for k in (0, 1):
        np.testing.assert_allclose(
            feats[f.checkpoint == k], per_fold[k][f.checkpoint == k], rtol=2e-3, atol=2e-3
        )
    mean = (per_fold[0] + per_fold[1]) / 2
    np.testing.assert_allclose(feats[f.checkpoint == -1], mean[f.checkpoint == -1], rtol=2e-3, atol=2e-3)

    # the sequence model validates on the test patients and composes with the mean of the fold CNNs
    result = train(_gru(base["store"], tmp_path / "gru", features))
    loaded, info = load_model(result.best_checkpoint)
    composed = cast(SequenceClassifier, loaded)
    assert info["model"]["ensemble"] == 2
    seq_split = json.loads((tmp_path / "gru" / "split.json").read_text())
    assert seq_split["val_patients"] == splits[0]["test_patients"]
    s = int(np.flatnonzero(store.series["patient_key"].to_numpy() == seq_split["val_patients"][0])[0])
    x = torch.from_numpy(store.read_series(s))
    mask = torch.ones(1, len(x), dtype=torch.bool)
    fresh = torch.stack([torch.from_numpy(_expected(r / "best.pt", x.numpy())) for r in runs]).mean(0)
    with torch.no_grad():
        torch.testing.assert_close(
            composed.forward_head(fresh[None], mask),
            composed(x.float().div(255)[None], mask),
            atol=1e-4,
            rtol=0,
        )
    with pytest.raises(UserError, match="--folds and --fold go together"):
        _train_config(base["store"], tmp_path / "x", folds=2).resolve()
