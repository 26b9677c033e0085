"""Training on CPU with a tiny backbone: a step per model, the loss, resume, DDP, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from flows.cli import main
from ichdata.errors import UserError
from ichdata.store import Store, open_store
from ichmodel.checkpoint import read_checkpoint
from ichmodel.config import TrainConfig
from ichmodel.data import StudyDataset, collate_studies, read_split
from ichmodel.losses import val_loss_sums, weighted_bce_sums
from ichmodel.metrics import weighted_log_loss
from ichmodel.models import SequenceClassifier, load_model, predict_study
from ichmodel.rundir import LOG_COLUMNS, read_log
from ichmodel.train import train

BACKBONE = "test_efficientnet"


def _config(store: Store, out: Path, model: str = "xception_gru", **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "backbone": BACKBONE,
        "epochs": 1,
        "batch_size": 2,
        "max_len": 6,
        "workers": 0,
        "val_fraction": 0.25,
        "progress": False,
        "device": "cpu",
    }
    base.update(kw)
    return TrainConfig(store=str(store.path), out=str(out), model=model, **base)


@pytest.mark.parametrize("model", ["xception", "xception_lstm", "xception_gru"])
def test_one_epoch_per_model_and_its_checkpoint(tmp_path: Path, tiny_store: Store, model: str) -> None:
    out = tmp_path / model
    result = train(_config(tiny_store, out, model, batch_size=8 if model == "xception" else 2))
    assert [p.name for p in sorted(out.iterdir())] == [
        "best.pt",
        "config.json",
        "last.pt",
        "log.csv",
        "split.json",
    ]
    assert len(result.history) == 1
    row = result.history[0]
    assert list(row)[: len(LOG_COLUMNS)] == list(LOG_COLUMNS)
    assert np.isfinite(row["train_loss"])
    assert 0.3 < row["val_loss"] < 1.5  # random init: around log 2
    assert result.best_epoch == 1
    assert result.best_val_loss == row["val_loss"]
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == model
    assert config["batch_size"] == (8 if model == "xception" else 2)

    split = read_split(out / "split.json", tiny_store.series)
    train_slices = int(tiny_store.series["n_slices"].iloc[split.train_series].sum())
    assert row["train_slices"] == train_slices
    seen = Counter(s for s, a, b in result.seen_windows[0] for _ in range(a, b))
    assert set(seen) == set(split.train_series.tolist())

    # the checkpoint rebuilds the model; the logged validation loss is the RSNA metric of its predictions
    net, info = load_model(out / "best.pt")
    assert info["model"]["name"] == model
    assert info["classes"] == list(tiny_store.classes)
    assert info["image_size"] == 64
    assert info["max_len"] == 6
    assert info["epoch"] == 1
    assert "optimizer" not in info
    probs, labels = [], []
    for s in split.val_series.tolist():
        probs.append(predict_study(net, tiny_store.read_series(s), max_len=info["max_len"]))
        a, b = tiny_store.series_rows(s)
        labels.append(tiny_store.labels[a:b])
        assert probs[-1].shape == (b - a, 6)
    expected = weighted_log_loss(np.concatenate(labels), np.concatenate(probs))
    assert row["val_loss"] == pytest.approx(expected, rel=1e-5)


def test_stage_wise_gru_on_a_frozen_backbone(tmp_path: Path, tiny_store: Store) -> None:
    cnn = train(_config(tiny_store, tmp_path / "cnn", "xception", batch_size=8))
    cnn_state = read_checkpoint(cnn.best_checkpoint)["state_dict"]
    gru_cfg: dict[str, Any] = {"rnn_hidden": 8, "rnn_layers": 1, "init_backbone": str(cnn.best_checkpoint)}
    split = str(tmp_path / "cnn" / "split.json")
    frozen = train(_config(tiny_store, tmp_path / "gru", freeze_backbone=True, split=split, **gru_cfg))
    net, info = load_model(frozen.best_checkpoint)
    assert isinstance(net, SequenceClassifier)
    assert (info["model"]["rnn_hidden"], info["model"]["rnn_layers"]) == (8, 1)
    assert (net.rnn.hidden_size, net.rnn.num_layers) == (8, 1)
    # the backbone is the CNN run's, weights and batch-norm statistics alike, after a training epoch
    enc = {k: v for k, v in cnn_state.items() if k.startswith("encoder.")}
    assert enc
    got = net.state_dict()
    for k, v in enc.items():
        assert torch.equal(got[k], v), k
    # ... while the GRU and the head did learn (the head started as the CNN's classifier)
    assert not torch.equal(got["fc.weight"], cnn_state["fc.weight"])
    assert frozen.history[0]["train_loss"] > 0

    # without freezing, the same start trains the backbone too
    free = train(_config(tiny_store, tmp_path / "free", split=split, **gru_cfg))
    got = load_model(free.best_checkpoint)[0].state_dict()
    assert any(not torch.equal(got[k], v) for k, v in enc.items() if v.is_floating_point())

    with pytest.raises(UserError, match=r"--init-backbone .*no such file"):
        train(_config(tiny_store, tmp_path / "x", init_backbone=str(tmp_path / "nope.pt")))
    with pytest.raises(
        UserError, match="trained on backbone 'test_efficientnet', this run uses 'test_resnet'"
    ):
        train(_config(tiny_store, tmp_path / "y", backbone="test_resnet", **gru_cfg))


def test_masked_padding_does_not_leak_into_the_loss(tiny_store: Store) -> None:
    ds = StudyDataset(tiny_store, series=[2, 3], max_len=None, reader="zarr")  # 3 and 12 slices
    batch = collate_studies([ds[0], ds[1]])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 12, 6, generator=g, requires_grad=True)
    total, weight = weighted_bce_sums(logits, batch["labels"], batch["mask"], batch["weight"])
    total.backward()
    assert logits.grad is not None
    grad = logits.grad.clone()
    assert (grad[0, 3:] == 0).all()  # no gradient reaches padding
    assert weight.item() == (3 + 12) * 7  # 5 subtypes × 1 + any × 2 per slice

    # garbage in the padded labels and logits changes nothing
    labels = batch["labels"].clone()
    labels[0, 3:] = 1
    garbage = logits.detach().clone()
    garbage[0, 3:] = 1e4
    garbage.requires_grad_(True)
    total2, weight2 = weighted_bce_sums(garbage, labels, batch["mask"], batch["weight"])
    total2.backward()
    assert total2.item() == pytest.approx(total.item())
    assert weight2.item() == weight.item()
    assert garbage.grad is not None
    torch.testing.assert_close(garbage.grad[:, :12][batch["mask"]], grad[batch["mask"]])

    # the batch loss is the weighted mean over the real slices of both studies, study by study
    parts = [
        weighted_bce_sums(
            logits[k : k + 1, :n],
            batch["labels"][k : k + 1, :n],
            batch["mask"][k : k + 1, :n],
            batch["weight"][k : k + 1],
        )
        for k, n in enumerate([3, 12])
    ]
    assert total.item() / weight.item() == pytest.approx(
        sum(p[0].item() for p in parts) / sum(p[1].item() for p in parts)
    )
    # filler windows (weight 0) and unlabelled slices (255) count for nothing
    filler = batch["weight"].clone()
    filler[1] = 0
    t3, w3 = weighted_bce_sums(logits, batch["labels"], batch["mask"], filler)
    assert w3.item() == 3 * 7
    assert t3.item() == pytest.approx(parts[0][0].item())
    unlabelled = batch["labels"].clone()
    unlabelled[1] = 255
    t4, w4 = weighted_bce_sums(logits, unlabelled, batch["mask"], batch["weight"])
    assert (t4.item(), w4.item()) == pytest.approx((t3.item(), w3.item()))
    _, c = val_loss_sums(logits, unlabelled, batch["mask"], batch["weight"])
    assert c.tolist() == [3.0] * 6


def test_resume_equals_uninterrupted_training(tmp_path: Path, tiny_store: Store) -> None:
    kw: dict[str, Any] = {"epochs": 3, "window_jitter": True, "warmup": 0.3}
    full = train(_config(tiny_store, tmp_path / "full", **kw))
    part = train(_config(tiny_store, tmp_path / "part", stop_after=1, **kw))
    assert len(part.history) == 1
    with pytest.raises(UserError, match="holds a run already"):
        train(_config(tiny_store, tmp_path / "part", **kw))
    with pytest.raises(UserError, match=r"different settings \(lr: 0\.0003 -> 0\.001\)"):
        train(_config(tiny_store, tmp_path / "part", resume=True, lr=1e-3, **kw))
    train(_config(tiny_store, tmp_path / "part", resume=True, stop_after=1, **kw))
    resumed = train(_config(tiny_store, tmp_path / "part", resume=True, **kw))
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]

    a = read_checkpoint(tmp_path / "full" / "last.pt")
    b = read_checkpoint(tmp_path / "part" / "last.pt")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (3, 3 * 3)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for k, v in a["optimizer"]["state"].items():
        for name, t in v.items():
            assert torch.equal(t, b["optimizer"]["state"][k][name]), (k, name)
    assert a["scheduler"] == b["scheduler"]
    assert [float(r["val_loss"]) for r in full.history] == pytest.approx(
        [float(r["val_loss"]) for r in resumed.history], rel=1e-12
    )
    assert len(resumed.seen_windows) == 1  # this invocation ran the third epoch only
    assert full.seen_windows[2] == resumed.seen_windows[0]


_DDP_SCRIPT = """
import json, os, sys
from ichmodel.config import TrainConfig
from ichmodel.train import train

