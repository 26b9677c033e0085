"""Checkpoints load without running code, and a damaged or foreign one is one line naming the file."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from flows.cli import main
from ichdata.errors import UserError
from ichdata.store import Store
from ichdata.testing import stored_from_hu, write_ct_slice
from ichmodel.checkpoint import read_checkpoint, save_checkpoint
from ichmodel.config import TrainConfig
from ichmodel.models import create_model, load_model
from ichmodel.train import train

BACKBONE = "test_efficientnet"
CLASSES = ["epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"]


class _Payload:
    """Unpickling this creates the file `marker`: what a malicious checkpoint would do, harmlessly."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def _malicious(path: Path, marker: Path) -> Path:
    """A `torch.save` checkpoint that looks like ours and runs code when unpickled."""
    kwargs = {"name": "xception", "backbone": BACKBONE}
    state = create_model("xception", backbone=BACKBONE).state_dict()
    tree = {
        "format": "ich-checkpoint",
        "version": 1,
        "model": kwargs,
        "state_dict": state,
        "x": _Payload(marker),
    }
    torch.save(tree, path, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    return path


def _valid(path: Path, **model: object) -> Path:
    torch.manual_seed(0)
    kwargs = {"name": "xception_gru", "backbone": BACKBONE, "rnn_hidden": 8, "rnn_layers": 1}
    state = create_model("xception_gru", backbone=BACKBONE, rnn_hidden=8, rnn_layers=1).state_dict()
    save_checkpoint(
        {"model": {**kwargs, **model}, "state_dict": state, "classes": CLASSES, "max_len": 3}, path
    )
    return path


def _config(store: Store, out: Path, **kw: object) -> TrainConfig:
    base: dict[str, object] = {"backbone": BACKBONE, "epochs": 1, "batch_size": 2, "max_len": 6}
    base.update(workers=0, val_fraction=0.25, progress=False, device="cpu", rnn_hidden=8, rnn_layers=1)
    base.update(kw)
    return TrainConfig(store=str(store.path), out=str(out), **base)  # type: ignore[arg-type]


def _dicom_folder(path: Path) -> Path:
    path.mkdir()
    hu = torch.full((64, 64), 30.0).numpy()
    write_ct_slice(
        path / "a.dcm",
        stored_from_hu(hu),
        image_id="ID_000000001",
        study_uid="1.2.9",
        series_uid="1.2.9.1",
        patient_id="P",
        image_position=(0.0, 0.0, 0.0),
    )
    return path


def _predict_args(checkpoint: Path, tmp_path: Path, store: Path) -> list[str]:
    """`ich predict` of `checkpoint` on a small DICOM folder, keeping its store at `store`."""
    src = _dicom_folder(tmp_path / "dicom")
    return [
        "predict",
        str(checkpoint),
        str(src),
        "--out",
        str(tmp_path / "p.csv"),
        "--store",
        str(store),
        "--quiet",
    ]


def test_a_malicious_checkpoint_runs_nothing_at_any_entry_point(
    tmp_path: Path, tiny_store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    evil = _malicious(tmp_path / "evil.pt", marker)

    # evaluate (and anything else) loads through load_model
    with pytest.raises(UserError, match=rf"checkpoint {evil}: .*pickle"):
        load_model(evil)
    assert not marker.exists()

    # predict refuses before converting anything
    store = tmp_path / "kept.zarr"
    assert main(_predict_args(evil, tmp_path, store)) == 2
    err = capsys.readouterr().err
    assert str(evil) in err
    assert len(err.strip().splitlines()) == 1
    assert not store.exists()
    assert not marker.exists()

    # --init-backbone
    with pytest.raises(UserError, match=rf"--init-backbone {evil}: .*pickle"):
        train(_config(tiny_store, tmp_path / "init", model="xception", init_backbone=str(evil)))
    assert not marker.exists()

    # --resume from a last.pt someone swapped
    run = tmp_path / "run"
    run.mkdir()
    _malicious(run / "last.pt", marker)
    with pytest.raises(UserError, match=r"--resume: .*last\.pt: .*pickle"):
        train(_config(tiny_store, run, resume=True))
    assert not marker.exists()


def test_a_checkpoint_round_trips_its_tree(tmp_path: Path) -> None:
    tree = {
        "model": {"name": "xception", "backbone": BACKBONE},
        "state_dict": {"w": torch.arange(6.0).view(2, 3), "n": torch.tensor(3)},
        "optimizer": {"state": {0: {"step": torch.tensor(2.0)}}, "param_groups": [{"betas": (0.9, 0.999)}]},
        "rng": [{"python": (3, (1, 2, 3), None), "torch": torch.zeros(4, dtype=torch.uint8)}],
        "val_loss": float("nan"),
        "best_val_loss": float("inf"),
    }
    save_checkpoint(tree, tmp_path / "c.pt")
    back = read_checkpoint(tmp_path / "c.pt")
    assert back["format"] == "ich-checkpoint"
    assert torch.equal(back["state_dict"]["w"], tree["state_dict"]["w"])  # type: ignore[index]
    assert back["optimizer"]["state"][0]["step"].item() == 2.0
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert back["rng"][0]["python"] == (3, (1, 2, 3), None)
    assert back["best_val_loss"] == float("inf")


def _flip_weight_bytes(path: Path, tensor: str, n: int = 64) -> None:
    """Flip `n` bytes inside the stored data of `tensor`, leaving the file's structure intact."""
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start, _ = json.loads(data[8 : 8 + header_len])[tensor]["data_offsets"]
    base = 8 + header_len + start
    for i in range(base, base + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        pytest.param(lambda p: p.write_bytes(b""), "empty", id="empty"),
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[:-1000]), "damaged", id="truncated"),
        pytest.param(lambda p: p.write_bytes(b"\0" * 64), "damaged", id="zeros"),
        pytest.param(lambda p: _flip_weight_bytes(p, "/state_dict/fc.weight"), "checksum", id="flipped"),
    ],
)
def test_a_damaged_checkpoint_is_one_line_naming_the_file(
    tmp_path: Path, damage: Callable[[Path], object], message: str
) -> None:
    ckpt = _valid(tmp_path / "best.pt")
    load_model(ckpt)  # intact: loads
    damage(ckpt)
    with pytest.raises(UserError, match=rf"checkpoint {ckpt}: .*{message}") as err:
        load_model(ckpt)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        pytest.param({"name": "xception_foo"}, "'xception_foo' is not one of", id="name"),
        pytest.param({"backbone": "test_resnet"}, "do not fit", id="backbone"),
        pytest.param({"rnn_hidden": 16}, "do not fit", id="shape"),
    ],
)
def test_metadata_that_does_not_fit_the_weights_is_refused(
    tmp_path: Path, model: dict[str, object], message: str
) -> None:
    ckpt = _valid(tmp_path / "best.pt", **model)
    with pytest.raises(UserError, match=rf"checkpoint {ckpt}: .*{message}") as err:
        load_model(ckpt)
    assert "\n" not in str(err.value)


def test_predict_and_resume_refuse_a_damaged_checkpoint_before_any_work(
    tmp_path: Path, tiny_store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _valid(tmp_path / "best.pt", backbone="test_resnet")
    store = tmp_path / "kept.zarr"
    args = _predict_args(ckpt, tmp_path, store)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {ckpt}: " in err
    assert len(err.strip().splitlines()) == 1
    assert not store.exists()

    run = tmp_path / "run"
    train(_config(tiny_store, run, stop_after=1, epochs=2))
    last = run / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(UserError, match=rf"--resume: {last}: .*damaged"):
        train(_config(tiny_store, run, resume=True, epochs=2))
