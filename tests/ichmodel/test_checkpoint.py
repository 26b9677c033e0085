"""Checkpoints load without running code, and a damaged or foreign one is one line naming the file."""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

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


# --- a valid checksum, a tree ich did not write ---------------------------------------------------


class _NoNetwork:
    """Every way loading could reach the network or a file a checkpoint names, made to fail loudly.

    Each attempt is recorded (and raises), so a test asserts that none was made.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import socket

        import timm.models
        import timm.models._factory

        self.calls: list[str] = []
        for owner, name in (
            (socket.socket, "connect"),
            (socket, "create_connection"),
            (socket, "getaddrinfo"),
            (timm.models._factory, "load_model_config_from_hf"),
            (timm.models._factory, "load_model_config_from_path"),
            (timm.models, "load_state_dict"),  # what `--weights FILE` reads the file with
        ):
            monkeypatch.setattr(owner, name, self._recorder(f"{getattr(owner, '__name__', owner)}.{name}"))

    def _recorder(self, what: str) -> Callable[..., object]:
        def refuse(*args: object, **kwargs: object) -> object:
            self.calls.append(what)
            raise OSError(f"test: {what} is not allowed")

        return refuse


@pytest.fixture(scope="module")
def trained(module_store: Store, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A store and a run directory after one of two epochs: the last.pt every case below alters."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(_config(module_store, run, stop_after=1, epochs=2))
    return module_store.path, run


def _train_args(store: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        str(store),
        "--out",
        str(out),
        "--backbone",
        BACKBONE,
        "--epochs",
        "2",
        "--batch-size",
        "2",
        "--max-len",
        "6",
        "--workers",
        "0",
        "--val-fraction",
        "0.25",
        "--device",
        "cpu",
        "--rnn-hidden",
        "8",
        "--rnn-layers",
        "1",
        "--quiet",
        *extra,
    ]


def _first_encoder_weight(tree: dict[str, Any]) -> str:
    return next(k for k in tree["state_dict"] if k.startswith("encoder.") and tree["state_dict"][k].ndim)


def _set(entry: str, value: object) -> Callable[[dict[str, Any]], None]:
    """A change to the tree: `model.x` sets an entry of the model's arguments, `x` one of the tree."""

    def change(tree: dict[str, Any]) -> None:
        if entry.startswith("model."):
            tree["model"][entry[len("model.") :]] = value
        else:
            tree[entry] = value

    return change


def _reshape_encoder_weight(tree: dict[str, Any]) -> None:
    tree["state_dict"][_first_encoder_weight(tree)] = torch.zeros(3)


def _list_for_a_weight(tree: dict[str, Any]) -> None:
    tree["state_dict"][_first_encoder_weight(tree)] = [0.0, 1.0]


def _drop(entry: str) -> Callable[[dict[str, Any]], None]:
    return lambda tree: tree.pop(entry)


#: (change, what the message says). Each is saved with `save_checkpoint`: the checksum is valid.
MALFORMED = [
    # the item 6: metadata that would make timm download, or read a file the checkpoint names
    pytest.param(
        _set("model.backbone", "hf-hub:timm/test_efficientnet.r160_in1k"), "not a timm model name", id="hub"
    ),
    pytest.param(_set("model.backbone", "timm/test_efficientnet"), "not a timm model name", id="hub-repo"),
    pytest.param(_set("model.backbone", "local-dir:/etc"), "not a timm model name", id="local-dir"),
    pytest.param(_set("model.pretrained", True), "'pretrained' is not one ich records", id="pretrained"),
    pytest.param(_set("model.weights", "/etc/passwd"), "'weights' is not one ich records", id="weights"),
    # wrong types and values of what ich records
    pytest.param(_set("model.rnn_hidden", "8"), "'rnn_hidden' is a str", id="rnn-hidden-str"),
    pytest.param(_set("model.rnn_layers", 0), "'rnn_layers' is out of range", id="rnn-layers-0"),
    pytest.param(_set("model.bidirectional", 1), "'bidirectional' is a int", id="bidirectional-int"),
    pytest.param(_set("model.num_classes", True), "'num_classes' is a bool", id="num-classes-bool"),
    pytest.param(_set("classes", "epidural"), "'classes' is a str", id="classes-str"),
    pytest.param(_set("classes", [1, 2, 3, 4, 5, 6]), "'classes' is a list, expected", id="classes-ints"),
    pytest.param(_set("classes", CLASSES[:5]), "5 classes for a model with 6 outputs", id="classes-count"),
    pytest.param(_set("max_len", "6"), "'max_len' is a str", id="max-len-str"),
    pytest.param(_set("max_len", 0), "'max_len' is a int, expected", id="max-len-0"),
    pytest.param(_set("epoch", 1.5), "'epoch' is a float", id="epoch-float"),
    pytest.param(_set("config", ["x"]), "'config' is a list", id="config-list"),
    pytest.param(_list_for_a_weight, "not a tensor", id="weight-list"),
    pytest.param(_reshape_encoder_weight, "do not fit", id="weight-shape"),
]