config = TrainConfig(**json.loads(sys.argv[1]))
result = train(config)
rank = int(os.environ["RANK"])
out = {"seen": [list(map(list, e)) for e in result.seen_windows], "history": list(result.history)}
with open(os.path.join(config.out, f"rank{rank}.json"), "w") as f:
    json.dump(out, f)
"""


def test_two_process_ddp_on_cpu(tmp_path: Path, store_factory: Callable[..., Store]) -> None:
    """torchrun, 2 processes, gloo: each study window once per epoch across ranks, one shared validation loss."""
    store = store_factory(lengths=(5, 9, 3, 12, 7, 4, 6, 8, 5, 2, 11))
    out = tmp_path / "ddp"
    config = _config(store, out, "xception_gru", epochs=2, max_len=5, batch_size=2)
    script = tmp_path / "ddp_train.py"
    script.write_text(_DDP_SCRIPT)
    import dataclasses

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    proc = subprocess.run(
        [*cmd, json.dumps(dataclasses.asdict(config))], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    split = read_split(out / "split.json", store.series)
    expected = StudyDataset(store, split.train_series, max_len=5, reader="zarr").windows.tolist()
    assert len(expected) >= 9
    for epoch in range(2):
        seen = [tuple(w) for r in ranks for w in r["seen"][epoch]]
        assert sorted(seen) == sorted(map(tuple, expected))  # every window once, across ranks
        assert not set(map(tuple, ranks[0]["seen"][epoch])) & set(map(tuple, ranks[1]["seen"][epoch]))
        assert ranks[0]["history"][epoch]["val_loss"] == ranks[1]["history"][epoch]["val_loss"]
        assert ranks[0]["history"][epoch]["train_slices"] == int(
            store.series["n_slices"].iloc[split.train_series].sum()
        )
    assert json.loads((out / "config.json").read_text())["world_size"] == 2

    # the validation loss reduced over ranks is the metric of the saved weights on all held-out slices
    net, _ = load_model(out / "last.pt")
    probs = [predict_study(net, store.read_series(s), max_len=5) for s in split.val_series.tolist()]
    labels = [store.labels[slice(*store.series_rows(s))] for s in split.val_series.tolist()]
    assert ranks[0]["history"][1]["val_loss"] == pytest.approx(
        weighted_log_loss(np.concatenate(labels), np.concatenate(probs)), rel=1e-5
    )


def test_cli_train_and_its_errors(
    tmp_path: Path, tiny_store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["train", str(tiny_store.path), "--out", str(out), "--backbone", BACKBONE, "--max-len", "6"]
    args += ["--epochs", "1", "--workers", "0", "--device", "cpu", "--quiet", "--batch-size", "3"]
    assert (
        main([*args, "--model", "xception_lstm", "--bidirectional", "--accum", "2", "--rnn-hidden", "16"])
        == 0
    )
    assert "best epoch 1: val loss" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert (config["model"], config["bidirectional"], config["accum"], config["batch_size"]) == (
        "xception_lstm",
        True,
        2,
        3,
    )
    net, _ = load_model(out / "best.pt")
    assert isinstance(net, SequenceClassifier)
    assert net.rnn.bidirectional
    assert (net.rnn.hidden_size, net.rnn.num_layers) == (16, 2)
    assert main([*args, "--model", "xception_lstm"]) == 2
    assert "holds a run already (last.pt); use --resume or another --out" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "new"), "--resume"]) == 2
    assert "last.pt does not exist; start without --resume" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "x"), "--backbone", "nope_net"]) == 2
    assert "'nope_net' is not a timm model name" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "y")]) == 2
    assert "not an ich store" in capsys.readouterr().err

    # a split file from one run is reused by another
    assert (
        main(
            [
                *args,
                "--out",
                str(tmp_path / "again"),
                "--split",
                str(out / "split.json"),
                "--model",
                "xception",
            ]
        )
        == 0
    )
    a = json.loads((out / "split.json").read_text())
    b = json.loads((tmp_path / "again" / "split.json").read_text())
    assert a["val_patients"] == b["val_patients"]
    assert open_store(tiny_store.path).n_series == len(a["train_series"]) + len(a["val_series"])


def test_resume_with_dataloader_workers_equals_uninterrupted_training(
    tmp_path: Path, tiny_store: Store
) -> None:
    """Persistent workers start once per invocation; a resumed run must not draw differently for it."""
    kw: dict[str, Any] = {"epochs": 2, "workers": 2, "warmup": 0.3}
    train(_config(tiny_store, tmp_path / "full", **kw))
    train(_config(tiny_store, tmp_path / "part", stop_after=1, **kw))
    train(_config(tiny_store, tmp_path / "part", resume=True, **kw))
    a = read_checkpoint(tmp_path / "full" / "last.pt")
    b = read_checkpoint(tmp_path / "part" / "last.pt")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 2 * 3)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert a["val_loss"] == b["val_loss"]


def test_train_refuses_a_store_without_labels_before_any_epoch(
    tmp_path: Path, store_factory: Callable[..., Store], capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 11 item 9: an unlabelled store used to train a full epoch to loss 0.0 / inf and exit 0."""
    unlabelled = store_factory("unlabelled.zarr", unlabelled_series=range(8))
    out = tmp_path / "run"
    argv = ["train", str(unlabelled.path), "--out", str(out), "--backbone", BACKBONE, "--epochs", "1"]
    assert main([*argv, "--device", "cpu", "--workers", "0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ich: error: ")
    assert "the training split has no labelled slice" in err
    assert len(err.strip().splitlines()) == 1
    assert not (out / "best.pt").exists()
    assert not (out / "last.pt").exists()


def test_train_names_the_classes_it_cannot_learn(
    tmp_path: Path, store_factory: Callable[..., Store], capsys: pytest.CaptureFixture[str]
) -> None:
    store = store_factory("no_epidural.zarr")
    store.labels[:, 0] = 0  # written below: no epidural positive anywhere
    import zarr

    zarr.open_array(store.path / "labels", mode="r+")[:] = store.labels
    train(_config(open_store(store.path), tmp_path / "run", "xception", batch_size=8, max_len=4))
    err = capsys.readouterr().err
    assert "warning: no positive slice of epidural among the" in err


@pytest.mark.slow
def test_torchrun_no_python_ich_train_is_ddp(tmp_path: Path, tiny_store: Store) -> None:
    """The README's DDP command: torchrun starts the `ich` console script itself, no module named."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = tmp_path / "ddp"
    cmd = [str(bin_dir / "torchrun"), "--nproc-per-node", "2", "--no-python", "ich", "train"]
    cmd += [str(tiny_store.path), "--out", str(out), "--backbone", BACKBONE, "--epochs", "1"]
    cmd += ["--batch-size", "2", "--max-len", "6", "--workers", "0", "--device", "cpu", "--quiet"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert (out / "best.pt").is_file()
    assert result.stdout.count("best epoch 1:") == 1  # rank 0 reports, once


def _cli_args(store: Store, out: Path) -> list[str]:
    args = ["train", str(store.path), "--out", str(out), "--backbone", BACKBONE, "--max-len", "6"]
    args += ["--epochs", "2", "--workers", "0", "--device", "cpu", "--quiet", "--batch-size", "2"]
    return [*args, "--rnn-hidden", "8", "--rnn-layers", "1"]


def _one_line(err: str) -> str:
    assert err.startswith("ich: error: "), err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("name", ["split.json", "config.json", "log.csv", "best.pt", "last.pt"])
def test_a_full_disk_in_a_new_run_is_one_line_naming_the_file(
    tmp_path: Path,
    tiny_store: Store,
    full_disk: Callable[[str], None],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
) -> None:
    out = tmp_path / "run"
    args = _cli_args(tiny_store, out)
    full_disk(name)
    assert main([*args, "--stop-after", "1"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"{out / name}: no space left on device; free some space, then run the same command again" in err
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert not (out / "last.pt").exists()
    monkeypatch.undo()  # space again: the same command runs
    assert main([*args, "--stop-after", "1"]) == 0
    assert [r["epoch"] for r in read_log(out / "log.csv")] == [1]


@pytest.mark.parametrize("name", ["split.json", "config.json", "log.csv", "last.pt"])
def test_a_full_disk_in_a_resumed_run_keeps_the_last_epoch_saved(
    tmp_path: Path,
    tiny_store: Store,
    full_disk: Callable[[str], None],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
) -> None:
    out = tmp_path / "run"
    args = _cli_args(tiny_store, out)
    assert main([*args, "--stop-after", "1"]) == 0
    saved = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    full_disk(name)
    assert main([*args, "--resume"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"{out / name}: no space left on device; free some space, then continue with --resume" in err
    assert sorted(p.name for p in out.iterdir()) == sorted(saved)  # no temporary file left behind
    assert (out / name).read_bytes() == saved[name]
    assert (out / "last.pt").read_bytes() == saved["last.pt"]  # what --resume continues from
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0
    assert [r["epoch"] for r in read_log(out / "log.csv")] == [1, 2]
    assert read_checkpoint(out / "last.pt")["epoch"] == 2