def _altered(trained: tuple[Path, Path], tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of the trained run whose last.pt (and best.pt) hold the changed tree."""
    run = tmp_path / "run"
    shutil.copytree(trained[1], run)
    tree = read_checkpoint(run / "last.pt")
    tree["config"]["out"] = str(run.absolute())  # the copy is the run being resumed
    change(tree)
    save_checkpoint(tree, run / "last.pt")
    save_checkpoint(tree, run / "best.pt")
    return run


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], names: Path) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ich: error: "), err
    assert len(err.strip().splitlines()) == 1, err
    assert str(names) in err
    return err


@pytest.mark.parametrize(("change", "message"), MALFORMED)
def test_a_malformed_tree_is_one_line_at_every_entry_point(
    tmp_path: Path,
    trained: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    change: Callable[[dict[str, Any]], None],
    message: str,
) -> None:
    store, _ = trained
    run = _altered(trained, tmp_path, change)
    last, best = run / "last.pt", run / "best.pt"
    guard = _NoNetwork(monkeypatch)

    with pytest.raises(UserError, match=rf"checkpoint {best}: .*{message}") as exc:
        load_model(best)
    assert "\n" not in str(exc.value)

    kept = tmp_path / "kept.zarr"
    _one_line_error(capsys, _predict_args(best, tmp_path, kept), best)
    assert not kept.exists()  # refused before converting anything

    report = tmp_path / "report"
    _one_line_error(capsys, ["evaluate", str(run), "--store", str(store), "--out", str(report)], best)
    assert not report.exists()

    init = tmp_path / "init"
    err = _one_line_error(capsys, _train_args(store, init, "--init-backbone", str(best)), best)
    assert "--init-backbone" in err
    assert not (init / "last.pt").exists()

    before = last.read_bytes()
    err = _one_line_error(capsys, _train_args(store, run, "--resume"), last)
    assert "--resume" in err
    assert last.read_bytes() == before  # no epoch was trained over it

    assert guard.calls == []


def _drop_param_groups(tree: dict[str, Any]) -> None:
    tree["optimizer"]["param_groups"] = []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(_drop("optimizer"), "holds no optimizer", id="no-optimizer"),
        pytest.param(_drop("config"), "holds no config", id="no-config"),
        pytest.param(_set("rng", []), "training state does not fit", id="no-rng-of-this-rank"),
        pytest.param(_set("rng", [{"python": 3}]), "training state does not fit", id="rng-malformed"),
        pytest.param(_drop_param_groups, "training state does not fit", id="optimizer-groups"),
        pytest.param(_set("scheduler", []), "'scheduler' is a list", id="scheduler-list"),
    ],
)
def test_resume_refuses_a_malformed_training_state_in_one_line(
    tmp_path: Path,
    trained: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    change: Callable[[dict[str, Any]], None],
    message: str,
) -> None:
    store, _ = trained
    run = _altered(trained, tmp_path, change)
    before = (run / "last.pt").read_bytes()
    err = _one_line_error(capsys, _train_args(store, run, "--resume"), run / "last.pt")
    assert message in err
    assert (run / "last.pt").read_bytes() == before


def test_a_plain_name_with_a_pretrained_tag_loads_without_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tag selects the backbone's input normalisation; loading still builds it with pretrained=False."""
    ckpt = _valid(tmp_path / "best.pt", backbone=f"{BACKBONE}.r160_in1k")
    guard = _NoNetwork(monkeypatch)
    model, info = load_model(ckpt)
    assert info["model"]["backbone"] == f"{BACKBONE}.r160_in1k"
    mean = cast(torch.Tensor, model.encoder.mean)
    assert torch.allclose(mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    assert guard.calls == []


def test_metadata_that_names_a_missing_tensor_is_one_line(tmp_path: Path) -> None:
    """JSON that `save_checkpoint` never writes (a reference to no tensor), with a valid checksum."""
    from safetensors.torch import save

    from ichmodel.checkpoint import _digest

    tree = {
        "format": "ich-checkpoint",
        "version": 2,
        "model": {"name": "xception", "backbone": BACKBONE},
        "state_dict": {"w": {"__tensor__": "nowhere"}},
    }
    tensors = {"/x": torch.zeros(1)}
    tree_json = json.dumps(tree)
    path = tmp_path / "odd.pt"
    path.write_bytes(save(tensors, metadata={"ich": tree_json, "sha256": _digest(tree_json, tensors)}))
    with pytest.raises(UserError, match=rf"checkpoint {path}: its metadata is malformed") as exc:
        load_model(path)
    assert "\n" not in str(exc.value)
